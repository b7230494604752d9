// Best-fit-decreasing bin packing of sequence lengths into bins of `capacity` tokens.
//
// The same algorithm as ssrengine/packing.py::_plan_bins_python, step for step, so both
// produce identical bins (checked by a hypothesis property test):
//
//   1. Visit items by decreasing length; equal lengths by increasing index.
//   2. Put the item into the open bin with the smallest remaining space r >= length.
//      Bins with equal r form a LIFO stack: the bin that reached r most recently wins.
//      No such bin: open a new one (bins are numbered in opening order).
//   3. The bin's new remaining space r - length is pushed on that stack (r - length = 0:
//      the bin is full and never looked at again).
//
// Output (CSR): bin b holds items order[offsets[b] : offsets[b+1]], in placement order.
// Cost: O(n + capacity) for the counting sort, O(capacity / 64^2) per item to find the bin.
#pragma once

#include <cstdint>
#include <vector>

namespace ssr {

struct BinPlan {
    std::vector<int64_t> order;    // item indices, grouped by bin
    std::vector<int64_t> offsets;  // (num_bins + 1) boundaries into `order`
};

// Throws std::invalid_argument unless capacity >= 1 and 1 <= lengths[i] <= capacity.
BinPlan plan_bins(const int64_t* lengths, int64_t n, int64_t capacity);

}  // namespace ssr
