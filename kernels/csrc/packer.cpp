// Best-fit-decreasing packer; the algorithm and its tie-breaking are specified in packer.hpp.
#include "packer.hpp"

#include <climits>
#include <stdexcept>
#include <string>

#if defined(_MSC_VER)
#include <intrin.h>
#endif

namespace ssr {
namespace {

// Index of the lowest set bit of a non-zero word.
inline int ctz64(uint64_t x) {
#if defined(_MSC_VER)
    unsigned long i;
    _BitScanForward64(&i, x);
    return static_cast<int>(i);
#else
    return __builtin_ctzll(x);
#endif
}

inline uint64_t bit(uint64_t i) { return uint64_t{1} << i; }

// The set of remaining-space values r in [0, size) that have at least one open bin.
// Two levels of 64-bit words: bit r of `words_`, and bit w of `summary_` iff words_[w] != 0.
// "Smallest member >= x" reads one word, then scans the summary (size / 4096 words: one word
// for bins of up to 4096 tokens).
class RemainderSet {
  public:
    explicit RemainderSet(int64_t size)
        : words_((size + 63) / 64, 0), summary_((words_.size() + 63) / 64, 0) {}

    void insert(int64_t r) {
        const size_t w = static_cast<size_t>(r) >> 6;
        if (words_[w] == 0) summary_[w >> 6] |= bit(w & 63);
        words_[w] |= bit(r & 63);
    }

    void erase(int64_t r) {
        const size_t w = static_cast<size_t>(r) >> 6;
        words_[w] &= ~bit(r & 63);
        if (words_[w] == 0) summary_[w >> 6] &= ~bit(w & 63);
    }

    // Smallest member >= x, or -1 if there is none.
    int64_t first_at_least(int64_t x) const {
        const size_t w = static_cast<size_t>(x) >> 6;
        if (w >= words_.size()) return -1;
        const uint64_t here = words_[w] & (~uint64_t{0} << (x & 63));
        if (here) return static_cast<int64_t>(w * 64 + ctz64(here));
        // The first non-empty word after w, found through the summary.
        const size_t next = w + 1;
        size_t s = next >> 6;
        if (s >= summary_.size()) return -1;
        uint64_t sbits = summary_[s] & (~uint64_t{0} << (next & 63));
        while (sbits == 0) {
            if (++s >= summary_.size()) return -1;
            sbits = summary_[s];
        }
        const size_t ww = s * 64 + ctz64(sbits);
        return static_cast<int64_t>(ww * 64 + ctz64(words_[ww]));
    }

  private:
    std::vector<uint64_t> words_;
    std::vector<uint64_t> summary_;
};

}  // namespace

BinPlan plan_bins(const int64_t* lengths, int64_t n, int64_t capacity) {
    if (capacity < 1) throw std::invalid_argument("max_tokens must be >= 1");
    if (n > INT32_MAX) throw std::invalid_argument("more than 2^31 - 1 lengths");
    for (int64_t i = 0; i < n; ++i) {
        if (lengths[i] < 1 || lengths[i] > capacity) {
            throw std::invalid_argument("item " + std::to_string(i) + " has length " +
                                        std::to_string(lengths[i]) + ", outside [1, " +
                                        std::to_string(capacity) + "]");
        }
    }
    // Item and bin numbers fit in int32 (checked above): half the memory traffic of int64,
    // which is what the loops below are bound by.

    // 1. Visiting order: a stable counting sort on the key capacity - length, i.e. longest
    //    first and equal lengths by increasing index. Items of key c (length capacity - c)
    //    sit at visit[first[c] : first[c + 1]]. O(n + capacity).
    std::vector<int64_t> first(capacity + 1, 0);
    std::vector<int32_t> visit(n);
    {
        for (int64_t i = 0; i < n; ++i) ++first[capacity - lengths[i] + 1];
        for (int64_t c = 1; c <= capacity; ++c) first[c] += first[c - 1];
        std::vector<int64_t> next(first.begin(), first.end() - 1);
        for (int64_t i = 0; i < n; ++i) {
            visit[next[capacity - lengths[i]]++] = static_cast<int32_t>(i);
        }
    }

    // 2. Best fit. The open bins with remaining space r form a LIFO stack threaded through
    //    `below`: top[r] is the newest, below[b] the bin under b (-1 ends the stack).
    std::vector<int32_t> top(capacity + 1, -1);
    std::vector<int32_t> below;  // per bin
    std::vector<int32_t> count;  // per bin: items placed
    std::vector<int32_t> bin_of(n);  // bin of the k-th visited item
    RemainderSet open(capacity + 1);
    for (int64_t c = 0; c < capacity; ++c) {
        const int64_t len = capacity - c;  // every item of this run has this length
        for (int64_t k = first[c]; k < first[c + 1]; ++k) {
            int64_t r = open.first_at_least(len);
            int32_t b;
            if (r < 0) {  // nothing fits: open a new bin
                b = static_cast<int32_t>(below.size());
                below.push_back(-1);
                count.push_back(0);
                r = capacity;
            } else {  // pop the newest bin with remaining space r
                b = top[r];
                top[r] = below[b];
                if (top[r] < 0) open.erase(r);
            }
            bin_of[k] = b;
            ++count[b];
            r -= len;
            if (r > 0) {  // push b on the stack of its new remaining space
                if (top[r] < 0) open.insert(r);
                below[b] = top[r];
                top[r] = b;
            }
        }
    }

    // 3. CSR output: scatter visited items to their bins; visiting order is placement order.
    const size_t num_bins = count.size();
    BinPlan plan;
    plan.offsets.assign(num_bins + 1, 0);
    for (size_t b = 0; b < num_bins; ++b) plan.offsets[b + 1] = plan.offsets[b] + count[b];
    std::vector<int64_t> fill(plan.offsets.begin(), plan.offsets.end() - 1);
    plan.order.resize(n);
    for (int64_t k = 0; k < n; ++k) plan.order[fill[bin_of[k]]++] = visit[k];
    return plan;
}

}  // namespace ssr
