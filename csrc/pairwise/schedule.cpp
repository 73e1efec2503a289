// All-pairs engine: one tile (product, then the fused pass), the parallel schedule of a run
// and the deterministic merge of the threads' partial states (docs/architecture.md).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "check.h"
#include "parallel_errors.h"
#include "cpu/blas.h"
#include "pairwise/fused.h"

#ifdef EMBGEOM_OPENMP
#include <omp.h>
#endif

namespace embgeom {


// The fused pass takes a tile's values in bands of rows. With the own kernels the product, too,
// is computed band by band (a buffer of kBandRows rows, not a whole tile); OpenBLAS (unpacked
// rows) computes the whole tile in one call.
void PairwiseEngine::process_tile(int64_t t, ThreadCtx& c, double* tsum, double* tsumsq) const {
  const Tile T = tile(t);
  const int64_t r0 = T.I * bs_, r1 = std::min(n_, r0 + bs_);
  const int64_t c0 = T.J * bs_, c1 = std::min(m_, c0 + bs_);
  const int64_t ncols = c1 - c0;
  if (c.colcnt.n < ncols + 16) c.colcnt.reset(ncols + 16);
  if (opt_.has_outside) std::memset(c.colcnt.data(), 0, sizeof(int32_t) * (ncols + 16));
  const FusedArgs A = fused_args(c, self_ && T.I == T.J);
  *tsum = 0.0;
  *tsumsq = 0.0;
  // rows [b0, b1) of the tile, row b0 at C (row stride ldc)
  auto pass = [&](float* C, int64_t ldc, int64_t b0, int64_t b1) {
    double s = 0.0, s2 = 0.0;
    prefetch_row_lists(c, b0, b1, c0, c1);
    fused_(A, c, C, ldc, b0, b1 - b0, c0, ncols, &s, &s2);
    *tsum += s;
    *tsumsq += s2;
  };
  if (kern_.blas) {
    // unpacked rows straight into C (+16: room for masked tails, odd stride)
    const int64_t ldc = ncols + 16;
    const int64_t need = (r1 - r0) * ldc;
    if (c.C.n < need) c.C.reset(need);
    blas_sgemm_nt(r1 - r0, ncols, d_, xrow(r0), d_, yrow(c0), d_, c.C.data(), ldc);
    for (int64_t b0 = r0; b0 < r1; b0 += kBandRows)
      pass(c.C.data() + (b0 - r0) * ldc, ldc, b0, std::min(r1, b0 + kBandRows));
  } else {
    const int64_t mr = kern_.mr, nr = kern_.nr;
    const int64_t pa0 = r0 / mr, pa1 = (r1 + mr - 1) / mr;
    const int64_t pb0 = c0 / nr, pb1 = (c1 + nr - 1) / nr;
    const int64_t ldc = (pb1 - pb0) * nr + 16;  // +16: room for masked tails, odd stride
    const int64_t band = std::max<int64_t>(1, kBandRows / mr);  // A panels a band
    const int64_t need = band * mr * ldc;
    if (c.C.n < need) c.C.reset(need);
    const int64_t coff = c0 - pb0 * nr;
    for (int64_t p0 = pa0; p0 < pa1; p0 += band) {
      const int64_t p1 = std::min(pa1, p0 + band);
      // panels are aligned to the matrix, not the tile: the band's rows within [r0, r1)
      const int64_t b0 = std::max(r0, p0 * mr), b1 = std::min(r1, p1 * mr);
      // a diagonal tile needs columns j > i only: skip the B panels left of the band's first row
      const int64_t q0 = A.diag ? std::max(pb0, std::min(pb1, (b0 + 1) / nr)) : pb0;
      gemm_tile(kern_, pa_, p0, p1, pb(), q0, pb1, c.C.data() + (q0 - pb0) * nr, ldc);
      pass(c.C.data() + (b0 - p0 * mr) * ldc + coff, ldc, b0, b1);
    }
  }
  if (opt_.has_outside) {
    int64_t* dst = self_ ? c.out_rows.data() : c.out_cols.data();
    const int32_t* cc = c.colcnt.data();
    for (int64_t jj = 0; jj < ncols; ++jj) dst[c0 + jj] += cc[jj];
  }
}

FusedArgs PairwiseEngine::fused_args(const ThreadCtx& c, bool diag) const {
  FusedArgs A;
  A.E = this;
  A.cold = fast_ && tile_is_cold(c);
  A.self = self_;
  A.fast = fast_;
  A.diag = diag;
  A.lists_only = lists_only_;
  A.metric = metric_;
  A.M = static_cast<float>(err_bound_);
  if (double(A.M) < err_bound_) A.M = std::nextafter(A.M, kInf);
  A.xn2 = xn2_.data();
  A.yn2 = self_ ? xn2_.data() : ys_->n2.data();
  A.bins = opt_.bins;
  A.lo = opt_.lo;
  A.hi = opt_.hi;
  A.scale = opt_.bins > 0 ? double(opt_.bins) / (opt_.hi - opt_.lo) : 0.0;
  A.do_hist = opt_.bins > 0;
  {
    // g = fl32(fl32(v - fl32(lo)) * fl32(scale)) and the float64 rule's r = fl64(fl64(v - lo) *
    // scale) differ by at most 3.01 u |T| + 1.01 u |lo| scale + 2.1e-16 |T| (u = 2^-24, T = (v -
    // lo) scale), with |T| <= bins + 1 for a value that the float32 test accepts
    const double u = numerics::kFp32UnitRoundoff, T = double(opt_.bins) + 1.0;
    const double guard = 3.1 * u * T + 1.1 * u * std::fabs(opt_.lo) * A.scale + 1e-12 * T;
    A.hlo = static_cast<float>(opt_.lo);
    A.hscale = static_cast<float>(A.scale);
    A.hfr_lo = static_cast<float>(guard);
    if (double(A.hfr_lo) < guard) A.hfr_lo = std::nextafter(A.hfr_lo, kInf);
    A.hfr_hi = static_cast<float>(1.0 - guard);
    if (double(A.hfr_hi) > 1.0 - guard) A.hfr_hi = std::nextafter(A.hfr_hi, -kInf);
    A.hist_f32 = A.do_hist && opt_.bins <= (int64_t(1) << 22) && guard < 0.25 && std::isfinite(A.hlo) &&
                 std::isfinite(A.hscale) && A.hscale > 0.0f;
  }
  A.do_top = opt_.topk > 0;
  A.do_bot = opt_.bottomk > 0;
  A.do_near = opt_.has_near && opt_.near_k > 0;
  A.near = opt_.near;
  A.shift = opt_.moment_shift;
  A.do_rtop = opt_.row_topk > 0;
  A.do_rbot = opt_.row_bottomk > 0;
  A.do_out = opt_.has_outside;
  A.oa = static_cast<float>(opt_.out_a);
  A.ob = static_cast<float>(opt_.out_b);
  // v < a (double) <=> v < smallest float >= a; v > b <=> v > largest float <= b
  if (A.do_out) {
    if (double(A.oa) < opt_.out_a) A.oa = std::nextafter(A.oa, kInf);
    if (double(A.ob) > opt_.out_b) A.ob = std::nextafter(A.ob, -kInf);
  }
  return A;
}

// The band's rows' list slots (and, in self mode, the tile's columns') are scattered over the
// lists of every row, and the band's product has streamed the packed panels through the caches since they
// were last read: fetch them before the band's pass, not one miss per offer.
void PairwiseEngine::prefetch_row_lists(const ThreadCtx& c, int64_t r0, int64_t r1, int64_t c0,
                                        int64_t c1) const {
  // a reservoir is written at its next free slot (until a compaction reads it whole): rows [a, b)
  // of lists of `width` slots a row
  auto next_slots = [](const std::vector<float>& val, const std::vector<int32_t>& col,
                       const std::vector<int32_t>& cnt, int64_t width, int64_t a, int64_t b) {
    for (int64_t q = a; q < b; ++q) {
      const int64_t at = q * width + cnt[q];
      __builtin_prefetch(val.data() + at, 1, 3);
      __builtin_prefetch(col.data() + at, 1, 3);
    }
  };
  auto rows = [&](int64_t a, int64_t b) {
    for (const RowCands* r : {&c.ctop, &c.cbot})
      if (r->k > 0) next_slots(r->val, r->col, r->cnt, r->cap, a, b);
    for (const RowLists* r : {&c.rtop, &c.rbot})
      if (r->k > 0) next_slots(r->val, r->col, r->cnt, r->stride, a, b);
  };
  if (!self_ || r0 < c0 || r1 > c1) rows(r0, r1);  // (a diagonal tile's band: among its columns)
  if (self_) rows(c0, c1);                         // the column direction
}

bool PairwiseEngine::tile_is_cold(const ThreadCtx& c) const {
  // (row lists need no exact values during the run: RowCands)
  for (const PairList* l : {&c.max1, &c.min1, &c.top, &c.bottom, &c.near})
    if (l->k > 0 && !l->full()) return true;
  return false;
}

void PairwiseEngine::run(int64_t begin, int64_t end) {
  bool idle = false;
  EMBGEOM_CHECK(running_.compare_exchange_strong(idle, true),
                "engine: a run is under way in another thread; one run at a time on an engine");
  struct Finished {
    std::atomic<bool>& running;
    ~Finished() { running = false; }
  } finished{running_};
  EMBGEOM_CHECK(0 <= begin && begin <= end && end <= num_tiles_,
                "tiles: expected 0 <= begin <= end <= " << num_tiles_ << ", got [" << begin << ", " << end << ")");
  EMBGEOM_CHECK(begin == st_.tiles_done || (fresh_ && st_.tiles_done == 0),
                "tiles must run in order: expected begin=" << st_.tiles_done << ", got " << begin);
  fresh_ = false;
  if (begin == end) {
    st_.tiles_done = end;
    return;
  }
  int nth = opt_.threads;
#ifdef EMBGEOM_OPENMP
  if (nth <= 0) nth = omp_get_max_threads();
#else
  nth = 1;
#endif
  nth = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nth, end - begin)));
  std::vector<double> tsum(end - begin), tsumsq(end - begin);
  std::vector<std::unique_ptr<ThreadCtx>> ctx(nth);

  // shared per-row thresholds, seeded from the lists so far (see RowLists::shared)
  std::vector<float> shared_top(st_.row_top.k > 0 ? st_.row_top.thr : std::vector<float>());
  std::vector<float> shared_bottom(st_.row_bottom.k > 0 ? st_.row_bottom.thr : std::vector<float>());
  for (size_t r = 0; r < prime_top_.size(); ++r) shared_top[r] = std::max(shared_top[r], prime_top_[r]);
  // a floor starts every row's filter there: the lists keep values >= floor only (exact mode's
  // reservoirs take values >= the shared threshold; fast mode's candidates are bounded by it)
  if (row_top_floor_ > -kInf)
    for (float& t : shared_top) t = std::max(t, row_top_floor_);
  for (size_t r = 0; r < prime_bottom_.size(); ++r) shared_bottom[r] = std::min(shared_bottom[r], prime_bottom_[r]);
  auto make_ctx = [&]() {
    auto c = std::make_unique<ThreadCtx>();
    c->max1 = st_.max1;
    c->min1 = st_.min1;
    c->top = st_.top;
    c->bottom = st_.bottom;
    c->near = st_.near;
    c->outp = st_.outside_pairs;
    c->hist.assign(st_.hist.size(), 0);
    if (fast_) {
      if (st_.row_top.k > 0) c->ctop.init(n_, st_.row_top.k, true, err_bound_, shared_top.data());
      if (st_.row_bottom.k > 0) c->cbot.init(n_, st_.row_bottom.k, false, err_bound_, shared_bottom.data());
    } else {
      // empty reservoirs: the state's pairs join at the merge, its thresholds through `shared`
      c->rtop.init(st_.row_top.k > 0 ? n_ : 0, st_.row_top.k, true, true);
      c->rbot.init(st_.row_bottom.k > 0 ? n_ : 0, st_.row_bottom.k, false, true);
      c->rtop.shared = shared_top.empty() ? nullptr : shared_top.data();
      c->rbot.shared = shared_bottom.empty() ? nullptr : shared_bottom.data();
    }
    if (opt_.has_outside) {
      c->out_rows.assign(n_, 0);
      if (!self_) c->out_cols.assign(m_, 0);
    }
    return c;
  };

  ParallelErrors errors;  // (a thread's failure, e.g. bad_alloc, raised after the region; st_ untouched)
#pragma omp parallel num_threads(nth)
  {
    int tid = 0;
#ifdef EMBGEOM_OPENMP
    tid = omp_get_thread_num();
#endif
    errors.run([&] { ctx[tid] = make_ctx(); });
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = begin; t < end; ++t)
      errors.run([&] { process_tile(t, *ctx[tid], &tsum[t - begin], &tsumsq[t - begin]); });
    // each thread sorts its own waiting offers: the merge below is then linear
    errors.run([&] {
      ThreadCtx& c = *ctx[tid];
      for (PairList* l : {&c.max1, &c.min1, &c.top, &c.bottom, &c.near, &c.outp}) l->settle();
    });
  }
  errors.rethrow();

  // deterministic merge (the result sets are unique under the total orders, sums are sequential)
  for (int64_t t = 0; t < end - begin; ++t) {
    st_.shifted_sum += tsum[t];
    st_.shifted_sumsq += tsumsq[t];
  }
  if (!lists_only_) st_.count += tile_pairs(begin, end);
  for (auto& cp : ctx) {
    if (!cp) continue;
    ThreadCtx& c = *cp;
    for (size_t b = 0; b < st_.hist.size(); ++b) st_.hist[b] += c.hist[b];
    st_.max1.absorb(c.max1);
    st_.min1.absorb(c.min1);
    st_.top.absorb(c.top);
    st_.bottom.absorb(c.bottom);
    st_.near.absorb(c.near);
    st_.outside_pairs.absorb(c.outp);
    st_.outside_count += c.out_count;
    for (size_t r = 0; r < c.out_rows.size(); ++r) st_.outside_rows[r] += c.out_rows[r];
    for (size_t r = 0; r < c.out_cols.size(); ++r) st_.outside_cols[r] += c.out_cols[r];
  }
  st_.settle_pair_lists();
  if (fast_) {
    settle_row_candidates(ctx, true, nth);
    settle_row_candidates(ctx, false, nth);
  }
  for (RowLists* dst : {&st_.row_top, &st_.row_bottom}) {
    if (dst->k <= 0 || fast_) continue;
    const bool top = dst == &st_.row_top;
    std::vector<const RowLists*> srcs;
    for (auto& cp : ctx)
      if (cp) srcs.push_back(top ? &cp->rtop : &cp->rbot);
    const int64_t step = 256;
    ParallelErrors merge_errors;
#pragma omp parallel for schedule(static) num_threads(nth)
    for (int64_t r = 0; r < n_; r += step)
      merge_errors.run([&] { dst->merge_rows(srcs, r, std::min(n_, r + step)); });
    merge_errors.rethrow();
  }
  st_.tiles_done = end;
}

// Fast mode, end of a run: per row, the threads' bf16 candidates (plus spilled ones) that are
// still within the band of the row's k-th best are rescored exactly and offered to the state's
// lists; rows are batched so the rescoring runs many FMA chains side by side.
void PairwiseEngine::settle_row_candidates(std::vector<std::unique_ptr<ThreadCtx>>& ctx, bool top, int nth) {
  RowLists& dst = top ? st_.row_top : st_.row_bottom;
  if (dst.k <= 0) return;
  const int64_t k = dst.k;
  const double M = err_bound_;
  std::vector<const RowCands*> srcs;
  for (auto& cp : ctx) {
    if (!cp) continue;
    RowCands& rc = top ? cp->ctop : cp->cbot;
    std::stable_sort(rc.spill.begin(), rc.spill.end(),
                     [](const RowCands::Spilled& a, const RowCands::Spilled& b) { return a.row < b.row; });
    srcs.push_back(&rc);
  }
  constexpr int64_t kRows = 64;  // rows per rescoring batch
  const int64_t blocks = (n_ + kRows - 1) / kRows;
  ParallelErrors errors;
#pragma omp parallel num_threads(std::max(1, nth))
  {
    struct Pending {
      int32_t row, col;
    };
    std::vector<Pending> pend;
    std::vector<float> vals, dots;
    std::vector<const float*> pa, pb;
    std::vector<std::pair<float, int32_t>> row_cands;
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < blocks; ++b) errors.run([&] {
      pend.clear();
      for (int64_t r = b * kRows; r < std::min(n_, (b + 1) * kRows); ++r) {
        row_cands.clear();
        for (const RowCands* src : srcs) {
          const RowCands& rc = *src;
          for (int32_t q = 0; q < rc.cnt[r]; ++q) row_cands.push_back({rc.val[r * rc.cap + q], rc.col[r * rc.cap + q]});
          const auto& sp = rc.spill;
          auto it = std::lower_bound(sp.begin(), sp.end(), r,
                                     [](const RowCands::Spilled& a, int64_t row) { return a.row < row; });
          for (; it != sp.end() && it->row == r; ++it) row_cands.push_back({it->v, it->col});
        }
        if (row_cands.empty()) continue;
        // bound on the final k-th best exact value: the state's list, and any k candidates
        double bound = dst.cnt[r] == k ? double(dst.thr[r]) : (top ? -double(kInf) : double(kInf));
        if (top) bound = std::max(bound, double(row_top_floor_));
        if (static_cast<int64_t>(row_cands.size()) >= k) {
          auto kth = row_cands.begin() + (k - 1);
          if (top)
            std::nth_element(row_cands.begin(), kth, row_cands.end(),
                             [](const auto& a, const auto& c) { return a.first > c.first; });
          else
            std::nth_element(row_cands.begin(), kth, row_cands.end(),
                             [](const auto& a, const auto& c) { return a.first < c.first; });
          bound = top ? std::max(bound, double(kth->first) - M) : std::min(bound, double(kth->first) + M);
        }
        for (const auto& rc : row_cands)
          if (top ? double(rc.first) + M >= bound : double(rc.first) - M <= bound)
            pend.push_back({int32_t(r), rc.second});
      }
      const size_t np = pend.size();
      pa.resize(np);
      pb.resize(np);
      dots.resize(np);
      for (size_t q = 0; q < np; ++q) {
        pa[q] = xrow(pend[q].row);
        pb[q] = yrow(pend[q].col);
      }
      dot_exact_batch(pa.data(), pb.data(), static_cast<int64_t>(np), d_, dots.data());
      for (size_t q = 0; q < np; ++q) {
        const float v = transform(dots[q], pend[q].row, pend[q].col);
        if (top && v < row_top_floor_) continue;  // a candidate within M below the floor
        dst.offer(pend[q].row, v, pend[q].col);
      }
    });
  }
  errors.rethrow();
}

}  // namespace embgeom
