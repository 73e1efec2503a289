// embgeom._cuda: CUDA kernels where Triton is the weaker tool.
//
// row_topk_merge: merge the fused kernel's per-row candidates into the running per-row top-k
// (or bottom-k) lists, in place. Each row's candidates are a data-dependent, usually tiny
// segment (a few entries after the running thresholds warm up); a sorted insertion with
// per-element branching is natural in CUDA and awkward in Triton's block-tensor model, and it
// replaces three global argsorts + a dense merge in torch.
//
// Interface: raw device pointers and a cudaStream_t as integers, no torch in the build, so the
// module builds with plain nvcc + pybind11 and imports on machines without a GPU (the CUDA
// runtime is linked statically and only touches the driver when a kernel is launched).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "check.h"

namespace py = pybind11;

namespace {

// (va, ia) ranks before (vb, ib): better value first, ties to the smaller column, padding
// (index -1, value NaN) last.
__device__ __forceinline__ bool ranks_before(float va, int64_t ia, float vb, int64_t ib, bool largest) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  if (va != vb) return largest ? (va > vb) : (va < vb);
  return ia < ib;
}

// One thread per row segment. vals/idx: (n_rows, k) row-major, each row sorted by
// ranks_before. Candidates of segment s: [seg_start[s], seg_start[s + 1]) of cand_v/cand_j,
// destined for row seg_rows[s]; a candidate never duplicates a listed (row, column).
__global__ void row_topk_merge_kernel(float* __restrict__ vals, int64_t* __restrict__ idx, int k,
                                      const int64_t* __restrict__ seg_rows,
                                      const int64_t* __restrict__ seg_start, int64_t num_segs,
                                      const float* __restrict__ cand_v,
                                      const int64_t* __restrict__ cand_j, bool largest) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= num_segs) return;
  const int64_t row = seg_rows[s];
  float* v = vals + row * k;
  int64_t* ix = idx + row * k;
  for (int64_t c = seg_start[s]; c < seg_start[s + 1]; ++c) {
    const float cv = cand_v[c];
    const int64_t cj = cand_j[c];
    if (!ranks_before(cv, cj, v[k - 1], ix[k - 1], largest)) continue;
    int p = k - 1;
    while (p > 0 && ranks_before(cv, cj, v[p - 1], ix[p - 1], largest)) {
      v[p] = v[p - 1];
      ix[p] = ix[p - 1];
      --p;
    }
    v[p] = cv;
    ix[p] = cj;
  }
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::ostringstream os;
    os << "embgeom._cuda." << what << ": " << cudaGetErrorString(err);
    throw std::runtime_error(os.str());
  }
}

void row_topk_merge(std::uintptr_t vals, std::uintptr_t idx, int64_t n_rows, int k,
                    std::uintptr_t seg_rows, std::uintptr_t seg_start, int64_t num_segs,
                    std::uintptr_t cand_v, std::uintptr_t cand_j, bool largest, std::uintptr_t stream) {
  EMBGEOM_CHECK(k > 0, "row_topk_merge: k: expected > 0, got " << k);
  EMBGEOM_CHECK(n_rows >= 0, "row_topk_merge: n_rows: expected >= 0, got " << n_rows);
  EMBGEOM_CHECK(num_segs >= 0 && num_segs <= n_rows,
                "row_topk_merge: num_segs: expected 0 <= num_segs <= n_rows = " << n_rows << ", got " << num_segs);
  EMBGEOM_CHECK(vals != 0 && idx != 0, "row_topk_merge: vals/idx: null device pointer");
  if (num_segs == 0) return;
  EMBGEOM_CHECK(seg_rows != 0 && seg_start != 0 && cand_v != 0 && cand_j != 0,
                "row_topk_merge: seg_rows/seg_start/cand_v/cand_j: null device pointer");
  const int threads = 128;
  const int64_t blocks = (num_segs + threads - 1) / threads;
  EMBGEOM_CHECK(blocks <= 0x7FFFFFFF, "row_topk_merge: num_segs too large: " << num_segs);
  row_topk_merge_kernel<<<static_cast<unsigned>(blocks), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<float*>(vals), reinterpret_cast<int64_t*>(idx), k,
      reinterpret_cast<const int64_t*>(seg_rows), reinterpret_cast<const int64_t*>(seg_start), num_segs,
      reinterpret_cast<const float*>(cand_v), reinterpret_cast<const int64_t*>(cand_j), largest);
  check_cuda(cudaGetLastError(), "row_topk_merge");
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device/driver" error
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "embgeom CUDA kernels: device pointers + stream in, no torch";
  m.def("row_topk_merge", &row_topk_merge, py::arg("vals"), py::arg("idx"), py::arg("n_rows"), py::arg("k"),
        py::arg("seg_rows"), py::arg("seg_start"), py::arg("num_segs"), py::arg("cand_v"), py::arg("cand_j"),
        py::arg("largest"), py::arg("stream"),
        "Merge candidates (sorted by row into segments) into per-row top-k lists in place.\n"
        "vals: (n_rows, k) float32, idx: (n_rows, k) int64, seg_rows: (S,) int64,\n"
        "seg_start: (S + 1,) int64, cand_v: float32, cand_j: int64; all device pointers.");
  m.def("device_count", &device_count, "CUDA devices visible to the runtime (0 without a driver/GPU)");
  m.attr("cuda_runtime_version") = CUDART_VERSION;
}
