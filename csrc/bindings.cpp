// The only pybind11 file: thin wrappers that check buffers and release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>

#include <cstdlib>
#include <unistd.h>  // access

#include "attention.h"
#include "attention_sums.h"
#include "check.h"
#include "cone_index.h"
#include "context.h"
#include "pair_values.h"
#include "eigvals.h"
#include "sym_counts.h"
#include "row_pairs.h"
#include "index_search.h"
#include "rows_dot.h"
#include "value_histogram.h"
#include "cpu/blas.h"
#include "cpu/isa.h"
#include "numerics.h"
#include "pairwise/engine.h"

#ifdef EMBGEOM_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using f32_array = py::array_t<float, py::array::c_style>;
using u8_array = py::array_t<uint8_t, py::array::c_style>;

namespace {

const uint8_t* mask_data(const u8_array& mask, int64_t B, int64_t T) {
  EMBGEOM_CHECK(mask.ndim() == 2 && mask.shape(0) == B && mask.shape(1) == T,
                "mask: expected shape (" << B << ", " << T << ")");
  return mask.data();
}

const uint8_t* mask_ptr(const std::optional<u8_array>& mask, int64_t B, int64_t T) {
  return mask ? mask_data(*mask, B, T) : nullptr;
}

// (B, H, T) of attention maps p (B, H, T, T)
struct MapDims {
  int64_t B, H, T;
};
MapDims map_dims(const f32_array& p) {
  EMBGEOM_CHECK(p.ndim() == 4 && p.shape(2) == p.shape(3), "attn: expected (B, H, T, T), got " << p.ndim() << " dims");
  return {p.shape(0), p.shape(1), p.shape(2)};
}

// x (B, T, D) or (G, B, T, D) float32, any strides but D's (contiguous): read in place
py::tuple cone_unit_sums(const py::array_t<float>& x, const std::optional<u8_array>& mask) {
  EMBGEOM_CHECK(x.ndim() == 3 || x.ndim() == 4, "x: expected (B, T, D) or (G, B, T, D), got " << x.ndim() << " dims");
  const int lead = int(x.ndim()) - 3;
  const int64_t G = lead ? x.shape(0) : 1, B = x.shape(lead), T = x.shape(lead + 1), D = x.shape(lead + 2);
  const int64_t f = sizeof(float);
  py::array_t<double> sums({G * B, D});
  py::array_t<int64_t> used(G * B), zero(G * B);
  if (x.size() == 0) {  // no vectors (an empty batch, sequence or chunk): nothing summed, whatever the strides
    const uint8_t* m = mask_ptr(mask, B, T);  // (its shape checked all the same)
    std::fill_n(sums.mutable_data(), sums.size(), 0.0);
    std::fill_n(used.mutable_data(), used.size(), int64_t(0));
    // D = 0: every valid row is a zero vector
    int64_t* zero_out = zero.mutable_data();
    for (int64_t b = 0; b < B; ++b) {
      int64_t valid = 0;
      if (D == 0)
        for (int64_t t = 0; t < T; ++t) valid += !m || m[b * T + t];
      for (int64_t g = 0; g < G; ++g) zero_out[g * B + b] = valid;
    }
    return py::make_tuple(sums, used, zero);
  }
  EMBGEOM_CHECK((D <= 1 || x.strides(lead + 2) == f) && x.strides(lead) % f == 0 && x.strides(lead + 1) % f == 0 &&
                    (!lead || x.strides(0) % f == 0),
                "x: the last dimension must be contiguous");
  const int64_t sg = lead ? x.strides(0) / f : 0, sb = x.strides(lead) / f, st = x.strides(lead + 1) / f;
  const uint8_t* m = mask_ptr(mask, B, T);
  {
    py::gil_scoped_release release;
    embgeom::cone_unit_sums(x.data(), G, B, T, D, sg, sb, st, m, sums.mutable_data(), used.mutable_data(),
                            zero.mutable_data());
  }
  return py::make_tuple(sums, used, zero);
}

f32_array attention_row_entropy(const f32_array& p, const std::optional<u8_array>& mask,
                                double smoothing) {
  const auto [B, H, T] = map_dims(p);
  const uint8_t* m = mask_ptr(mask, B, T);
  f32_array out({B, H, T});
  {
    py::gil_scoped_release release;
    embgeom::attention_row_entropy(p.data(), B, H, T, m, smoothing, out.mutable_data());
  }
  return out;
}

using i64_array = py::array_t<int64_t, py::array::c_style>;

py::tuple context_summaries(const i64_array& j, const u8_array& mask, const u8_array& sep, const i64_array& ids,
                            const std::optional<i64_array>& sentence, const std::optional<u8_array>& stop) {
  EMBGEOM_CHECK(j.ndim() == 3, "j: expected (B, H, T) int64, got " << j.ndim() << " dims");
  const int64_t B = j.shape(0), H = j.shape(1), T = j.shape(2);
  auto bt = [&](const py::array& a, const char* name) {
    EMBGEOM_CHECK(a.ndim() == 2 && a.shape(0) == B && a.shape(1) == T, name << ": expected (" << B << ", " << T << ")");
  };
  bt(mask, "mask");
  bt(sep, "sep");
  bt(ids, "ids");
  if (sentence) bt(*sentence, "sentence");
  if (stop) bt(*stop, "stop");
  py::array_t<int64_t> counts({int64_t(6), H}), hist({H, T}), focus({B, H});
  {
    py::gil_scoped_release release;
    embgeom::context_summaries(j.data(), B, H, T, mask.data(), sep.data(), ids.data(),
                               sentence ? sentence->data() : nullptr, stop ? stop->data() : nullptr,
                               counts.mutable_data(), hist.mutable_data(), focus.mutable_data());
  }
  return py::make_tuple(counts, hist, focus);
}

py::array_t<int64_t> context_argmax(const py::array_t<float>& o, const std::optional<u8_array>& mask) {
  EMBGEOM_CHECK(o.ndim() == 4, "head_out: expected (B, H, T, d), got " << o.ndim() << " dims");
  const int64_t B = o.shape(0), H = o.shape(1), T = o.shape(2), d = o.shape(3);
  const int64_t f = sizeof(float);
  const uint8_t* m = mask_ptr(mask, B, T);
  py::array_t<int64_t> out({B, H, T});
  if (out.size() == 0) return out;  // (numpy gives empty arrays strides of 0)
  EMBGEOM_CHECK((d <= 1 || o.strides(3) == f) && o.strides(0) % f == 0 && o.strides(1) % f == 0 &&
                    o.strides(2) % f == 0,
                "head_out: expected contiguous rows of d floats (any strides across b, h, t)");
  {
    py::gil_scoped_release release;
    embgeom::context_argmax(o.data(), B, H, T, d, o.strides(0) / f, o.strides(1) / f, o.strides(2) / f, m,
                            out.mutable_data());
  }
  return out;
}

py::tuple attention_sums(const f32_array& p, const u8_array& mask, const u8_array& keys, const u8_array& other,
                         bool entropy) {
  const auto [B, H, T] = map_dims(p);
  const uint8_t* m = mask_data(mask, B, T);
  EMBGEOM_CHECK(other.ndim() == 2 && other.shape(0) == B && other.shape(1) == T, "other: expected (B, T)");
  EMBGEOM_CHECK(keys.ndim() == 3 && keys.shape(0) == B && keys.shape(1) == T, "keys: expected (B, T, K)");
  const int64_t K = keys.shape(2);
  py::array_t<double> key_mass({B, H, K}), sep_other({B, H}), prev({B, H}), next({B, H}), row_sum({B, H, T}),
      offsets({H, T > 0 ? 2 * T - 1 : int64_t(0)});
  py::array_t<float> ent(entropy ? std::vector<int64_t>{B, H, T} : std::vector<int64_t>{0});
  {
    py::gil_scoped_release release;
    embgeom::attention_sums(p.data(), B, H, T, m, keys.data(), K, other.data(), key_mass.mutable_data(),
                            sep_other.mutable_data(), prev.mutable_data(), next.mutable_data(),
                            row_sum.mutable_data(), offsets.mutable_data(), entropy ? ent.mutable_data() : nullptr);
  }
  if (!entropy) return py::make_tuple(key_mass, sep_other, prev, next, row_sum, offsets, py::none());
  return py::make_tuple(key_mass, sep_other, prev, next, row_sum, offsets, ent);
}

py::array_t<double> js_pair_sums(const f32_array& P) {
  EMBGEOM_CHECK(P.ndim() == 3, "P: expected (K, R, T), got " << P.ndim() << " dims");
  const int64_t K = P.shape(0), R = P.shape(1), T = P.shape(2);
  py::array_t<double> out({K, K});
  {
    py::gil_scoped_release release;
    embgeom::js_pair_sums(P.data(), K, R, T, out.mutable_data());
  }
  return out;
}

py::array_t<int64_t> prefix_sums_below(const f32_array& x, double mass) {
  EMBGEOM_CHECK(x.ndim() >= 1, "x: expected an array of rows, got a scalar");
  const int64_t T = x.shape(x.ndim() - 1), R = T > 0 ? x.size() / T : 0;
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim() - 1);
  py::array_t<int64_t> out(shape);
  {
    py::gil_scoped_release release;
    embgeom::prefix_sums_below(x.data(), R, T, mass, out.mutable_data());
  }
  if (T == 0) std::fill(out.mutable_data(), out.mutable_data() + out.size(), int64_t(0));
  return out;
}

py::tuple value_histogram(const f32_array& p, const u8_array& mask, bool widen_to_zero) {
  const auto [B, H, T] = map_dims(p);
  const uint8_t* m = mask_data(mask, B, T);
  py::array_t<int64_t> counts({B, H, int64_t(embgeom::kValueBins)}), zero_bin({B, H});
  {
    py::gil_scoped_release release;
    embgeom::value_histogram(p.data(), B, H, T, m, widen_to_zero, counts.mutable_data(),
                             zero_bin.mutable_data());
  }
  return py::make_tuple(counts, zero_bin);
}

py::array_t<double> row_pair_sums(const py::array_t<float>& a, const py::array_t<float>& b) {
  EMBGEOM_CHECK(a.ndim() == 2 && b.ndim() == 2, "a, b: expected (N, D) arrays, got " << a.ndim() << " and "
                                                                                     << b.ndim() << " dims");
  const int64_t N = a.shape(0), D = a.shape(1);
  EMBGEOM_CHECK(b.shape(0) == N && b.shape(1) == D, "b: expected the shape of a");
  const int64_t f = sizeof(float);
  py::array_t<double> out({N, int64_t(4)});
  if (N == 0) return out;  // (an empty array's strides are arbitrary)
  EMBGEOM_CHECK((D <= 1 || (a.strides(1) == f && b.strides(1) == f)) && a.strides(0) % f == 0 &&
                    b.strides(0) % f == 0,
                "a, b: expected rows of contiguous floats");
  {
    py::gil_scoped_release release;
    embgeom::row_pair_sums(a.data(), a.strides(0) / f, b.data(), b.strides(0) / f, N, D, out.mutable_data());
  }
  return out;
}

py::tuple eigvals_abs(const py::array_t<double, py::array::c_style | py::array::forcecast>& a, int threads) {
  if (a.ndim() != 3 || a.shape(1) != a.shape(2))
    throw std::invalid_argument("eigvals_abs: expected (k, n, n) float64, got " + std::to_string(a.ndim()) + " dims");
  embgeom::check_threads(threads);
  const int64_t k = a.shape(0), n = a.shape(1);
  py::array_t<double> out({k, n});
  py::array_t<uint8_t> ok(k);
  {
    py::gil_scoped_release release;
    embgeom::eigvals_abs(a.data(), k, n, out.mutable_data(), ok.mutable_data(), threads);
  }
  return py::make_tuple(out, ok.attr("astype")("bool"));
}

using f64_c = py::array_t<double, py::array::c_style | py::array::forcecast>;

py::tuple sym_tridiagonal(const f64_c& a, int threads) {
  if (a.ndim() != 3 || a.shape(1) != a.shape(2))
    throw std::invalid_argument("sym_tridiagonal: expected (k, n, n) float64, got " + std::to_string(a.ndim()) +
                                " dims");
  embgeom::check_threads(threads);
  const int64_t k = a.shape(0), n = a.shape(1);
  py::array_t<double> d({k, n}), e({k, std::max<int64_t>(0, n - 1)});
  py::array_t<uint8_t> ok(k);
  {
    py::gil_scoped_release release;
    embgeom::sym_tridiagonal(a.data(), k, n, d.mutable_data(), e.mutable_data(), ok.mutable_data(), threads);
  }
  return py::make_tuple(d, e, ok.attr("astype")("bool"));
}

// d (k, n), e (k, n - 1) float64: the shapes tridiag_count_below and tridiag_largest read
static void check_tridiagonal(const f64_c& d, const f64_c& e, const char* fn) {
  if (d.ndim() != 2 || e.ndim() != 2 || e.shape(0) != d.shape(0) ||
      e.shape(1) != std::max<py::ssize_t>(0, d.shape(1) - 1))
    throw std::invalid_argument(std::string(fn) + ": expected d (k, n) and e (k, n - 1) float64");
}

py::array_t<int64_t> tridiag_count_below(const f64_c& d, const f64_c& e, const f64_c& x) {
  check_tridiagonal(d, e, "tridiag_count_below");
  if (x.ndim() != 2 || x.shape(0) != d.shape(0))
    throw std::invalid_argument("tridiag_count_below: expected x (k, T) float64 with k = d's rows");
  const int64_t k = d.shape(0), n = d.shape(1), T = x.shape(1);
  py::array_t<int64_t> out({k, T});
  {
    py::gil_scoped_release release;
    embgeom::tridiag_count_below(d.data(), e.data(), k, n, x.data(), T, out.mutable_data());
  }
  return out;
}

py::array_t<double> tridiag_largest(const f64_c& d, const f64_c& e, const f64_c& tol) {
  check_tridiagonal(d, e, "tridiag_largest");
  if (tol.ndim() != 1 || tol.shape(0) != d.shape(0))
    throw std::invalid_argument("tridiag_largest: expected tol (k,) float64 with k = d's rows");
  const int64_t k = d.shape(0), n = d.shape(1);
  py::array_t<double> out(k);
  {
    py::gil_scoped_release release;
    embgeom::tridiag_largest(d.data(), e.data(), k, n, tol.data(), out.mutable_data());
  }
  return out;
}

py::array_t<double> row_moments(const py::array_t<float>& x) {
  EMBGEOM_CHECK(x.ndim() == 2 && x.shape(1) >= 1, "x: expected (N, D) float32 with D >= 1, got " << x.ndim()
                                                                                                 << " dims");
  const int64_t N = x.shape(0), D = x.shape(1), f = sizeof(float);
  py::array_t<double> out({N, int64_t(4)});
  if (N == 0) return out;
  EMBGEOM_CHECK((D <= 1 || x.strides(1) == f) && x.strides(0) % f == 0, "x: expected rows of contiguous floats");
  {
    py::gil_scoped_release release;
    embgeom::row_moments(x.data(), x.strides(0) / f, N, D, out.mutable_data());
  }
  return out;
}

// An index's scan for a few queries (rows_dot.h): q (Q, D) float32, rows (N, D) of T.
template <class T, class Kernel>
py::array_t<float> rows_dot(const f32_array& q, const py::array& rows, const char* what, Kernel kernel) {
  // rows of another dtype are refused, not converted (a float32 array read as bf16 had given NaN)
  EMBGEOM_CHECK(py::isinstance<py::array_t<T>>(rows),  // (an equivalent dtype: native order, any metadata)
                "rows: expected " << what << ", got dtype " << std::string(py::str(rows.dtype())));
  EMBGEOM_CHECK(q.ndim() == 2 && rows.ndim() == 2, "q, rows: expected (Q, D) and (N, D) arrays, got "
                                                       << q.ndim() << " and " << rows.ndim() << " dims");
  const int64_t Q = q.shape(0), D = q.shape(1), N = rows.shape(0);
  EMBGEOM_CHECK(rows.shape(1) == D, "rows: expected " << D << " columns (the queries'), got " << rows.shape(1));
  const int64_t h = sizeof(T);
  py::array_t<float> out({Q, N});
  if (Q == 0 || N == 0) return out;
  EMBGEOM_CHECK((D <= 1 || rows.strides(1) == h) && rows.strides(0) % h == 0 && rows.strides(0) / h >= D,
                "rows: expected rows of contiguous " << what);
  {
    py::gil_scoped_release release;
    kernel(q.data(), Q, static_cast<const T*>(rows.data()), rows.strides(0) / h, N, D, out.mutable_data());
  }
  return out;
}

py::array_t<float> rows_dot_bf16(const f32_array& q, const py::array& rows) {
  return rows_dot<int16_t>(q, rows, "bf16 values (int16 bit patterns)",
                  [](const float* qq, int64_t Q, const int16_t* r, int64_t ldr, int64_t N, int64_t D, float* out) {
                    embgeom::rows_dot_bf16(qq, Q, reinterpret_cast<const uint16_t*>(r), ldr, N, D, out);
                  });
}

py::array_t<float> rows_dot_f32(const f32_array& q, const py::array& rows) {
  return rows_dot<float>(q, rows, "float32 values", embgeom::rows_dot_f32);
}

using f64_array = py::array_t<double, py::array::c_style>;

// An index's selection after a scan (rows_dot.h): scores (Q, N) float32 -> (values (Q, k)
// float32, columns (Q, k) int64), largest first.
py::tuple scores_topk(const f32_array& scores, int64_t k) {
  EMBGEOM_CHECK(scores.ndim() == 2, "scores: expected (Q, N) float32, got " << scores.ndim() << " dims");
  EMBGEOM_CHECK(k >= 0, "k: expected >= 0, got " << k);
  const int64_t Q = scores.shape(0), N = scores.shape(1);
  py::array_t<float> vals({Q, k});
  py::array_t<int64_t> idx({Q, k});
  {
    py::gil_scoped_release release;
    embgeom::scores_topk(scores.data(), Q, N, k, vals.mutable_data(), idx.mutable_data());
  }
  return py::make_tuple(vals, idx);
}

// A search of a few queries in one call (index_search.h): q (Q, D) float32 scan queries, rows
// (N, D) float32 or int16 (bf16 bit patterns), scale / bias (N,) float32 or None, zero_rows (N,)
// float64 norms or None, margin (Q,), exact_rows (N, D) float32, qexact (Q, D) float32 or
// float64 (cosine: Index._exact_queries' scaling), qnorm (Q,) -> (values (Q, k) float64, ids
// (Q, k) int64), or None where a query's list is too short for its margin.
py::object few_search(const f32_array& q, const py::array& rows, const std::optional<f32_array>& scale,
                      const std::optional<f32_array>& bias, const std::optional<f64_array>& zero_rows, int64_t kk,
                      int64_t k, const f64_array& margin, double widen, const f32_array& exact_rows,
                      const py::array& qexact, const f64_array& qnorm, const std::string& metric) {
  EMBGEOM_CHECK(q.ndim() == 2 && rows.ndim() == 2 && exact_rows.ndim() == 2 && qexact.ndim() == 2,
                "q, rows, exact_rows, qexact: expected 2-d arrays");
  embgeom::FewSearch a;
  a.Q = q.shape(0);
  a.D = q.shape(1);
  a.N = rows.shape(0);
  const bool bf16 = rows.dtype().is(py::dtype::of<int16_t>());
  EMBGEOM_CHECK(bf16 || rows.dtype().is(py::dtype::of<float>()), "rows: expected float32 or int16 (bf16 bits)");
  const int64_t h = bf16 ? 2 : 4;
  EMBGEOM_CHECK(rows.shape(1) == a.D && (a.D <= 1 || rows.strides(1) == h) && rows.strides(0) % h == 0 &&
                    rows.strides(0) / h >= a.D,
                "rows: expected (N, D) rows of contiguous values, D = " << a.D);
  EMBGEOM_CHECK(exact_rows.shape(0) == a.N && exact_rows.shape(1) == a.D, "exact_rows: expected (N, D) float32");
  EMBGEOM_CHECK(qexact.shape(0) == a.Q && qexact.shape(1) == a.D && (qexact.flags() & py::array::c_style),
                "qexact: expected C-contiguous (Q, D)");
  const bool q64 = qexact.dtype().is(py::dtype::of<double>());
  EMBGEOM_CHECK(q64 || qexact.dtype().is(py::dtype::of<float>()), "qexact: expected float32 or float64");
  EMBGEOM_CHECK(margin.size() == a.Q && qnorm.size() == a.Q, "margin, qnorm: bad sizes");
  for (const auto* v : {&scale, &bias})
    EMBGEOM_CHECK(!*v || (*v)->size() == a.N, "scale, bias: expected (N,) float32");
  EMBGEOM_CHECK(!zero_rows || zero_rows->size() == a.N, "zero_rows: expected (N,) float64");
  EMBGEOM_CHECK(metric == "cosine" || metric == "dot" || metric == "l2", "metric: expected cosine, dot or l2");
  EMBGEOM_CHECK(k >= 1 && kk >= 1 && kk <= a.N, "k, kk: expected 1 <= kk <= N and k >= 1");
  a.qscan = q.data();
  if (bf16)
    a.rows_bf16 = static_cast<const uint16_t*>(rows.data());
  else
    a.rows_f32 = static_cast<const float*>(rows.data());
  a.ldr = rows.strides(0) / h;
  a.scale = scale ? scale->data() : nullptr;
  a.bias = bias ? bias->data() : nullptr;
  a.zero_rows = zero_rows ? zero_rows->data() : nullptr;
  a.kk = kk;
  a.k = k;
  a.margin = margin.data();
  a.widen = widen;
  a.rows = exact_rows.data();
  if (q64)
    a.qexact_f64 = static_cast<const double*>(qexact.data());
  else
    a.qexact_f32 = static_cast<const float*>(qexact.data());
  a.qnorm = qnorm.data();
  a.metric = metric == "cosine" ? 0 : metric == "dot" ? 1 : 2;
  py::array_t<double> vals({a.Q, k});
  py::array_t<int64_t> ids({a.Q, k});
  bool done;
  {
    py::gil_scoped_release release;
    done = embgeom::few_search(a, vals.mutable_data(), ids.mutable_data());
  }
  if (!done) return py::none();
  return py::make_tuple(vals, ids);
}

// A bf16 index's scan rows (rows_dot.h): rows (N, D) float32, out (N, D) int16 bit patterns
// (filled, or read when fill is false); scale / norm (N,) float64 or None. Returns the rows'
// largest scan rounding.
double bf16_scan_rows(const f32_array& rows, const std::optional<f64_array>& scale,
                      const std::optional<f64_array>& norm, py::array out, bool fill) {
  EMBGEOM_CHECK(rows.ndim() == 2, "rows: expected (N, D) float32, got " << rows.ndim() << " dims");
  const int64_t N = rows.shape(0), D = rows.shape(1);
  // written in place: a converted copy (another dtype or layout) would take the values instead
  EMBGEOM_CHECK(out.dtype().is(py::dtype::of<int16_t>()) && out.ndim() == 2 && out.shape(0) == N &&
                    out.shape(1) == D && (out.flags() & py::array::c_style) && (out.writeable() || !fill),
                "out: expected a writable C-contiguous (N, D) int16 array of the rows' shape");
  for (const auto* a : {&scale, &norm})
    EMBGEOM_CHECK(!*a || ((*a)->ndim() == 1 && (*a)->shape(0) == N), "scale, norm: expected (N,) float64");
  if (N == 0 || D == 0) return 0.0;
  uint16_t* o = static_cast<uint16_t*>(const_cast<void*>(out.data()));  // written only when fill
  py::gil_scoped_release release;
  return embgeom::bf16_scan_rows(rows.data(), D, N, D, scale ? scale->data() : nullptr,
                                 norm ? norm->data() : nullptr, o, D, fill);
}

int max_threads() {
#ifdef EMBGEOM_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// OpenBLAS from the scipy-openblas32 wheel, opened once at import (cpu/blas.h).
// EMBGEOM_OPENBLAS=0 keeps the own kernels; EMBGEOM_OPENBLAS=<path> opens that library.
// EMBGEOM_CPU caps OpenBLAS's kernel family too (OPENBLAS_CORETYPE, read when it loads), unless
// OPENBLAS_CORETYPE is already set: set for that load alone, then removed (left set, it had
// capped every OpenBLAS the process opened later).
void load_openblas() {
  const char* env = std::getenv("EMBGEOM_OPENBLAS");
  const std::string want = env ? env : "";
  if (want == "0") {
    embgeom::blas_set_unavailable("off (EMBGEOM_OPENBLAS=0)");
    return;
  }
  std::string path = want;
  if (path.empty()) {
    // The wheel's library file, found without importing its package: the import opens the library
    // RTLD_GLOBAL "to make the namespace available to NumPy/SciPy", and scipy, loaded later, then
    // bound its own BLAS calls (ARPACK's, under UMAP's spectral start) to this OpenBLAS: scipy's
    // results changed with embgeom's import, and with EMBGEOM_CPU.
    try {
      py::object spec = py::module_::import("importlib.util").attr("find_spec")("scipy_openblas32");
      if (!spec.is_none() && !spec.attr("submodule_search_locations").is_none()) {
        py::list where = spec.attr("submodule_search_locations");
        if (py::len(where) > 0) path = where[0].cast<std::string>() + "/lib/libscipy_openblas.so";
      }
    } catch (const std::exception&) {
      PyErr_Clear();
    }
    if (path.empty() || access(path.c_str(), R_OK) != 0) {
      embgeom::blas_set_unavailable("scipy-openblas32 not installed (own kernels)");
      return;
    }
  }
  bool capped = false;
#if EMBGEOM_X86
  const std::string cap = embgeom::isa_cap();
  if (!std::getenv("OPENBLAS_CORETYPE") && (cap == "avx2" || cap == "generic")) {
    setenv("OPENBLAS_CORETYPE", cap == "avx2" ? "Haswell" : "Prescott", 0);
    capped = true;
  }
#endif
  embgeom::blas_load(path);
  if (capped) unsetenv("OPENBLAS_CORETYPE");
}

py::dict cpu_info() {
  using embgeom::Isa;
  py::dict d;
  d["cpu_features"] = embgeom::cpu_features();
  d["isa_supported"] = embgeom::isa_name(embgeom::isa_supported());
  d["cap"] = embgeom::isa_cap();
  d["isa"] = embgeom::isa_name(embgeom::isa_level());
  d["blas"] = embgeom::blas_status();
  d["gemm_exact"] = std::string(embgeom::select_kernel(false).name);
  const embgeom::GemmKernel fast = embgeom::select_kernel(true);
  d["gemm_fast_bf16"] = fast.bf16;  // fast mode runs a bf16 product here
  d["gemm_fast"] = fast.bf16 ? std::string(fast.name)
                             : std::string(fast.name) + " (" + embgeom::fast_product_note() +
                                   ": fast runs the exact product)";
  {
    const float one = 1.0f;
    embgeom::PairwiseOptions o;
    o.block = 1;  // a one-row probe: only the pass it picks is read
    embgeom::PairwiseEngine e(&one, 1, nullptr, 0, 1, o);
    d["fused_pass"] = std::string(e.fused_name());
  }
  d["entropy"] = std::string(embgeom::attention_entropy_path());
  d["context_argmax"] = std::string(embgeom::context_argmax_path());
  d["row_pair_sums"] = std::string(embgeom::row_pair_sums_path());
  d["rows_dot"] = std::string(embgeom::rows_dot_path());
  d["pair_values"] = std::string(embgeom::pair_values_path());
  d["pair_cosines"] = std::string(embgeom::pair_cosines_path());
  d["js_pair_sums"] = std::string(embgeom::js_pair_sums_path());
  d["attention_sums"] = std::string(embgeom::attention_sums_path());
  d["cone_index"] = std::string(embgeom::cone_index_path());
  d["eigvals"] = std::string(embgeom::eigvals_abs_path());
  d["sym_tridiagonal"] = std::string(embgeom::sym_tridiagonal_path());
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  load_openblas();
  m.doc() = "embgeom C++ core (CPU kernels, OpenMP)";
  m.def("cone_unit_sums", &cone_unit_sums, py::arg("x"), py::arg("mask") = py::none(),
        "Sum of unit vectors per set: x (B, T, D) or (G, B, T, D) float32 (strided, D contiguous), mask (B, T) "
        "uint8 -> (sums (G * B, D) float64, used (G * B,) int64, zero_rows (G * B,) int64)");
  m.def("context_argmax", &context_argmax, py::arg("head_out"), py::arg("mask") = py::none(),
        "Context similarity's argmax: head_out (B, H, T, d) float32, mask (B, T) uint8 -> (B, H, T) int64");
  m.def("context_summaries", &context_summaries, py::arg("j"), py::arg("mask"), py::arg("sep"), py::arg("ids"),
        py::arg("sentence") = py::none(), py::arg("stop") = py::none(),
        "Context similarity's sums over one layer's argmax j (B, H, T) int64: (counts (6, H): rows, distance, "
        "separator, repeated, same_sentence, period_or_separator; hist (H, T); focus (B, H) positions) int64");
  m.def("attention_sums", &attention_sums, py::arg("attn"), py::arg("mask"), py::arg("keys"), py::arg("other"),
        py::arg("entropy") = false,
        "One layer's attention summaries: attn (B, H, T, T) float32, mask/other (B, T), keys (B, T, K) uint8 -> "
        "(key_mass (B, H, K), sep_other, prev, next (B, H), row_sum (B, H, T), offsets (H, 2T - 1)) float64, "
        "and with entropy=True the rows' entropies (B, H, T) float32 (NaN for padded rows; else None)");
  m.def("row_pair_sums", &row_pair_sums, py::arg("a"), py::arg("b"),
        "Float64 row sums of two (N, D) float32 arrays -> (N, 4): |a|^2, |b|^2, |a - b|^2, a . b");
  m.def("eigvals_abs", &eigvals_abs, py::arg("a"), py::arg("threads") = 0,
        "(|eigenvalues| (k, n) float64, converged (k,) bool) of k real n x n matrices (lockstep QR)");
  m.def("sym_tridiagonal", &sym_tridiagonal, py::arg("a"), py::arg("threads") = 0,
        "(d (k, n), e (k, n - 1) float64, ok (k,) bool): k real symmetric n x n matrices (lower triangles read) "
        "reduced to tridiagonal form (lockstep Householder)");
  m.def("tridiag_count_below", &tridiag_count_below, py::arg("d"), py::arg("e"), py::arg("x"),
        "Sturm counts: (k, T) int64, the eigenvalues of tridiagonal matrix i below x[i, t]");
  m.def("tridiag_largest", &tridiag_largest, py::arg("d"), py::arg("e"), py::arg("tol"),
        "(k,) float64 upper bounds hi on each tridiagonal matrix's largest eigenvalue, within tol[i] of it");
  m.def("row_moments", &row_moments, py::arg("x"),
        "Float64 mean and central moments of each row: x (N, D) float32 -> (N, 4): mean, m2, m3, m4");
  m.def("js_pair_sums", &js_pair_sums, py::arg("P"),
        "Clark's head distance: P (K, R, T) float32 smoothed rows -> (K, K) float64, "
        "[a, b] (a < b) = the JS divergences of the row pairs (P[a][r], P[b][r]) summed over r");
  m.def("prefix_sums_below", &prefix_sums_below, py::arg("x"), py::arg("mass"),
        "k90's count: x (..., T) float32 rows of negated entries sorted ascending -> (...) int64, the number of "
        "prefixes whose float64 running sum of -x stays below mass");
  m.def("value_histogram", &value_histogram, py::arg("attn"), py::arg("mask"), py::arg("widen_to_zero"),
        "The geometry-of-BERT value histogram of each map: attn (B, H, T, T) float32, mask (B, T) uint8 -> "
        "(counts (B, H, 20), bin of 0 (B, H)) int64");
  m.def("rows_dot_bf16", &rows_dot_bf16, py::arg("q"), py::arg("rows"),
        "A bf16 index's scan for a few queries: q (Q, D) float32, rows (N, D) bf16 bit patterns as int16 -> "
        "(Q, N) float32 dot products (exact products, float32 sums)");
  m.def("rows_dot_f32", &rows_dot_f32, py::arg("q"), py::arg("rows"),
        "A float32 index's scan for a few queries: q (Q, D) float32, rows (N, D) float32 -> (Q, N) float32 dot "
        "products (float32 sums)");
  m.def("scores_topk", &scores_topk, py::arg("scores"), py::arg("k"),
        "An index's selection after a scan: scores (Q, N) float32 -> (values (Q, k) float32, columns (Q, k) "
        "int64), largest first, equal values by column, NaN as -inf; past a row's N: -inf and -1");
  m.def("few_search", &few_search, py::arg("q"), py::arg("rows"), py::arg("scale"), py::arg("bias"),
        py::arg("zero_rows"), py::arg("kk"), py::arg("k"), py::arg("margin"), py::arg("widen"), py::arg("exact_rows"),
        py::arg("qexact"), py::arg("qnorm"), py::arg("metric"),
        "An index's search of a few queries in one call: the scan, its kk best, each query's threshold, the "
        "candidates' float64 values and their order -> (values (Q, k) float64, ids (Q, k) int64), or None where "
        "a query's list is too short for its margin");
  m.def("bf16_scan_rows", &bf16_scan_rows, py::arg("rows"), py::arg("scale"), py::arg("norm"), py::arg("out"),
        py::arg("fill") = true,
        "A bf16 index's scan rows: rows (N, D) float32, scale / norm (N,) float64 or None, out (N, D) int16 "
        "(filled with bf16(float32(rows * scale)), or only read if not fill) -> the largest float64 norm of "
        "out - rows / norm over rows");
  m.def("attention_row_entropy", &attention_row_entropy, py::arg("attn"),
        py::arg("mask") = py::none(), py::arg("smoothing") = 0.0,
        "Row entropy in nats: attn (B, H, T, T) float32, mask (B, T) uint8 -> (B, H, T) float32");
  m.def("max_threads", &max_threads, "OpenMP threads the kernels use");
  m.def("fast_product", [] {
        const embgeom::GemmKernel fast = embgeom::select_kernel(true);
        py::dict d;
        d["kernel"] = std::string(fast.name);
        d["bf16"] = fast.bf16;
        d["why_exact"] = std::string(embgeom::fast_product_note());  // "" when bf16
        return d;
      },
        "The product a new engine in fast mode takes now (EMBGEOM_CPU / EMBGEOM_GEMM read): "
        "{kernel, bf16, why_exact: why it is the exact float32 product, '' when bf16}");
  m.def("cpu_info", &cpu_info,
        "Vector level (EMBGEOM_CPU cap applied), BLAS, and the product kernel / fused pass / "
        "text-kernel paths a new engine takes now");

  // the numeric rules of csrc/numerics.h, for tests/test_numerics.py (agreement with numerics.py)
  m.attr("NEAR_DUPLICATE_TAU") = double(embgeom::numerics::kNearDuplicateTau);
  m.def("bin_index", [](double v, double lo, double hi, int64_t bins) {
    EMBGEOM_CHECK(bins >= 1, "bins: expected >= 1, got " << bins);
    EMBGEOM_CHECK(hi > lo, "range: expected lo < hi");
    return embgeom::numerics::bin_index(v, lo, hi, bins, embgeom::numerics::bin_scale(lo, hi, bins));
  }, py::arg("v"), py::arg("lo"), py::arg("hi"), py::arg("bins"));
  m.def("fast_error_bound", [](int64_t d, const std::string& metric, double x_full, double x_rounded,
                               double x_delta, double y_full, double y_rounded, double y_delta) {
    return embgeom::numerics::fast_error_bound(d, metric == "euclidean", x_full, x_rounded, x_delta,
                                               y_full, y_rounded, y_delta);
  }, py::kw_only(), py::arg("d"), py::arg("metric"), py::arg("x_full"), py::arg("x_rounded"),
     py::arg("x_delta"), py::arg("y_full"), py::arg("y_rounded"), py::arg("y_delta"));
  m.def("order_key", [](const std::string& kind, double v, double near) {
    using embgeom::numerics::ListKind;
    ListKind k;
    if (kind == "top") k = ListKind::top;
    else if (kind == "bottom") k = ListKind::bottom;
    else if (kind == "near") k = ListKind::near;
    else if (kind == "outside_pairs") k = ListKind::outside;
    else EMBGEOM_CHECK(false, "kind: expected top, bottom, near or outside_pairs, got '" << kind << "'");
    return embgeom::numerics::order_key(k, v, near);
  }, py::arg("kind"), py::arg("v"), py::arg("near") = 0.0);
  // float64 and float32 queries (pybind11 tries each overload without conversion first, so a
  // float32 query set is read where it lies instead of widened into a float64 copy)
  // the pairs of pair_values / pair_cosines checked: (rows, q) of one D, every (qi, ci) in range -> P
  auto checked_pairs = [](const auto& rows, const auto& q, const py::array_t<int64_t, py::array::c_style>& qi,
                          const py::array_t<int64_t, py::array::c_style>& ci) {
    EMBGEOM_CHECK(rows.ndim() == 2 && q.ndim() == 2 && rows.shape(1) == q.shape(1),
                  "rows, q: expected (N, D) rows and (Q, D) queries of one D");
    EMBGEOM_CHECK(qi.ndim() == 1 && ci.ndim() == 1 && qi.shape(0) == ci.shape(0),
                  "qi, ci: expected two int64 index vectors of one length");
    const int64_t P = qi.shape(0), N = rows.shape(0), Q = q.shape(0);
    const int64_t* a = qi.data();
    const int64_t* b = ci.data();
    for (int64_t p = 0; p < P; ++p)
      EMBGEOM_CHECK(a[p] >= 0 && a[p] < Q && b[p] >= 0 && b[p] < N,
                    "qi, ci: pair " << p << " = (" << a[p] << ", " << b[p] << ") is outside (" << Q << ", " << N << ")");
    return P;
  };
  using Ids = py::array_t<int64_t, py::array::c_style>;
  auto pair_values = [checked_pairs](const f32_array& rows, const auto& q, const Ids& qi, const Ids& ci, bool sqdist) {
    const int64_t P = checked_pairs(rows, q, qi, ci), D = rows.shape(1);
    const int64_t* a = qi.data();
    const int64_t* b = ci.data();
    py::array_t<double> out(P);
    {
      py::gil_scoped_release release;
      embgeom::pair_values(rows.data(), q.data(), D, a, b, P, sqdist, out.mutable_data());
    }
    return out;
  };
  const char* pair_values_doc = "Exact float64 dot products (or squared distances) of (query qi[p], row ci[p]) pairs";
  m.def("pair_values", [pair_values](const f32_array& rows, const py::array_t<double, py::array::c_style>& q,
                                     const py::array_t<int64_t, py::array::c_style>& qi,
                                     const py::array_t<int64_t, py::array::c_style>& ci, bool sqdist) {
    return pair_values(rows, q, qi, ci, sqdist);
  }, py::arg("rows"), py::arg("q"), py::arg("qi"), py::arg("ci"), py::arg("sqdist"), pair_values_doc);
  m.def("pair_values", [pair_values](const f32_array& rows, const f32_array& q,
                                     const py::array_t<int64_t, py::array::c_style>& qi,
                                     const py::array_t<int64_t, py::array::c_style>& ci, bool sqdist) {
    return pair_values(rows, q, qi, ci, sqdist);
  }, py::arg("rows"), py::arg("q"), py::arg("qi"), py::arg("ci"), py::arg("sqdist"), pair_values_doc);
  // exact cosines (pair_values.h, pair_cosines): float64 or float32 queries, as pair_values
  auto pair_cosines = [checked_pairs](const auto& rows, const auto& q, const Ids& qi, const Ids& ci) {
    const int64_t P = checked_pairs(rows, q, qi, ci), D = rows.shape(1);
    const int64_t* a = qi.data();
    const int64_t* b = ci.data();
    py::array_t<double> out(P);
    {
      py::gil_scoped_release release;
      embgeom::pair_cosines(rows.data(), q.data(), D, a, b, P, out.mutable_data());
    }
    return out;
  };
  const char* pair_cosines_doc = "Exact float64 cosines of (query qi[p], row ci[p]) pairs (NaN for a zero row)";
  m.def("pair_cosines", [pair_cosines](const f32_array& rows, const py::array_t<double, py::array::c_style>& q,
                                       const py::array_t<int64_t, py::array::c_style>& qi,
                                       const py::array_t<int64_t, py::array::c_style>& ci) {
    return pair_cosines(rows, q, qi, ci);
  }, py::arg("rows"), py::arg("q"), py::arg("qi"), py::arg("ci"), pair_cosines_doc);
  m.def("pair_cosines", [pair_cosines](const f32_array& rows, const f32_array& q,
                                       const py::array_t<int64_t, py::array::c_style>& qi,
                                       const py::array_t<int64_t, py::array::c_style>& ci) {
    return pair_cosines(rows, q, qi, ci);
  }, py::arg("rows"), py::arg("q"), py::arg("qi"), py::arg("ci"), pair_cosines_doc);
  // float64 rows and queries (a float64 cloud's neighbour graph: projection.exact_knn)
  m.def("pair_cosines", [pair_cosines](const py::array_t<double, py::array::c_style>& rows,
                                       const py::array_t<double, py::array::c_style>& q,
                                       const py::array_t<int64_t, py::array::c_style>& qi,
                                       const py::array_t<int64_t, py::array::c_style>& ci) {
    return pair_cosines(rows, q, qi, ci);
  }, py::arg("rows"), py::arg("q"), py::arg("qi"), py::arg("ci"), pair_cosines_doc);
  m.def("direct_distance", [](const f32_array& a, const f32_array& b) {
    EMBGEOM_CHECK(a.ndim() == 1 && b.ndim() == 1 && a.shape(0) == b.shape(0), "a, b: expected two rows of one length");
    return embgeom::numerics::direct_distance(a.data(), b.data(), a.shape(0));
  }, py::arg("a"), py::arg("b"));
  m.attr("openmp") = py::bool_(
#ifdef EMBGEOM_OPENMP
      true
#else
      false
#endif
  );

  // pairwise engine: conversion only (the state's index remapping and keys: pairwise/state_io.cpp)
  {
    using embgeom::PairwiseEngine;
    using f32_in = py::array_t<float, py::array::c_style | py::array::forcecast>;
    using i64_arr = py::array_t<int64_t>;
    using f64_arr = py::array_t<double>;
    // every call but run's own reads or changes the engine's state: refused while a run (GIL
    // released) is under way in another thread
    auto idle = [](auto& e) -> auto& {
      EMBGEOM_CHECK(!e.running(), "engine: a run is under way in another thread; wait for it to finish");
      return e;
    };
    auto vec_i64 = [](const std::vector<int64_t>& v) {
      i64_arr a(static_cast<py::ssize_t>(v.size()));
      if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(int64_t));
      return a;
    };
    py::class_<embgeom::PreparedColumns, std::shared_ptr<embgeom::PreparedColumns>>(m, "PreparedColumns",
        "Column rows prepared once (compacted, normalised for cosine, packed) for cross-mode engines")
        .def_property_readonly("rows", [](const embgeom::PreparedColumns& c) { return c.m0; })
        .def_property_readonly("dim", [](const embgeom::PreparedColumns& c) { return c.d; })
        .def_property_readonly("key", [](const embgeom::PreparedColumns& c) { return c.key; });
    m.def("prepare_columns",
          [](const f32_in& y, const std::string& metric, const std::string& precision, int threads) {
            EMBGEOM_CHECK(y.ndim() == 2, "y: expected (M, D), got " << y.ndim() << " dims");
            embgeom::check_threads(threads);
            embgeom::PairwiseOptions o;
            o.metric = metric;
            o.precision = precision;
            o.block = 1;
            o.threads = threads;
            py::gil_scoped_release release;
            return std::const_pointer_cast<embgeom::PreparedColumns>(
                embgeom::prepare_columns(y.data(), y.shape(0), y.shape(1), o));
          },
          py::arg("y"), py::kw_only(), py::arg("metric"), py::arg("precision"), py::arg("threads"),
          "Prepare column rows once for PairwiseEngine(x, None, columns=...) runs (cross mode)");
    py::class_<PairwiseEngine>(m, "PairwiseEngine",
        "All-pairs statistics over a deterministic tile schedule (docs/metrics.md).\n"
        "x: (N, D) float32, y: (M, D) float32 or None (self mode: pairs i < j).")
        .def(py::init([](const f32_in& x, const std::optional<f32_in>& y, const std::string& metric,
                         const std::string& precision, int64_t block, int64_t bins, double lo,
                         double hi, int64_t topk, int64_t bottomk, std::optional<double> near,
                         int64_t near_k, int64_t row_topk, int64_t row_bottomk,
                         std::optional<std::pair<double, double>> outside, int64_t outside_limit,
                         int threads, double moment_shift,
                         std::optional<std::shared_ptr<const embgeom::PreparedColumns>> columns) {
               EMBGEOM_CHECK(x.ndim() == 2, "x: expected (N, D), got " << x.ndim() << " dims");
               const int64_t D = x.shape(1);
               if (y) {
                 EMBGEOM_CHECK(y->ndim() == 2 && y->shape(1) == D,
                               "y: expected (M, " << D << "), got " << y->ndim() << " dims");
               }
               embgeom::PairwiseOptions o;
               o.metric = metric;
               o.precision = precision;
               o.block = block;
               o.bins = bins;
               o.lo = lo;
               o.hi = hi;
               o.topk = topk;
               o.bottomk = bottomk;
               o.has_near = near.has_value();
               o.near = near.value_or(0.0);
               o.near_k = near_k;
               o.row_topk = row_topk;
               o.row_bottomk = row_bottomk;
               o.has_outside = outside.has_value();
               if (outside) {
                 o.out_a = outside->first;
                 o.out_b = outside->second;
               }
               o.outside_limit = outside_limit;
               o.threads = threads;
               o.moment_shift = moment_shift;
               if (columns) {
                 EMBGEOM_CHECK(!y, "y: pass either y or columns, not both");
                 EMBGEOM_CHECK((*columns)->d == D, "x: expected (N, " << (*columns)->d << ") like the columns, got D=" << D);
                 py::gil_scoped_release release;
                 return std::make_unique<PairwiseEngine>(x.data(), x.shape(0), *columns, o);
               }
               py::gil_scoped_release release;
               return std::make_unique<PairwiseEngine>(x.data(), x.shape(0), y ? y->data() : nullptr,
                                                       y ? y->shape(0) : 0, D, o);
             }),
             // every option explicit: the defaults live in python/embgeom/engine/config.py alone
             py::arg("x"), py::arg("y").none(true), py::kw_only(), py::arg("metric"),
             py::arg("precision"), py::arg("block"), py::arg("bins"), py::arg("lo"), py::arg("hi"),
             py::arg("topk"), py::arg("bottomk"), py::arg("near").none(true), py::arg("near_k"),
             py::arg("row_topk"), py::arg("row_bottomk"), py::arg("outside").none(true),
             py::arg("outside_limit"), py::arg("threads"), py::arg("moment_shift"),
             py::arg("columns").none(true))
        .def("num_tiles", &PairwiseEngine::num_tiles)
        .def("tile_pairs", &PairwiseEngine::tile_pairs, py::arg("begin"), py::arg("end"))
        .def("run", &PairwiseEngine::run, py::arg("begin"), py::arg("end"),
             py::call_guard<py::gil_scoped_release>(), "Process tiles [begin, end) (GIL released)")
        .def("set_row_top_floor", [idle](PairwiseEngine& e, double floor) { idle(e).set_row_top_floor(floor); },
             py::arg("floor"), "Before the first run: per-row top lists of the values >= floor only (NaN: none)")
        .def("keep_lists_only", [idle](PairwiseEngine& e) { idle(e).keep_lists_only(); },
             "Before the first run: only the per-row lists and outside counts and pairs are kept "
             "(no count, moments or extremes)")
        .def("discard_statistics", [idle](PairwiseEngine& e) { idle(e).discard_statistics(); },
             "Benchmarks only: later runs compute the schedule's products and skip the statistics")
        .def_property_readonly("kernel", [](const PairwiseEngine& e) { return std::string(e.kernel_name()); })
        .def_property_readonly("fused_pass", [](const PairwiseEngine& e) { return std::string(e.fused_name()); })
        .def_property_readonly("isa", [](const PairwiseEngine& e) { return std::string(embgeom::isa_name(e.isa())); })
        .def_property_readonly("hist_error_bound", &PairwiseEngine::hist_error_bound)
        .def_property_readonly("running", &PairwiseEngine::running, "Whether a run is under way")
        .def_property_readonly("tiles_done", [idle](const PairwiseEngine& e) { return idle(e).state().tiles_done; })
        .def("state", [vec_i64, idle](const PairwiseEngine& e) {
          const embgeom::ExportedState s = idle(e).export_state();
          auto pair = [](bool has, const embgeom::OrigPair& p) -> py::object {
            if (!has) return py::none();
            return py::make_tuple(p.v, p.i, p.j);
          };
          auto list = [](const std::vector<embgeom::OrigPair>& l) {
            const py::ssize_t k = static_cast<py::ssize_t>(l.size());
            f64_arr v(k);
            i64_arr i(k), j(k);
            for (py::ssize_t q = 0; q < k; ++q) {
              v.mutable_data()[q] = l[q].v;
              i.mutable_data()[q] = l[q].i;
              j.mutable_data()[q] = l[q].j;
            }
            return py::make_tuple(v, i, j);
          };
          auto rows = [&](int64_t k, const std::vector<float>& val, const std::vector<int64_t>& idx) -> py::object {
            if (k <= 0) return py::none();
            const int64_t N = e.n_orig();
            py::array_t<float> v({N, k});
            i64_arr ix({N, k});
            if (N * k) {
              std::memcpy(v.mutable_data(), val.data(), sizeof(float) * N * k);
              std::memcpy(ix.mutable_data(), idx.data(), sizeof(int64_t) * N * k);
            }
            return py::make_tuple(v, ix);
          };
          py::dict d;
          d["tiles_done"] = s.tiles_done;
          d["count"] = s.count;
          d["mean"] = s.mean;
          d["m2"] = s.m2;
          d["moment_shift"] = s.moment_shift;
          d["shifted_sum"] = s.shifted_sum;
          d["shifted_sumsq"] = s.shifted_sumsq;
          d["min"] = pair(s.has_min, s.min);
          d["max"] = pair(s.has_max, s.max);
          d["hist"] = s.hist.empty() ? py::object(py::none()) : py::object(vec_i64(s.hist));
          d["top"] = list(s.top);
          d["bottom"] = list(s.bottom);
          d["near"] = list(s.near);
          d["row_top"] = rows(s.row_top_k, s.row_top_val, s.row_top_idx);
          d["row_bottom"] = rows(s.row_bottom_k, s.row_bottom_val, s.row_bottom_idx);
          d["outside_count"] = s.outside_count;
          d["outside_rows"] = s.has_outside_rows ? py::object(vec_i64(s.outside_rows)) : py::object(py::none());
          d["outside_cols"] = s.has_outside_cols ? py::object(vec_i64(s.outside_cols)) : py::object(py::none());
          d["outside_pairs"] = list(s.outside_pairs);
          d["excluded_rows"] = vec_i64(s.excluded_rows);
          d["excluded_cols"] = vec_i64(s.excluded_cols);
          d["hist_error_bound"] = s.hist_error_bound;
          return d;
        })
        .def("load_state", [idle](PairwiseEngine& e, const py::dict& d) {
          idle(e);
          auto get = [&](const char* k) -> py::object {
            EMBGEOM_CHECK(d.contains(k), "state: missing key '" << k << "'");
            return d[k];
          };
          embgeom::ExportedState s;
          s.tiles_done = get("tiles_done").cast<int64_t>();
          s.count = get("count").cast<int64_t>();
          s.mean = get("mean").cast<double>();
          s.m2 = get("m2").cast<double>();
          for (auto [key, dst] : {std::pair<const char*, double*>{"moment_shift", &s.moment_shift},
                                  {"shifted_sum", &s.shifted_sum}, {"shifted_sumsq", &s.shifted_sumsq}})
            if (d.contains(key)) *dst = d[key].cast<double>();  // optional: older states lack them
          auto pair = [&](const char* name, bool& has, embgeom::OrigPair& p) {
            py::object o = get(name);
            has = !o.is_none();
            if (!has) return;
            auto t = o.cast<py::tuple>();
            EMBGEOM_CHECK(t.size() == 3, "state: '" << name << "' must be (v, i, j)");
            p = {t[0].cast<double>(), t[1].cast<int64_t>(), t[2].cast<int64_t>()};
          };
          pair("max", s.has_max, s.max);
          pair("min", s.has_min, s.min);
          auto list = [&](const char* name, std::vector<embgeom::OrigPair>& dst) {
            auto t = get(name).cast<py::tuple>();
            EMBGEOM_CHECK(t.size() == 3, "state: '" << name << "' must be (v, i, j)");
            auto v = py::array_t<double, py::array::forcecast>(t[0]);
            auto i = py::array_t<int64_t, py::array::forcecast>(t[1]);
            auto j = py::array_t<int64_t, py::array::forcecast>(t[2]);
            EMBGEOM_CHECK(v.size() == i.size() && v.size() == j.size(), "state: '" << name << "' lengths differ");
            for (py::ssize_t q = 0; q < v.size(); ++q) dst.push_back({v.data()[q], i.data()[q], j.data()[q]});
          };
          list("top", s.top);
          list("bottom", s.bottom);
          list("near", s.near);
          list("outside_pairs", s.outside_pairs);
          if (!get("hist").is_none()) {
            auto h = py::array_t<int64_t, py::array::forcecast>(get("hist"));
            s.hist.assign(h.data(), h.data() + h.size());
          }
          auto rows = [&](const char* name, int64_t& k, std::vector<float>& val, std::vector<int64_t>& idx) {
            py::object o = get(name);
            if (o.is_none()) return;
            auto t = o.cast<py::tuple>();
            EMBGEOM_CHECK(t.size() == 2, "state: '" << name << "' must be (values, indices)");
            auto v = py::array_t<float, py::array::forcecast | py::array::c_style>(t[0]);
            auto ix = py::array_t<int64_t, py::array::forcecast | py::array::c_style>(t[1]);
            EMBGEOM_CHECK(v.ndim() == 2 && ix.ndim() == 2 && v.shape(0) == ix.shape(0) && v.shape(1) == ix.shape(1),
                          "state: '" << name << "' must be two (N, k) arrays");
            k = v.shape(1);
            val.assign(v.data(), v.data() + v.size());
            idx.assign(ix.data(), ix.data() + ix.size());
          };
          rows("row_top", s.row_top_k, s.row_top_val, s.row_top_idx);
          rows("row_bottom", s.row_bottom_k, s.row_bottom_val, s.row_bottom_idx);
          s.outside_count = get("outside_count").cast<int64_t>();
          auto counts = [&](const char* name, std::vector<int64_t>& dst) {
            if (!d.contains(name) || d[name].is_none()) return;
            auto a = py::array_t<int64_t, py::array::forcecast>(d[name]);
            dst.assign(a.data(), a.data() + a.size());
          };
          counts("outside_rows", s.outside_rows);
          counts("outside_cols", s.outside_cols);
          e.import_state(s);
        }, py::arg("state"));
  }

}
