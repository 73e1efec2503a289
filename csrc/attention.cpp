#include "attention.h"

#include "cpu/isa.h"
#if EMBGEOM_X86
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "check.h"

namespace embgeom {
namespace {

// -sum v ln v over the row's valid keys, v = keep * p + uniform, accumulated in float64; terms
// with v below FLT_MIN (at most 1e-36 each) count as 0 ln 0 = 0. The AVX-512 path computes ln
// with getexp/getmant and Cephes' logf polynomial (relative error ~1e-7), 16 keys at a time:
// std::log per element made this kernel the largest cost of `embgeom text`. The AVX2 path takes
// the same polynomial from the float's bits in intrinsics, 8 keys at a time; the portable path
// (SSE2, NEON) in plain loops over blocks of 16 keys that the compiler vectorises.
double row_entropy_scalar(const float* row, const float* weight, int64_t T, float keep, float uniform) {
  double ent = 0.0;
  for (int64_t k = 0; k < T; ++k) {
    if (weight && weight[k] == 0.0f) continue;
    const double v = double(keep * row[k] + uniform);
    if (v >= double(std::numeric_limits<float>::min())) ent -= v * std::log(v);
  }
  return ent;
}

// Cephes' logf polynomial in x - 1, highest power first (every path evaluates it in this order)
constexpr int kLogTerms = 9;
constexpr float kLogPoly[kLogTerms] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                                       -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                                       2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};

// ln v for normal floats v > 0: v = x 2^e with x in [sqrt(0.5), sqrt(2)), Cephes' logf.
__attribute__((always_inline)) inline float log_poly(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  float e = float(int32_t(u >> 23) - 127);
  u = (u & 0x007fffffu) | 0x3f800000u;  // mantissa in [1, 2)
  float x;
  std::memcpy(&x, &u, 4);
  const bool high = x > 1.41421356f;
  x = high ? x * 0.5f : x;
  e = high ? e + 1.0f : e;
  x = x - 1.0f;
  const float z = x * x;
  float y = kLogPoly[0];
  for (int c = 1; c < kLogTerms; ++c) y = y * x + kLogPoly[c];
  y = y * x * z;
  y = e * -2.12194440e-4f + y;
  y = z * -0.5f + y;
  return e * 0.693359375f + (x + y);
}

__attribute__((always_inline)) inline double row_entropy_body(const float* row, const float* mask_weight,
                                                              int64_t T, float keep, float uniform) {
  constexpr int W = 16;
  const float tiny = std::numeric_limits<float>::min();
  double acc[W] = {};
  int64_t k = 0;
  for (; k + W <= T; k += W) {
    // branch-free so the compiler vectorises it: masked keys and terms below FLT_MIN add 0
    float weight[W], term[W];
    if (mask_weight) {
      for (int l = 0; l < W; ++l) weight[l] = mask_weight[k + l];
    } else {
      for (int l = 0; l < W; ++l) weight[l] = 1.0f;
    }
    for (int l = 0; l < W; ++l) {
      const float v = keep * row[k + l] + uniform;
      const bool use = v >= tiny && weight[l] != 0.0f;
      // a select, not a product with the weight: a padded key's NaN must add nothing
      term[l] = use ? v * log_poly(v) : 0.0f;
    }
    for (int l = 0; l < W; ++l) acc[l] += double(term[l]);
  }
  double ent = 0.0;
  for (int l = 0; l < W; ++l) ent += acc[l];
  for (; k < T; ++k) {
    if (mask_weight && mask_weight[k] == 0.0f) continue;
    const float v = keep * row[k] + uniform;
    if (v >= tiny) ent += double(v * log_poly(v));
  }
  return -ent;
}

double row_entropy_generic(const float* row, const float* weight, int64_t T, float keep, float uniform) {
  return row_entropy_body(row, weight, T, keep, uniform);
}

#if EMBGEOM_X86  // off x86 the portable body is the NEON path
// ln v for normal floats v > 0, 8 lanes: the bits of log_poly, in intrinsics
EMBGEOM_AVX2 inline __m256 log_ps_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(u, 23), _mm256_set1_epi32(127)));
  __m256 x = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(u, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 high = _mm256_cmp_ps(x, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
  x = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(0.5f)), high);
  e = _mm256_add_ps(e, _mm256_and_ps(high, one));
  x = _mm256_sub_ps(x, one);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(kLogPoly[0]);
  for (int c = 1; c < kLogTerms; ++c) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kLogPoly[c]));
  y = _mm256_mul_ps(_mm256_mul_ps(y, x), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fmadd_ps(z, _mm256_set1_ps(-0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(x, y));
}

// 8 float32 terms added to two float64 accumulators (lanes 0-3, 4-7), and their total
EMBGEOM_AVX2 inline void add_terms_pd(__m256d& acc0, __m256d& acc1, __m256 term) {
  acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(term)));
  acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(term, 1)));
}
EMBGEOM_AVX2 inline double total_pd(__m256d acc0, __m256d acc1) {
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// The AVX2 row in intrinsics: GCC's vectorisation of the portable body kept half of its float64
// sums scalar and the rest on the stack (perf; about 1 ns a key on the Zen 3 host)
EMBGEOM_AVX2 double row_entropy_avx2(const float* row, const float* weight, int64_t T, float keep,
                                     float uniform) {
  const __m256 vk = _mm256_set1_ps(keep), vu = _mm256_set1_ps(uniform), one = _mm256_set1_ps(1.0f);
  const __m256 tiny = _mm256_set1_ps(std::numeric_limits<float>::min()), zero = _mm256_setzero_ps();
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t k = 0;
  for (; k + 8 <= T; k += 8) {
    const __m256 v = _mm256_fmadd_ps(vk, _mm256_loadu_ps(row + k), vu);
    __m256 use = _mm256_cmp_ps(v, tiny, _CMP_GE_OQ);
    if (weight) use = _mm256_and_ps(use, _mm256_cmp_ps(_mm256_loadu_ps(weight + k), zero, _CMP_NEQ_UQ));
    add_terms_pd(acc0, acc1, _mm256_and_ps(use, _mm256_mul_ps(v, log_ps_avx2(_mm256_blendv_ps(one, v, use)))));
  }
  double ent = total_pd(acc0, acc1);
  for (; k < T; ++k) {
    if (weight && weight[k] == 0.0f) continue;
    const float v = keep * row[k] + uniform;
    if (v >= std::numeric_limits<float>::min()) ent += double(v * log_poly(v));
  }
  return -ent;
}
#endif

#if EMBGEOM_X86
EMBGEOM_AVX512 inline __m512 log_ps(__m512 v) {
  // v = x * 2^e with x in [sqrt(0.5), sqrt(2)): getmant gives [1, 2), halve the upper part
  __m512 x = _mm512_getmant_ps(v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
  __m512 e = _mm512_getexp_ps(v);
  const __mmask16 high = _mm512_cmp_ps_mask(x, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  x = _mm512_mask_mul_ps(x, high, x, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, high, e, _mm512_set1_ps(1.0f));
  x = _mm512_sub_ps(x, _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(kLogPoly[0]);
  for (int c = 1; c < kLogTerms; ++c) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kLogPoly[c]));
  y = _mm512_mul_ps(_mm512_mul_ps(y, x), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fmadd_ps(z, _mm512_set1_ps(-0.5f), y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(x, y));
}

EMBGEOM_AVX512 double row_entropy_avx512(const float* row, const float* weight, int64_t T, float keep,
                                         float uniform) {
  const __m512 vk = _mm512_set1_ps(keep), vu = _mm512_set1_ps(uniform);
  const __m512 tiny = _mm512_set1_ps(std::numeric_limits<float>::min());
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  for (int64_t k = 0; k < T; k += 16) {
    const int64_t rem = T - k;
    __mmask16 m = rem >= 16 ? __mmask16(0xffff) : __mmask16((1u << rem) - 1);
    if (weight) m &= _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(m, weight + k), _mm512_setzero_ps(), _CMP_NEQ_UQ);
    const __m512 v = _mm512_fmadd_ps(vk, _mm512_maskz_loadu_ps(m, row + k), vu);
    m &= _mm512_cmp_ps_mask(v, tiny, _CMP_GE_OQ);
    const __m512 term = _mm512_maskz_mul_ps(m, v, log_ps(_mm512_mask_blend_ps(m, _mm512_set1_ps(1.0f), v)));
    acc0 = _mm512_add_pd(acc0, _mm512_cvtps_pd(_mm512_castps512_ps256(term)));
    acc1 = _mm512_add_pd(acc1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(term), 1))));
  }
  return -_mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
}

#endif  // EMBGEOM_X86

}  // namespace

// EMBGEOM_SCALAR_ENTROPY=1: the scalar std::log loop (the reference the vector paths are
// tested against)
RowEntropyFn pick_row_entropy(const char** name) {
  const Isa level = isa_level();
  if (std::getenv("EMBGEOM_SCALAR_ENTROPY")) {
    *name = "scalar";
    return row_entropy_scalar;
  }
#if EMBGEOM_X86
  if (level == Isa::avx512) {
    *name = "avx512";
    return row_entropy_avx512;
  }
  if (level == Isa::avx2) {
    *name = "avx2";
    return row_entropy_avx2;
  }
#endif
  (void)level;
  *name = EMBGEOM_NEON ? "portable-neon" : "portable-generic";
  return row_entropy_generic;
}

namespace {

// JS(p, q) of one row pair, summed over its keys: (s / 4) F(x) a key, s = p + q, x = (p - q) / s,
// F(x) = (1 + x) ln(1 + x) + (1 - x) ln(1 - x) = 1/2 [p ln(2p / s) + q ln(2q / s)] 4 / s. Every term is
// >= 0, so nothing cancels in the sum: for |x| < 1/4 the series F = sum_k x^2k / (k (2k - 1)) (6
// terms: the next is below 1e-9 of the sum), beyond it the logarithms (F >= 0.063 there, their two
// terms ~4x that: their rounding costs ~1e-6 of it). The identity ln 2 + (sum p ln p + sum q ln q - sum s ln s) / 2 had
// cancelled: heads with JS 1e-7 a row came out 13 % low. p, q > 0 (smoothed rows; padded keys
// are 1/2 in both rows: x = 0, a 0 term). float32 terms, float64 sums.
constexpr int kJsTerms = 6;
constexpr float kJsSeries[kJsTerms] = {1.0f / 66, 1.0f / 45, 1.0f / 28, 1.0f / 15, 1.0f / 6, 1.0f};
constexpr float kJsSeriesBelow = 0.0625f;  // x^2 below which the series is used

__attribute__((always_inline)) inline float js_term(float p, float q) {
  const float s = p + q;
  const float inv = 1.0f / s;  // (one division for x, 2p / s and 2q / s)
  const float x = (p - q) * inv;
  const float y = x * x;
  float f = kJsSeries[0];
  for (int c = 1; c < kJsTerms; ++c) f = f * y + kJsSeries[c];
  const float series = 0.25f * s * (y * f);
  const float logs = 0.5f * (p * log_poly(2.0f * p * inv) + q * log_poly(2.0f * q * inv));
  // below the smallest normal float 1 / s overflows (x = 0 x inf): such a term is 0 within
  // float32 anyway (the rows are smoothed far above it)
  return s >= std::numeric_limits<float>::min() ? (y < kJsSeriesBelow ? series : logs) : 0.0f;
}

double pair_js_generic(const float* p, const float* q, int64_t T) {
  constexpr int W = 16;
  double acc[W] = {};
  int64_t k = 0;
  for (; k + W <= T; k += W) {
    float term[W];
    for (int l = 0; l < W; ++l) term[l] = js_term(p[k + l], q[k + l]);
    for (int l = 0; l < W; ++l) acc[l] += double(term[l]);
  }
  double sum = 0.0;
  for (int l = 0; l < W; ++l) sum += acc[l];
  for (; k < T; ++k) sum += double(js_term(p[k], q[k]));
  return sum;
}

#if EMBGEOM_X86
// 8 keys: the series everywhere, the logarithms only when a lane needs them (similar heads: none)
EMBGEOM_AVX2 inline __m256 js_terms_avx2(__m256 p, __m256 q) {
  const __m256 s = _mm256_add_ps(p, q);
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), s);  // (one division for x, 2p / s and 2q / s)
  const __m256 x = _mm256_mul_ps(_mm256_sub_ps(p, q), inv);
  const __m256 y = _mm256_mul_ps(x, x);
  __m256 f = _mm256_set1_ps(kJsSeries[0]);
  for (int c = 1; c < kJsTerms; ++c) f = _mm256_fmadd_ps(f, y, _mm256_set1_ps(kJsSeries[c]));
  __m256 term = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.25f), s), _mm256_mul_ps(y, f));
  const __m256 far = _mm256_cmp_ps(y, _mm256_set1_ps(kJsSeriesBelow), _CMP_GE_OQ);
  if (_mm256_movemask_ps(far)) {
    const __m256 twice = _mm256_add_ps(inv, inv);
    const __m256 lp = log_ps_avx2(_mm256_mul_ps(p, twice));
    const __m256 lq = log_ps_avx2(_mm256_mul_ps(q, twice));
    const __m256 logs = _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_fmadd_ps(p, lp, _mm256_mul_ps(q, lq)));
    term = _mm256_blendv_ps(term, logs, far);
  }
  // (as js_term: no term below the smallest normal float, where 1 / s overflows)
  return _mm256_and_ps(term, _mm256_cmp_ps(s, _mm256_set1_ps(std::numeric_limits<float>::min()), _CMP_GE_OQ));
}

EMBGEOM_AVX2 double pair_js_avx2(const float* p, const float* q, int64_t T) {
  __m256d acc0 = _mm256_setzero_pd(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t k = 0;
  for (; k + 16 <= T; k += 16) {
    add_terms_pd(acc0, acc1, js_terms_avx2(_mm256_loadu_ps(p + k), _mm256_loadu_ps(q + k)));
    add_terms_pd(acc2, acc3, js_terms_avx2(_mm256_loadu_ps(p + k + 8), _mm256_loadu_ps(q + k + 8)));
  }
  for (; k + 8 <= T; k += 8) add_terms_pd(acc0, acc1, js_terms_avx2(_mm256_loadu_ps(p + k), _mm256_loadu_ps(q + k)));
  double sum = total_pd(_mm256_add_pd(acc0, acc2), _mm256_add_pd(acc1, acc3));
  for (; k < T; ++k) sum += double(js_term(p[k], q[k]));
  return sum;
}
#endif

#if EMBGEOM_X86
// 16 keys a step, the tail masked (masked lanes are 0 and 0: no term); as js_terms_avx2
EMBGEOM_AVX512 inline __m512 js_terms_avx512(__m512 p, __m512 q) {
  const __m512 s = _mm512_add_ps(p, q);
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), s);
  const __m512 x = _mm512_mul_ps(_mm512_sub_ps(p, q), inv);
  const __m512 y = _mm512_mul_ps(x, x);
  __m512 f = _mm512_set1_ps(kJsSeries[0]);
  for (int c = 1; c < kJsTerms; ++c) f = _mm512_fmadd_ps(f, y, _mm512_set1_ps(kJsSeries[c]));
  __m512 term = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.25f), s), _mm512_mul_ps(y, f));
  const __mmask16 far = _mm512_cmp_ps_mask(y, _mm512_set1_ps(kJsSeriesBelow), _CMP_GE_OQ);
  const __m512 tiny = _mm512_set1_ps(std::numeric_limits<float>::min());
  if (far) {
    // the arguments kept >= the smallest normal float: getexp(0) is -inf, and 0 x -inf NaN
    const __m512 twice = _mm512_add_ps(inv, inv);
    const __m512 lp = log_ps(_mm512_max_ps(_mm512_mul_ps(p, twice), tiny));
    const __m512 lq = log_ps(_mm512_max_ps(_mm512_mul_ps(q, twice), tiny));
    const __m512 logs = _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_fmadd_ps(p, lp, _mm512_mul_ps(q, lq)));
    term = _mm512_mask_blend_ps(far, term, logs);
  }
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, tiny, _CMP_GE_OQ), term);
}

EMBGEOM_AVX512 double pair_js_avx512(const float* p, const float* q, int64_t T) {
  __m512d acc0 = _mm512_setzero_pd(), acc1 = acc0;
  for (int64_t k = 0; k < T; k += 16) {
    const int64_t rem = T - k;
    const __mmask16 m = rem >= 16 ? __mmask16(0xffff) : __mmask16((1u << rem) - 1);
    const __m512 term = js_terms_avx512(_mm512_maskz_loadu_ps(m, p + k), _mm512_maskz_loadu_ps(m, q + k));
    acc0 = _mm512_add_pd(acc0, _mm512_cvtps_pd(_mm512_castps512_ps256(term)));
    acc1 = _mm512_add_pd(acc1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(term), 1))));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
}
#endif

using PairJsFn = double (*)(const float*, const float*, int64_t);

PairJsFn pick_pair_js(const char** name) {
#if EMBGEOM_X86
  if (isa_level() == Isa::avx512) {
    *name = "avx512";
    return pair_js_avx512;
  }
#endif
  return pick_avx2_or_generic<PairJsFn>(pair_js_generic, EMBGEOM_IF_X86(pair_js_avx2), "avx2", name);
}

}  // namespace

const char* attention_entropy_path() { return picked_name(pick_row_entropy); }

const char* js_pair_sums_path() { return picked_name(pick_pair_js); }

void js_pair_sums(const float* P, int64_t K, int64_t R, int64_t T, double* out) {
  EMBGEOM_CHECK(K >= 0 && R >= 0 && T >= 0, "js_pair_sums: bad shape");
  const char* name = "";
  const PairJsFn pair_js = pick_pair_js(&name);
  // blocks of rows small enough that every head's rows of a block stay in L2; each block's K x K
  // partial sums are written by one thread and added in block order: the same sums whatever
  // the thread count
  constexpr int64_t kRowBlock = 8;
  const int64_t blocks = (R + kRowBlock - 1) / kRowBlock;
  std::vector<double> part(size_t(blocks) * K * K, 0.0);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    double* acc = part.data() + blk * K * K;
    const int64_t r0 = blk * kRowBlock, r1 = std::min(R, r0 + kRowBlock);
    for (int64_t a = 0; a < K; ++a)
      for (int64_t b = a + 1; b < K; ++b) {
        double s = 0.0;
        for (int64_t r = r0; r < r1; ++r) s += pair_js(P + (a * R + r) * T, P + (b * R + r) * T, T);
        acc[a * K + b] = s;
      }
  }
  std::fill(out, out + K * K, 0.0);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const double* acc = part.data() + blk * K * K;
    for (int64_t i = 0; i < K * K; ++i) out[i] += acc[i];
  }
}

void attention_row_entropy(const float* p, int64_t B, int64_t H, int64_t T, const uint8_t* mask,
                           double smoothing, float* out) {
  EMBGEOM_CHECK(B >= 0 && H >= 0 && T >= 0, "attention_row_entropy: bad shape");
  EMBGEOM_CHECK(smoothing >= 0.0 && smoothing <= 1.0,
                "smoothing: expected a value in [0, 1], got " << smoothing);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const char* name = "";
  const RowEntropyFn row_entropy = pick_row_entropy(&name);
#pragma omp parallel
  {
  // the key mask as float weights, made once per text: the vector loops load them (bytes turned
  // into floats lane by lane cost more than the logarithms: perf, AVX2 Zen 3)
  std::vector<float> weight(mask ? T : 0);
#pragma omp for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const uint8_t* m = mask ? mask + b * T : nullptr;
      if (m)
        for (int64_t t = 0; t < T; ++t) weight[t] = m[t] ? 1.0f : 0.0f;
      int64_t n_valid = T;
      if (m) {
        n_valid = 0;
        for (int64_t t = 0; t < T; ++t) n_valid += m[t] ? 1 : 0;
      }
      const double uniform = n_valid > 0 ? smoothing / double(n_valid) : 0.0;
      const double keep = 1.0 - smoothing;
      for (int64_t q = 0; q < T; ++q) {
        float* dst = out + (b * H + h) * T + q;
        if (m && !m[q]) {
          *dst = nan;
          continue;
        }
        const float* row = p + ((b * H + h) * T + q) * T;
        const double ent = row_entropy(row, m ? weight.data() : nullptr, T, float(keep), float(uniform));
        *dst = static_cast<float>(ent);
      }
    }
  }
  }
}

void prefix_sums_below(const float* x, int64_t R, int64_t T, double mass, int64_t* out) {
  EMBGEOM_CHECK(R >= 0 && T >= 0, "prefix_sums_below: bad shape");
  const double bound = -mass;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const float* row = x + r * T;
    double s = 0.0;
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) {
      s += double(row[t]);
      n += s > bound;  // (-s < mass, as numpy compares the negated running sums)
    }
    out[r] = n;
  }
}

}  // namespace embgeom
