// The portable fused pass: written once in plain C++ over blocks of W values, fixed-length loops
// the compiler vectorises for the target it is compiled for (baseline: SSE2 or NEON; AVX2+FMA
// through EMBGEOM_AVX2). Each block computes the values, moments, histogram slots and one flag
// word per value; the rare flagged values (candidates for a list, outside pairs) are then handled
// one by one, as in the AVX-512 pass. The last < W values of a row go through the same rules one
// at a time (pair_one).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "pairwise/fused.h"

namespace embgeom {
namespace {

constexpr int W = 16;

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
      if (!c.outp.full() || i <= c.outp.e.back().i) offer_outside(c, exact(), i, j);
    }
  }
}

// The flagged values of one block (rare): list offers, exact values in fast mode, outside pairs.
void block_slow(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, int64_t i, int64_t ii, int64_t jj,
                int64_t j0, const float* v, const uint32_t* fl, bool deferred, int64_t& orow) {
  const PairwiseEngine& E = *A.E;
  uint32_t out = 0;  // lanes outside [a, b]
  for (int l = 0; l < W; ++l) {
    const uint32_t f = fl[l];
    if (!f) continue;
    const int64_t j = j0 + l;
    // row lists take the tile's values as they are (exact mode: exact; fast: bf16)
    if (f & kRt) offer_row(A, c, true, i, v[l], j);
    if (f & kCt) offer_row(A, c, true, j, v[l], i);
    if (f & kRb) offer_row(A, c, false, i, v[l], j);
    if (f & kCb) offer_row(A, c, false, j, v[l], i);
    if (f & kOut) out |= 1u << l;
    if (!(f & (kG | kMaybe))) continue;
    if (deferred) {
      c.cand.push_back({int32_t(ii), int32_t(jj + l), ((f & kG) ? kCandGlobal : 0u) | ((f & kMaybe) ? kCandMaybeOut : 0u)});
      continue;
    }
    const float e = A.fast ? E.exact_value(i, j) : v[l];
    if (f & kG) offer_global(A, c, e, i, j);
    if ((f & kMaybe) && (e < A.oa || e > A.ob)) out |= 1u << l;
  }
  if (!out) return;
  orow += __builtin_popcount(out);
  int32_t* colcnt = c.colcnt.data() + jj;
  for (uint32_t todo = out; todo; todo &= todo - 1) colcnt[__builtin_ctz(todo)]++;
  if (c.outp.full() && i > c.outp.e.back().i) return;
  for (uint32_t todo = out; todo; todo &= todo - 1) {
    const int l = __builtin_ctz(todo);
    const int64_t j = j0 + l;
    if (c.outp.full() && (i > c.outp.e.back().i || (i == c.outp.e.back().i && j > c.outp.e.back().j))) break;
    if (deferred) {
      c.cand.push_back({int32_t(ii), int32_t(jj + l), kCandOutPair});
      continue;
    }
    offer_outside(c, A.fast ? E.exact_value(i, j) : v[l], i, j);
  }
}

__attribute__((always_inline)) inline void fused_body(const FusedArgs& A, PairwiseEngine::ThreadCtx& c,
                                                      float* C, int64_t ldc, int64_t r0, int64_t nr,
                                                      int64_t c0, int64_t nc, double* tsum,
                                                      double* tsumsq) {
  const PairwiseEngine& E = *A.E;
  const float M = A.M;
  double s = 0.0, s2 = 0.0;                        // tails
  alignas(64) double sv[W] = {}, s2v[W] = {};       // blocks, per lane
  int64_t* hist = A.do_hist ? c.hist.data() : nullptr;
  const float* rthr_top = A.do_rtop ? row_filter(A, c, true) : nullptr;
  const float* rthr_bot = A.do_rbot ? row_filter(A, c, false) : nullptr;
  const bool col_top = rthr_top && A.self, col_bot = rthr_bot && A.self;
  const double lo = A.lo, hi = A.hi, scale = A.scale, shift = A.shift, nearv = A.near;
  const double bmax = double(A.bins > 0 ? A.bins - 1 : 0);
  const int32_t over = int32_t(A.bins + 1);
  const float oa_lo = A.oa - M, ob_hi = A.ob + M, oa_hi = A.oa + M, ob_lo = A.ob - M;
  const bool maybe_out = A.do_out && A.fast;
  // fast mode outside cold tiles: thresholds stay as at tile start (a superset of the
  // candidates), which are then rescored in one interleaved batch
  const bool deferred = A.fast && !A.cold;
  c.cand.clear();

  // global list thresholds (refreshed after offers)
  float t_hi = 0, t_lo = 0;
  double t_near = 0;
  auto refresh = [&]() {
    t_hi = std::min(thr_hi(c.max1), A.do_top ? thr_hi(c.top) : kInf) - M;
    t_lo = std::max(thr_lo(c.min1), A.do_bot ? thr_lo(c.bottom) : -kInf) + M;
    t_near = A.do_near ? thr_dist(c.near) + M : -1.0;
  };
  refresh();

  for (int64_t ii = 0; ii < nr; ++ii) {
    const int64_t i = r0 + ii;
    const float* row = C + ii * ldc;
    const int64_t jb = A.diag ? ii + 1 : 0;
    const float na = A.metric == 2 ? A.xn2[i] : 0.0f;
    int64_t orow = 0;
    int64_t jj = jb;
    for (; jj + W <= nc; jj += W) {
      const int64_t j0 = c0 + jj;
      const float* src = row + jj;
      alignas(64) float v[W];
      if (A.metric == 0) {
        for (int l = 0; l < W; ++l) v[l] = std::min(std::max(src[l], -1.0f), 1.0f);
      } else if (A.metric == 1) {
        for (int l = 0; l < W; ++l) v[l] = src[l];
      } else {
        const float* nb = A.yn2 + j0;
        uint32_t nd = 0;
        for (int l = 0; l < W; ++l) {
          const float sn = na + nb[l];
          const float t = sn - (src[l] + src[l]);
          v[l] = std::sqrt(std::max(t, 0.0f));
          nd |= uint32_t(numerics::is_near_duplicate(t, sn)) << l;
        }
        // near-identical rows: the norm formula cancels, take the direct distance
        for (; nd; nd &= nd - 1) v[__builtin_ctz(nd)] = E.direct_distance(i, j0 + __builtin_ctz(nd));
      }
      for (int l = 0; l < W; ++l) {
        const double dv = double(v[l]) - shift;
        sv[l] += dv;
        s2v[l] += dv * dv;
      }
      if (hist) {
        alignas(64) int32_t slot[W];
        for (int l = 0; l < W; ++l) {
          const double dv = v[l];
          const double f = std::min(std::max(std::floor((dv - lo) * scale), 0.0), bmax);
          int32_t b = int32_t(f) + 1;
          b = dv < lo ? 0 : b;
          slot[l] = dv > hi ? over : b;
        }
        for (int l = 0; l < W; ++l) hist[slot[l]]++;
      }
      alignas(64) uint32_t fl[W];
      for (int l = 0; l < W; ++l) fl[l] = (v[l] >= t_hi || v[l] <= t_lo) ? kG : 0u;
      if (A.do_near)
        for (int l = 0; l < W; ++l) fl[l] |= std::fabs(double(v[l]) - nearv) <= t_near ? kG : 0u;
      if (rthr_top) {
        const float t = rthr_top[i] - M;
        for (int l = 0; l < W; ++l) fl[l] |= v[l] >= t ? kRt : 0u;
      }
      if (col_top) {
        const float* t = rthr_top + j0;
        for (int l = 0; l < W; ++l) fl[l] |= v[l] >= t[l] - M ? kCt : 0u;
      }
      if (rthr_bot) {
        const float t = rthr_bot[i] + M;
        for (int l = 0; l < W; ++l) fl[l] |= v[l] <= t ? kRb : 0u;
      }
      if (col_bot) {
        const float* t = rthr_bot + j0;
        for (int l = 0; l < W; ++l) fl[l] |= v[l] <= t[l] + M ? kCb : 0u;
      }
      if (A.do_out) {
        for (int l = 0; l < W; ++l) {
          const bool sure = v[l] < oa_lo || v[l] > ob_hi;
          const bool maybe = maybe_out && !sure && (v[l] < oa_hi || v[l] > ob_lo);
          fl[l] |= (sure ? kOut : 0u) | (maybe ? kMaybe : 0u);
        }
      }
      uint32_t any = 0;
      for (int l = 0; l < W; ++l) any |= fl[l];
      if (__builtin_expect(any != 0, 0)) {
        block_slow(A, c, i, ii, jj, j0, v, fl, deferred, orow);
        if (!deferred && (any & (kG | kMaybe))) refresh();
      }
    }
    for (; jj < nc; ++jj) pair_one(A, c, i, c0 + jj, jj, row[jj], s, s2, orow);
    if (A.do_out) {
      c.out_count += orow;
      c.out_rows[i] += orow;
    }
  }
  if (deferred && !c.cand.empty()) rescore_candidates(A, c, r0, c0);
  for (int l = 0; l < W; ++l) {
    s += sv[l];
    s2 += s2v[l];
  }
  *tsum = s;
  *tsumsq = s2;
}

}  // namespace

void fused_tile_generic(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float* C, int64_t ldc,
                        int64_t r0, int64_t nr, int64_t c0, int64_t nc, double* tsum, double* tsumsq) {
  fused_body(A, c, C, ldc, r0, nr, c0, nc, tsum, tsumsq);
}

EMBGEOM_AVX2 void fused_tile_avx2(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float* C,
                                  int64_t ldc, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                                  double* tsum, double* tsumsq) {
  fused_body(A, c, C, ldc, r0, nr, c0, nc, tsum, tsumsq);
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
