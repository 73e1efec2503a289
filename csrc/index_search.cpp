#include "index_search.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "check.h"
#include "pair_values.h"
#include "rows_dot.h"

namespace embgeom {

bool few_search(const FewSearch& a, double* vals, int64_t* ids) {
  const int64_t Q = a.Q, N = a.N, kk = a.kk, k = a.k;
  EMBGEOM_CHECK(Q >= 0 && N >= 0 && a.D >= 0 && k >= 1 && kk >= 1 && kk <= N, "few_search: bad shape");
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  // the scan values: up to 4 MiB in a buffer each thread keeps between calls (a new one took its
  // pages' faults every call), more in one of this call's own (its faults are a small part of
  // such a scan, and a thread does not hold on to them)
  constexpr int64_t kKeptFloats = int64_t(1) << 20;
  thread_local std::vector<float> kept;
  std::vector<float> own;
  std::vector<float>& scores = Q * N <= kKeptFloats ? kept : own;
  scores.resize(static_cast<size_t>(Q * N));
  float* s = scores.data();
  if (a.rows_bf16)
    rows_dot_bf16(a.qscan, Q, a.rows_bf16, a.ldr, N, a.D, s);
  else
    rows_dot_f32(a.qscan, Q, a.rows_f32, a.ldr, N, a.D, s);
  if (a.scale || a.bias || a.zero_rows)
    for (int64_t q = 0; q < Q; ++q) {
      float* sq = s + q * N;
      if (a.scale)
        for (int64_t r = 0; r < N; ++r) sq[r] *= a.scale[r];
      if (a.bias)
        for (int64_t r = 0; r < N; ++r) sq[r] += a.bias[r];
      if (a.zero_rows)
        for (int64_t r = 0; r < N; ++r)
          if (a.zero_rows[r] == 0.0) sq[r] = kNegInf;
    }
  std::vector<float> best(static_cast<size_t>(Q * kk));
  std::vector<int64_t> col(static_cast<size_t>(Q * kk));
  scores_topk(s, Q, N, kk, best.data(), col.data());
  // each query's threshold (Index._threshold: v - 2 margin, a bf16 product's rounding widening
  // it, rounded down to float32) and the candidates at or above it (a prefix of its best)
  std::vector<int64_t> keep(static_cast<size_t>(Q), 0);
  std::vector<uint8_t> invalid(static_cast<size_t>(Q));
  for (int64_t q = 0; q < Q; ++q) {
    const float* bq = best.data() + q * kk;
    const float kth = bq[std::min(k, kk) - 1];
    const double m2 = 2 * a.margin[q];
    double t = double(kth) - m2;
    if (a.widen != 0.0) t = t - a.widen * (std::fabs(double(kth)) + m2);
    float thresh = static_cast<float>(t);
    if (double(thresh) > t) thresh = std::nextafter(thresh, kNegInf);
    invalid[q] = a.metric == 0 && a.qnorm[q] == 0.0;  // (scans 0 everywhere: never short)
    if (kk < N && bq[kk - 1] >= thresh && std::isfinite(kth) && !invalid[q]) return false;
    while (keep[q] < kk && std::isfinite(bq[keep[q]]) && bq[keep[q]] >= thresh) ++keep[q];
  }
  // the float64 values of the candidates (Index._pair_values)
  std::vector<int64_t> qi, ci;
  for (int64_t q = 0; q < Q; ++q)
    for (int64_t j = 0; j < keep[q]; ++j) {
      qi.push_back(q);
      ci.push_back(col[size_t(q * kk + j)]);
    }
  const int64_t P = int64_t(qi.size());
  std::vector<double> v(static_cast<size_t>(P));
  if (a.metric == 0 && a.qexact_f64)
    pair_cosines(a.rows, a.qexact_f64, a.D, qi.data(), ci.data(), P, v.data());
  else if (a.metric == 0)
    pair_cosines(a.rows, a.qexact_f32, a.D, qi.data(), ci.data(), P, v.data());
  else if (a.qexact_f64)
    pair_values(a.rows, a.qexact_f64, a.D, qi.data(), ci.data(), P, a.metric == 2, v.data());
  else
    pair_values(a.rows, a.qexact_f32, a.D, qi.data(), ci.data(), P, a.metric == 2, v.data());
  if (a.metric == 2)
    for (int64_t p = 0; p < P; ++p) v[p] = std::sqrt(v[p]);
  // (value desc | distance asc, id asc), misses (a zero row: NaN) last
  int64_t p0 = 0;
  std::vector<int64_t> order;
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t m = keep[q];
    order.resize(size_t(m));
    std::iota(order.begin(), order.end(), p0);
    auto key = [&](int64_t p) { return std::isnan(v[p]) ? INFINITY : (a.metric == 2 ? v[p] : -v[p]); };
    std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
      const double kx = key(x), ky = key(y);
      if (kx != ky) return kx < ky;
      return ci[x] < ci[y];
    });
    for (int64_t t = 0; t < k; ++t) {
      const bool have = t < m && !invalid[q] && !std::isnan(v[order[t]]);
      vals[q * k + t] = have ? v[order[t]] : kNaN;
      ids[q * k + t] = have ? ci[order[t]] : -1;
    }
    p0 += m;
  }
  return true;
}

}  // namespace embgeom
