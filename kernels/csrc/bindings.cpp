// pybind11 module ssrengine.kernels._packer: the native best-fit-decreasing planner.
// Used by ssrengine.packing.plan_bins; the pure-Python planner there is the fallback and oracle.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <utility>
#include <vector>

#include "packer.hpp"

namespace py = pybind11;

namespace {

// Hand a vector to NumPy without copying: the array owns it through a capsule.
py::array_t<int64_t> to_numpy(std::vector<int64_t>&& v) {
    auto* owned = new std::vector<int64_t>(std::move(v));
    py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
    return py::array_t<int64_t>({static_cast<py::ssize_t>(owned->size())}, owned->data(),
                                free_when_done);
}

py::tuple plan_bins(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths,
                    int64_t max_tokens) {
    if (lengths.ndim() != 1) throw std::invalid_argument("lengths must be one-dimensional");
    const int64_t* data = lengths.data();
    const auto n = static_cast<int64_t>(lengths.size());
    ssr::BinPlan plan;
    {
        py::gil_scoped_release no_gil;  // pure C++ from here on
        plan = ssr::plan_bins(data, n, max_tokens);
    }
    return py::make_tuple(to_numpy(std::move(plan.order)), to_numpy(std::move(plan.offsets)));
}

}  // namespace

PYBIND11_MODULE(_packer, m) {
    m.doc() = "Native best-fit-decreasing sequence packer (see kernels/csrc/packer.hpp).";
    m.def("plan_bins", &plan_bins, py::arg("lengths"), py::arg("max_tokens"),
          "(order, offsets) int64 arrays: bin b holds items order[offsets[b]:offsets[b+1]].");
}
