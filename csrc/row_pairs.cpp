#include "row_pairs.h"

#include "check.h"
#include "cpu/isa.h"

#if EMBGEOM_X86
#include <immintrin.h>
#endif

namespace embgeom {
namespace {

// one element pair's terms added to the four sums (|a|^2, |b|^2, |a - b|^2, a . b)
inline void add_terms(double x, double y, double* s) {
  const double e = x - y;
  s[0] += x * x;
  s[1] += y * y;
  s[2] += e * e;
  s[3] += x * y;
}

// four float64 sums of one row pair, four partial sums each (one sum waits on every add)
void sums_generic(const float* a, const float* b, int64_t D, double* out) {
  double aa[4] = {}, bb[4] = {}, dd[4] = {}, ab[4] = {};
  int64_t k = 0;
  for (; k + 4 <= D; k += 4)
    for (int l = 0; l < 4; ++l) {
      const double x = a[k + l], y = b[k + l], e = x - y;
      aa[l] += x * x;
      bb[l] += y * y;
      dd[l] += e * e;
      ab[l] += x * y;
    }
  const auto total = [](const double* s) { return (s[0] + s[1]) + (s[2] + s[3]); };
  out[0] = total(aa);
  out[1] = total(bb);
  out[2] = total(dd);
  out[3] = total(ab);
  for (; k < D; ++k) add_terms(a[k], b[k], out);
}

#if EMBGEOM_X86
EMBGEOM_AVX2 inline double total_avx2(__m256d s) {
  alignas(32) double l[4];
  _mm256_store_pd(l, s);
  return (l[0] + l[1]) + (l[2] + l[3]);
}

EMBGEOM_AVX2 void sums_avx2(const float* a, const float* b, int64_t D, double* out) {
  __m256d aa = _mm256_setzero_pd(), bb = aa, dd = aa, ab = aa;
  int64_t k = 0;
  for (; k + 4 <= D; k += 4) {
    const __m256d x = _mm256_cvtps_pd(_mm_loadu_ps(a + k)), y = _mm256_cvtps_pd(_mm_loadu_ps(b + k));
    const __m256d e = _mm256_sub_pd(x, y);
    aa = _mm256_fmadd_pd(x, x, aa);
    bb = _mm256_fmadd_pd(y, y, bb);
    dd = _mm256_fmadd_pd(e, e, dd);
    ab = _mm256_fmadd_pd(x, y, ab);
  }
  out[0] = total_avx2(aa);
  out[1] = total_avx2(bb);
  out[2] = total_avx2(dd);
  out[3] = total_avx2(ab);
  for (; k < D; ++k) add_terms(a[k], b[k], out);
}
#endif

using SumsFn = void (*)(const float*, const float*, int64_t, double*);

SumsFn pick_sums(const char** name) {
  return pick_avx2_or_generic<SumsFn>(sums_generic, EMBGEOM_IF_X86(sums_avx2), "avx2", name);
}

}  // namespace

const char* row_pair_sums_path() { return picked_name(pick_sums); }

// Below this many values a call opens no parallel region (a query's norm): the pool's threads
// would then spin beside the caller's next BLAS call on the same cores.
constexpr int64_t kParallelValues = int64_t(1) << 16;

void row_pair_sums(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t N, int64_t D, double* out) {
  EMBGEOM_CHECK(N >= 0 && D >= 0, "row_pair_sums: bad shape");
  const char* name = "";
  const SumsFn sums = pick_sums(&name);
#pragma omp parallel for schedule(static) if (N * D >= kParallelValues)
  for (int64_t r = 0; r < N; ++r) sums(a + r * lda, b + r * ldb, D, out + 4 * r);
}

void row_moments(const float* x, int64_t ldx, int64_t N, int64_t D, double* out) {
  EMBGEOM_CHECK(N >= 0 && D >= 1, "row_moments: bad shape");
#pragma omp parallel for schedule(static) if (N * D >= kParallelValues)
  for (int64_t r = 0; r < N; ++r) {
    const float* row = x + r * ldx;
    // four partial sums a moment (a plain loop the compiler vectorises; one sum waits on each add)
    double s[4] = {};
    int64_t k = 0;
    for (; k + 4 <= D; k += 4)
      for (int l = 0; l < 4; ++l) s[l] += double(row[k + l]);
    for (; k < D; ++k) s[0] += double(row[k]);
    const double mean = ((s[0] + s[1]) + (s[2] + s[3])) / double(D);
    double m2[4] = {}, m3[4] = {}, m4[4] = {};
    for (k = 0; k + 4 <= D; k += 4)
      for (int l = 0; l < 4; ++l) {
        const double d = double(row[k + l]) - mean, d2 = d * d;
        m2[l] += d2;
        m3[l] += d2 * d;
        m4[l] += d2 * d2;
      }
    for (; k < D; ++k) {
      const double d = double(row[k]) - mean, d2 = d * d;
      m2[0] += d2;
      m3[0] += d2 * d;
      m4[0] += d2 * d2;
    }
    const auto total = [](const double* t) { return (t[0] + t[1]) + (t[2] + t[3]); };
    double* o = out + 4 * r;
    o[0] = mean;
    o[1] = total(m2) / double(D);
    o[2] = total(m3) / double(D);
    o[3] = total(m4) / double(D);
  }
}

}  // namespace embgeom
