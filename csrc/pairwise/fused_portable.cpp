// The portable fused pass: written once over blocks of W values with the vector types of
// cpu/simd.h, compiled per vector level (baseline: SSE2 or NEON, W = 4; AVX2+FMA through
// EMBGEOM_AVX2, W = 8).
// Each block computes the values, moments, histogram slots and one flag word per value; the rare
// flagged values (candidates for a list, outside pairs) are then handled one by one, as in the
// AVX-512 pass. The last < W values of a row go through the same rules one at a time (pair_one).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/simd.h"
#include "pairwise/fused.h"

namespace embgeom {
namespace {

// flag bits of a value in a block
constexpr uint32_t kG = 1u, kRt = 2u, kCt = 4u, kRb = 8u, kCb = 16u, kMaybe = 32u, kOut = 64u;

// One pair, every rule, one at a time (block tails).
__attribute__((always_inline)) inline void pair_one(const FusedArgs& A, PairwiseEngine::ThreadCtx& c,
                                                    int64_t i, int64_t j, int64_t jj, float raw,
                                                    double& s, double& s2, int64_t& orow) {
  const PairwiseEngine& E = *A.E;
  const float M = A.M;
  float v;
  if (A.metric == 0) v = std::min(std::max(raw, -1.0f), 1.0f);
  else if (A.metric == 1) v = raw;
  else v = E.transform(raw, i, j);
  const double dv = double(v) - A.shift;
  s += dv;
  s2 += dv * dv;
  if (A.do_hist) c.hist[hist_bin(A, v)]++;
  bool g = v >= thr_hi(c.max1) - M || v <= thr_lo(c.min1) + M;
  if (A.do_top) g = g || v >= thr_hi(c.top) - M;
  if (A.do_bot) g = g || v <= thr_lo(c.bottom) + M;
  if (A.do_near) g = g || std::fabs(double(v) - A.near) <= thr_dist(c.near) + M;
  float e = v;
  bool have_e = !A.fast;
  auto exact = [&]() {
    if (!have_e) {
      e = E.exact_value(i, j);
      have_e = true;
    }
    return e;
  };
  if (g) offer_global(A, c, exact(), i, j);
  if (A.do_rtop) {
    const float* thr = row_filter(A, c, true);
    if (v >= thr[i] - M) offer_row(A, c, true, i, v, j);
    if (A.self && v >= thr[j] - M) offer_row(A, c, true, j, v, i);
  }
  if (A.do_rbot) {
    const float* thr = row_filter(A, c, false);
    if (v <= thr[i] + M) offer_row(A, c, false, i, v, j);
    if (A.self && v <= thr[j] + M) offer_row(A, c, false, j, v, i);
  }
  if (A.do_out) {
    bool o;
    if (v < A.oa - M || v > A.ob + M) o = true;
    else if (v < A.oa + M || v > A.ob - M) o = exact() < A.oa || exact() > A.ob;
    else o = false;
    if (o) {
      ++orow;
      c.colcnt.data()[jj]++;
      if (outside_list_open(c, i)) offer_outside(c, exact(), i, j);
    }
  }
}

// The flagged values of one block (rare): list offers, exact values in fast mode, outside pairs.
// Values surely outside [a, b] (kOut) were counted by the block step; this lists them, and counts
// and lists those that the exact value decides (kMaybe, fast mode).
template <int W>
void block_slow(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, int64_t i, int64_t ii, int64_t jj,
                int64_t j0, const float* v, const uint32_t* fl, bool deferred, int64_t& orow) {
  const PairwiseEngine& E = *A.E;
  uint32_t counted = 0, listed = 0, lanes = 0;
  for (int l = 0; l < W; ++l) lanes |= uint32_t(fl[l] != 0) << l;  // no branch a lane
  for (; lanes; lanes &= lanes - 1) {
    const int l = __builtin_ctz(lanes);
    const uint32_t f = fl[l];
    const int64_t j = j0 + l;
    // row lists take the tile's values as they are (exact mode: exact; fast: bf16)
    if (f & kRt) offer_row(A, c, true, i, v[l], j);
    if (f & kCt) offer_row(A, c, true, j, v[l], i);
    if (f & kRb) offer_row(A, c, false, i, v[l], j);
    if (f & kCb) offer_row(A, c, false, j, v[l], i);
    if (f & kOut) listed |= 1u << l;
    if (!(f & (kG | kMaybe))) continue;
    if (deferred || (A.fast && !(f & kG))) {  // (outside decisions wait in cold tiles too)
      c.cand.push_back({int32_t(ii), int32_t(jj + l), ((f & kG) ? kCandGlobal : 0u) | ((f & kMaybe) ? kCandMaybeOut : 0u)});
      continue;
    }
    const float e = A.fast ? E.exact_value(i, j) : v[l];
    if (f & kG) offer_global(A, c, e, i, j);
    if ((f & kMaybe) && (e < A.oa || e > A.ob)) {
      counted |= 1u << l;
      listed |= 1u << l;
    }
  }
  if (counted) {
    orow += __builtin_popcount(counted);
    int32_t* colcnt = c.colcnt.data() + jj;
    for (uint32_t todo = counted; todo; todo &= todo - 1) colcnt[__builtin_ctz(todo)]++;
  }
  if (listed && outside_list_open(c, i)) list_outside(A, c, i, ii, jj, j0, listed, v);
}

// kLean: no histogram, near list, outside counts or l2 (row and global lists and moments only,
// as a row top-k run): compiled out, which frees registers the flags kept in memory.
// kListsOnly (FusedArgs::lists_only): no moments, extremes, histogram, global or near lists, or
// l2 (an index's candidate runs and pairs_above's; outside counts unless kLean).
template <int W, bool kLean, bool kListsOnly = false>
__attribute__((always_inline)) inline void fused_body(const FusedArgs& A, PairwiseEngine::ThreadCtx& c,
                                                      float* C, int64_t ldc, int64_t r0, int64_t nr,
                                                      int64_t c0, int64_t nc, double* tsum,
                                                      double* tsumsq) {
  using namespace simd;
  using f32 = typename Lanes<W>::f32;
  using i32 = typename Lanes<W>::i32;
  using f32h = typename Lanes<W>::f32h;
  using i32h = typename Lanes<W>::i32h;
  using f64h = typename Lanes<W>::f64h;
  using i64h = typename Lanes<W>::i64h;
  const PairwiseEngine& E = *A.E;
  const float M = A.M;
  double s = 0.0, s2 = 0.0;                                       // tails
  f64h s_lo = {}, s_hi = {}, q_lo = {}, q_hi = {};  // blocks, per lane
  constexpr bool kStats = !kLean && !kListsOnly;  // histogram, near list and l2 compiled in
  const bool do_near = kStats && A.do_near, do_out = !kLean && A.do_out, l2 = kStats && A.metric == 2;
  int64_t* hist = kStats && A.do_hist ? c.hist.data() : nullptr;
  alignas(32) int32_t slot_buf[2][W];  // histogram slots of this block and the previous one
  int32_t* slot = slot_buf[0];
  int32_t* prev = slot_buf[1];
  bool pending = false;
  const float* rthr_top = A.do_rtop ? row_filter(A, c, true) : nullptr;
  const float* rthr_bot = A.do_rbot ? row_filter(A, c, false) : nullptr;
  const bool col_top = rthr_top && A.self, col_bot = rthr_bot && A.self;
  const f64h lo = splat<f64h>(A.lo), hi = splat<f64h>(A.hi), scale = splat<f64h>(A.scale);
  const f64h shift = splat<f64h>(A.shift), nearv = splat<f64h>(A.near), zero = {};
  const f64h bmax = splat<f64h>(double(A.bins > 0 ? A.bins - 1 : 0));
  const i32h over = splat<i32h>(int32_t(A.bins + 1)), slot0 = {};
  const f32 one = splat<f32>(1.0f), mone = splat<f32>(-1.0f), vM = splat<f32>(M);
  const f32 oa_lo = splat<f32>(A.oa - M), ob_hi = splat<f32>(A.ob + M);
  const f32 oa_hi = splat<f32>(A.oa + M), ob_lo = splat<f32>(A.ob - M);
  const i32 none = {};
  const f32 hlo = splat<f32>(A.hlo), hscale = splat<f32>(A.hscale);
  const f32 hfr_lo = splat<f32>(A.hfr_lo), hfr_hi = splat<f32>(A.hfr_hi);
  const i32 hbins = splat<i32>(int32_t(A.bins)), ione = splat<i32>(1);
  const bool maybe_out = do_out && A.fast;
  int32_t* colcnt = c.colcnt.data();
  // fast mode outside cold tiles: thresholds stay as at tile start (a superset of the
  // candidates), which are then rescored in one interleaved batch
  const bool deferred = A.fast && !A.cold;
  c.cand.clear();

  // global list thresholds (refreshed after offers)
  f32 t_hi, t_lo;
  f64h t_near;
  auto refresh = [&]() {
    t_hi = splat<f32>(std::min(thr_hi(c.max1), A.do_top ? thr_hi(c.top) : kInf) - M);
    t_lo = splat<f32>(std::max(thr_lo(c.min1), A.do_bot ? thr_lo(c.bottom) : -kInf) + M);
    t_near = splat<f64h>(A.do_near ? thr_dist(c.near) + M : -1.0);
  };
  refresh();

  // histogram slots of W/2 values (numerics::bin_index: for y = (v - lo) * scale,
  // min(max(floor(y), 0), bins - 1) == trunc(min(max(y, 0), bins - 1)), and truncation is the
  // one float-to-int conversion every vector level has)
  auto slots = [&](f64h d) {
    f64h y = (d - lo) * scale;
    y = select(y > zero, y, zero);
    y = select(y < bmax, y, bmax);
    i32h b = convert<i32h>(y) + 1;
    b = select(convert<i32h>(d < lo), slot0, b);
    return select(convert<i32h>(d > hi), over, b);
  };

  for (int64_t ii = 0; ii < nr; ++ii) {
    const int64_t i = r0 + ii;
    const float* row = C + ii * ldc;
    const int64_t jb = A.diag ? i - c0 + 1 : 0;  // strictly above the diagonal
    const float na = l2 ? A.xn2[i] : 0.0f;
    int64_t orow = 0;
    i32 orow_v = {};  // sure outside values of the row's blocks, per lane
    const bool list_out = do_out && outside_list_open(c, i);
    int64_t jj = jb;
    for (; jj + W <= nc; jj += W) {
      const int64_t j0 = c0 + jj;
      f32 v = load<f32>(row + jj);
      if (A.metric == 0) {
        v = select(v < mone, mone, v);
        v = select(v > one, one, v);
      } else if (l2) {
        const float* src = row + jj;
        const float* nb = A.yn2 + j0;
        alignas(32) float dist[W];
        uint32_t nd = 0;
        for (int l = 0; l < W; ++l) {
          const float sn = na + nb[l];
          const float t = sn - (src[l] + src[l]);
          dist[l] = std::sqrt(std::max(t, 0.0f));
          nd |= uint32_t(numerics::is_near_duplicate(t, sn)) << l;
        }
        // near-identical rows: the norm formula cancels, take the direct distance
        for (; nd; nd &= nd - 1) dist[__builtin_ctz(nd)] = E.direct_distance(i, j0 + __builtin_ctz(nd));
        v = load<f32>(dist);
      }
      f64h d_lo = {}, d_hi = {};
      if (!kListsOnly) {
        d_lo = convert<f64h>(low<f32h>(v));
        d_hi = convert<f64h>(high<f32h>(v));
        const f64h e_lo = d_lo - shift, e_hi = d_hi - shift;
        s_lo += e_lo;
        s_hi += e_hi;
        q_lo += e_lo * e_lo;
        q_hi += e_hi * e_hi;
      }
      if (hist) {
        // count the previous block's slots (as fused_avx512.cpp: reading back the slots just
        // stored would wait for the vector stores to reach the cache)
        if (pending) {
          for (int l = 0; l < W; ++l) hist[prev[l]]++;
        }
        // float32 slots where every value is safely inside a bin (FusedArgs::hist_f32)
        bool edge = true;
        i32 ix = {};
        if (A.hist_f32) {
          const f32 g = (v - hlo) * hscale;
          ix = convert<i32>(g);
          const f32 fr = g - convert<f32>(ix);
          edge = any((fr <= hfr_lo) | (fr >= hfr_hi) | (ix < none) | (ix >= hbins));
        }
        if (__builtin_expect(!edge, 1)) {
          store(slot, ix + ione);
        } else {
          store(slot, slots(d_lo));
          store(slot + W / 2, slots(d_hi));
        }
        pending = true;
        std::swap(slot, prev);
      }
      i32 fl = {};
      if (!kListsOnly) fl = ((v >= t_hi) | (v <= t_lo)) & int32_t(kG);
      if (do_near) {
        const f64h a_lo = d_lo - nearv, a_hi = d_hi - nearv;
        const i64h n_lo = select(a_lo < zero, -a_lo, a_lo) <= t_near;
        const i64h n_hi = select(a_hi < zero, -a_hi, a_hi) <= t_near;
        fl |= join<i32>(convert<i32h>(n_lo), convert<i32h>(n_hi)) & int32_t(kG);
      }
      // row i's own threshold is read again every block: it rises as the row's list fills
      if (rthr_top) fl |= (v >= splat<f32>(rthr_top[i] - M)) & int32_t(kRt);
      if (col_top) fl |= (v >= load<f32>(rthr_top + j0) - vM) & int32_t(kCt);
      if (rthr_bot) fl |= (v <= splat<f32>(rthr_bot[i] + M)) & int32_t(kRb);
      if (col_bot) fl |= (v <= load<f32>(rthr_bot + j0) + vM) & int32_t(kCb);
      if (do_out) {
        // counted here (a mask lane is -1); flagged only for the list
        const i32 sure = (v < oa_lo) | (v > ob_hi);
        orow_v -= sure;
        store(colcnt + jj, load<i32>(colcnt + jj) - sure);
        if (list_out) fl |= sure & int32_t(kOut);
        if (maybe_out) fl |= ~sure & ((v < oa_hi) | (v > ob_lo)) & int32_t(kMaybe);
      }
      if (__builtin_expect(any(fl != none), 0)) {
        alignas(32) float vals[W];
        alignas(32) uint32_t flags[W];
        store(vals, v);
        store(flags, fl);
        uint32_t seen = 0;
        for (int l = 0; l < W; ++l) seen |= flags[l];
        block_slow<W>(A, c, i, ii, jj, j0, vals, flags, deferred, orow);
        if (!deferred && (seen & (kG | kMaybe))) refresh();
      }
    }
    for (; jj < nc; ++jj) pair_one(A, c, i, c0 + jj, jj, row[jj], s, s2, orow);
    orow += sum(orow_v);
    if (do_out) {
      c.out_count += orow;
      c.out_rows[i] += orow;
    }
  }
  if (pending) {
    for (int l = 0; l < W; ++l) hist[prev[l]]++;
  }
  if (A.fast && !c.cand.empty()) rescore_candidates(A, c, r0, c0);
  // (rows only: the tails' moments are not kept either)
  *tsum = kListsOnly ? 0.0 : s + sum(s_lo + s_hi);
  *tsumsq = kListsOnly ? 0.0 : s2 + sum(q_lo + q_hi);
}

bool lean(const FusedArgs& A) { return !A.do_hist && !A.do_near && !A.do_out && A.metric != 2; }

}  // namespace

void fused_tile_generic(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float* C, int64_t ldc,
                        int64_t r0, int64_t nr, int64_t c0, int64_t nc, double* tsum, double* tsumsq) {
  if (A.lists_only && A.do_out)
    fused_body<4, false, true>(A, c, C, ldc, r0, nr, c0, nc, tsum, tsumsq);
  else if (A.lists_only)
    fused_body<4, true, true>(A, c, C, ldc, r0, nr, c0, nc, tsum, tsumsq);
  else if (lean(A))
    fused_body<4, true>(A, c, C, ldc, r0, nr, c0, nc, tsum, tsumsq);
  else
    fused_body<4, false>(A, c, C, ldc, r0, nr, c0, nc, tsum, tsumsq);
}

EMBGEOM_AVX2 void fused_tile_avx2(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float* C,
                                  int64_t ldc, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                                  double* tsum, double* tsumsq) {
  if (A.lists_only && A.do_out)
    fused_body<8, false, true>(A, c, C, ldc, r0, nr, c0, nc, tsum, tsumsq);
  else if (A.lists_only)
    fused_body<8, true, true>(A, c, C, ldc, r0, nr, c0, nc, tsum, tsumsq);
  else if (lean(A))
    fused_body<8, true>(A, c, C, ldc, r0, nr, c0, nc, tsum, tsumsq);
  else
    fused_body<8, false>(A, c, C, ldc, r0, nr, c0, nc, tsum, tsumsq);
}

void rescore_candidates(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, int64_t r0, int64_t c0) {
  const PairwiseEngine& E = *A.E;
  const size_t n = c.cand.size();
  c.pa.resize(n);
  c.pb.resize(n);
  c.dots.resize(n);
  for (size_t q = 0; q < n; ++q) {
    c.pa[q] = E.xrow(r0 + c.cand[q].ii);
    c.pb[q] = E.yrow(c0 + c.cand[q].jj);
  }
  dot_exact_batch(c.pa.data(), c.pb.data(), static_cast<int64_t>(n), E.d(), c.dots.data());
  for (size_t q = 0; q < n; ++q) {
    const int64_t i = r0 + c.cand[q].ii, j = c0 + c.cand[q].jj;
    const uint32_t f = c.cand[q].flags;
    const float e = E.transform(c.dots[q], i, j);
    if (f & kCandGlobal) offer_global(A, c, e, i, j);
    bool offer_out = (f & kCandOutPair) != 0;
    if ((f & kCandMaybeOut) && (e < A.oa || e > A.ob)) {
      c.out_count++;
      c.out_rows[i]++;
      (A.self ? c.out_rows : c.out_cols)[j]++;
      offer_out = true;
    }
    if (offer_out) offer_outside(c, e, i, j);
  }
  c.cand.clear();
}

FusedFn select_fused(Isa level) {
#if EMBGEOM_X86
  // EMBGEOM_FUSED=portable: the portable pass on an AVX-512 level too (A/B benchmarks, tests)
  const char* f = std::getenv("EMBGEOM_FUSED");
  const bool portable = f && std::strcmp(f, "portable") == 0;
  if (level == Isa::avx512 && !portable) return fused_tile_avx512;
  if (level >= Isa::avx2) return fused_tile_avx2;
#endif
  (void)level;
  return fused_tile_generic;
}

const char* PairwiseEngine::fused_name() const { return embgeom::fused_name(isa_); }

const char* fused_name(Isa level) {
  const FusedFn f = select_fused(level);
#if EMBGEOM_X86
  if (f == fused_tile_avx512) return "avx512";
#endif
  if (f == fused_tile_avx2) return "portable-avx2";
  return EMBGEOM_NEON ? "portable-neon" : "portable-generic";
}

}  // namespace embgeom
