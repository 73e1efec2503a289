// The engine state to and from original row / column indices, with moments as (count, mean,
// M2) and list keys from numerics::order_key (docs/architecture.md, engine state). bindings.cpp
// only converts ExportedState to Python objects and back.
#include <cmath>
#include <limits>

#include "check.h"
#include "numerics.h"
#include "pairwise/engine.h"

namespace embgeom {

ExportedState PairwiseEngine::export_state() const {
  const PairwiseState& s = st_;
  const auto& xm = x_map();
  const auto& ym = y_map();
  ExportedState o;
  o.tiles_done = s.tiles_done;
  o.count = s.count;
  const numerics::Moments m =
      numerics::moments_from_shifted(s.count, opt_.moment_shift, s.shifted_sum, s.shifted_sumsq);
  o.mean = m.mean;
  o.m2 = m.m2;
  o.moment_shift = opt_.moment_shift;
  o.shifted_sum = s.shifted_sum;
  o.shifted_sumsq = s.shifted_sumsq;
  auto pair = [&](const PairEntry& e) { return OrigPair{double(e.v), xm[e.i], ym[e.j]}; };
  if (!s.min1.e.empty()) {
    o.has_min = true;
    o.min = pair(s.min1.e[0]);
  }
  if (!s.max1.e.empty()) {
    o.has_max = true;
    o.max = pair(s.max1.e[0]);
  }
  o.hist = s.hist;
  auto list = [&](const PairList& l, std::vector<OrigPair>& dst) {
    dst.clear();
    for (const PairEntry& e : l.e) dst.push_back(pair(e));
  };
  list(s.top, o.top);
  list(s.bottom, o.bottom);
  list(s.near, o.near);
  list(s.outside_pairs, o.outside_pairs);
  auto rows = [&](const RowLists& r, int64_t& k, std::vector<float>& val, std::vector<int64_t>& idx) {
    k = r.k > 0 ? r.k : 0;
    if (!k) return;
    val.assign(n0_ * k, std::numeric_limits<float>::quiet_NaN());
    idx.assign(n0_ * k, -1);
    for (int64_t q = 0; q < r.n; ++q)
      for (int32_t t = 0; t < r.cnt[q]; ++t) {
        val[xm[q] * k + t] = r.val[q * k + t];
        idx[xm[q] * k + t] = ym[r.col[q * k + t]];
      }
  };
  rows(s.row_top, o.row_top_k, o.row_top_val, o.row_top_idx);
  rows(s.row_bottom, o.row_bottom_k, o.row_bottom_val, o.row_bottom_idx);
  o.outside_count = s.outside_count;
  auto counts = [](const std::vector<int64_t>& c, const std::vector<int64_t>& map, int64_t total) {
    std::vector<int64_t> out(total, 0);
    for (size_t q = 0; q < c.size(); ++q) out[map[q]] = c[q];
    return out;
  };
  o.has_outside_rows = opt_.has_outside;
  o.has_outside_cols = opt_.has_outside && !self_;
  if (o.has_outside_rows) o.outside_rows = counts(s.outside_rows, xm, n0_);
  if (o.has_outside_cols) o.outside_cols = counts(s.outside_cols, ym, m0_);
  o.excluded_rows = excluded_rows();
  o.excluded_cols = excluded_cols();
  o.hist_error_bound = err_bound_;
  return o;
}

void PairwiseEngine::import_state(const ExportedState& in) {
  PairwiseState s = empty_state();
  auto cx = [&](int64_t i) {
    EMBGEOM_CHECK(i >= 0 && i < n0_ && compact_x(i) >= 0, "state: bad row index " << i);
    return compact_x(i);
  };
  auto cy = [&](int64_t j) {
    EMBGEOM_CHECK(j >= 0 && j < m0_ && compact_y(j) >= 0, "state: bad column index " << j);
    return compact_y(j);
  };
  s.tiles_done = in.tiles_done;
  EMBGEOM_CHECK(s.tiles_done >= 0 && s.tiles_done <= num_tiles_,
                "state: tiles_done " << s.tiles_done << " outside [0, " << num_tiles_ << "]");
  s.count = in.count;
  EMBGEOM_CHECK(s.count >= 0, "state: count must be >= 0, got " << s.count);
  if (in.moment_shift == opt_.moment_shift && std::isfinite(in.shifted_sum) && std::isfinite(in.shifted_sumsq)) {
    s.shifted_sum = in.shifted_sum;
    s.shifted_sumsq = in.shifted_sumsq;
  } else {
    numerics::shifted_from_moments(s.count, opt_.moment_shift, numerics::Moments{in.mean, in.m2},
                                   &s.shifted_sum, &s.shifted_sumsq);
  }
  using numerics::ListKind;
  auto offer = [&](PairList& dst, ListKind kind, const OrigPair& p) {
    // (a self-mode run lists pairs i < j only: a crafted (i, i) or (j, i) would stand as a pair)
    EMBGEOM_CHECK(!self_ || p.i < p.j, "state: pair (" << p.i << ", " << p.j << ") in a self-mode state (need i < j)");
    const float v = static_cast<float>(p.v);
    dst.offer(numerics::order_key(kind, v, opt_.near), v, cx(p.i), cy(p.j));
  };
  if (in.has_max) offer(s.max1, ListKind::top, in.max);
  if (in.has_min) offer(s.min1, ListKind::bottom, in.min);
  for (const OrigPair& p : in.top) offer(s.top, ListKind::top, p);
  for (const OrigPair& p : in.bottom) offer(s.bottom, ListKind::bottom, p);
  for (const OrigPair& p : in.near) offer(s.near, ListKind::near, p);
  for (const OrigPair& p : in.outside_pairs) offer(s.outside_pairs, ListKind::outside, p);
  s.settle_pair_lists();
  if (!s.hist.empty()) {
    EMBGEOM_CHECK(in.hist.size() == s.hist.size(),
                  "state: hist must have " << s.hist.size() << " entries, got " << in.hist.size());
    s.hist = in.hist;
  }
  auto rows = [&](const char* name, RowLists& r, int64_t k, const std::vector<float>& val,
                  const std::vector<int64_t>& idx) {
    if (r.k <= 0) return;
    EMBGEOM_CHECK(k == r.k && int64_t(val.size()) == n0_ * k && int64_t(idx.size()) == n0_ * k,
                  "state: '" << name << "' must be (N, " << r.k << ") arrays");
    for (int64_t q = 0; q < n0_; ++q)
      for (int64_t c = 0; c < k; ++c) {
        const int64_t j = idx[q * k + c];
        if (j < 0) continue;
        r.offer(cx(q), val[q * k + c], static_cast<int32_t>(cy(j)));
      }
  };
  rows("row_top", s.row_top, in.row_top_k, in.row_top_val, in.row_top_idx);
  rows("row_bottom", s.row_bottom, in.row_bottom_k, in.row_bottom_val, in.row_bottom_idx);
  s.outside_count = in.outside_count;
  auto counts = [&](const char* name, std::vector<int64_t>& c, const std::vector<int64_t>& src, bool rows_side) {
    if (!opt_.has_outside || (!rows_side && self_)) return;
    const int64_t total = rows_side ? n0_ : m0_;
    EMBGEOM_CHECK(int64_t(src.size()) == total, "state: '" << name << "' must have " << total << " entries");
    for (int64_t q = 0; q < total; ++q) {
      const int64_t cq = rows_side ? compact_x(q) : compact_y(q);
      if (cq >= 0) c[cq] = src[q];
    }
  };
  counts("outside_rows", s.outside_rows, in.outside_rows, true);
  counts("outside_cols", s.outside_cols, in.outside_cols, false);
  set_state(std::move(s));
}

}  // namespace embgeom
