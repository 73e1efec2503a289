// The fused pass over one tile's values (docs/architecture.md, all-pairs engine): clamp or
// transform, moments, histogram, candidate filters for the global and per-row lists, outside
// counts. One argument struct (FusedArgs) for every variant; the variants differ only in how
// many values a step handles: fused_portable.cpp (written once, compiled per vector level:
// generic/NEON and AVX2) and fused_avx512.cpp (hand-written AVX-512).
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "numerics.h"
#include "pairwise/engine.h"

namespace embgeom {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct PairwiseEngine::ThreadCtx {
  AlignedBuf<float> C;  // tile values
  int64_t ldc = 0;
  PairList max1, min1, top, bottom, near, outp;
  std::vector<int64_t> hist;
  RowLists rtop, rbot;  // exact mode
  RowCands ctop, cbot;  // fast mode
  int64_t out_count = 0;
  std::vector<int64_t> out_rows, out_cols;
  AlignedBuf<int32_t> colcnt;
  struct Cand {
    int32_t ii, jj;
    uint32_t flags;
  };
  std::vector<Cand> cand;  // fast mode: candidates of the tile, rescored in one batch
  std::vector<const float*> pa, pb;
  std::vector<float> dots;
  // histogram slots of the pass's current step and of the one before it (fused_avx512.cpp)
  alignas(64) int32_t idx[2][16];
};
// Everything the fused pass needs, resolved once per tile.
struct FusedArgs {
  const PairwiseEngine* E;
  // fast mode: some global list is still filling, so candidates are rescored one by one as
  // they come, with the thresholds refreshed after each (else: batched at the end of the tile)
  bool cold;
  bool self, fast;
  bool diag;  // a diagonal tile (self mode, r0 >= c0 for its rows): pairs j > i only
  // per-row lists and outside counts only (PairwiseEngine::keep_lists_only): no moments,
  // extremes, histogram, global or near lists, metric cosine or dot
  bool lists_only;
  int metric;
  float M;  // decision margin (0 in exact mode)
  const float* xn2;
  const float* yn2;
  int64_t bins;
  double lo, hi, scale;
  // Histogram slots in float32 (hist_f32): g = (v - hlo) * hscale, a block of 16 (8) values per
  // vector instead of two of doubles. A value whose g lies strictly inside a bin, its fraction
  // g - trunc(g) in (hfr_lo, hfr_hi), has the float64 rule's bin (numerics::bin_index): the
  // float32 rounding moves g by less than the guard (fused_args). Any other value in a block
  // sends the block through the float64 rule (near a bin edge, out of range, about 0.1 % of
  // values with 2000 bins).
  bool hist_f32;
  float hlo, hscale, hfr_lo, hfr_hi;
  bool do_hist, do_top, do_bot, do_near, do_rtop, do_rbot, do_out;
  double near;
  float oa, ob;
  double shift;  // moment_shift
};

// Offers one pair to the global lists (value exact: rescored in fast mode by the caller).
inline void offer_global(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float e, int64_t i, int64_t j) {
  using numerics::ListKind;
  using numerics::order_key;
  c.max1.offer(order_key(ListKind::top, e), e, i, j);
  c.min1.offer(order_key(ListKind::bottom, e), e, i, j);
  if (A.do_top) c.top.offer(order_key(ListKind::top, e), e, i, j);
  if (A.do_bot) c.bottom.offer(order_key(ListKind::bottom, e), e, i, j);
  if (A.do_near) c.near.offer(order_key(ListKind::near, e, A.near), e, i, j);
}

// Offers one pair outside [a, b] to the outside-pairs list ((i, j) order only).
inline void offer_outside(PairwiseEngine::ThreadCtx& c, float e, int64_t i, int64_t j) {
  c.outp.offer(numerics::order_key(numerics::ListKind::outside, e), e, i, j);
}

// Per-row lists: exact mode offers exact values to RowLists, fast mode bf16 values to RowCands.
inline const float* row_filter(const FusedArgs& A, const PairwiseEngine::ThreadCtx& c, bool top) {
  if (A.fast) return (top ? c.ctop : c.cbot).shared;
  return (top ? c.rtop : c.rbot).filter_thr();
}
inline void offer_row(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, bool top, int64_t row, float v,
                      int64_t col) {
  if (A.fast)
    (top ? c.ctop : c.cbot).offer(row, v, static_cast<int32_t>(col));
  else
    (top ? c.rtop : c.rbot).push(row, v, static_cast<int32_t>(col));
}

// A list of k = 0 (switched off, or lowered to a pair count of 0) is full while empty: its
// thresholds let nothing in, and nothing reads e.back() of it.
inline float thr_hi(const PairList& l) { return l.k <= 0 ? kInf : l.full() ? l.e.back().v : -kInf; }
inline float thr_lo(const PairList& l) { return l.k <= 0 ? -kInf : l.full() ? l.e.back().v : kInf; }
inline double thr_dist(const PairList& l) {
  if (l.k <= 0) return -std::numeric_limits<double>::infinity();
  return l.full() ? -l.e.back().key : std::numeric_limits<double>::infinity();
}

inline int64_t hist_bin(const FusedArgs& A, float v) {
  return numerics::bin_index(double(v), A.lo, A.hi, A.bins, A.scale);
}


// Fast mode: exact values of the tile's candidates in one batch, then the offers and the
// outside decisions they were waiting for. Candidate flags:
constexpr uint32_t kCandGlobal = 1u;    // offer to the global lists
constexpr uint32_t kCandMaybeOut = 32u; // outside [a, b] undecided by the bf16 value
constexpr uint32_t kCandOutPair = 64u;  // surely outside: list the pair

// Whether the outside-pairs list may still take pairs of row i (it keeps the first pairs in
// (i, j) order, so once full it only closes).
inline bool outside_list_open(const PairwiseEngine::ThreadCtx& c, int64_t i) {
  if (c.outp.k <= 0) return false;  // outside_limit=0: counted, never listed
  return !c.outp.full() || i <= c.outp.e.back().i;
}

// The outside pairs of one step of a pass: lanes l set in `lanes` are pairs (i, j0 + l) with
// tile values vals[l], tile column jj + l and tile row ii. Offered in (i, j) order until the full
// list can take no more; in fast mode queued for the tile's batch rescoring instead.
inline void list_outside(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, int64_t i, int64_t ii,
                         int64_t jj, int64_t j0, uint32_t lanes, const float* vals) {
  for (uint32_t todo = lanes; todo; todo &= todo - 1) {
    const int l = __builtin_ctz(todo);
    const int64_t j = j0 + l;
    if (c.outp.full() && (i > c.outp.e.back().i || (i == c.outp.e.back().i && j > c.outp.e.back().j))) break;
    if (A.fast) {
      c.cand.push_back({int32_t(ii), int32_t(jj + l), kCandOutPair});
      continue;
    }
    offer_outside(c, vals[l], i, j);
  }
}
void rescore_candidates(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, int64_t r0, int64_t c0);

using FusedFn = void (*)(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float* C, int64_t ldc,
                         int64_t r0, int64_t nr, int64_t c0, int64_t nc, double* tsum, double* tsumsq);
static_assert(std::is_same<FusedFn, void (*)(const FusedArgs&, PairwiseEngine::ThreadCtx&, float*,
                                             int64_t, int64_t, int64_t, int64_t, int64_t, double*,
                                             double*)>::value,
              "one fused-pass signature");

// The portable pass, compiled for the baseline target (generic; NEON on aarch64) and for AVX2.
void fused_tile_generic(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float* C, int64_t ldc,
                        int64_t r0, int64_t nr, int64_t c0, int64_t nc, double* tsum, double* tsumsq);
void fused_tile_avx2(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float* C, int64_t ldc,
                     int64_t r0, int64_t nr, int64_t c0, int64_t nc, double* tsum, double* tsumsq);
#if EMBGEOM_X86
void fused_tile_avx512(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float* C, int64_t ldc,
                       int64_t r0, int64_t nr, int64_t c0, int64_t nc, double* tsum, double* tsumsq);
#endif

// The pass for a level, and its name for `embgeom info`.
FusedFn select_fused(Isa level);
const char* fused_name(Isa level);

}  // namespace embgeom
