// Symmetric tridiagonalisation of many small matrices in lockstep, and Sturm counts on the
// tridiagonal forms: the eigenvalue counts behind sv_counts (the numerical ranks and the
// singular values below 1e-3 of `embgeom text --matrices`), which need no eigenvalues, only how
// many lie below a threshold (Golub and Van Loan, Matrix Computations, 8.3.1 and 8.4.1).
#include "sym_counts.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "check.h"
#include "cpu/isa.h"
#include "lanes.h"

namespace embgeom {
namespace {

using lanes::Buf;
using lanes::kMaxLanes;

// Householder reduction (LAPACK dsytd2, lower): for j = 0..n-3 the reflection H = I - tau v v^T
// that zeroes column j below its subdiagonal entry, applied from both sides to the trailing
// block A22 through p = tau A22 v, w = p - (tau / 2) (p . v) v, A22 -= v w^T + w v^T. Only the
// lower triangle is stored and updated; a lane whose column is zero below the subdiagonal takes
// tau = 0 (the identity).
template <int kLanes>
__attribute__((always_inline)) inline void tridiag_group_body(const double* const* mats, int count, int64_t n,
                                                              double* const* ds, double* const* es, uint8_t* ok,
                                                              Buf& hbuf, Buf& wbuf) {
  using Vec = typename lanes::F64<kLanes>::type;  // (kLanes wide: the target's registers)
  Vec* H = hbuf.zeroed<Vec>(size_t(n * n));
  Vec* const v = wbuf.zeroed<Vec>(size_t(2 * n));
  Vec* const p = v + n;
  auto h = [&](int64_t r, int64_t c) -> Vec& { return H[r * n + c]; };
  double scale[kLanes];
  bool failed[kLanes] = {};
  for (int l = 0; l < kLanes; ++l) {
    scale[l] = 1.0;
    if (l >= count) continue;  // a zero matrix: every reflection the identity, written nowhere
    double big = 0.0;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c <= r; ++c) big = std::max(big, std::fabs(mats[l][r * n + c]));
    failed[l] = !std::isfinite(big);
    scale[l] = lanes::pow2_near(big);
    const double inv = failed[l] ? 0.0 : 1.0 / scale[l];
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c <= r; ++c) h(r, c)[l] = mats[l][r * n + c] * inv;
  }
  for (int64_t j = 0; j + 2 < n; ++j) {
    const int64_t m0 = j + 1;
    Vec ss = {};
    for (int64_t r = m0 + 1; r < n; ++r) ss += h(r, j) * h(r, j);
    const Vec x0 = h(m0, j);
    Vec tau = {}, sc = {};
    for (int l = 0; l < kLanes; ++l) {
      double beta = x0[l];
      if (ss[l] > 0.0) {
        beta = -std::copysign(std::sqrt(x0[l] * x0[l] + ss[l]), x0[l]);
        tau[l] = (beta - x0[l]) / beta;
        sc[l] = 1.0 / (x0[l] - beta);
      }
      if (l < count) es[l][j] = beta;
    }
    v[m0] = Vec{} + 1.0;
    for (int64_t r = m0 + 1; r < n; ++r) v[r] = h(r, j) * sc;
    // p = tau A22 v, reading each stored entry once: row r's part below the diagonal gives
    // p[r] (row times v) and p[c] (column times v[r])
    for (int64_t r = m0; r < n; ++r) p[r] = Vec{};
    for (int64_t r = m0; r < n; ++r) {
      const Vec vr = v[r];
      const Vec* row = &h(r, 0);
      Vec acc = row[r] * vr;
      for (int64_t c = m0; c < r; ++c) {
        acc += row[c] * v[c];
        p[c] += row[c] * vr;
      }
      p[r] += acc;
    }
    Vec pv = {};
    for (int64_t r = m0; r < n; ++r) {
      p[r] *= tau;
      pv += p[r] * v[r];
    }
    const Vec half = -0.5 * tau * pv;
    for (int64_t r = m0; r < n; ++r) p[r] += half * v[r];  // p is now w
    for (int64_t r = m0; r < n; ++r) {
      const Vec vr = v[r], wr = p[r];
      Vec* row = &h(r, 0);
      for (int64_t c = m0; c <= r; ++c) row[c] -= vr * p[c] + wr * v[c];
    }
    for (int l = 0; l < count; ++l) ds[l][j] = h(j, j)[l];
  }
  for (int l = 0; l < count; ++l) {
    if (n >= 2) {
      ds[l][n - 2] = h(n - 2, n - 2)[l];
      es[l][n - 2] = h(n - 1, n - 2)[l];
    }
    if (n >= 1) ds[l][n - 1] = h(n - 1, n - 1)[l];
    bool fine = !failed[l];
    for (int64_t i = 0; i < n; ++i) {
      ds[l][i] *= scale[l];
      fine &= std::isfinite(ds[l][i]);
    }
    for (int64_t i = 0; i + 1 < n; ++i) {
      es[l][i] *= scale[l];
      fine &= std::isfinite(es[l][i]);
    }
    ok[l] = fine;
  }
}

using GroupFn = void (*)(const double* const*, int, int64_t, double* const*, double* const*, uint8_t*, Buf&, Buf&);

void group_generic(const double* const* m, int count, int64_t n, double* const* d, double* const* e, uint8_t* ok,
                   Buf& H, Buf& w) {
  tridiag_group_body<2>(m, count, n, d, e, ok, H, w);
}
#if EMBGEOM_X86
EMBGEOM_AVX2 void group_avx2(const double* const* m, int count, int64_t n, double* const* d, double* const* e,
                             uint8_t* ok, Buf& H, Buf& w) {
  tridiag_group_body<4>(m, count, n, d, e, ok, H, w);
}
EMBGEOM_AVX512 void group_avx512(const double* const* m, int count, int64_t n, double* const* d, double* const* e,
                                 uint8_t* ok, Buf& H, Buf& w) {
  tridiag_group_body<8>(m, count, n, d, e, ok, H, w);
}
#endif

lanes::Picked<GroupFn> pick_group(const char** name) {
  return lanes::pick_lanes<GroupFn>(group_generic, EMBGEOM_IF_X86(group_avx2), EMBGEOM_IF_X86(group_avx512), name);
}

// One tridiagonal matrix scaled by a power of two near its largest magnitude (exact): the
// squares e^2 of the Sturm recurrence neither underflow nor overflow (entries of 1e-200 squared
// to 0 and their counts ignored the off-diagonal). x and the results scale with it.
struct ScaledTridiagonal {
  std::vector<double> d, e;
  double scale = 1.0;  // the matrix was multiplied by 1 / scale
  double pivmin = 0.0;  // LAPACK dstebz's smallest pivot magnitude: safe minimum times max(1, largest e^2)
  void load(const double* di, const double* ei, int64_t n) {
    double big = 0.0;
    for (int64_t i = 0; i < n; ++i) big = std::max(big, std::fabs(di[i]));
    for (int64_t i = 0; i + 1 < n; ++i) big = std::max(big, std::fabs(ei[i]));
    scale = lanes::pow2_near(big);
    d.assign(di, di + n);
    e.assign(ei, ei + std::max<int64_t>(0, n - 1));
    double m = 1.0;
    for (auto& x : d) x /= scale;
    for (auto& x : e) {
      x /= scale;
      m = std::max(m, x * x);
    }
    pivmin = DBL_MIN * m;
  }
};

int64_t count_below(const double* d, const double* e, int64_t n, double x, double piv) {
  int64_t count = 0;
  double q = 1.0;
  for (int64_t i = 0; i < n; ++i) {
    q = d[i] - x - (i ? e[i - 1] * e[i - 1] / q : 0.0);
    if (std::fabs(q) <= piv) q = -piv;
    count += q < 0.0;
  }
  return count;
}

}  // namespace

const char* sym_tridiagonal_path() { return picked_name(pick_group); }

void sym_tridiagonal(const double* a, int64_t k, int64_t n, double* d, double* e, uint8_t* ok, int threads) {
  EMBGEOM_CHECK(k >= 0 && n >= 0, "sym_tridiagonal: bad shape");
  const int64_t ne = n - 1;
  lanes::run_groups(pick_group, k, n, ok, threads, [&](GroupFn fn, int W, int64_t g, int count, Buf& H, Buf& work) {
    const double* mats[kMaxLanes];
    double* ds[kMaxLanes];
    double* es[kMaxLanes];
    for (int l = 0; l < W; ++l) {
      const int64_t i = g * W + l;
      mats[l] = l < count ? a + i * n * n : nullptr;
      ds[l] = l < count ? d + i * n : nullptr;
      es[l] = l < count ? e + i * ne : nullptr;
    }
    fn(mats, count, n, ds, es, ok + g * W, H, work);
  });
}

void tridiag_count_below(const double* d, const double* e, int64_t k, int64_t n, const double* x, int64_t T,
                         int64_t* counts) {
  EMBGEOM_CHECK(k >= 0 && n >= 0 && T >= 0, "tridiag_count_below: bad shape");
  const int64_t ne = std::max<int64_t>(0, n - 1);
  ScaledTridiagonal m;
  for (int64_t i = 0; i < k; ++i) {
    m.load(d + i * n, e + i * ne, n);
    for (int64_t t = 0; t < T; ++t)
      counts[i * T + t] = count_below(m.d.data(), m.e.data(), n, x[i * T + t] / m.scale, m.pivmin);
  }
}

void tridiag_largest(const double* d, const double* e, int64_t k, int64_t n, const double* tol, double* hi) {
  EMBGEOM_CHECK(k >= 0 && n >= 0, "tridiag_largest: bad shape");
  const int64_t ne = std::max<int64_t>(0, n - 1);
  ScaledTridiagonal m;
  for (int64_t i = 0; i < k; ++i) {
    if (n == 0) {
      hi[i] = 0.0;
      continue;
    }
    m.load(d + i * n, e + i * ne, n);
    const double* di = m.d.data();
    const double* ei = m.e.data();
    // lambda_max lies in [max d, Gershgorin's upper bound]
    double lo = di[0], up = -INFINITY;
    for (int64_t r = 0; r < n; ++r) {
      const double off = (r ? std::fabs(ei[r - 1]) : 0.0) + (r + 1 < n ? std::fabs(ei[r]) : 0.0);
      lo = std::max(lo, di[r]);
      up = std::max(up, di[r] + off);
    }
    up += 2.0 * DBL_EPSILON * std::fabs(up) + DBL_MIN;  // (the bound's own rounding)
    const double t = tol[i] / m.scale;
    for (int it = 0; it < 2200 && up - lo > t; ++it) {
      const double mid = 0.5 * (lo + up);
      if (mid <= lo || mid >= up) break;  // float64 resolution
      if (count_below(di, ei, n, mid, m.pivmin) == n)
        up = mid;
      else
        lo = mid;
    }
    hi[i] = up * m.scale;
  }
}

}  // namespace embgeom
