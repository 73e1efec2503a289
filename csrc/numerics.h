// Every numeric rule of the all-pairs engine, once on the C++ side (docs/metrics.md says why
// each is so). The Python copy is python/embgeom/numerics.py; tests/test_numerics.py checks that
// the two agree (through the small functions bindings.cpp exports from here).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace embgeom {
namespace numerics {

// Euclidean distance: |a|^2 + |b|^2 - 2 a.b cancels for near-identical rows. Where the squared
// distance from that formula is below kNearDuplicateTau * (|a|^2 + |b|^2), the distance is
// recomputed directly (direct_distance): NEAR_DUPLICATE_TAU in numerics.py.
constexpr float kNearDuplicateTau = 1.0f / 64;

inline bool is_near_duplicate(float sq_from_formula, float sq_norm_sum) {
  return sq_from_formula < kNearDuplicateTau * sq_norm_sum;
}

// sqrt(sum (a_k - b_k)^2), the differences of the fp32 rows summed in float64, rounded to fp32.
inline float direct_distance(const float* a, const float* b, int64_t d) {
  double acc = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    const double u = double(a[k]) - double(b[k]);
    acc += u * u;
  }
  return static_cast<float>(std::sqrt(acc));
}

// Histogram: bins per unit value, the one factor every engine multiplies by (float64).
inline double bin_scale(double lo, double hi, int64_t bins) { return double(bins) / (hi - lo); }

// Slot of a value: 0 = underflow (v < lo), 1..bins = bin b - 1, bins + 1 = overflow (v > hi).
// Bin b = floor((v - lo) * scale) in float64, and v = hi (or a value whose product rounds up to
// bins) falls in the last bin. numerics.bin_index in Python.
inline int64_t bin_index(double v, double lo, double hi, int64_t bins, double scale) {
  if (v < lo) return 0;
  if (v > hi) return bins + 1;
  const double f = std::min(std::max(std::floor((v - lo) * scale), 0.0), double(bins - 1));
  return static_cast<int64_t>(f) + 1;
}

// fp32 unit roundoff.
constexpr double kFp32UnitRoundoff = 1.0 / (1 << 24);

// Sound bound on |fast value - exact fp32 value| for any pair, from the actual rounding.
// x_full / x_rounded / x_delta: the largest L2 norm over the rows of x of the fp32 row, of its
// rounded (bf16) copy, and of their difference; the same for y. For a~ = a + da:
// a~.b~ - a.b = a~.(b~ - b) + (a~ - a).b, so by Cauchy-Schwarz
// |err| <= |a~||db| + |da||b| + 2 gamma_d |a~||b~| (fp32 accumulation on both sides).
// Euclidean: |sqrt(s) - sqrt(t)| <= sqrt(|s - t|), plus the fp32 rounding of the squared
// distance formula on both sides. numerics.fast_error_bound in Python.
inline double fast_error_bound(int64_t d, bool euclidean, double x_full, double x_rounded,
                               double x_delta, double y_full, double y_rounded, double y_delta) {
  const double e32 = kFp32UnitRoundoff;
  const double gam = (d + 2) * e32 / (1.0 - (d + 2) * e32);
  const double edot = (x_rounded * y_delta + x_delta * y_full +
                       2 * gam * std::max(x_rounded, x_full) * std::max(y_rounded, y_full)) * 1.01 +
                      1e-30;
  if (!euclidean) return edot;
  const double ed2 = 2 * edot + 8 * e32 * (x_full * x_full + y_full * y_full);
  return std::sqrt(ed2) * 1.01;
}

// Ranked lists: the engine keeps "larger key is better", ties by (i, j) ascending, so its key is
// the negation of numerics.order_key's ascending one: top v, bottom -v, near -|v - near|,
// outside pairs 0 ((i, j) order only).
enum class ListKind : int { top = 0, bottom = 1, near = 2, outside = 3 };
inline double order_key(ListKind kind, double v, double near = 0.0) {
  switch (kind) {
    case ListKind::top: return v;
    case ListKind::bottom: return -v;
    case ListKind::near: return -std::fabs(v - near);
    default: return 0.0;
  }
}

// Moments: engines sum (v - shift) and (v - shift)^2 with shift a value near the mean
// (numerics.moment_shift), so the variance does not cancel when std << |mean|. These convert
// the shifted sums of `count` values to (mean, M2) and back.
struct Moments {
  double mean = 0.0, m2 = 0.0;
};
inline Moments moments_from_shifted(int64_t count, double shift, double sum, double sumsq) {
  Moments m;
  if (count <= 0) return m;
  const double dev = sum / double(count);
  m.mean = shift + dev;
  m.m2 = std::max(0.0, sumsq - sum * dev);
  return m;
}
inline void shifted_from_moments(int64_t count, double shift, const Moments& m, double* sum,
                                 double* sumsq) {
  const double dev = m.mean - shift;
  *sum = double(count) * dev;
  *sumsq = m.m2 + double(count) * dev * dev;
}

}  // namespace numerics
}  // namespace embgeom
