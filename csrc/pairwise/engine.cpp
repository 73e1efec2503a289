// All-pairs engine: construction (compaction, products, fast-mode bound), the schedule of
// tiles, and the metric transform (docs/metrics.md).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "parallel_errors.h"
#include "check.h"
#include "numerics.h"
#include "pairwise/fused.h"

#ifdef EMBGEOM_OPENMP
#include <omp.h>
#endif

namespace embgeom {

namespace {
void skip_fused_pass(const FusedArgs&, PairwiseEngine::ThreadCtx&, float*, int64_t, int64_t, int64_t,
                     int64_t, int64_t, double* tsum, double* tsumsq) {
  *tsum = 0.0;
  *tsumsq = 0.0;
}
}  // namespace

void PairwiseEngine::discard_statistics() { fused_ = skip_fused_pass; }

void PairwiseEngine::set_row_top_floor(float floor) {
  EMBGEOM_CHECK(fresh_ && st_.tiles_done == 0, "set_row_top_floor: the engine has run already");
  row_top_floor_ = std::isnan(floor) ? -std::numeric_limits<float>::infinity() : floor;
}

void PairwiseEngine::keep_lists_only() {
  EMBGEOM_CHECK(fresh_ && st_.tiles_done == 0, "keep_lists_only: the engine has run already");
  EMBGEOM_CHECK(metric_ != 2 && opt_.bins == 0 && opt_.topk == 0 && opt_.bottomk == 0 && !opt_.has_near,
                "keep_lists_only: needs metric cosine or dot and no histogram, global or near lists");
  lists_only_ = true;
  st_ = empty_state();
}

// ---------------------------------------------------------------------------------------------
// construction and schedule
// ---------------------------------------------------------------------------------------------

namespace {

void check_options(const PairwiseOptions& opt) {
  EMBGEOM_CHECK(opt.metric == "cosine" || opt.metric == "dot" || opt.metric == "euclidean",
                "metric: expected 'cosine', 'dot' or 'euclidean', got '" << opt.metric << "'");
  EMBGEOM_CHECK(opt.precision == "exact" || opt.precision == "fast",
                "precision: expected 'exact' or 'fast', got '" << opt.precision << "'");
  EMBGEOM_CHECK(opt.block >= 1, "block: expected >= 1, got " << opt.block);
  EMBGEOM_CHECK(opt.bins >= 0, "bins: expected >= 0, got " << opt.bins);
  EMBGEOM_CHECK(opt.bins == 0 || (std::isfinite(opt.lo) && std::isfinite(opt.hi) && opt.hi > opt.lo),
                "range: expected finite lo < hi, got (" << opt.lo << ", " << opt.hi << ")");
  EMBGEOM_CHECK(!opt.has_near || std::isfinite(opt.near), "near: expected a finite value");
  EMBGEOM_CHECK(!opt.has_outside || (!std::isnan(opt.out_a) && !std::isnan(opt.out_b) && opt.out_a <= opt.out_b),
                "outside: expected (a, b) with a <= b, got (" << opt.out_a << ", " << opt.out_b << ")");
  EMBGEOM_CHECK(opt.topk >= 0, "topk: expected >= 0, got " << opt.topk);
  EMBGEOM_CHECK(opt.bottomk >= 0, "bottomk: expected >= 0, got " << opt.bottomk);
  EMBGEOM_CHECK(opt.near_k >= 0, "near_k: expected >= 0, got " << opt.near_k);
  EMBGEOM_CHECK(opt.outside_limit >= 0, "outside_limit: expected >= 0, got " << opt.outside_limit);
  // a row has fewer than 2^31 neighbours (M < 2^31): a longer per-row list had wrapped its size
  EMBGEOM_CHECK(opt.row_topk >= 0 && opt.row_topk <= kMaxRowList,
                "row_topk: expected 0 to " << kMaxRowList << ", got " << opt.row_topk);
  EMBGEOM_CHECK(opt.row_bottomk >= 0 && opt.row_bottomk <= kMaxRowList,
                "row_bottomk: expected 0 to " << kMaxRowList << ", got " << opt.row_bottomk);
  check_threads(opt.threads);
}

int metric_code(const std::string& metric) { return metric == "cosine" ? 0 : (metric == "dot" ? 1 : 2); }

int row_threads(int threads) {
#ifdef EMBGEOM_OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

// Compact rows (zero rows dropped for cosine), normalised for cosine; squared norms for euclidean.
void compact_rows(const char* name, const float* src, int64_t rows, int64_t d, int metric, int nthreads,
                  std::vector<int64_t>& map, std::vector<int64_t>& inv, RowBuffer& out,
                  std::vector<float>& n2) {
  std::vector<double> nrm(rows);
  // each row's sum in k order; four rows side by side, so that an add does not wait on the one
  // before it (one chain at a time: 0.01 s of the vocabulary's 0.04 s here)
  constexpr int64_t kSide = 4;
  const int64_t groups = (rows + kSide - 1) / kSide;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = g * kSide, nr = std::min(kSide, rows - r0);
    const float* p[kSide];  // the last group repeats its last row in the missing places
    for (int64_t q = 0; q < kSide; ++q) p[q] = src + (r0 + std::min(q, nr - 1)) * d;
    double s[kSide] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t k = 0; k < d; ++k)
      for (int64_t q = 0; q < kSide; ++q) s[q] += double(p[q][k]) * double(p[q][k]);
    for (int64_t q = 0; q < nr; ++q) nrm[r0 + q] = s[q];
  }
  for (int64_t r = 0; r < rows; ++r)
    EMBGEOM_CHECK(std::isfinite(nrm[r]), name << ": row " << r << " has a non-finite value or overflows");
  inv.assign(rows, -1);
  map.clear();
  for (int64_t r = 0; r < rows; ++r) {
    if (metric == 0 && nrm[r] == 0.0) continue;
    inv[r] = static_cast<int64_t>(map.size());
    map.push_back(r);
  }
  const int64_t c = static_cast<int64_t>(map.size());
  out.resize(c * d);
  n2.resize(metric == 2 ? c : 0);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t q = 0; q < c; ++q) {
    const float* p = src + map[q] * d;
    float* o = out.data() + q * d;
    if (metric == 0) {
      const double s = std::sqrt(nrm[map[q]]);
      for (int64_t k = 0; k < d; ++k) o[k] = static_cast<float>(double(p[k]) / s);
    } else {
      std::memcpy(o, p, sizeof(float) * d);
      if (metric == 2) n2[q] = static_cast<float>(nrm[map[q]]);
    }
  }
}

// What prepared columns must match: the metric, precision and product kernel of the run.
std::string columns_key(const PairwiseOptions& opt, const GemmKernel& kern) {
  return opt.metric + "/" + opt.precision + "/" + kern.name;
}

// exact mode never rescores: the row copies are dropped (euclidean keeps them for the direct
// distance of near-identical rows; BLAS products read them)
bool rows_needed(const GemmKernel& kern, int metric) { return kern.bf16 || metric == 2 || kern.blas; }

}  // namespace

std::shared_ptr<const PreparedColumns> prepare_columns(const float* y, int64_t m, int64_t d,
                                                       const PairwiseOptions& opt) {
  check_options(opt);
  EMBGEOM_CHECK(m >= 0 && m < (int64_t(1) << 31) && d >= 1, "y: expected (M, D) with M < 2^31, D >= 1");
  const int metric = metric_code(opt.metric);
  const int nthreads = row_threads(opt.threads);
  const GemmKernel kern = select_kernel(opt.precision == "fast");
  auto c = std::make_shared<PreparedColumns>();
  c->key = columns_key(opt, kern);
  c->m0 = m;
  c->d = d;
  compact_rows("y", y, m, d, metric, nthreads, c->map, c->inv, c->rows, c->n2);
  c->m = static_cast<int64_t>(c->map.size());
  if (!kern.blas) pack_panels(c->rows.data(), c->m, d, d, kern.b_panels(), c->panels, nthreads);
  if (kern.bf16) c->bf16_norms = bf16_rounding_norms(c->rows.data(), c->m, d, nthreads);
  if (!rows_needed(kern, metric)) RowBuffer().swap(c->rows);
  return c;
}

PairwiseEngine::PairwiseEngine(const float* x, int64_t n, const float* y, int64_t m, int64_t d,
                               const PairwiseOptions& opt)
    : opt_(opt) {
  check_options(opt);
  EMBGEOM_CHECK(y == nullptr || m >= 0, "y: bad row count " << m);
  EMBGEOM_CHECK(n < (int64_t(1) << 31) && m < (int64_t(1) << 31), "x/y: at most 2^31-1 rows");
  init(x, n, y == nullptr ? nullptr : prepare_columns(y, m, d, opt), d);
}

PairwiseEngine::PairwiseEngine(const float* x, int64_t n, std::shared_ptr<const PreparedColumns> columns,
                               const PairwiseOptions& opt)
    : opt_(opt) {
  check_options(opt);
  EMBGEOM_CHECK(columns != nullptr, "columns: expected prepared columns");
  EMBGEOM_CHECK(n < (int64_t(1) << 31), "x: at most 2^31-1 rows");
  init(x, n, std::move(columns), -1);
}

void PairwiseEngine::init(const float* x, int64_t n, std::shared_ptr<const PreparedColumns> columns,
                          int64_t d) {
  if (columns) d = columns->d;
  EMBGEOM_CHECK(n >= 0 && d >= 1, "x: expected shape (N, D) with D >= 1, got (" << n << ", " << d << ")");
  self_ = (columns == nullptr);
  metric_ = metric_code(opt_.metric);
  d_ = d;
  bs_ = opt_.block;
  n0_ = n;
  m0_ = self_ ? n : columns->m0;
  const int threads = opt_.threads;
  const int nthreads = row_threads(threads);
  compact_rows("x", x, n, d, metric_, nthreads, xmap_, xinv_, xr_, xn2_);
  n_ = static_cast<int64_t>(xmap_.size());
  m_ = self_ ? n_ : columns->m;

  isa_ = isa_level();
  fused_ = select_fused(isa_);
  kern_ = select_kernel(opt_.precision == "fast");
  fast_ = kern_.bf16;
  if (columns) {
    EMBGEOM_CHECK(columns->key == columns_key(opt_, kern_),
                  "columns: prepared for " << columns->key << ", this run needs " << columns_key(opt_, kern_));
    ys_ = std::move(columns);
  }
  if (!kern_.blas) {
    pack_panels(xr_.data(), n_, d, d, kern_.a_panels(), pa_, threads);
    if (self_) {  // x packed once more as B panels (the only part of ys_ self mode reads)
      auto own = std::make_shared<PreparedColumns>();
      pack_panels(xr_.data(), n_, d, d, kern_.b_panels(), own->panels, threads);
      ys_ = std::move(own);
    }
  }
  if (fast_) {
    const RoundingNorms na = bf16_rounding_norms(xr_.data(), n_, d, nthreads);
    const RoundingNorms nb = self_ ? na : ys_->bf16_norms;
    err_bound_ = numerics::fast_error_bound(d, metric_ == 2, na.full, na.rounded, na.delta, nb.full,
                                            nb.rounded, nb.delta);
  }
  prime_row_bounds(nthreads);
  if (!rows_needed(kern_, metric_)) RowBuffer().swap(xr_);

  nbx_ = (n_ + bs_ - 1) / bs_;
  nby_ = self_ ? nbx_ : (m_ + bs_ - 1) / bs_;
  if (self_) {
    row_off_.resize(nbx_ + 1);
    int64_t t = 0;
    for (int64_t I = 0; I < nbx_; ++I) {
      row_off_[I] = t;
      t += nbx_ - I;
    }
    row_off_[nbx_] = t;
    num_tiles_ = t;
  } else {
    num_tiles_ = nbx_ * nby_;
  }

  st_ = empty_state();
}

// Fast mode: a row's list filter starts unbounded and tightens only as the tiles stream past,
// so a sequential scan offers about k ln(m / k) candidates per row, and more where the columns
// are ordered (a vocabulary's ids). Each row starts instead from the k-th best of its values
// against an evenly spread sample of columns: k real pairs, so (widened by the bf16 error) never
// past the row's final k-th best, and the lists come out identical.
void PairwiseEngine::prime_row_bounds(int threads) {
  const int64_t kt = opt_.row_topk, kb = opt_.row_bottomk;
  const int64_t s = std::min<int64_t>(kPrimeSample, m_ / 4);
  // exact mode: an offer is one store into a reservoir, and the sample's product costs what it
  // saves there (vocabulary, k = 117: 1,024 columns cut the run by 0.2 s and took 0.2 s)
  if (!fast_ || (kt <= 0 && kb <= 0) || s <= std::max(kt, kb)) return;
  std::vector<int64_t> cols(s);
  std::vector<float> rows(s * d_);
  for (int64_t q = 0; q < s; ++q) {
    cols[q] = (2 * q + 1) * m_ / (2 * s);
    std::memcpy(rows.data() + q * d_, yrow(cols[q]), sizeof(float) * d_);
  }
  PackedPanels B;
  pack_panels(rows.data(), s, d_, d_, kern_.b_panels(), B, threads);
  if (kt > 0) prime_top_.assign(n_, -kInf);
  if (kb > 0) prime_bottom_.assign(n_, kInf);
  const double M = err_bound_;
  const int64_t width = B.panels * kern_.nr, chunk = 8;  // A panels per work item
  const int64_t items = (pa_.panels + chunk - 1) / chunk;
  ParallelErrors errors;
#pragma omp parallel num_threads(std::max(1, threads))
  {
    AlignedBuf<float> C;
    errors.run([&] { C.reset(chunk * kern_.mr * width); });
    std::vector<float> vals, best;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) errors.run([&] {
      const int64_t p0 = it * chunk, p1 = std::min(pa_.panels, p0 + chunk);
      gemm_tile(kern_, pa_, p0, p1, B, 0, B.panels, C.data(), width);
      for (int64_t r = p0 * kern_.mr; r < std::min(n_, p1 * kern_.mr); ++r) {
        const float* row = C.data() + (r - p0 * kern_.mr) * width;
        vals.clear();
        for (int64_t q = 0; q < s; ++q)
          if (!self_ || cols[q] != r) vals.push_back(transform(row[q], r, cols[q]));
        // the k-th best, widened by M and rounded outwards (bottom: the k-th largest negated)
        auto bound = [&](int64_t k, bool top) {
          const int64_t m = static_cast<int64_t>(vals.size());
          if (m < k) return top ? -kInf : kInf;
          best.resize(4 * m);
          for (int64_t q = 0; q < m; ++q) best[3 * m + q] = top ? vals[q] : -vals[q];
          const float kth = rank_largest(best.data() + 3 * m, m, k - 1, best.data());
          return widened_bound(top ? kth : -kth, M, top);
        };
        if (kt > 0) prime_top_[r] = bound(kt, true);
        if (kb > 0) prime_bottom_[r] = bound(kb, false);
      }
    });
  }
  errors.rethrow();
}

PairwiseState PairwiseEngine::empty_state() const {
  PairwiseState st;
  st.max1.k = lists_only_ ? 0 : 1;  // (a list of k = 0 lets nothing in)
  st.min1.k = lists_only_ ? 0 : 1;
  st.top.k = opt_.topk;
  st.bottom.k = opt_.bottomk;
  st.near.k = opt_.has_near ? opt_.near_k : 0;
  st.outside_pairs.k = opt_.has_outside ? opt_.outside_limit : 0;
  if (opt_.bins > 0) st.hist.assign(opt_.bins + 2, 0);
  st.row_top.init(n_, opt_.row_topk, true);
  st.row_bottom.init(n_, opt_.row_bottomk, false);
  if (opt_.has_outside) {
    st.outside_rows.assign(n_, 0);
    if (!self_) st.outside_cols.assign(m_, 0);
  }
  return st;
}

PairwiseEngine::Tile PairwiseEngine::tile(int64_t t) const {
  if (!self_) return {t / nby_, t % nby_};
  const int64_t I = std::upper_bound(row_off_.begin(), row_off_.end(), t) - row_off_.begin() - 1;
  return {I, I + (t - row_off_[I])};
}

int64_t PairwiseEngine::tile_pairs(int64_t begin, int64_t end) const {
  EMBGEOM_CHECK(0 <= begin && begin <= end && end <= num_tiles_,
                "tiles: expected 0 <= begin <= end <= " << num_tiles_ << ", got [" << begin << ", " << end << ")");
  int64_t s = 0;
  for (int64_t t = begin; t < end; ++t) {
    const Tile T = tile(t);
    const int64_t r = std::min(bs_, n_ - T.I * bs_);
    const int64_t c = std::min(bs_, m_ - T.J * bs_);
    s += (self_ && T.I == T.J) ? r * (r - 1) / 2 : r * c;
  }
  return s;
}

std::vector<int64_t> PairwiseEngine::excluded_rows() const {
  std::vector<int64_t> e;
  for (int64_t r = 0; r < n0_; ++r)
    if (xinv_[r] < 0) e.push_back(r);
  return e;
}

std::vector<int64_t> PairwiseEngine::excluded_cols() const {
  std::vector<int64_t> e;
  if (self_) return e;
  for (int64_t r = 0; r < m0_; ++r)
    if (ys_->inv[r] < 0) e.push_back(r);
  return e;
}

void PairwiseEngine::set_state(PairwiseState s) {
  st_ = std::move(s);
  fresh_ = false;
}

float PairwiseEngine::transform(float dot, int64_t ci, int64_t cj) const {
  if (metric_ == 0) return std::min(std::max(dot, -1.0f), 1.0f);
  if (metric_ == 1) return dot;
  const float s = xn2_[ci] + (self_ ? xn2_ : ys_->n2)[cj];
  const float t = s - (dot + dot);
  if (numerics::is_near_duplicate(t, s)) return direct_distance(ci, cj);
  return std::sqrt(t);
}

float PairwiseEngine::direct_distance(int64_t ci, int64_t cj) const {
  return numerics::direct_distance(xrow(ci), yrow(cj), d_);
}

float PairwiseEngine::exact_value(int64_t ci, int64_t cj) const {
  const float* a = xr_.data() + ci * d_;
  const float* b = yrow(cj);
  return transform(dot_exact(a, b, d_), ci, cj);
}

}  // namespace embgeom
