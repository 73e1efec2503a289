#include "rows_dot.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/simd.h"

#if EMBGEOM_X86
#include <immintrin.h>
#endif

namespace embgeom {
namespace {

// queries handled in one pass over a row (each row read once for all of them)
constexpr int kQueries = 4;

inline float widen(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float widen(float f) { return f; }

// Rows a few KiB ahead asked for before they are read: the hardware's own prefetch left a
// one-query scan of 100,000 x 384 rows short of the memory's rate (alternating in one process,
// 2 threads, Emerald Rapids: float32 8.0-8.5 -> 6.7-7.6 ms, bf16 rows 4.9-5.4 -> 3.8-4.3 ms;
// 32 rows ahead was slower again)
constexpr int64_t kAheadBytes = 8 << 10;
inline int64_t rows_ahead(int64_t row_bytes) {
  return std::max<int64_t>(1, kAheadBytes / std::max<int64_t>(1, row_bytes));
}

// rows [r0, r1) against G <= kQueries queries; eight running sums a query (vectorisable)
template <class T>
void dot_rows_generic(const float* q, int G, int64_t D, const T* rows, int64_t ldr, int64_t r0, int64_t r1,
                      float* out, int64_t N) {
  const int64_t ahead = rows_ahead(D * int64_t(sizeof(T)));
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = rows + r * ldr;
    if (r + ahead < r1) simd::prefetch_row(row + ahead * ldr, D);
    for (int g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      float s[8] = {};
      int64_t k = 0;
      for (; k + 8 <= D; k += 8)
        for (int l = 0; l < 8; ++l) s[l] += qg[k + l] * widen(row[k + l]);
      float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
      for (; k < D; ++k) t += qg[k] * widen(row[k]);
      out[g * N + r] = t;
    }
  }
}

#if EMBGEOM_X86
EMBGEOM_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
EMBGEOM_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

EMBGEOM_AVX2 inline float total8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// G queries (a template: the accumulators stay in registers), 16 values a step in two sums a
// query so that consecutive FMAs do not wait on each other
template <int G, class T>
EMBGEOM_AVX2 void dot_rows_avx2_g(const float* q, int64_t D, const T* rows, int64_t ldr, int64_t r0, int64_t r1,
                                  float* out, int64_t N) {
  const int64_t ahead = rows_ahead(D * int64_t(sizeof(T)));
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = rows + r * ldr;
    if (r + ahead < r1) simd::prefetch_row(row + ahead * ldr, D);
    __m256 a[G], b[G];
    for (int g = 0; g < G; ++g) a[g] = b[g] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= D; k += 16) {
      const __m256 lo = load8(row + k), hi = load8(row + k + 8);
      for (int g = 0; g < G; ++g) {
        a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + k), lo, a[g]);
        b[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + k + 8), hi, b[g]);
      }
    }
    if (k + 8 <= D) {
      const __m256 lo = load8(row + k);
      for (int g = 0; g < G; ++g) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + k), lo, a[g]);
      k += 8;
    }
    for (int g = 0; g < G; ++g) {
      float t = total8(_mm256_add_ps(a[g], b[g]));
      for (int64_t kk = k; kk < D; ++kk) t += q[g * D + kk] * widen(row[kk]);
      out[g * N + r] = t;
    }
  }
}

// f(std::integral_constant<int, G>) for G in 1..kQueries: the query count as a template argument
template <class F>
inline void with_queries(int G, F&& f) {
  static_assert(kQueries == 4, "one case per query count");
  switch (G) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    default: return f(std::integral_constant<int, 4>());
  }
}

template <class T>
void dot_rows_avx2(const float* q, int G, int64_t D, const T* rows, int64_t ldr, int64_t r0, int64_t r1, float* out,
                   int64_t N) {
  with_queries(G, [&](auto g) { dot_rows_avx2_g<decltype(g)::value>(q, D, rows, ldr, r0, r1, out, N); });
}

// AVX-512: a row's 16-value steps in S sums a query (four for one query: a lone chain of FMAs
// would wait on each one's latency), the tail under a mask, queries from L1.
constexpr __mmask16 kAll16 = 0xffff;
EMBGEOM_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 m = kAll16) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
EMBGEOM_AVX512 inline __m512 load16(const float* p, __mmask16 m = kAll16) { return _mm512_maskz_loadu_ps(m, p); }

template <int G, class T>
EMBGEOM_AVX512 void dot_rows_avx512_g(const float* q, int64_t D, const T* rows, int64_t ldr, int64_t r0, int64_t r1,
                                      float* out, int64_t N) {
  constexpr int S = G <= 2 ? 4 : 2;
  const __mmask16 tail = static_cast<__mmask16>((1u << (D % 16)) - 1u);
  const int64_t ahead = rows_ahead(D * int64_t(sizeof(T)));
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = rows + r * ldr;
    if (r + ahead < r1) simd::prefetch_row(row + ahead * ldr, D);
    __m512 acc[G][S];
    for (int g = 0; g < G; ++g)
      for (int s = 0; s < S; ++s) acc[g][s] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * S <= D; k += 16 * S)
      for (int s = 0; s < S; ++s) {
        const __m512 v = load16(row + k + 16 * s);
        for (int g = 0; g < G; ++g)
          acc[g][s] = _mm512_fmadd_ps(load16(q + g * D + k + 16 * s), v, acc[g][s]);
      }
    for (; k + 16 <= D; k += 16) {
      const __m512 v = load16(row + k);
      for (int g = 0; g < G; ++g) acc[g][0] = _mm512_fmadd_ps(load16(q + g * D + k), v, acc[g][0]);
    }
    if (tail) {
      const __m512 v = load16(row + k, tail);
      for (int g = 0; g < G; ++g)
        acc[g][S - 1] = _mm512_fmadd_ps(load16(q + g * D + k, tail), v, acc[g][S - 1]);
    }
    for (int g = 0; g < G; ++g) {
      __m512 t = acc[g][0];
      for (int s = 1; s < S; ++s) t = _mm512_add_ps(t, acc[g][s]);
      out[g * N + r] = _mm512_reduce_add_ps(t);
    }
  }
}

template <class T>
void dot_rows_avx512(const float* q, int G, int64_t D, const T* rows, int64_t ldr, int64_t r0, int64_t r1,
                     float* out, int64_t N) {
  with_queries(G, [&](auto g) { dot_rows_avx512_g<decltype(g)::value>(q, D, rows, ldr, r0, r1, out, N); });
}
#endif

template <class T>
using DotRowsFn = void (*)(const float*, int, int64_t, const T*, int64_t, int64_t, int64_t, float*, int64_t);

template <class T>
DotRowsFn<T> pick_dot_rows(const char** name) {
#if EMBGEOM_X86
  if (isa_level() == Isa::avx512) {
    *name = "avx512";
    return dot_rows_avx512<T>;
  }
#endif
  return pick_avx2_or_generic<DotRowsFn<T>>(dot_rows_generic<T>, EMBGEOM_IF_X86(dot_rows_avx2<T>), "avx2", name);
}

template <class T>
void rows_dot(const float* q, int64_t Q, const T* rows, int64_t ldr, int64_t N, int64_t D, float* out) {
  EMBGEOM_CHECK(Q >= 0 && N >= 0 && D >= 0 && ldr >= D, "rows_dot: bad shape");
  const char* name = "";
  const DotRowsFn<T> dot = pick_dot_rows<T>(&name);
  // rows a task: about 192 KB, which stay in L2 while every group of queries passes over them
  // (a block per group of four read the rows from memory once a group)
  const int64_t block = std::max<int64_t>(16, (int64_t(192) << 10) / std::max<int64_t>(1, D * int64_t(sizeof(T))));
  const int64_t blocks = (N + block - 1) / block;
  // one block: no parallel region (a one-query norm or a tiny index need not wake the pool)
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * block, r1 = std::min(N, r0 + block);
    for (int64_t g0 = 0; g0 < Q; g0 += kQueries)
      dot(q + g0 * D, int(std::min<int64_t>(kQueries, Q - g0)), D, rows, ldr, r0, r1, out + g0 * N, N);
  }
}

}  // namespace

const char* rows_dot_path() { return picked_name(pick_dot_rows<float>); }

void rows_dot_f32(const float* q, int64_t Q, const float* rows, int64_t ldr, int64_t N, int64_t D, float* out) {
  rows_dot(q, Q, rows, ldr, N, D, out);
}

void rows_dot_bf16(const float* q, int64_t Q, const uint16_t* rows, int64_t ldr, int64_t N, int64_t D,
                   float* out) {
  rows_dot(q, Q, rows, ldr, N, D, out);
}

double bf16_scan_rows(const float* rows, int64_t ldr, int64_t N, int64_t D, const double* scale,
                      const double* norm, uint16_t* out, int64_t ldo, bool fill) {
  double worst = 0.0;
  // (torch's float64 arithmetic for this took 1.3 s for 100,000 x 384 on 2 cores: 20 s at 1M rows)
#pragma omp parallel for schedule(static) reduction(max : worst) if (N * D > (1 << 16))
  for (int64_t r = 0; r < N; ++r) {
    const float* row = rows + r * ldr;
    uint16_t* o = out + r * ldo;
    const double s = scale ? scale[r] : 1.0;
    const double nr = norm ? std::max(norm[r], 1e-300) : 1.0;
    double sq = 0.0;
    for (int64_t k = 0; k < D; ++k) {
      uint16_t b = o[k];
      if (fill) {
        b = to_bf16(scale ? static_cast<float>(double(row[k]) * s) : row[k]);
        o[k] = b;
      }
      const double e = double(widen(b)) - (norm ? double(row[k]) / nr : double(row[k]));
      sq += e * e;
    }
    worst = std::max(worst, std::sqrt(sq));
  }
  return worst;
}

void scores_topk(const float* scores, int64_t Q, int64_t N, int64_t k, float* vals, int64_t* idx) {
  EMBGEOM_CHECK(Q >= 0 && N >= 0 && k >= 0, "scores_topk: bad shape");
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  struct Entry {
    float v;
    int64_t j;
  };
  // heap order: the worst entry (smallest value, then largest column) on top
  auto worse = [](const Entry& a, const Entry& b) { return a.v > b.v || (a.v == b.v && a.j < b.j); };
  std::vector<Entry> heap;
  for (int64_t q = 0; q < Q; ++q) {
    const float* row = scores + q * N;
    heap.clear();
    const int64_t fill = std::min(k, N);
    for (int64_t j = 0; j < fill; ++j) heap.push_back({row[j] == row[j] ? row[j] : kNegInf, j});
    std::make_heap(heap.begin(), heap.end(), worse);
    float thr = fill == k && k > 0 ? heap.front().v : std::numeric_limits<float>::infinity();
    auto offer = [&](int64_t j) {
      const float v = row[j];
      if (!(v > thr)) return;  // NaN, or not above the k-th best (an equal value has a larger column)
      std::pop_heap(heap.begin(), heap.end(), worse);
      heap.back() = {v, j};
      std::push_heap(heap.begin(), heap.end(), worse);
      thr = heap.front().v;
    };
    int64_t j = fill;
    if (fill == k && k > 0) {
      // blocks of 8 with no value above the running k-th best are passed over in one test
      for (; j + 8 <= N; j += 8) {
        bool any = false;
        for (int l = 0; l < 8; ++l) any |= row[j + l] > thr;
        if (any)
          for (int l = 0; l < 8; ++l) offer(j + l);
      }
      for (; j < N; ++j) offer(j);
    }
    std::sort_heap(heap.begin(), heap.end(), worse);  // best first
    for (int64_t t = 0; t < k; ++t) {
      const bool have = t < int64_t(heap.size());
      vals[q * k + t] = have ? heap[t].v : kNegInf;
      idx[q * k + t] = have ? heap[t].j : -1;
    }
  }
}

}  // namespace embgeom
