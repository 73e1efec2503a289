// All-pairs statistics engine: schedule, per-thread partial states, fused reductions.
#include "pairwise.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "check.h"
#include "cpu_features.h"

#ifdef EMBGEOM_OPENMP
#include <omp.h>
#endif

// gcc 12 flags its own AVX-512 intrinsic headers with false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"


namespace embgeom {

namespace {
constexpr float kInf = std::numeric_limits<float>::infinity();

inline bool pair_better(const PairEntry& a, const PairEntry& b) {
  if (a.key != b.key) return a.key > b.key;
  if (a.i != b.i) return a.i < b.i;
  return a.j < b.j;
}
}  // namespace

bool PairList::offer(double key, float v, int64_t i, int64_t j) {
  if (k <= 0) return false;
  const PairEntry x{key, v, i, j};
  if (full() && !pair_better(x, e.back())) return false;
  auto pos = std::upper_bound(e.begin(), e.end(), x, pair_better);  // first worse than x
  if (pos != e.begin()) {
    const PairEntry& p = *(pos - 1);
    if (p.i == i && p.j == j) return false;  // already listed
  }
  e.insert(pos, x);
  if (static_cast<int64_t>(e.size()) > k) e.pop_back();
  return true;
}

void RowLists::init(int64_t rows, int64_t kk, bool is_top) {
  n = rows;
  k = kk;
  top = is_top;
  if (k <= 0) {
    val.clear();
    col.clear();
    cnt.clear();
    thr.clear();
    return;
  }
  val.assign(n * k, std::numeric_limits<float>::quiet_NaN());
  col.assign(n * k, -1);
  cnt.assign(n, 0);
  thr.assign(n, top ? -kInf : kInf);
}

namespace {
// Raise (top) or lower (bottom) a shared threshold with a CAS on its bits. Readers use plain
// loads: a stale value is an earlier, looser bound, so the result does not depend on timing.
void publish_threshold(float* slot, float v, bool top) {
  uint32_t* bits = reinterpret_cast<uint32_t*>(slot);
  uint32_t cur = __atomic_load_n(bits, __ATOMIC_RELAXED);
  uint32_t want;
  std::memcpy(&want, &v, sizeof want);
  for (;;) {
    float f;
    std::memcpy(&f, &cur, sizeof f);
    if (top ? !(v > f) : !(v < f)) return;
    if (__atomic_compare_exchange_n(bits, &cur, want, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return;
  }
}
}  // namespace

void RowLists::offer(int64_t row, float v, int32_t c) {
  float* rv = val.data() + row * k;
  int32_t* rc = col.data() + row * k;
  int32_t n_ = cnt[row];
  auto better = [&](float v1, int32_t c1, float v2, int32_t c2) {
    if (v1 != v2) return top ? v1 > v2 : v1 < v2;
    return c1 < c2;
  };
  if (n_ == k && !better(v, c, rv[k - 1], rc[k - 1])) return;
  int32_t p = n_ < k ? n_ : static_cast<int32_t>(k - 1);  // slot the shift starts from
  int32_t pos = 0;
  while (pos < n_ && !better(v, c, rv[pos], rc[pos])) ++pos;
  if (pos > 0 && rc[pos - 1] == c) return;  // already listed
  for (int32_t q = p; q > pos; --q) {
    rv[q] = rv[q - 1];
    rc[q] = rc[q - 1];
  }
  rv[pos] = v;
  rc[pos] = c;
  if (n_ < k) cnt[row] = ++n_;
  if (n_ == k) {
    thr[row] = rv[k - 1];
    if (shared) publish_threshold(shared + row, thr[row], top);
  }
}

// ---------------------------------------------------------------------------------------------
// construction and schedule
// ---------------------------------------------------------------------------------------------

PairwiseEngine::PairwiseEngine(const float* x, int64_t n, const float* y, int64_t m, int64_t d,
                               const PairwiseOptions& opt)
    : opt_(opt) {
  EMBGEOM_CHECK(opt.metric == "cosine" || opt.metric == "dot" || opt.metric == "euclidean",
                "metric: expected 'cosine', 'dot' or 'euclidean', got '" << opt.metric << "'");
  EMBGEOM_CHECK(opt.precision == "exact" || opt.precision == "fast",
                "precision: expected 'exact' or 'fast', got '" << opt.precision << "'");
  EMBGEOM_CHECK(n >= 0 && d >= 1, "x: expected shape (N, D) with D >= 1, got (" << n << ", " << d << ")");
  EMBGEOM_CHECK(y == nullptr || m >= 0, "y: bad row count " << m);
  EMBGEOM_CHECK(n < (int64_t(1) << 31) && m < (int64_t(1) << 31), "x/y: at most 2^31-1 rows");
  EMBGEOM_CHECK(opt.block >= 1, "block: expected >= 1, got " << opt.block);
  EMBGEOM_CHECK(opt.bins >= 0, "bins: expected >= 0, got " << opt.bins);
  EMBGEOM_CHECK(opt.bins == 0 || (std::isfinite(opt.lo) && std::isfinite(opt.hi) && opt.hi > opt.lo),
                "range: expected finite lo < hi, got (" << opt.lo << ", " << opt.hi << ")");
  EMBGEOM_CHECK(opt.topk >= 0, "topk: expected >= 0, got " << opt.topk);
  EMBGEOM_CHECK(opt.bottomk >= 0, "bottomk: expected >= 0, got " << opt.bottomk);
  EMBGEOM_CHECK(opt.near_k >= 0, "near_k: expected >= 0, got " << opt.near_k);
  EMBGEOM_CHECK(!opt.has_near || std::isfinite(opt.near), "near: expected a finite value");
  EMBGEOM_CHECK(opt.row_topk >= 0, "row_topk: expected >= 0, got " << opt.row_topk);
  EMBGEOM_CHECK(opt.row_bottomk >= 0, "row_bottomk: expected >= 0, got " << opt.row_bottomk);
  EMBGEOM_CHECK(!opt.has_outside || (!std::isnan(opt.out_a) && !std::isnan(opt.out_b) && opt.out_a <= opt.out_b),
                "outside: expected (a, b) with a <= b, got (" << opt.out_a << ", " << opt.out_b << ")");
  EMBGEOM_CHECK(opt.outside_limit >= 0, "outside_limit: expected >= 0, got " << opt.outside_limit);
  EMBGEOM_CHECK(opt.threads >= 0, "threads: expected >= 0, got " << opt.threads);

  self_ = (y == nullptr);
  metric_ = opt.metric == "cosine" ? 0 : (opt.metric == "dot" ? 1 : 2);
  d_ = d;
  bs_ = opt.block;
  n0_ = n;
  m0_ = self_ ? n : m;
  const int threads = opt.threads;
  int nthreads = 1;  // for the row loops below
#ifdef EMBGEOM_OPENMP
  nthreads = threads > 0 ? threads : omp_get_max_threads();
#endif

  auto compact = [&](const char* name, const float* src, int64_t rows, std::vector<int64_t>& map,
                     std::vector<int64_t>& inv, std::vector<float>& out, std::vector<float>& n2) {
    std::vector<double> nrm(rows);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0.0;
      const float* p = src + r * d;
      for (int64_t k = 0; k < d; ++k) s += double(p[k]) * double(p[k]);
      nrm[r] = s;
    }
    for (int64_t r = 0; r < rows; ++r)
      EMBGEOM_CHECK(std::isfinite(nrm[r]), name << ": row " << r << " has a non-finite value or overflows");
    inv.assign(rows, -1);
    map.clear();
    for (int64_t r = 0; r < rows; ++r) {
      if (metric_ == 0 && nrm[r] == 0.0) continue;
      inv[r] = static_cast<int64_t>(map.size());
      map.push_back(r);
    }
    const int64_t c = static_cast<int64_t>(map.size());
    out.resize(c * d);
    n2.resize(metric_ == 2 ? c : 0);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t q = 0; q < c; ++q) {
      const float* p = src + map[q] * d;
      float* o = out.data() + q * d;
      if (metric_ == 0) {
        const double s = std::sqrt(nrm[map[q]]);
        for (int64_t k = 0; k < d; ++k) o[k] = static_cast<float>(double(p[k]) / s);
      } else {
        std::memcpy(o, p, sizeof(float) * d);
        if (metric_ == 2) n2[q] = static_cast<float>(nrm[map[q]]);
      }
    }
  };
  compact("x", x, n, xmap_, xinv_, xr_, xn2_);
  n_ = static_cast<int64_t>(xmap_.size());
  if (!self_) {
    compact("y", y, m, ymap_, yinv_, yr_, yn2_);
    m_ = static_cast<int64_t>(ymap_.size());
  } else {
    m_ = n_;
  }

  kern_ = select_kernel(opt.precision == "fast");
  fast_ = kern_.bf16;
  pack_panels(xr_.data(), n_, d, d, kern_.mr, kern_.bf16, pa_, threads);
  pack_panels(self_ ? xr_.data() : yr_.data(), m_, d, d, kern_.nr, kern_.bf16, pb_, threads);
  if (fast_) {
    // Sound bound on |bf16 value - exact fp32 value| for any pair, from the actual rounding:
    // a~.b~ - a.b = a~.(b~ - b) + (a~ - a).b, so by Cauchy-Schwarz
    // |err| <= |a~| |db| + |da| |b| + 2 gamma_d |a~||b~| (fp32 accumulation on both sides),
    // maxed over rows; bf16 inputs the dot-product instruction treats as zero (denormals)
    // count as rounded to zero.
    const double e32 = std::ldexp(1.0, -24);
    const double gam = (d + 2) * e32 / (1.0 - (d + 2) * e32);
    struct Norms {
      double full = 0, bf = 0, delta = 0;
    };
    auto norms = [&](const std::vector<float>& r, int64_t rows) {
      double full = 0, bf = 0, delta = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(max : full, bf, delta)
      for (int64_t q = 0; q < rows; ++q) {
        double s = 0, sb = 0, sd = 0;
        for (int64_t k = 0; k < d; ++k) {
          const float v = r[q * d + k];
          uint32_t u = uint32_t(to_bf16(v)) << 16;
          if ((u & 0x7f800000u) == 0) u = 0;  // DAZ
          float vb;
          std::memcpy(&vb, &u, 4);
          s += double(v) * v;
          sb += double(vb) * vb;
          sd += (double(vb) - v) * (double(vb) - v);
        }
        full = std::max(full, std::sqrt(s));
        bf = std::max(bf, std::sqrt(sb));
        delta = std::max(delta, std::sqrt(sd));
      }
      Norms mx;
      mx.full = full;
      mx.bf = bf;
      mx.delta = delta;
      return mx;
    };
    const Norms na = norms(xr_, n_), nb = self_ ? na : norms(yr_, m_);
    const double edot = (na.bf * nb.delta + na.delta * nb.full +
                         2 * gam * std::max(na.bf, na.full) * std::max(nb.bf, nb.full)) * 1.01 + 1e-30;
    if (metric_ == 2) {
      // value = sqrt(max(|a|^2 + |b|^2 - 2 dot, 0)): |sqrt(s) - sqrt(t)| <= sqrt(|s - t|), plus
      // fp32 rounding of the squared-distance formula on either side.
      const double ed2 = 2 * edot + 8 * e32 * (na.full * na.full + nb.full * nb.full);
      err_bound_ = std::sqrt(ed2) * 1.01;
    } else {
      err_bound_ = edot;
    }
  }
  prime_row_bounds(nthreads);
  // exact mode never rescores: drop the row copies (euclidean keeps them for the direct
  // distance of near-identical rows)
  if (!fast_ && metric_ != 2) {
    std::vector<float>().swap(xr_);
    std::vector<float>().swap(yr_);
  }

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

// A bound on a row's final k-th best exact value from the k-th best of k real pairs' values that
// are each within M of exact: kth - M (top) or kth + M (bottom), rounded outwards to float.
static float widened_bound(float kth, double M, bool top) {
  const double b = top ? double(kth) - M : double(kth) + M;
  float f = static_cast<float>(b);
  if (top ? double(f) > b : double(f) < b) f = std::nextafter(f, top ? -kInf : kInf);
  return f;
}

// Fast mode: a row's list filter starts unbounded and tightens only as the tiles stream past,
// so a sequential scan offers about k ln(m / k) candidates per row, and more where the columns
// are ordered (a vocabulary's ids). Each row starts instead from the k-th best of its values
// against an evenly spread sample of columns: k real pairs, so (widened by the bf16 error) never
// past the row's final k-th best, and the lists come out identical.
void PairwiseEngine::prime_row_bounds(int threads) {
  const int64_t kt = opt_.row_topk, kb = opt_.row_bottomk;
  const int64_t s = std::min<int64_t>(kPrimeSample, m_ / 4);
  // exact mode: an offer is a short list insertion, and the sample costs what it saves there
  if (!fast_ || (kt <= 0 && kb <= 0) || s <= std::max(kt, kb)) return;
  std::vector<int64_t> cols(s);
  std::vector<float> rows(s * d_);
  for (int64_t q = 0; q < s; ++q) {
    cols[q] = (2 * q + 1) * m_ / (2 * s);
    std::memcpy(rows.data() + q * d_, yrow(cols[q]), sizeof(float) * d_);
  }
  PackedPanels B;
  pack_panels(rows.data(), s, d_, d_, kern_.nr, kern_.bf16, B, threads);
  if (kt > 0) prime_top_.assign(n_, -kInf);
  if (kb > 0) prime_bottom_.assign(n_, kInf);
  const double M = err_bound_;
  const int64_t width = B.panels * kern_.nr, chunk = 8;  // A panels per work item
  const int64_t items = (pa_.panels + chunk - 1) / chunk;
#pragma omp parallel num_threads(std::max(1, threads))
  {
    AlignedBuf<float> C;
    C.reset(chunk * kern_.mr * width);
    std::vector<float> vals, best;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t p0 = it * chunk, p1 = std::min(pa_.panels, p0 + chunk);
      gemm_tile(kern_, pa_, p0, p1, B, 0, B.panels, C.data(), width);
      for (int64_t r = p0 * kern_.mr; r < std::min(n_, p1 * kern_.mr); ++r) {
        const float* row = C.data() + (r - p0 * kern_.mr) * width;
        vals.clear();
        for (int64_t q = 0; q < s; ++q)
          if (!self_ || cols[q] != r) vals.push_back(transform(row[q], r, cols[q]));
        // the k-th best (kept in a sorted list of k: few values get past its last one),
        // widened by M and rounded outwards
        auto bound = [&](int64_t k, bool top) {
          best.assign(k, top ? -kInf : kInf);
          for (const float v : vals) {
            if (top ? !(v > best[k - 1]) : !(v < best[k - 1])) continue;
            int64_t p = k - 1;
            for (; p > 0 && (top ? v > best[p - 1] : v < best[p - 1]); --p) best[p] = best[p - 1];
            best[p] = v;
          }
          return widened_bound(best[k - 1], M, top);
        };
        if (kt > 0) prime_top_[r] = bound(kt, true);
        if (kb > 0) prime_bottom_[r] = bound(kb, false);
      }
    }
  }
}

PairwiseState PairwiseEngine::empty_state() const {
  PairwiseState st;
  st.max1.k = 1;
  st.min1.k = 1;
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
    if (yinv_[r] < 0) e.push_back(r);
  return e;
}

void PairwiseEngine::set_state(PairwiseState s) {
  st_ = std::move(s);
  fresh_ = false;
}

float PairwiseEngine::transform(float dot, int64_t ci, int64_t cj) const {
  if (metric_ == 0) return std::min(std::max(dot, -1.0f), 1.0f);
  if (metric_ == 1) return dot;
  const float s = xn2_[ci] + (self_ ? xn2_ : yn2_)[cj];
  const float t = s - (dot + dot);
  if (t < kNearTau * s) return direct_distance(ci, cj);
  return std::sqrt(t);
}

float PairwiseEngine::direct_distance(int64_t ci, int64_t cj) const {
  const float* a = xrow(ci);
  const float* b = yrow(cj);
  double acc = 0.0;
  for (int64_t k = 0; k < d_; ++k) {
    const double u = double(a[k]) - double(b[k]);
    acc += u * u;
  }
  return static_cast<float>(std::sqrt(acc));
}

float PairwiseEngine::exact_value(int64_t ci, int64_t cj) const {
  const float* a = xr_.data() + ci * d_;
  const float* b = (self_ ? xr_ : yr_).data() + cj * d_;
  return transform(dot_exact(a, b, d_), ci, cj);
}

// ---------------------------------------------------------------------------------------------
// per-thread partial state and the fused pass
// ---------------------------------------------------------------------------------------------

// Fast mode's per-row lists during a run: candidates kept by their bf16-product value v, which
// is within M of the exact value. Any k of them with v >= t prove the row's final k-th best
// exact value is >= t - M, so the filter (v >= bound - M) and the pruning (drop v < t - 2M)
// never lose a pair of the final list, and only the survivors are rescored, once, at the end
// of the run (instead of every candidate that passes a filter still loose early in the run).
// Mirrored for bottom lists.
struct RowCands {
  struct Spilled {
    int32_t row, col;
    float v;
  };
  int64_t n = 0, k = 0, cap = 0;
  bool top = true;
  double M = 0.0;
  std::vector<float> val;  // n * cap, best first
  std::vector<int32_t> col;
  std::vector<int32_t> cnt;
  std::vector<Spilled> spill;  // pushed out of a full row while still within the band
  float* shared = nullptr;     // per row: bound on the final k-th best exact value

  void init(int64_t rows, int64_t kk, bool is_top, double margin, float* bounds) {
    n = rows;
    k = kk;
    top = is_top;
    M = margin;
    cap = std::max<int64_t>(2 * k, k + 8);
    val.assign(n * cap, 0.0f);
    col.assign(n * cap, -1);
    cnt.assign(n, 0);
    spill.clear();
    shared = bounds;
  }
  bool better(float v1, int32_t c1, float v2, int32_t c2) const {
    if (v1 != v2) return top ? v1 > v2 : v1 < v2;
    return c1 < c2;
  }
  // v can be dropped: its exact value is strictly worse than the bound's
  bool out_of_band(float v, double bound) const {
    return top ? double(v) + M < bound : double(v) - M > bound;
  }
  void offer(int64_t row, float v, int32_t c) {
    float* rv = val.data() + row * cap;
    int32_t* rc = col.data() + row * cap;
    int64_t nn = cnt[row];
    if (out_of_band(v, shared[row])) return;
    if (nn == cap) {
      if (!better(v, c, rv[cap - 1], rc[cap - 1])) {
        spill.push_back({int32_t(row), c, v});
        return;
      }
      spill.push_back({int32_t(row), rc[cap - 1], rv[cap - 1]});
      --nn;
    }
    int64_t pos = nn;
    while (pos > 0 && better(v, c, rv[pos - 1], rc[pos - 1])) {
      rv[pos] = rv[pos - 1];
      rc[pos] = rc[pos - 1];
      --pos;
    }
    rv[pos] = v;
    rc[pos] = c;
    ++nn;
    if (nn >= k) {
      // k real pairs with values within M of rv[k-1]: publish that bound
      publish_threshold(shared + row, widened_bound(rv[k - 1], M, top), top);
      const double b = top ? double(rv[k - 1]) - M : double(rv[k - 1]) + M;
      const double bound = top ? std::max(b, double(shared[row])) : std::min(b, double(shared[row]));
      while (nn > k && out_of_band(rv[nn - 1], bound)) --nn;
    }
    cnt[row] = static_cast<int32_t>(nn);
  }
};

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
  alignas(64) int32_t idx[16];
};

namespace {

// Everything the fused pass needs, resolved once per tile.
struct FusedArgs {
  const PairwiseEngine* E;
  // fast mode: some global list is still filling, so candidates are rescored one by one as
  // they come, with the thresholds refreshed after each (else: batched at the end of the tile)
  bool cold;
  bool self, fast, diag;
  int metric;
  float M;  // decision margin (0 in exact mode)
  const float* xn2;
  const float* yn2;
  int64_t bins;
  double lo, hi, scale;
  bool do_hist, do_top, do_bot, do_near, do_rtop, do_rbot, do_out;
  double near;
  float oa, ob;
  double shift;  // moment_shift
};

// Offers one pair to the global lists (value exact: rescored in fast mode by the caller).
inline void offer_global(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float e, int64_t i, int64_t j) {
  c.max1.offer(e, e, i, j);
  c.min1.offer(-double(e), e, i, j);
  if (A.do_top) c.top.offer(e, e, i, j);
  if (A.do_bot) c.bottom.offer(-double(e), e, i, j);
  if (A.do_near) c.near.offer(-std::fabs(double(e) - A.near), e, i, j);
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
    (top ? c.rtop : c.rbot).offer(row, v, static_cast<int32_t>(col));
}

inline float thr_hi(const PairList& l) { return l.full() ? l.e.back().v : -kInf; }
inline float thr_lo(const PairList& l) { return l.full() ? l.e.back().v : kInf; }
inline double thr_dist(const PairList& l) {
  return l.full() ? -l.e.back().key : std::numeric_limits<double>::infinity();
}

inline int64_t hist_bin(const FusedArgs& A, float v) {
  const double dv = v;
  if (dv < A.lo) return 0;
  if (dv > A.hi) return A.bins + 1;
  double f = std::floor((dv - A.lo) * A.scale);
  f = std::min(std::max(f, 0.0), double(A.bins - 1));
  return static_cast<int64_t>(f) + 1;
}

// Portable fused pass over one tile. row(ii) points at the value of column c0 of row r0 + ii.
void fused_tile_scalar(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float* C, int64_t ldc,
                       int64_t r0, int64_t nr, int64_t c0, int64_t nc, double* tsum, double* tsumsq) {
  const PairwiseEngine& E = *A.E;
  double s = 0.0, s2 = 0.0;
  const float M = A.M;
  for (int64_t ii = 0; ii < nr; ++ii) {
    const int64_t i = r0 + ii;
    float* row = C + ii * ldc;
    const int64_t jb = A.diag ? ii + 1 : 0;
    int64_t orow = 0;
    for (int64_t jj = jb; jj < nc; ++jj) {
      const int64_t j = c0 + jj;
      float v;
      if (A.metric == 0) v = std::min(std::max(row[jj], -1.0f), 1.0f);
      else if (A.metric == 1) v = row[jj];
      else {
        v = E.transform(row[jj], i, j);
      }
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
          if (!c.outp.full() || i <= c.outp.e.back().i) c.outp.offer(0.0, exact(), i, j);
        }
      }
    }
    if (A.do_out) {
      c.out_count += orow;
      c.out_rows[i] += orow;
    }
  }
  *tsum = s;
  *tsumsq = s2;
}

// Fast mode: exact values of the tile's candidates in one batch, then the offers and the
// outside decisions they were waiting for.
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
    if (f & 1u) offer_global(A, c, e, i, j);
    bool offer_out = (f & 64u) != 0;
    if ((f & 32u) && (e < A.oa || e > A.ob)) {
      c.out_count++;
      c.out_rows[i]++;
      (A.self ? c.out_rows : c.out_cols)[j]++;
      offer_out = true;
    }
    if (offer_out) c.outp.offer(0.0, e, i, j);
  }
  c.cand.clear();
}

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

EMBGEOM_AVX512 void fused_tile_avx512(const FusedArgs& A, PairwiseEngine::ThreadCtx& c, float* C,
                                      int64_t ldc, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                                      double* tsum, double* tsumsq) {
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
  int64_t* hist = A.do_hist ? c.hist.data() : nullptr;
  int32_t* colcnt = c.colcnt.data();
  const float* rthr_top = A.do_rtop ? row_filter(A, c, true) : nullptr;
  const float* rthr_bot = A.do_rbot ? row_filter(A, c, false) : nullptr;
  // fast mode outside cold tiles: thresholds stay as at tile start (a superset of the
  // candidates), which are then rescored in one interleaved batch
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
    const int64_t jb = A.diag ? ii + 1 : 0;
    const __m512 na = A.metric == 2 ? _mm512_set1_ps(A.xn2[i]) : _mm512_setzero_ps();
    int64_t orow = 0;
    for (int64_t jj = jb; jj < nc; jj += 16) {
      const int64_t rem = nc - jj;
      const __mmask16 m = rem >= 16 ? __mmask16(0xffff) : __mmask16((1u << rem) - 1);
      const int64_t j0 = c0 + jj;
      __m512 v = _mm512_maskz_loadu_ps(m, row + jj);
      if (A.metric == 0) {
        v = _mm512_min_ps(_mm512_max_ps(v, mone), one);
      } else if (A.metric == 2) {
        const __m512 nb = _mm512_maskz_loadu_ps(m, A.yn2 + j0);
        const __m512 sn = _mm512_add_ps(na, nb);
        const __m512 t = _mm512_sub_ps(sn, _mm512_add_ps(v, v));
        v = _mm512_maskz_mov_ps(m, _mm512_sqrt_ps(_mm512_max_ps(t, _mm512_setzero_ps())));
        // near-identical rows: the norm formula cancels, take the direct distance
        __mmask16 nd = _mm512_mask_cmp_ps_mask(m, t, _mm512_mul_ps(sn, _mm512_set1_ps(PairwiseEngine::kNearTau)), _CMP_LT_OQ);
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
      const __m512d d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d d1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
      // masked-off lanes hold 0 and must add nothing
      const __m512d e0 = _mm512_maskz_sub_pd(__mmask8(m & 0xff), d0, vshift);
      const __m512d e1 = _mm512_maskz_sub_pd(__mmask8(m >> 8), d1, vshift);
      s0 = _mm512_add_pd(s0, e0);
      s1 = _mm512_add_pd(s1, e1);
      q0 = _mm512_fmadd_pd(e0, e0, q0);
      q1 = _mm512_fmadd_pd(e1, e1, q1);
      if (hist) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(c.idx), hist_bins8(d0, vlo, vhi, vsc, vz, vbmax, i1, izero, iover));
        _mm256_store_si256(reinterpret_cast<__m256i*>(c.idx + 8), hist_bins8(d1, vlo, vhi, vsc, vz, vbmax, i1, izero, iover));
        if (m == 0xffff) {
          for (int l = 0; l < 16; ++l) hist[c.idx[l]]++;
        } else {
          for (int l = 0; l < rem; ++l) hist[c.idx[l]]++;
        }
      }
      // global lists and extremes
      __mmask16 g = _mm512_mask_cmp_ps_mask(m, v, _mm512_set1_ps(t_hi), _CMP_GE_OQ) |
                    _mm512_mask_cmp_ps_mask(m, v, _mm512_set1_ps(t_lo), _CMP_LE_OQ);
      if (A.do_near) {
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
        if (deferred) {
          while (todo) {
            const int l = __builtin_ctz(todo);
            todo &= todo - 1;
            const __mmask16 bit = __mmask16(1u << l);
            const uint32_t f = ((g & bit) ? 1u : 0u) | ((maybe & bit) ? 32u : 0u);
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
        if (!c.outp.full() || i <= c.outp.e.back().i) {
          alignas(64) float vals[16];
          _mm512_store_ps(vals, v);
          __mmask16 todo = mo;
          while (todo) {
            const int l = __builtin_ctz(todo);
            todo &= todo - 1;
            const int64_t j = j0 + l;
            if (c.outp.full() && (i > c.outp.e.back().i || (i == c.outp.e.back().i && j > c.outp.e.back().j))) break;
            if (deferred) {
              c.cand.push_back({int32_t(ii), int32_t(jj + l), 64u});
              continue;
            }
            c.outp.offer(0.0, A.fast ? E.exact_value(i, j) : vals[l], i, j);
          }
        }
      }
    }
    if (A.do_out) {
      c.out_count += orow;
      c.out_rows[i] += orow;
    }
  }
  if (deferred && !c.cand.empty()) rescore_candidates(A, c, r0, c0);
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

bool use_avx512_fused() {
  static const bool ok = cpu_has_avx512() && !std::getenv("EMBGEOM_SCALAR_FUSED");
  return ok;
}

}  // namespace

void PairwiseEngine::process_tile(int64_t t, ThreadCtx& c, double* tsum, double* tsumsq) const {
  const Tile T = tile(t);
  const int64_t r0 = T.I * bs_, r1 = std::min(n_, r0 + bs_);
  const int64_t c0 = T.J * bs_, c1 = std::min(m_, c0 + bs_);
  const int64_t mr = kern_.mr, nr = kern_.nr;
  const int64_t pa0 = r0 / mr, pa1 = (r1 + mr - 1) / mr;
  const int64_t pb0 = c0 / nr, pb1 = (c1 + nr - 1) / nr;
  const int64_t ldc = (pb1 - pb0) * nr + 16;  // +16: room for masked tails, odd stride
  const int64_t need = (pa1 - pa0) * mr * ldc;
  if (c.C.n < need) c.C.reset(need);
  prefetch_row_lists(c, r0, r1, c0, c1);
  gemm_tile(kern_, pa_, pa0, pa1, pb_, pb0, pb1, c.C.data(), ldc);
  const int64_t roff = r0 - pa0 * mr, coff = c0 - pb0 * nr;
  const int64_t ncols = c1 - c0;
  if (c.colcnt.n < ncols + 16) c.colcnt.reset(ncols + 16);
  if (opt_.has_outside) std::memset(c.colcnt.data(), 0, sizeof(int32_t) * (ncols + 16));

  FusedArgs A;
  A.E = this;
  A.cold = fast_ && tile_is_cold(c);
  A.self = self_;
  A.fast = fast_;
  A.diag = self_ && T.I == T.J;
  A.metric = metric_;
  A.M = static_cast<float>(err_bound_);
  if (double(A.M) < err_bound_) A.M = std::nextafter(A.M, kInf);
  A.xn2 = xn2_.data();
  A.yn2 = self_ ? xn2_.data() : yn2_.data();
  A.bins = opt_.bins;
  A.lo = opt_.lo;
  A.hi = opt_.hi;
  A.scale = opt_.bins > 0 ? double(opt_.bins) / (opt_.hi - opt_.lo) : 0.0;
  A.do_hist = opt_.bins > 0;
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

  float* C = c.C.data() + roff * ldc + coff;
  if (use_avx512_fused())
    fused_tile_avx512(A, c, C, ldc, r0, r1 - r0, c0, ncols, tsum, tsumsq);
  else
    fused_tile_scalar(A, c, C, ldc, r0, r1 - r0, c0, ncols, tsum, tsumsq);

  if (opt_.has_outside) {
    int64_t* dst = self_ ? c.out_rows.data() : c.out_cols.data();
    const int32_t* cc = c.colcnt.data();
    for (int64_t jj = 0; jj < ncols; ++jj) dst[c0 + jj] += cc[jj];
  }
}

// The tile's rows' list slots are scattered over n * k entries, far from the caches since the
// last tile of the same rows: fetch them while the tile product runs, not one miss per offer.
void PairwiseEngine::prefetch_row_lists(const ThreadCtx& c, int64_t r0, int64_t r1, int64_t c0,
                                        int64_t c1) const {
  auto fetch = [](const void* p, size_t bytes) {
    const char* b = static_cast<const char*>(p);
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(b + o, 1, 3);
  };
  // slots of rows [a, b) in lists of `width` entries a row
  auto slots = [&](const std::vector<float>& val, const std::vector<int32_t>& col,
                   const std::vector<int32_t>& cnt, int64_t width, int64_t a, int64_t b) {
    if (width <= 0) return;
    fetch(val.data() + a * width, sizeof(float) * (b - a) * width);
    fetch(col.data() + a * width, sizeof(int32_t) * (b - a) * width);
    fetch(cnt.data() + a, sizeof(int32_t) * (b - a));
  };
  auto rows = [&](int64_t a, int64_t b) {
    if (b <= a) return;
    for (const RowCands* r : {&c.ctop, &c.cbot})
      if (r->k > 0) slots(r->val, r->col, r->cnt, r->cap, a, b);
    for (const RowLists* r : {&c.rtop, &c.rbot}) slots(r->val, r->col, r->cnt, r->k, a, b);
  };
  rows(r0, r1);
  if (self_ && c0 != r0) rows(c0, c1);  // the column direction
}

bool PairwiseEngine::tile_is_cold(const ThreadCtx& c) const {
  // (row lists need no exact values during the run: RowCands)
  for (const PairList* l : {&c.max1, &c.min1, &c.top, &c.bottom, &c.near})
    if (l->k > 0 && !l->full()) return true;
  return false;
}

void PairwiseEngine::run(int64_t begin, int64_t end) {
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
      c->rtop = st_.row_top;
      c->rbot = st_.row_bottom;
      c->rtop.shared = shared_top.empty() ? nullptr : shared_top.data();
      c->rbot.shared = shared_bottom.empty() ? nullptr : shared_bottom.data();
    }
    if (opt_.has_outside) {
      c->out_rows.assign(n_, 0);
      if (!self_) c->out_cols.assign(m_, 0);
    }
    return c;
  };

#pragma omp parallel num_threads(nth)
  {
    int tid = 0;
#ifdef EMBGEOM_OPENMP
    tid = omp_get_thread_num();
#endif
    ctx[tid] = make_ctx();
    ThreadCtx& c = *ctx[tid];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = begin; t < end; ++t) process_tile(t, c, &tsum[t - begin], &tsumsq[t - begin]);
  }

  // deterministic merge (the result sets are unique under the total orders, sums are sequential)
  for (int64_t t = 0; t < end - begin; ++t) {
    st_.shifted_sum += tsum[t];
    st_.shifted_sumsq += tsumsq[t];
  }
  st_.count += tile_pairs(begin, end);
  for (auto& cp : ctx) {
    if (!cp) continue;
    ThreadCtx& c = *cp;
    for (size_t b = 0; b < st_.hist.size(); ++b) st_.hist[b] += c.hist[b];
    auto merge = [](PairList& dst, const PairList& src) {
      for (const auto& e : src.e) dst.offer(e.key, e.v, e.i, e.j);
    };
    merge(st_.max1, c.max1);
    merge(st_.min1, c.min1);
    merge(st_.top, c.top);
    merge(st_.bottom, c.bottom);
    merge(st_.near, c.near);
    merge(st_.outside_pairs, c.outp);
    st_.outside_count += c.out_count;
    for (size_t r = 0; r < c.out_rows.size(); ++r) st_.outside_rows[r] += c.out_rows[r];
    for (size_t r = 0; r < c.out_cols.size(); ++r) st_.outside_cols[r] += c.out_cols[r];
  }
  if (fast_) {
    settle_row_candidates(ctx, true, nth);
    settle_row_candidates(ctx, false, nth);
  }
  for (RowLists* dst : {&st_.row_top, &st_.row_bottom}) {
    if (dst->k <= 0 || fast_) continue;
    const bool top = dst == &st_.row_top;
    const int64_t k = dst->k;
#pragma omp parallel for schedule(static) num_threads(nth)
    for (int64_t r = 0; r < n_; ++r) {
      for (auto& cp : ctx) {
        if (!cp) continue;
        const RowLists& src = top ? cp->rtop : cp->rbot;
        for (int32_t q = 0; q < src.cnt[r]; ++q) dst->offer(r, src.val[r * k + q], src.col[r * k + q]);
      }
    }
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
    for (int64_t b = 0; b < blocks; ++b) {
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
      for (size_t q = 0; q < np; ++q)
        dst.offer(pend[q].row, transform(dots[q], pend[q].row, pend[q].col), pend[q].col);
    }
  }
}

}  // namespace embgeom
