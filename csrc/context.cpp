#include "context.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "check.h"
#include "cpu/isa.h"
#include "cpu/simd.h"

#if EMBGEOM_X86
#include <immintrin.h>
#endif

namespace embgeom {
namespace {

constexpr int kRows = 4;   // query rows sharing one pass over the keys (AVX2, SSE2, NEON)
constexpr int kRows512 = 8;  // the AVX-512 block's: 8 zmm accumulators hide the FMAs' latency
constexpr int kMaxRows = 8;
constexpr int kCols = 16;  // keys a register block holds (kt's rows are padded to a multiple)

// Scores of kRows query rows against the keys of kt (d rows of ldk floats, key-major, zero
// beyond the n keys), into acc (kRows rows of ldk): a kRows x kCols block of accumulators stays
// in registers over all d. Vectors of W = 4 lanes (cpu/simd.h: SSE2, NEON; the AVX2 block is
// written in intrinsics below). Plain arrays were kept in memory by GCC, each step waiting on a
// store.
template <int W>
__attribute__((always_inline)) inline void scores_body(const float* const* q, const float* kt, int64_t ldk,
                                                       int64_t d, float* acc) {
  using namespace simd;
  using f32 = typename Lanes<W>::f32;
  constexpr int V = kCols / W;
  for (int64_t c0 = 0; c0 < ldk; c0 += kCols) {
    f32 a[kRows][V] = {};
    for (int64_t k = 0; k < d; ++k) {
      f32 col[V];
      for (int v = 0; v < V; ++v) col[v] = load<f32>(kt + k * ldk + c0 + v * W);
      for (int r = 0; r < kRows; ++r) {
        const f32 x = splat<f32>(q[r][k]);
        for (int v = 0; v < V; ++v) a[r][v] += x * col[v];
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < V; ++v) store(acc + r * ldk + c0 + v * W, a[r][v]);
  }
}

void scores_generic(const float* const* q, const float* kt, int64_t n, int64_t d, float* acc) {
  scores_body<4>(q, kt, n, d, acc);
}

#if EMBGEOM_X86
// The AVX2 block in intrinsics: each query value one vbroadcastss from memory (the vector types'
// splat compiled to an add and a broadcast, or to lane inserts)
EMBGEOM_AVX2 void scores_avx2(const float* const* q, const float* kt, int64_t ldk, int64_t d, float* acc) {
  static_assert(kRows == 4 && kCols == 16, "the register block below is 4 x 16");
  const float *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3];
  for (int64_t c0 = 0; c0 < ldk; c0 += kCols) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
    __m256 a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    const float* col = kt + c0;
    for (int64_t k = 0; k < d; ++k, col += ldk) {
      const __m256 k0 = _mm256_loadu_ps(col), k1 = _mm256_loadu_ps(col + 8);
      __m256 x = _mm256_broadcast_ss(q0 + k);
      a00 = _mm256_fmadd_ps(x, k0, a00);
      a01 = _mm256_fmadd_ps(x, k1, a01);
      x = _mm256_broadcast_ss(q1 + k);
      a10 = _mm256_fmadd_ps(x, k0, a10);
      a11 = _mm256_fmadd_ps(x, k1, a11);
      x = _mm256_broadcast_ss(q2 + k);
      a20 = _mm256_fmadd_ps(x, k0, a20);
      a21 = _mm256_fmadd_ps(x, k1, a21);
      x = _mm256_broadcast_ss(q3 + k);
      a30 = _mm256_fmadd_ps(x, k0, a30);
      a31 = _mm256_fmadd_ps(x, k1, a31);
    }
    float* out = acc + c0;
    _mm256_storeu_ps(out, a00);
    _mm256_storeu_ps(out + 8, a01);
    _mm256_storeu_ps(out + ldk, a10);
    _mm256_storeu_ps(out + ldk + 8, a11);
    _mm256_storeu_ps(out + 2 * ldk, a20);
    _mm256_storeu_ps(out + 2 * ldk + 8, a21);
    _mm256_storeu_ps(out + 3 * ldk, a30);
    _mm256_storeu_ps(out + 3 * ldk + 8, a31);
  }
}

// The AVX-512 block: kRows512 query rows x kCols keys, one zmm of keys a step and each query
// value broadcast from memory (twice the AVX2 block's products a step: a layer of 32 x 128 tokens,
// 12 heads of 32, 5.4 ms against 6.5 with the AVX2 block, 2 threads, Emerald Rapids). Each row's
// own key (query r of the block is key self0 + r) is stored as NaN, and the row maxima are taken
// from the registers (maxima[r]); keys past n are NaN columns in kt: a max leaves NaN out as
// max_avx2 does, and no hit takes it (a separate pass over the stored scores for the maxima had
// been 13 % of the kernel's time).
EMBGEOM_AVX512 void scores_max_avx512(const float* const* q, const float* kt, int64_t ldk, int64_t d, float* acc,
                                      int64_t self0, float* maxima) {
  static_assert(kRows512 == 8 && kCols == 16, "the register block below is 8 x 16");
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 nan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
  __m512 top[kRows512];
  for (int r = 0; r < kRows512; ++r) top[r] = ninf;
  for (int64_t c0 = 0; c0 < ldk; c0 += kCols) {
    __m512 a[kRows512];
    for (int r = 0; r < kRows512; ++r) a[r] = _mm512_setzero_ps();
    const float* col = kt + c0;
    for (int64_t k = 0; k < d; ++k, col += ldk) {
      const __m512 keys = _mm512_loadu_ps(col);
      for (int r = 0; r < kRows512; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][k]), keys, a[r]);
    }
    for (int r = 0; r < kRows512; ++r) {
      const int64_t own = self0 + r - c0;
      if (own >= 0 && own < kCols) a[r] = _mm512_mask_mov_ps(a[r], __mmask16(1u << own), nan);
      top[r] = _mm512_max_ps(a[r], top[r]);  // (x, m): a NaN x leaves m
      _mm512_storeu_ps(acc + r * ldk + c0, a[r]);
    }
  }
  for (int r = 0; r < kRows512; ++r) maxima[r] = _mm512_reduce_max_ps(top[r]);
}

// the columns c of s[0, n) (n a multiple of kCols) with s[c] >= reach, ascending, 16 at a time
EMBGEOM_AVX512 int64_t hits_avx512(const float* s, int64_t n, float reach, int32_t* cand) {
  const __m512 r = _mm512_set1_ps(reach);
  int64_t nc = 0;
  for (int64_t c = 0; c < n; c += kCols)
    for (unsigned m = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + c), r, _CMP_GE_OQ); m; m &= m - 1)
      cand[nc++] = static_cast<int32_t>(c + __builtin_ctz(m));
  return nc;
}
#endif

// max of s[0, n), n a multiple of kCols, NaN entries left out (-inf if every entry is NaN): kCols
// running maxima (a select the compiler vectorises; one running maximum is a chain of dependent
// compares)
float max_generic(const float* s, int64_t n) {
  float m[kCols];
  for (int l = 0; l < kCols; ++l) m[l] = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < n; c += kCols)
    for (int l = 0; l < kCols; ++l) m[l] = s[c + l] > m[l] ? s[c + l] : m[l];
  float top = m[0];
  for (int l = 1; l < kCols; ++l) top = m[l] > top ? m[l] : top;
  return top;
}

// the columns c of s[0, n) (n a multiple of kCols) with s[c] >= reach, ascending, into cand:
// kCols keys tested at once (a reduction the compiler vectorises), key by key only in the few
// blocks with one
int64_t hits_generic(const float* s, int64_t n, float reach, int32_t* cand) {
  int64_t nc = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kCols) {
    bool hit = false;
    for (int l = 0; l < kCols; ++l) hit |= s[c0 + l] >= reach;
    if (__builtin_expect(hit, 0))
      for (int l = 0; l < kCols; ++l)
        if (s[c0 + l] >= reach) cand[nc++] = static_cast<int32_t>(c0 + l);
  }
  return nc;
}

#if EMBGEOM_X86
EMBGEOM_AVX2 float max_avx2(const float* s, int64_t n) {
  __m256 m0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  for (int64_t c = 0; c < n; c += kCols) {
    // (x, m): a NaN x leaves m, as the generic select does
    m0 = _mm256_max_ps(_mm256_loadu_ps(s + c), m0);
    m1 = _mm256_max_ps(_mm256_loadu_ps(s + c + 8), m1);
  }
  m0 = _mm256_max_ps(m0, m1);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

EMBGEOM_AVX2 int64_t hits_avx2(const float* s, int64_t n, float reach, int32_t* cand) {
  const __m256 r = _mm256_set1_ps(reach);
  int64_t nc = 0;
  for (int64_t c = 0; c < n; c += 8) {
    unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + c), r, _CMP_GE_OQ)));
    for (; m; m &= m - 1) cand[nc++] = static_cast<int32_t>(c + __builtin_ctz(m));
  }
  return nc;
}
#endif

// one vector level's kernels
struct Kernels {
  void (*scores)(const float* const*, const float*, int64_t, int64_t, float*);  // `rows` query rows
  // or the scores with each row's own key NaN and the row maxima (nullptr: scores, row_max)
  void (*scores_max)(const float* const*, const float*, int64_t, int64_t, float*, int64_t, float*);
  int rows;
  float (*row_max)(const float*, int64_t);
  int64_t (*hits)(const float*, int64_t, float, int32_t*);
  const char* name;
};

Kernels pick_kernels() {
#if EMBGEOM_X86
  if (isa_level() >= Isa::avx512) return {nullptr, scores_max_avx512, kRows512, max_avx2, hits_avx512, "avx512"};
  if (isa_level() >= Isa::avx2) return {scores_avx2, nullptr, kRows, max_avx2, hits_avx2, "avx2"};
#endif
  return {scores_generic, nullptr, kRows, max_generic, hits_generic,
          EMBGEOM_NEON ? "portable-neon" : "portable-generic"};
}

// float64 dot product of float32 rows, four partial sums (a single sum waits on each add)
double dot64(const float* a, const float* b, int64_t d) {
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= d; k += 4)
    for (int l = 0; l < 4; ++l) s[l] += double(a[k + l]) * double(b[k + l]);
  for (; k < d; ++k) s[0] += double(a[k]) * double(b[k]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

}  // namespace

const char* context_argmax_path() {
  return pick_kernels().name;
}

void context_argmax(const float* o, int64_t B, int64_t H, int64_t T, int64_t d, int64_t sb, int64_t sh,
                    int64_t st, const uint8_t* mask, int64_t* out) {
  EMBGEOM_CHECK(B >= 0 && H >= 0 && T >= 0 && d >= 0, "context_argmax: bad shape");
  const Kernels K = pick_kernels();
  // |fl(a . b) - a . b| <= gamma_d |a| |b| + d eta for a float32 dot product of length d (any
  // order; eta = 2^-149, the subnormal spacing, for products that underflow)
  const double u = std::ldexp(1.0, -24);
  const double gamma = double(d) * u / (1.0 - double(d) * u);
  const double underflow = double(d) * std::ldexp(1.0, -149);
#pragma omp parallel
  {
    std::vector<int64_t> pos;
    std::vector<float> rows, kt, acc;
    std::vector<int32_t> cand;
    std::vector<double> qnorm;
#pragma omp for collapse(2) schedule(dynamic, 8)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const float* ob = o + b * sb + h * sh;  // row t at ob + t * st
        int64_t* dst = out + (b * H + h) * T;
        for (int64_t t = 0; t < T; ++t) dst[t] = t;  // rows without an answer point at themselves
        pos.clear();
        for (int64_t t = 0; t < T; ++t)
          if (!mask || mask[b * T + t]) pos.push_back(t);
        const int64_t n = static_cast<int64_t>(pos.size());
        if (n < 2) continue;
        const int64_t ldk = (n + kCols - 1) / kCols * kCols;
        // the real rows copied together first: a hook's (B, T, H, d) rows lie H * d floats
        // apart and the scores read each one again per block of queries (with the dynamic
        // chunks, where a stalled core's share goes to the other: median 10 -> 8 ms a layer
        // for 32 x 128 tokens, 12 heads of 32, 2 threads, Zen 3; equal on one thread)
        rows.resize(n * d);
        for (int64_t c = 0; c < n; ++c) {  // (an inline loop: std::copy of d floats was a memmove call)
          const float* src = ob + pos[c] * st;
          float* to = rows.data() + c * d;
          for (int64_t k = 0; k < d; ++k) to[k] = src[k];
        }
        // keys past n: NaN columns, which no maximum or hit takes
        kt.assign(d * ldk, std::numeric_limits<float>::quiet_NaN());
        qnorm.resize(n);
        double kmax = 0.0;
        for (int64_t c = 0; c < n; ++c) {
          const float* row = rows.data() + c * d;
          for (int64_t k = 0; k < d; ++k) kt[k * ldk + c] = row[k];
          qnorm[c] = std::sqrt(dot64(row, row, d));
          kmax = std::max(kmax, qnorm[c]);
        }
        acc.resize(K.rows * ldk);
        cand.resize(ldk);
        float maxima[kMaxRows];
        for (int64_t c0 = 0; c0 < n; c0 += K.rows) {
          const float* q[kMaxRows];
          for (int r = 0; r < K.rows; ++r) q[r] = rows.data() + std::min(n - 1, c0 + r) * d;
          if (K.scores_max) K.scores_max(q, kt.data(), ldk, d, acc.data(), c0, maxima);
          else K.scores(q, kt.data(), ldk, d, acc.data());
          for (int r = 0; r < K.rows && c0 + r < n; ++r) {
            const int64_t self = c0 + r;
            float* s = acc.data() + r * ldk;
            int64_t best = -1;
            double best_v = -std::numeric_limits<double>::infinity();
            // strictly greater: the smaller position keeps a tie (the first that is not NaN
            // stands even at -inf)
            auto offer = [&](int64_t c) {
              const double v = dot64(q[r], rows.data() + c * d, d);
              if (best < 0 ? v == v : v > best_v) {
                best_v = v;
                best = c;
              }
            };
            if (!(qnorm[self] * kmax < 0.5 * double(std::numeric_limits<float>::max()))) {
              // a float32 product or partial sum may pass float32's range (|q . k| <= |q| |k|),
              // or the rows hold NaN / inf: every key in float64
              for (int64_t c = 0; c < n; ++c)
                if (c != self) offer(c);
              if (best >= 0) dst[pos[self]] = pos[best];
              continue;
            }
            float top = maxima[r];
            if (!K.scores_max) {
              s[self] = std::numeric_limits<float>::quiet_NaN();  // (keys past n: NaN columns)
              top = K.row_max(s, ldk);
            }
            // keys whose exact product may reach the row's maximum (a float bound rounded
            // down), then rescored in float64
            const double reach = double(top) - 2.02 * (gamma * qnorm[self] * kmax + underflow);
            float reach_f = static_cast<float>(reach);
            if (double(reach_f) > reach) reach_f = std::nextafter(reach_f, -std::numeric_limits<float>::infinity());
            const int64_t nc = K.hits(s, ldk, reach_f, cand.data());  // (never its own key or one past n)
            if (nc == 1) {  // the maximum alone needs no rescoring
              dst[pos[self]] = pos[cand[0]];
              continue;
            }
            for (int64_t t = 0; t < nc; ++t) offer(cand[t]);
            if (best >= 0) dst[pos[self]] = pos[best];
          }
        }
      }
    }
  }
}

void context_summaries(const int64_t* j, int64_t B, int64_t H, int64_t T, const uint8_t* mask, const uint8_t* sep,
                       const int64_t* ids, const int64_t* sentence, const uint8_t* stop, int64_t* counts,
                       int64_t* hist, int64_t* focus) {
  EMBGEOM_CHECK(B >= 0 && H >= 0 && T >= 0, "context_summaries: bad shape");
  std::fill_n(counts, 6 * H, int64_t(0));
  std::fill_n(hist, H * T, int64_t(0));
  std::vector<int64_t> hits(T);
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* m = mask + b * T;
    int64_t real = 0;
    for (int64_t t = 0; t < T; ++t) real += m[t] != 0;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t* jb = j + (b * H + h) * T;
      std::fill(hits.begin(), hits.end(), int64_t(0));
      if (real >= 2)
        for (int64_t i = 0; i < T; ++i) {
          if (!m[i]) continue;
          const int64_t to = jb[i];
          EMBGEOM_CHECK(to >= 0 && to < T, "context_summaries: j out of range");
          const int64_t dist = to > i ? to - i : i - to;
          counts[0 * H + h] += 1;
          counts[1 * H + h] += dist;
          counts[2 * H + h] += sep[b * T + to] != 0;
          counts[3 * H + h] += ids[b * T + to] == ids[b * T + i];
          if (sentence) counts[4 * H + h] += sentence[b * T + to] == sentence[b * T + i];
          if (stop) counts[5 * H + h] += stop[b * T + to] != 0;
          hist[h * T + dist] += 1;
          hits[to] += 1;
        }
      int64_t best = 0;
      for (int64_t t = 1; t < T; ++t)
        if (hits[t] > hits[best]) best = t;
      focus[b * H + h] = best;
    }
  }
}

}  // namespace embgeom
