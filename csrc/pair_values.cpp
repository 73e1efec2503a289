#include "pair_values.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu/isa.h"
#include "cpu/simd.h"

#if EMBGEOM_X86
#include <immintrin.h>
#endif

namespace embgeom {

namespace {

// The fixed order (pair_values.h): 16 running sums, sum l over d = l, l + 16, ... in turn, then
// t_l = s_l + s_(l+8), u_l = t_l + t_(l+4), w_l = u_l + u_(l+2), w_0 + w_1.
constexpr int kSums = 16;

inline double total16(const double* s) {
  double t[8], u[4];
  for (int l = 0; l < 8; ++l) t[l] = s[l] + s[l + 8];
  for (int l = 0; l < 4; ++l) u[l] = t[l] + t[l + 4];
  return (u[0] + u[2]) + (u[1] + u[3]);
}

template <bool SQDIST, typename Q>
inline double one_pair(const float* r, const Q* q, int64_t D) {
  auto term = [&](int64_t d) {
    if (SQDIST) {
      const double e = double(r[d]) - double(q[d]);
      return e * e;
    }
    return double(r[d]) * double(q[d]);
  };
  double s[kSums] = {};
  int64_t d = 0;
  for (; d + kSums <= D; d += kSums)
    for (int l = 0; l < kSums; ++l) s[l] += term(d + l);
  for (int l = 0; d < D; ++d, ++l) s[l] += term(d);
  return total16(s);
}

// (s_qc, s_qq, s_cc) -> the cosine (pair_values.h, pair_cosines)
inline double cosine_of(double qc, double qq, double cc) {
  if (cc == 0.0) return std::numeric_limits<double>::quiet_NaN();
  return std::min(std::max(qc / std::max(std::sqrt(qq * cc), 1e-300), -1.0), 1.0);
}

// The terms of dimensions [d, D) into running sums l = 0, 1, ... of each of the three (the last
// D % 16 of every build, and all of them in one_cosine), then the cosine
template <typename R, typename Q>
inline double cosine_from(const R* r, const Q* q, int64_t d, int64_t D, double* qc, double* qq, double* cc) {
  for (int l = 0; d < D; ++d, l = (l + 1) % kSums) {
    const double x = r[d], y = q[d];
    qc[l] += x * y;
    qq[l] += y * y;
    cc[l] += x * x;
  }
  return cosine_of(total16(qc), total16(qq), total16(cc));
}

template <typename R, typename Q>
inline double one_cosine(const R* r, const Q* q, int64_t D) {
  double qc[kSums] = {}, qq[kSums] = {}, cc[kSums] = {};
  return cosine_from(r, q, 0, D, qc, qq, cc);
}

#if EMBGEOM_X86
// The same order for float32 rows and queries (dot): four vectors of four sums. Each product of
// two floats is exact in double, so the FMA rounds once as the add does in one_pair: the
// values are one_pair's, bit for bit. Sixteen independent sums instead of four: four chains
// had each add wait on the one before (vocabulary rows in cache, 2 threads: 66 ns a pair with
// four scalar sums, 28 ns here).
EMBGEOM_AVX2 inline __m256d widen4(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }

EMBGEOM_AVX2 double one_pair_f32_avx2(const float* r, const float* q, int64_t D) {
  __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;  // sums 0-3, 4-7, 8-11, 12-15
  int64_t d = 0;
  for (; d + kSums <= D; d += kSums) {
    s0 = _mm256_fmadd_pd(widen4(r + d), widen4(q + d), s0);
    s1 = _mm256_fmadd_pd(widen4(r + d + 4), widen4(q + d + 4), s1);
    s2 = _mm256_fmadd_pd(widen4(r + d + 8), widen4(q + d + 8), s2);
    s3 = _mm256_fmadd_pd(widen4(r + d + 12), widen4(q + d + 12), s3);
  }
  alignas(32) double s[kSums];
  _mm256_store_pd(s, s0);
  _mm256_store_pd(s + 4, s1);
  _mm256_store_pd(s + 8, s2);
  _mm256_store_pd(s + 12, s3);
  for (int l = 0; d < D; ++d, ++l) s[l] += double(r[d]) * double(q[d]);  // the last D % 16
  return total16(s);
}

// one_cosine for float32 rows and queries: one_pair_f32_avx2's order for each of the three sums
// (every product of two floats exact: the values are one_cosine's, bit for bit)
EMBGEOM_AVX2 double one_cosine_f32_avx2(const float* r, const float* q, int64_t D) {
  __m256d qc[4], qq[4], cc[4];
  for (int v = 0; v < 4; ++v) qc[v] = qq[v] = cc[v] = _mm256_setzero_pd();
  int64_t d = 0;
  for (; d + kSums <= D; d += kSums)
    for (int v = 0; v < 4; ++v) {
      const __m256d x = widen4(r + d + 4 * v), y = widen4(q + d + 4 * v);
      qc[v] = _mm256_fmadd_pd(x, y, qc[v]);
      qq[v] = _mm256_fmadd_pd(y, y, qq[v]);
      cc[v] = _mm256_fmadd_pd(x, x, cc[v]);
    }
  alignas(32) double sqc[kSums], sqq[kSums], scc[kSums];
  for (int v = 0; v < 4; ++v) {
    _mm256_store_pd(sqc + 4 * v, qc[v]);
    _mm256_store_pd(sqq + 4 * v, qq[v]);
    _mm256_store_pd(scc + 4 * v, cc[v]);
  }
  return cosine_from(r, q, d, D, sqc, sqq, scc);
}

// The same with sums 0-7 and 8-15 in two zmm a sum: half the instructions of the AVX2 loop
// (2 threads, 2M random pairs of 100,000 x 384 rows: 140 ns a pair there against pair_values'
// 100); the same values, bit for bit
EMBGEOM_AVX512 double one_cosine_f32_avx512(const float* r, const float* q, int64_t D) {
  __m512d qc[2], qq[2], cc[2];
  for (int v = 0; v < 2; ++v) qc[v] = qq[v] = cc[v] = _mm512_setzero_pd();
  int64_t d = 0;
  for (; d + kSums <= D; d += kSums)
    for (int v = 0; v < 2; ++v) {
      const __m512d x = _mm512_cvtps_pd(_mm256_loadu_ps(r + d + 8 * v));
      const __m512d y = _mm512_cvtps_pd(_mm256_loadu_ps(q + d + 8 * v));
      qc[v] = _mm512_fmadd_pd(x, y, qc[v]);
      qq[v] = _mm512_fmadd_pd(y, y, qq[v]);
      cc[v] = _mm512_fmadd_pd(x, x, cc[v]);
    }
  alignas(64) double sqc[kSums], sqq[kSums], scc[kSums];
  for (int v = 0; v < 2; ++v) {
    _mm512_store_pd(sqc + 8 * v, qc[v]);
    _mm512_store_pd(sqq + 8 * v, qq[v]);
    _mm512_store_pd(scc + 8 * v, cc[v]);
  }
  return cosine_from(r, q, d, D, sqc, sqq, scc);
}
#endif

using OnePairF32 = double (*)(const float*, const float*, int64_t);

OnePairF32 pick_one_pair_f32(const char** name) {
  return pick_avx2_or_generic<OnePairF32>(one_pair<false, float>, EMBGEOM_IF_X86(one_pair_f32_avx2), "avx2",
                                          name);
}

OnePairF32 pick_one_cosine_f32(const char** name) {
#if EMBGEOM_X86
  if (isa_level() >= Isa::avx512) {
    *name = "avx512";
    return one_cosine_f32_avx512;
  }
#endif
  return pick_avx2_or_generic<OnePairF32>(one_cosine<float, float>, EMBGEOM_IF_X86(one_cosine_f32_avx2), "avx2", name);
}

// Pairs a few places ahead are prefetched: the rows of a pair list are scattered over a corpus
// larger than the caches, and one pair's arithmetic is too short for the out-of-order window to
// reach the next pair's loads. 3M random pairs of the vocabulary (384 dims, 2 threads, Zen 3),
// alternating runs: 221-245 ns a pair with 4 pairs ahead, 353-387 ns without (8 ahead: slower,
// the rows in flight outgrow L1).
constexpr int64_t kPrefetchAhead = 4;

template <typename R, typename Q, class OnePair>
void run(const R* rows, const Q* q, int64_t D, const int64_t* qi, const int64_t* ci, int64_t P,
         double* out, OnePair one) {
#ifdef EMBGEOM_OPENMP
#pragma omp parallel for schedule(static) if (P > 4096)
#endif
  for (int64_t p = 0; p < P; ++p) {
    if (p + kPrefetchAhead < P) {
      simd::prefetch_row(rows + ci[p + kPrefetchAhead] * D, D);
      if (qi[p + kPrefetchAhead] != qi[p]) simd::prefetch_row(q + qi[p + kPrefetchAhead] * D, D);
    }
    out[p] = one(rows + ci[p] * D, q + qi[p] * D, D);
  }
}

template <typename Q>
void dispatch(const float* rows, const Q* q, int64_t D, const int64_t* qi, const int64_t* ci, int64_t P,
              bool sqdist, double* out) {
  if (sqdist) {
    run(rows, q, D, qi, ci, P, out, one_pair<true, Q>);
  } else if constexpr (std::is_same_v<Q, float>) {
    const char* name = "";
    run(rows, q, D, qi, ci, P, out, pick_one_pair_f32(&name));
  } else {
    run(rows, q, D, qi, ci, P, out, one_pair<false, Q>);
  }
}

}  // namespace

const char* pair_values_path() { return picked_name(pick_one_pair_f32); }
const char* pair_cosines_path() { return picked_name(pick_one_cosine_f32); }

void pair_values(const float* rows, const double* q, int64_t D, const int64_t* qi, const int64_t* ci,
                 int64_t P, bool sqdist, double* out) {
  dispatch(rows, q, D, qi, ci, P, sqdist, out);
}

void pair_values(const float* rows, const float* q, int64_t D, const int64_t* qi, const int64_t* ci,
                 int64_t P, bool sqdist, double* out) {
  dispatch(rows, q, D, qi, ci, P, sqdist, out);
}

void pair_cosines(const float* rows, const double* q, int64_t D, const int64_t* qi, const int64_t* ci,
                  int64_t P, double* out) {
  run(rows, q, D, qi, ci, P, out, one_cosine<float, double>);
}

void pair_cosines(const double* rows, const double* q, int64_t D, const int64_t* qi, const int64_t* ci,
                  int64_t P, double* out) {
  run(rows, q, D, qi, ci, P, out, one_cosine<double, double>);
}

void pair_cosines(const float* rows, const float* q, int64_t D, const int64_t* qi, const int64_t* ci,
                  int64_t P, double* out) {
  const char* name = "";
  run(rows, q, D, qi, ci, P, out, pick_one_cosine_f32(&name));
}

}  // namespace embgeom
