// The only pybind11 file: thin wrappers that check buffers and release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "attention.h"
#include "check.h"
#include "cone_index.h"

#ifdef EMBGEOM_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using f32_array = py::array_t<float, py::array::c_style>;
using u8_array = py::array_t<uint8_t, py::array::c_style>;

namespace {

const uint8_t* mask_ptr(const std::optional<u8_array>& mask, int64_t B, int64_t T) {
  if (!mask) return nullptr;
  EMBGEOM_CHECK(mask->ndim() == 2 && mask->shape(0) == B && mask->shape(1) == T,
                "mask: expected shape (" << B << ", " << T << ")");
  return mask->data();
}

py::tuple cone_unit_sums(const f32_array& x, const std::optional<u8_array>& mask) {
  EMBGEOM_CHECK(x.ndim() == 3, "x: expected (B, T, D), got " << x.ndim() << " dims");
  const int64_t B = x.shape(0), T = x.shape(1), D = x.shape(2);
  const uint8_t* m = mask_ptr(mask, B, T);
  py::array_t<double> sums({B, D});
  py::array_t<int64_t> used(B), zero(B);
  {
    py::gil_scoped_release release;
    embgeom::cone_unit_sums(x.data(), B, T, D, m, sums.mutable_data(), used.mutable_data(),
                            zero.mutable_data());
  }
  return py::make_tuple(sums, used, zero);
}

f32_array attention_row_entropy(const f32_array& p, const std::optional<u8_array>& mask,
                                double smoothing) {
  EMBGEOM_CHECK(p.ndim() == 4 && p.shape(2) == p.shape(3),
                "attn: expected (B, H, T, T), got " << p.ndim() << " dims");
  const int64_t B = p.shape(0), H = p.shape(1), T = p.shape(2);
  const uint8_t* m = mask_ptr(mask, B, T);
  f32_array out({B, H, T});
  {
    py::gil_scoped_release release;
    embgeom::attention_row_entropy(p.data(), B, H, T, m, smoothing, out.mutable_data());
  }
  return out;
}

int max_threads() {
#ifdef EMBGEOM_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "embgeom C++ core (CPU kernels, OpenMP)";
  m.def("cone_unit_sums", &cone_unit_sums, py::arg("x"), py::arg("mask") = py::none(),
        "Sum of unit vectors per set: x (B, T, D) float32, mask (B, T) uint8 -> "
        "(sums (B, D) float64, used (B,) int64, zero_rows (B,) int64)");
  m.def("attention_row_entropy", &attention_row_entropy, py::arg("attn"),
        py::arg("mask") = py::none(), py::arg("smoothing") = 0.0,
        "Row entropy in nats: attn (B, H, T, T) float32, mask (B, T) uint8 -> (B, H, T) float32");
  m.def("max_threads", &max_threads, "OpenMP threads the kernels use");
  m.attr("openmp") = py::bool_(
#ifdef EMBGEOM_OPENMP
      true
#else
      false
#endif
  );

  // BEGIN pairwise engine bindings (owned by engine author)
  // END pairwise engine bindings
}
