// The hand-written AVX-512 fused pass (16 values a step, masks for the tails), kept beside the
// portable pass because it measured faster on the AVX-512 dev host: the portable source compiled
// with 16 lanes for AVX-512 took 1.5x as long over the default vocabulary (full M1 output 1.68 s
// against 1.14 s; vector-extension lane masks do not map onto AVX-512's mask registers). Same
// rules as fused_portable.cpp, value for value.
#include "pairwise/fused.h"

#if EMBGEOM_X86
#include <immintrin.h>

#include <algorithm>
#include <cmath>

// gcc 12 flags its own AVX-512 intrinsic headers with false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace embgeom {

namespace {

EMBGEOM_AVX512 inline __m256i hist_bins8(__m512d dv, __m512d vlo, __m512d vhi, __m512d vsc,
                                         __m512d vz, __m512d vbmax, __m256i i1, __m256i izero,
                                         __m256i iover) {
  __m512d f = _mm512_roundscale_pd(_mm512_mul_pd(_mm512_sub_pd(dv, vlo), vsc),
                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  f = _mm512_min_pd(_mm512_max_pd(f, vz), vbmax);
  __m256i ix = _mm256_add_epi32(_mm512_cvttpd_epi32(f), i1);
  ix = _mm256_mask_mov_epi32(ix, _mm512_cmp_pd_mask(dv, vlo, _CMP_LT_OQ), izero);
  ix = _mm256_mask_mov_epi32(ix, _mm512_cmp_pd_mask(dv, vhi, _CMP_GT_OQ), iover);
  return ix;
}

// kListsOnly (FusedArgs::lists_only): the per-row lists' filters and the outside counts alone,
// the moments, extremes, histogram, global and near lists compiled out: an index's candidate
// runs and pairs_above's, where the AMX bf16 product is cheap and the rest of the pass was most
// of the run (Emerald Rapids, medians of alternating runs in one process: the vocabulary's fast
// row top-15 0.756 -> 0.652 s; pairs above 0.89 of 8,192 x 32,768 rows 0.228 -> 0.179 s)
template <bool kListsOnly>
EMBGEOM_AVX512 void fused_body(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float* C, int64_t ldc,
                               int64_t r0, int64_t nr, int64_t c0, int64_t nc, double* tsum,
                               double* tsumsq) {
  const PairwiseEngine& E = *A.E;
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  __m512d q0 = _mm512_setzero_pd(), q1 = _mm512_setzero_pd();
  const __m512 vM = _mm512_set1_ps(A.M);
  const __m512 one = _mm512_set1_ps(1.0f), mone = _mm512_set1_ps(-1.0f);
  const __m512d vlo = _mm512_set1_pd(A.lo), vhi = _mm512_set1_pd(A.hi), vsc = _mm512_set1_pd(A.scale);
  const __m512d vbmax = _mm512_set1_pd(double(A.bins > 0 ? A.bins - 1 : 0)), vz = _mm512_setzero_pd();
  const __m256i i1 = _mm256_set1_epi32(1), iover = _mm256_set1_epi32(int(A.bins + 1));
  const __m256i izero = _mm256_setzero_si256();
  const __m512d vnear = _mm512_set1_pd(A.near);
  const __m512d vshift = _mm512_set1_pd(A.shift);
  const __m512 oa_lo = _mm512_set1_ps(A.oa - A.M), ob_hi = _mm512_set1_ps(A.ob + A.M);
  const __m512 oa_hi = _mm512_set1_ps(A.oa + A.M), ob_lo = _mm512_set1_ps(A.ob - A.M);
  const __m512i ones = _mm512_set1_epi32(1);
  const __m512 hlo = _mm512_set1_ps(A.hlo), hscale = _mm512_set1_ps(A.hscale);
  const __m512 hfr_lo = _mm512_set1_ps(A.hfr_lo), hfr_hi = _mm512_set1_ps(A.hfr_hi);
  const __m512i hbins = _mm512_set1_epi32(int32_t(A.bins));
  // histogram slots waiting to be counted (the previous step's)
  int32_t* slot = c.idx[0];
  int32_t* prev = c.idx[1];
  int pending = 0;
  int64_t* hist = !kListsOnly && A.do_hist ? c.hist.data() : nullptr;
  const bool do_near = !kListsOnly && A.do_near;
  int32_t* colcnt = c.colcnt.data();
  const float* rthr_top = A.do_rtop ? row_filter(A, c, true) : nullptr;
  const float* rthr_bot = A.do_rbot ? row_filter(A, c, false) : nullptr;
  // fast mode outside cold tiles: thresholds stay as at tile start (a superset of the
  // candidates), which are then rescored in one interleaved batch. In cold tiles too the
  // outside decisions wait for the batch (they move no threshold): one by one, a tile of the
  // vocabulary's near-identical [unused] rows took 0.05 s of single FMA chains.
  const bool deferred = A.fast && !A.cold;
  c.cand.clear();

  // filter thresholds (refreshed after offers)
  float t_hi = 0, t_lo = 0;
  double t_near = 0;
  auto refresh = [&]() {
    t_hi = std::min(thr_hi(c.max1), A.do_top ? thr_hi(c.top) : kInf) - A.M;
    t_lo = std::max(thr_lo(c.min1), A.do_bot ? thr_lo(c.bottom) : -kInf) + A.M;
    t_near = A.do_near ? thr_dist(c.near) + A.M : -1.0;
  };
  refresh();

  for (int64_t ii = 0; ii < nr; ++ii) {
    const int64_t i = r0 + ii;
    float* row = C + ii * ldc;
    const int64_t jb = A.diag ? i - c0 + 1 : 0;  // strictly above the diagonal
    const __m512 na = A.metric == 2 ? _mm512_set1_ps(A.xn2[i]) : _mm512_setzero_ps();
    int64_t orow = 0;
    for (int64_t jj = jb; jj < nc; jj += 16) {
      const int64_t rem = nc - jj;
      const __mmask16 m = rem >= 16 ? __mmask16(0xffff) : __mmask16((1u << rem) - 1);
      const int64_t j0 = c0 + jj;
      __m512 v = _mm512_maskz_loadu_ps(m, row + jj);
      if (A.metric == 0) {
        v = _mm512_min_ps(_mm512_max_ps(v, mone), one);
      } else if (!kListsOnly && A.metric == 2) {
        const __m512 nb = _mm512_maskz_loadu_ps(m, A.yn2 + j0);
        const __m512 sn = _mm512_add_ps(na, nb);
        const __m512 t = _mm512_sub_ps(sn, _mm512_add_ps(v, v));
        v = _mm512_maskz_mov_ps(m, _mm512_sqrt_ps(_mm512_max_ps(t, _mm512_setzero_ps())));
        // near-identical rows: the norm formula cancels, take the direct distance
        __mmask16 nd = _mm512_mask_cmp_ps_mask(m, t, _mm512_mul_ps(sn, _mm512_set1_ps(numerics::kNearDuplicateTau)), _CMP_LT_OQ);
        if (__builtin_expect(nd != 0, 0)) {
          alignas(64) float tv[16];
          _mm512_store_ps(tv, v);
          while (nd) {
            const int l = __builtin_ctz(nd);
            nd &= nd - 1;
            tv[l] = E.direct_distance(i, j0 + l);
          }
          v = _mm512_maskz_load_ps(m, tv);
        }
      }
      __m512d d0 = vz, d1 = vz;
      if (!kListsOnly) {
        d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        d1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        // masked-off lanes hold 0 and must add nothing
        const __m512d e0 = _mm512_maskz_sub_pd(__mmask8(m & 0xff), d0, vshift);
        const __m512d e1 = _mm512_maskz_sub_pd(__mmask8(m >> 8), d1, vshift);
        s0 = _mm512_add_pd(s0, e0);
        s1 = _mm512_add_pd(s1, e1);
        q0 = _mm512_fmadd_pd(e0, e0, q0);
        q1 = _mm512_fmadd_pd(e1, e1, q1);
      }
      if (hist) {
        // float32 slots where every value is safely inside a bin (FusedArgs::hist_f32)
        __mmask16 edge = m;
        __m512i ix = _mm512_setzero_si512();
        if (A.hist_f32) {
          const __m512 g = _mm512_mul_ps(_mm512_sub_ps(v, hlo), hscale);
          ix = _mm512_cvttps_epi32(g);
          const __m512 fr = _mm512_sub_ps(g, _mm512_cvtepi32_ps(ix));
          edge = _mm512_mask_cmp_ps_mask(m, fr, hfr_lo, _CMP_LE_OQ) | _mm512_mask_cmp_ps_mask(m, fr, hfr_hi, _CMP_GE_OQ) |
                 _mm512_mask_cmpge_epu32_mask(m, ix, hbins);
        }
        if (__builtin_expect(edge == 0, 1)) {
          _mm512_store_si512(slot, _mm512_add_epi32(ix, ones));
        } else {
          _mm256_store_si256(reinterpret_cast<__m256i*>(slot), hist_bins8(d0, vlo, vhi, vsc, vz, vbmax, i1, izero, iover));
          _mm256_store_si256(reinterpret_cast<__m256i*>(slot + 8), hist_bins8(d1, vlo, vhi, vsc, vz, vbmax, i1, izero, iover));
        }
        // count the previous step's slots: reading back the slots just stored would wait for the
        // wide store to reach the cache (store forwarding to narrow loads stalls)
        if (pending == 16) {
          for (int l = 0; l < 16; ++l) hist[prev[l]]++;
        } else {
          for (int l = 0; l < pending; ++l) hist[prev[l]]++;
        }
        pending = rem >= 16 ? 16 : int(rem);
        std::swap(slot, prev);
      }
      // global lists and extremes
      __mmask16 g = 0;
      if (!kListsOnly)
        g = _mm512_mask_cmp_ps_mask(m, v, _mm512_set1_ps(t_hi), _CMP_GE_OQ) |
            _mm512_mask_cmp_ps_mask(m, v, _mm512_set1_ps(t_lo), _CMP_LE_OQ);
      if (do_near) {
        const __m512d tn = _mm512_set1_pd(t_near);
        const __m512d a0 = _mm512_abs_pd(_mm512_sub_pd(d0, vnear));
        const __m512d a1 = _mm512_abs_pd(_mm512_sub_pd(d1, vnear));
        const __mmask16 gn = __mmask16(_mm512_cmp_pd_mask(a0, tn, _CMP_LE_OQ)) |
                             __mmask16(__mmask16(_mm512_cmp_pd_mask(a1, tn, _CMP_LE_OQ)) << 8);
        g |= gn & m;
      }
      // per-row lists: row direction (row i) and, in self mode, column direction (rows j)
      __mmask16 rt = 0, ct = 0, rb = 0, cb = 0;
      if (rthr_top) {
        rt = _mm512_mask_cmp_ps_mask(m, v, _mm512_set1_ps(rthr_top[i] - A.M), _CMP_GE_OQ);
        if (A.self)
          ct = _mm512_mask_cmp_ps_mask(m, v, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, rthr_top + j0), vM), _CMP_GE_OQ);
      }
      if (rthr_bot) {
        rb = _mm512_mask_cmp_ps_mask(m, v, _mm512_set1_ps(rthr_bot[i] + A.M), _CMP_LE_OQ);
        if (A.self)
          cb = _mm512_mask_cmp_ps_mask(m, v, _mm512_add_ps(_mm512_maskz_loadu_ps(m, rthr_bot + j0), vM), _CMP_LE_OQ);
      }
      const __mmask16 rows_any = rt | ct | rb | cb;
      __mmask16 mo = 0;
      __mmask16 maybe = 0;
      if (A.do_out) {
        mo = _mm512_mask_cmp_ps_mask(m, v, oa_lo, _CMP_LT_OQ) | _mm512_mask_cmp_ps_mask(m, v, ob_hi, _CMP_GT_OQ);
        if (A.fast)
          maybe = (_mm512_mask_cmp_ps_mask(m, v, oa_hi, _CMP_LT_OQ) |
                   _mm512_mask_cmp_ps_mask(m, v, ob_lo, _CMP_GT_OQ)) & ~mo;
      }
      if (__builtin_expect(g | rows_any | maybe, 0)) {
        alignas(64) float vals[16];
        _mm512_store_ps(vals, v);
        // row lists take the tile's values as they are (exact mode: exact; fast: bf16)
        for (__mmask16 todo = rows_any; todo; todo &= todo - 1) {
          const int l = __builtin_ctz(todo);
          const int64_t j = j0 + l;
          const __mmask16 bit = __mmask16(1u << l);
          if (rt & bit) offer_row(A, c, true, i, vals[l], j);
          if (ct & bit) offer_row(A, c, true, j, vals[l], i);
          if (rb & bit) offer_row(A, c, false, i, vals[l], j);
          if (cb & bit) offer_row(A, c, false, j, vals[l], i);
        }
        __mmask16 todo = g | maybe;
        if (A.fast) {  // to the tile's batch: all, or in a cold tile all but global candidates
          __mmask16 wait = deferred ? todo : __mmask16(maybe & ~g);
          todo &= ~wait;
          for (; wait; wait &= wait - 1) {
            const int l = __builtin_ctz(wait);
            const __mmask16 bit = __mmask16(1u << l);
            const uint32_t f = ((g & bit) ? kCandGlobal : 0u) | ((maybe & bit) ? kCandMaybeOut : 0u);
            c.cand.push_back({int32_t(ii), int32_t(jj + l), f});
          }
        }
        while (todo) {
          const int l = __builtin_ctz(todo);
          todo &= todo - 1;
          const int64_t j = j0 + l;
          const float e = A.fast ? E.exact_value(i, j) : vals[l];
          const __mmask16 bit = __mmask16(1u << l);
          if (g & bit) offer_global(A, c, e, i, j);
          if ((maybe & bit) && (e < A.oa || e > A.ob)) mo |= bit;
        }
        if (!deferred) refresh();
      }
      if (mo) {
        orow += __builtin_popcount(mo);
        __m512i cc = _mm512_loadu_si512(colcnt + jj);
        _mm512_storeu_si512(colcnt + jj, _mm512_mask_add_epi32(cc, mo, cc, ones));
        if (outside_list_open(c, i)) {
          alignas(64) float vals[16];
          _mm512_store_ps(vals, v);
          list_outside(A, c, i, ii, jj, j0, mo, vals);
        }
      }
    }
    if (A.do_out) {
      c.out_count += orow;
      c.out_rows[i] += orow;
    }
  }
  for (int l = 0; l < pending; ++l) hist[prev[l]]++;
  if (A.fast && !c.cand.empty()) rescore_candidates(A, c, r0, c0);
  alignas(64) double a[8], b[8];
  _mm512_store_pd(a, _mm512_add_pd(s0, s1));
  _mm512_store_pd(b, _mm512_add_pd(q0, q1));
  double s = 0, s2 = 0;
  for (int l = 0; l < 8; ++l) {
    s += a[l];
    s2 += b[l];
  }
  *tsum = s;
  *tsumsq = s2;
}

}  // namespace

EMBGEOM_AVX512 void fused_tile_avx512(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float* C,
                                      int64_t ldc, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                                      double* tsum, double* tsumsq) {
  if (A.lists_only)
    fused_body<true>(A, c, C, ldc, r0, nr, c0, nc, tsum, tsumsq);
  else
    fused_body<false>(A, c, C, ldc, r0, nr, c0, nc, tsum, tsumsq);
}

}  // namespace embgeom

#endif  // EMBGEOM_X86
