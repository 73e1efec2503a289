// Stand-alone check of the C++ core against results computed here independently in float64
// (brute force over all pairs), on small odd-shaped inputs. Built and run by
// `make check-aarch64` (cross-compiled, under qemu-aarch64) and `make check-native`; no Python.
// Tolerances follow tests/test_cpp_engine.py: counts must lie between the values safely inside
// and possibly inside, listed values match the reference at their pair, lists hold every pair
// clearly better than the k-th reference value.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <vector>

#include "attention.h"
#include "cone_index.h"
#include "eigvals.h"
#include "sym_counts.h"
#include "cpu/isa.h"
#include "numerics.h"
#include "pairwise/engine.h"
#include "tests/checks.h"

using namespace embgeom;

using embgeom_checks::failures;
using embgeom_checks::randn;

// cosine self mode with every output, block sizes that leave ragged tiles
static void check_pairwise(int64_t n, int64_t d, int64_t block, unsigned seed) {
  std::vector<float> x = randn(n * d, seed);
  for (int64_t k = 0; k < d; ++k) x[5 * d + k] = 0.0f;            // a zero row: excluded
  for (int64_t k = 0; k < d; ++k) x[(n - 1) * d + k] = x[k];      // a duplicate of row 0
  PairwiseOptions o;
  o.block = block;
  o.bins = 16;
  o.lo = -1.0;
  o.hi = 1.0;
  o.topk = 5;
  o.bottomk = 4;
  o.row_topk = 3;
  o.row_bottomk = 2;
  o.has_outside = true;
  o.out_a = -0.2;
  o.out_b = 0.25;
  o.outside_limit = 7;
  PairwiseEngine e(x.data(), n, nullptr, 0, d, o);
  e.run(0, e.num_tiles());
  const PairwiseState& s = e.state();
  const auto& map = e.x_map();
  const int64_t c = e.n();
  CHECK(c == n - 1, "compact rows %lld", (long long)c);
  // reference in float64 on compact rows
  std::vector<double> u(c * d);
  for (int64_t r = 0; r < c; ++r) {
    double q = 0;
    for (int64_t k = 0; k < d; ++k) q += double(x[map[r] * d + k]) * x[map[r] * d + k];
    for (int64_t k = 0; k < d; ++k) u[r * d + k] = x[map[r] * d + k] / std::sqrt(q);
  }
  auto ref = [&](int64_t i, int64_t j) {
    double a = 0;
    for (int64_t k = 0; k < d; ++k) a += u[i * d + k] * u[j * d + k];
    return std::min(1.0, std::max(-1.0, a));
  };
  const double tol = 4e-7 * (d + 8) + 1e-6;
  std::vector<double> vals;
  double sum = 0;
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = i + 1; j < c; ++j) {
      vals.push_back(ref(i, j));
      sum += vals.back();
    }
  const int64_t cnt = int64_t(vals.size());
  CHECK(s.count == cnt, "count %lld != %lld", (long long)s.count, (long long)cnt);
  const numerics::Moments m = numerics::moments_from_shifted(s.count, o.moment_shift, s.shifted_sum, s.shifted_sumsq);
  CHECK(std::fabs(m.mean - sum / cnt) <= tol, "mean %.9f vs %.9f", m.mean, sum / cnt);
  double m2 = 0;
  for (double v : vals) m2 += (v - sum / cnt) * (v - sum / cnt);
  CHECK(std::fabs(m.m2 - m2) <= 4 * tol * cnt, "m2 %.9f vs %.9f", m.m2, m2);
  // histogram between sure and possible counts
  const double sc = numerics::bin_scale(o.lo, o.hi, o.bins);
  std::vector<int64_t> lower(o.bins + 2, 0), upper(o.bins + 2, 0);
  for (double v : vals) {
    const int64_t a = numerics::bin_index(v - tol, o.lo, o.hi, o.bins, sc);
    const int64_t b = numerics::bin_index(v + tol, o.lo, o.hi, o.bins, sc);
    if (a == b) lower[a]++;
    for (int64_t q = a; q <= b; ++q) upper[q]++;
  }
  int64_t hsum = 0;
  for (int64_t b = 0; b < o.bins + 2; ++b) {
    hsum += s.hist[b];
    CHECK(lower[b] <= s.hist[b] && s.hist[b] <= upper[b], "hist[%lld] = %lld not in [%lld, %lld]", (long long)b,
          (long long)s.hist[b], (long long)lower[b], (long long)upper[b]);
  }
  CHECK(hsum == cnt, "hist total");
  // global top / bottom lists
  std::vector<double> sorted = vals;
  std::sort(sorted.begin(), sorted.end());
  auto check_list = [&](const PairList& l, bool top) {
    CHECK(int64_t(l.e.size()) == std::min<int64_t>(l.k, cnt), "list size");
    if (l.e.empty()) return;
    for (size_t q = 0; q < l.e.size(); ++q) {
      CHECK(l.e[q].i < l.e[q].j, "pair order");
      CHECK(std::fabs(l.e[q].v - ref(l.e[q].i, l.e[q].j)) <= tol, "list value");
      if (q) CHECK(top ? l.e[q].v <= l.e[q - 1].v : l.e[q].v >= l.e[q - 1].v, "list order");
    }
    const double kth = top ? sorted[cnt - l.e.size()] : sorted[l.e.size() - 1];
    std::set<std::pair<int64_t, int64_t>> got;
    for (const auto& p : l.e) got.insert({p.i, p.j});
    for (int64_t i = 0; i < c; ++i)
      for (int64_t j = i + 1; j < c; ++j) {
        const double v = ref(i, j);
        if (top ? v > kth + 2 * tol : v < kth - 2 * tol) CHECK(got.count({i, j}), "missing pair (%lld, %lld)", (long long)i, (long long)j);
      }
  };
  check_list(s.top, true);
  check_list(s.bottom, false);
  CHECK(!s.max1.e.empty() && std::fabs(s.max1.e[0].v - sorted.back()) <= 2 * tol, "max");
  // per-row lists
  auto check_rows = [&](const RowLists& r, bool top) {
    for (int64_t i = 0; i < c; ++i) {
      std::vector<double> row;
      for (int64_t j = 0; j < c; ++j)
        if (j != i) row.push_back(ref(i, j));
      std::sort(row.begin(), row.end());
      const int64_t nv = std::min<int64_t>(r.k, int64_t(row.size()));
      CHECK(r.cnt[i] == nv, "row %lld count", (long long)i);
      std::set<int64_t> cols;
      for (int64_t q = 0; q < r.cnt[i]; ++q) {
        const int64_t j = r.col[i * r.k + q];
        cols.insert(j);
        CHECK(j != i && std::fabs(r.val[i * r.k + q] - ref(i, j)) <= tol, "row %lld value", (long long)i);
      }
      const double kth = top ? row[row.size() - nv] : row[nv - 1];
      for (int64_t j = 0; j < c; ++j) {
        if (j == i) continue;
        const double v = ref(i, j);
        if (top ? v > kth + 2 * tol : v < kth - 2 * tol) CHECK(cols.count(j), "row %lld misses %lld", (long long)i, (long long)j);
      }
    }
  };
  check_rows(s.row_top, true);
  check_rows(s.row_bottom, false);
  // outside [a, b]
  int64_t sure = 0, maybe = 0;
  for (double v : vals) {
    sure += (v < o.out_a - tol || v > o.out_b + tol);
    maybe += (v < o.out_a + tol || v > o.out_b - tol);
  }
  CHECK(sure <= s.outside_count && s.outside_count <= maybe, "outside count %lld not in [%lld, %lld]",
        (long long)s.outside_count, (long long)sure, (long long)maybe);
  int64_t rows_total = 0;
  for (int64_t r : s.outside_rows) rows_total += r;
  CHECK(rows_total == 2 * s.outside_count, "outside rows");
  CHECK(int64_t(s.outside_pairs.e.size()) == std::min<int64_t>(o.outside_limit, s.outside_count), "outside pairs");
  // state export (original indices) and import round trip: a second engine resumes to the same
  // exported state; the excluded zero row never appears
  const ExportedState ex = e.export_state();
  CHECK(ex.excluded_rows.size() == 1 && ex.excluded_rows[0] == 5, "excluded rows");
  for (const auto& p : ex.top) CHECK(p.i != 5 && p.j != 5 && p.i < n && p.j < n, "exported indices");
  PairwiseEngine e2(x.data(), n, nullptr, 0, d, o);
  e2.import_state(ex);
  const ExportedState ex2 = e2.export_state();
  CHECK(ex2.count == ex.count && ex2.hist == ex.hist && ex2.row_top_idx == ex.row_top_idx &&
            ex2.outside_rows == ex.outside_rows && ex2.top.size() == ex.top.size(),
        "state round trip");
  for (size_t q = 0; q < ex.top.size(); ++q)
    CHECK(ex2.top[q].i == ex.top[q].i && ex2.top[q].j == ex.top[q].j && ex2.top[q].v == ex.top[q].v, "top round trip");
  // per-row lists and outside counts alone (keep_lists_only), exact and fast: the same lists and
  // counts, nothing else kept
  for (const char* precision : {"exact", "fast"}) {
    PairwiseOptions r;
    r.block = block;
    r.precision = precision;
    r.row_topk = o.row_topk;
    r.row_bottomk = o.row_bottomk;
    r.has_outside = true;
    r.out_a = o.out_a;
    r.out_b = o.out_b;
    r.outside_limit = o.outside_limit;
    PairwiseEngine er(x.data(), n, nullptr, 0, d, r);
    er.keep_lists_only();
    er.run(0, er.num_tiles());
    const PairwiseState& sr = er.state();
    CHECK(sr.count == 0 && sr.max1.e.empty() && sr.min1.e.empty() && sr.shifted_sum == 0.0, "%s lists only: no statistics", precision);
    CHECK(sr.outside_count == s.outside_count && sr.outside_rows == s.outside_rows &&
              sr.outside_pairs.e.size() == s.outside_pairs.e.size(),
          "%s lists only: outside counts", precision);
    for (size_t q = 0; q < s.outside_pairs.e.size() && q < sr.outside_pairs.e.size(); ++q)
      CHECK(sr.outside_pairs.e[q].i == s.outside_pairs.e[q].i && sr.outside_pairs.e[q].j == s.outside_pairs.e[q].j &&
                sr.outside_pairs.e[q].v == s.outside_pairs.e[q].v,
            "%s lists only: outside pair %zu", precision, q);
    for (const auto* pr : {&sr.row_top, &sr.row_bottom}) {
      const RowLists& want = pr == &sr.row_top ? s.row_top : s.row_bottom;
      CHECK(pr->cnt == want.cnt, "%s lists only: row counts", precision);
      for (int64_t i = 0; i < c && pr->cnt == want.cnt; ++i)
        for (int64_t q = 0; q < want.cnt[i]; ++q)
          CHECK(pr->col[i * pr->k + q] == want.col[i * want.k + q] && pr->val[i * pr->k + q] == want.val[i * want.k + q],
                "%s lists only: row %lld entry %lld", precision, (long long)i, (long long)q);
    }
  }
}

// histogram slots of values on and beside bin edges (a few float ulps either side), exactly the
// float64 rule's (numerics::bin_index): dot products of 1-d rows with 1.0 are the rows' values,
// 21 columns a row so that every pass sees full vector blocks and a tail
static void check_hist_edges(double lo, double hi, int64_t bins) {
  const double scale = double(bins) / (hi - lo);
  std::vector<float> x;
  for (int64_t k = -1; k <= bins + 1; ++k) {
    const float e = static_cast<float>(lo + double(k) / scale);
    float below = e, above = e;
    x.push_back(e);
    for (int q = 0; q < 3; ++q) {
      below = std::nextafter(below, -1e30f);
      above = std::nextafter(above, 1e30f);
      x.push_back(below);
      x.push_back(above);
    }
  }
  x.push_back(static_cast<float>(lo));
  x.push_back(static_cast<float>(hi));
  x.push_back(static_cast<float>(hi + 10 * (hi - lo)));
  x.push_back(static_cast<float>(lo - 10 * (hi - lo)));
  const int64_t n = int64_t(x.size()), m = 21;
  std::vector<float> y(m, 1.0f);
  PairwiseOptions o;
  o.metric = "dot";
  o.block = 64;
  o.bins = bins;
  o.lo = lo;
  o.hi = hi;
  PairwiseEngine e(x.data(), n, y.data(), m, 1, o);
  e.run(0, e.num_tiles());
  std::vector<int64_t> want(bins + 2, 0);
  for (float v : x) want[numerics::bin_index(double(v), lo, hi, bins, scale)] += m;
  const std::vector<int64_t>& got = e.state().hist;
  int64_t wrong = 0;
  for (int64_t b = 0; b < bins + 2; ++b) wrong += got[b] != want[b];
  CHECK(wrong == 0, "histogram on bin edges [%g, %g) x %lld: %lld slots differ from the float64 rule", lo, hi,
        (long long)bins, (long long)wrong);
}

// contiguous sets, and the same sets read in place as G = 2 groups of a (B, T, G, D) layout (a
// hook's head outputs), group g's rows scaled by g + 1 (the same unit vectors)
static void check_cone(int64_t B, int64_t T, int64_t D) {
  std::vector<float> x = randn(B * T * D, 7);
  std::vector<uint8_t> mask(B * T, 1);
  if (B > 1) mask[T + T / 2] = 0;
  std::vector<double> sums(B * D);
  std::vector<int64_t> used(B), zero(B);
  cone_unit_sums(x.data(), 1, B, T, D, 0, T * D, D, mask.data(), sums.data(), used.data(), zero.data());
  const int64_t G = 2;
  std::vector<float> xg(B * T * G * D);
  for (int64_t r = 0; r < B * T; ++r)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < D; ++k) xg[(r * G + g) * D + k] = float(g + 1) * x[r * D + k];
  std::vector<double> gsums(G * B * D);
  std::vector<int64_t> gused(G * B), gzero(G * B);
  cone_unit_sums(xg.data(), G, B, T, D, D, T * G * D, G * D, mask.data(), gsums.data(), gused.data(), gzero.data());
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> ref(D, 0.0);
    int64_t nu = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (!mask[b * T + t]) continue;
      double q = 0;
      for (int64_t k = 0; k < D; ++k) q += double(x[(b * T + t) * D + k]) * x[(b * T + t) * D + k];
      for (int64_t k = 0; k < D; ++k) ref[k] += x[(b * T + t) * D + k] / std::sqrt(q);
      ++nu;
    }
    CHECK(used[b] == nu && zero[b] == 0, "cone counts");
    for (int64_t k = 0; k < D; ++k) CHECK(std::fabs(sums[b * D + k] - ref[k]) <= 1e-9 * T, "cone sum");
    for (int64_t g = 0; g < G; ++g) {
      const int64_t set = g * B + b;
      CHECK(gused[set] == nu && gzero[set] == 0, "cone counts, strided groups");
      for (int64_t k = 0; k < D; ++k)
        CHECK(std::fabs(gsums[set * D + k] - ref[k]) <= 1e-9 * T, "cone sum, strided groups");
    }
  }
}

static void check_entropy(int64_t B, int64_t H, int64_t T) {
  std::vector<float> p = randn(B * H * T * T, 11);
  for (int64_t r = 0; r < B * H * T; ++r) {  // softmax rows
    float mx = -1e30f;
    for (int64_t k = 0; k < T; ++k) mx = std::max(mx, 3 * p[r * T + k]);
    double z = 0;
    for (int64_t k = 0; k < T; ++k) z += std::exp(3 * p[r * T + k] - mx);
    for (int64_t k = 0; k < T; ++k) p[r * T + k] = float(std::exp(3 * p[r * T + k] - mx) / z);
  }
  std::vector<float> out(B * H * T);
  attention_row_entropy(p.data(), B, H, T, nullptr, 0.0, out.data());
  for (int64_t r = 0; r < B * H * T; ++r) {
    double ent = 0;
    for (int64_t k = 0; k < T; ++k) {
      const double v = p[r * T + k];
      if (v >= 1.1754943508222875e-38) ent -= v * std::log(v);
    }
    CHECK(std::fabs(out[r] - ent) <= 1e-5 * (1 + ent), "entropy row %lld: %.7f vs %.7f", (long long)r, out[r], ent);
  }
}

// eigenvalue magnitudes of matrices whose eigenvalues are known: companion matrices of
// prod (x - r) with real roots r (any sign) and 2 x 2 rotation-scaling blocks (a complex pair of
// magnitude rho) on a block diagonal mixed by a similarity with a triangular matrix; k = 11
// matrices (a partial group of 8)
static void check_eigvals(int64_t n) {
  const int64_t k = 11;
  std::vector<double> a(k * n * n, 0.0), want(k * n);
  std::mt19937 gen{static_cast<unsigned>(n)};
  std::uniform_real_distribution<double> u(-2.0, 2.0);
  for (int64_t m = 0; m < k; ++m) {
    double* A = a.data() + m * n * n;
    double* w = want.data() + m * n;
    if (m % 2 == 0) {
      // companion matrix: coefficients of prod (x - r_i), r_i = (i + 1) / n with alternating signs
      std::vector<double> c(n + 1, 0.0);
      c[0] = 1.0;
      for (int64_t i = 0; i < n; ++i) {
        const double r = (i % 2 ? -1.0 : 1.0) * double(i + 1) / double(n);
        w[i] = std::fabs(r);
        for (int64_t q = i + 1; q >= 1; --q) c[q] -= r * c[q - 1];
      }
      for (int64_t j = 0; j < n; ++j) A[j] = -c[j + 1];
      for (int64_t i = 1; i < n; ++i) A[i * n + i - 1] = 1.0;
    } else {
      // block diagonal: rotation-scaling pairs, and a last 1 x 1 when n is odd
      std::vector<double> B(n * n, 0.0);
      for (int64_t i = 0; i + 1 < n; i += 2) {
        const double rho = 0.5 + 0.1 * double(i), th = 0.3 + 0.2 * double(i);
        B[i * n + i] = B[(i + 1) * n + i + 1] = rho * std::cos(th);
        B[i * n + i + 1] = -rho * std::sin(th);
        B[(i + 1) * n + i] = rho * std::sin(th);
        w[i] = w[i + 1] = rho;
      }
      if (n % 2) {
        B[n * n - 1] = -0.7;
        w[n - 1] = 0.7;
      }
      // A = T B T^-1 with T unit upper triangular (T^-1 by back substitution)
      std::vector<double> T(n * n, 0.0), Ti(n * n, 0.0), TB(n * n, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        T[i * n + i] = 1.0;
        for (int64_t j = i + 1; j < n; ++j) T[i * n + j] = 0.3 * u(gen);
      }
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = j; i >= 0; --i) {
          double s = i == j ? 1.0 : 0.0;
          for (int64_t q = i + 1; q <= j; ++q) s -= T[i * n + q] * Ti[q * n + j];
          Ti[i * n + j] = s;
        }
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j)
          for (int64_t q = 0; q < n; ++q) TB[i * n + j] += T[i * n + q] * B[q * n + j];
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j)
          for (int64_t q = 0; q < n; ++q) A[i * n + j] += TB[i * n + q] * Ti[q * n + j];
    }
    std::sort(w, w + n);
  }
  std::vector<double> got(k * n);
  std::vector<uint8_t> ok(k);
  eigvals_abs(a.data(), k, n, got.data(), ok.data(), 2);
  for (int64_t m = 0; m < k; ++m) {
    // a row or column without off-diagonal entries (the similarity's last 1 x 1 block for odd
    // n): an eigenvalue LAPACK permutes out, left to the caller's fallback (ok = 0)
    bool isolated = false;
    const double* am = a.data() + m * n * n;
    for (int64_t i = 0; i < n && n > 1; ++i) {
      bool row = true, col = true;
      for (int64_t j = 0; j < n; ++j)
        if (j != i) {
          row = row && am[i * n + j] == 0.0;
          col = col && am[j * n + i] == 0.0;
        }
      isolated = isolated || row || col;
    }
    CHECK(bool(ok[m]) == !isolated, "eigvals n=%lld matrix %lld: ok %d, isolated %d", (long long)n, (long long)m,
          int(ok[m]), int(isolated));
    if (isolated) continue;
    std::sort(got.begin() + m * n, got.begin() + (m + 1) * n);
    for (int64_t i = 0; i < n; ++i)
      CHECK(std::fabs(got[m * n + i] - want[m * n + i]) <= 1e-8 * (1.0 + want[m * n + n - 1]),
            "eigvals n=%lld matrix %lld: |lambda| %.17g, want %.17g", (long long)n, (long long)m, got[m * n + i],
            want[m * n + i]);
  }
}

// tridiagonal forms of symmetric matrices of known spectra: Q diag(lambda) Q^T with Q a product
// of two Householder reflections, lambda with repeats, zeros and both signs, one matrix all zero,
// one scaled to 1e-200 (the power-of-two scaling); k = 11 (a partial group at every width). The
// counts and the largest eigenvalue on the tridiagonal forms equal those of lambda.
static void check_sym_tridiagonal(int64_t n) {
  const int64_t k = 11;
  std::vector<double> a(k * n * n, 0.0), want(k * n, 0.0);
  std::mt19937 gen{static_cast<unsigned>(100 + n)};
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int64_t m = 0; m < k; ++m) {
    double* A = a.data() + m * n * n;
    double* w = want.data() + m * n;
    if (m == 3) continue;  // all zero
    const double scale = m == 5 ? 1e-200 : 1.0;
    for (int64_t i = 0; i < n; ++i) w[i] = scale * (i % 4 == 3 ? 0.0 : double((i * 7 + m) % 5) - 1.5);
    std::vector<double> Q(n * n, 0.0);
    for (int64_t i = 0; i < n; ++i) Q[i * n + i] = 1.0;
    for (int refl = 0; refl < 2; ++refl) {  // Q = Q (I - 2 x x^T / x^T x)
      std::vector<double> x(n);
      double xx = 0.0;
      for (auto& xi : x) {
        xi = u(gen);
        xx += xi * xi;
      }
      for (int64_t r = 0; r < n; ++r) {
        double qx = 0.0;
        for (int64_t c = 0; c < n; ++c) qx += Q[r * n + c] * x[c];
        for (int64_t c = 0; c < n; ++c) Q[r * n + c] -= 2.0 * qx * x[c] / xx;
      }
    }
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < n; ++c) {
        double s = 0.0;
        for (int64_t q = 0; q < n; ++q) s += Q[r * n + q] * w[q] * Q[c * n + q];
        A[r * n + c] = s;
      }
    std::sort(w, w + n);
  }
  std::vector<double> d(k * n), e(k * std::max<int64_t>(0, n - 1));
  std::vector<uint8_t> ok(k);
  sym_tridiagonal(a.data(), k, n, d.data(), e.data(), ok.data(), 2);
  std::vector<double> tol(k, 0.0), hi(k);
  tridiag_largest(d.data(), e.data(), k, n, tol.data(), hi.data());
  // thresholds between the distinct eigenvalues -1.5, -0.5, 0, 0.5, 1.5, 2.5 (times the scale)
  const double cuts[] = {-2.0, -1.0, -0.25, 0.25, 1.0, 2.0, 3.0};
  const int64_t T = 7;
  std::vector<double> x(k * T);
  for (int64_t m = 0; m < k; ++m)
    for (int64_t t = 0; t < T; ++t) x[m * T + t] = cuts[t] * (m == 5 ? 1e-200 : 1.0);
  std::vector<int64_t> counts(k * T);
  tridiag_count_below(d.data(), e.data(), k, n, x.data(), T, counts.data());
  for (int64_t m = 0; m < k; ++m) {
    const double* w = want.data() + m * n;
    const double s = m == 5 ? 1e-200 : 1.0;
    CHECK(ok[m], "sym_tridiagonal n=%lld matrix %lld: not ok", (long long)n, (long long)m);
    double trace = 0.0, want_trace = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      trace += d[m * n + i];
      want_trace += w[i];
    }
    CHECK(std::fabs(trace - want_trace) <= 1e-12 * n * s, "sym_tridiagonal n=%lld matrix %lld: trace %.17g, want %.17g",
          (long long)n, (long long)m, trace, want_trace);
    CHECK(std::fabs(hi[m] - w[n - 1]) <= 1e-12 * n * s && hi[m] >= w[n - 1] - 1e-12 * n * s,
          "tridiag_largest n=%lld matrix %lld: %.17g, want %.17g", (long long)n, (long long)m, hi[m], w[n - 1]);
    for (int64_t t = 0; t < T; ++t) {
      int64_t below = 0;
      for (int64_t i = 0; i < n; ++i) below += w[i] < x[m * T + t];
      CHECK(counts[m * T + t] == below, "tridiag_count_below n=%lld matrix %lld x=%g: %lld, want %lld", (long long)n,
            (long long)m, x[m * T + t], (long long)counts[m * T + t], (long long)below);
    }
  }
}

int main() {
  std::printf("vector level %s (%s), product %s, fused pass %s, entropy %s, cone %s\n",
              isa_name(isa_level()), cpu_features().c_str(), select_kernel(false).name,
              [] {
                const float one = 1.0f;
                PairwiseOptions o;
                o.block = 1;
                return PairwiseEngine(&one, 1, nullptr, 0, 1, o).fused_name();
              }(),
              attention_entropy_path(), cone_index_path());
  std::printf("eigenvalues %s, symmetric tridiagonal %s\n", eigvals_abs_path(), sym_tridiagonal_path());
  check_pairwise(41, 13, 16, 1);
  check_pairwise(70, 37, 7, 2);
  check_pairwise(129, 5, 64, 3);
  check_hist_edges(-1.0, 1.0, 2000);
  check_hist_edges(-0.37, 0.81, 777);
  check_hist_edges(0.1, 0.3, 3);
  check_cone(3, 29, 19);
  check_cone(1, 600, 33);
  check_cone(20, 9, 7);  // B >= 16: every group of a text in one work item
  check_entropy(2, 3, 37);
  check_entropy(1, 2, 5);
  for (int64_t n : {1, 2, 3, 6, 9, 20}) check_eigvals(n);
  for (int64_t n : {1, 2, 3, 5, 16, 33}) check_sym_tridiagonal(n);
  embgeom_checks::check_kernels();
  if (failures) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
