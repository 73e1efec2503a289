// Eigenvalue magnitudes of many small nonsymmetric matrices, several at a time in the lanes of
// one vector register (lanes.h: 8 with AVX-512, 4 with AVX2, 2 with SSE2 or NEON). Every step of
// the algorithm runs on all of them at once; the steps that depend on a matrix's values (the
// Householder vectors, deflation, the shifts) are computed lane by lane, and a lane that has
// nothing to do in a step gets the identity reflection (beta = 0). The algorithm is the textbook
// one (Golub and Van Loan, Matrix Computations, 7.4-7.5):
// - scale each matrix by a power of two near its largest magnitude (exact; undone at the end);
// - balance it (rows and columns scaled by powers of two, as LAPACK's dgebal scales);
// - Householder reduction to upper Hessenberg form;
// - Francis double-shift QR sweeps on each matrix's active window [lo, hi], deflating a
//   1 x 1 or 2 x 2 block at the bottom whenever a subdiagonal entry is negligible against its
//   two diagonal neighbours (ulp * (|h(k-1,k-1)| + |h(k,k)|)), exceptional shifts after every 10
//   sweeps without a deflation, and a lane given up after 30 max(10, n) of them.
// A sweep updates the rows and columns of the union of the sweeping lanes' windows (outside a
// lane's own window only its coupling blocks change, which no eigenvalue reads), so lanes with
// different windows share every loop bound.
#include "eigvals.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <vector>

#include "check.h"
#include "cpu/isa.h"
#include "lanes.h"


namespace embgeom {
namespace {

using lanes::Buf;
using lanes::kMaxLanes;

#define EIG_INLINE __attribute__((always_inline)) inline

struct Lane {
  int64_t hi = -1;       // bottom of the active window (-1: done)
  int64_t lo = 0;        // top of this sweep's window
  int64_t its = 0;       // sweeps since the last deflation
  int64_t found = 0;     // magnitudes written
  bool sweep = false;    // sweeps in this round
  bool failed = false;
  double scale = 1.0;    // the matrix was multiplied by 1 / scale
  double anorm = 0.0;    // largest magnitude of the Hessenberg matrix
  double x = 0, y = 0, z = 0;  // first column of the double-shift polynomial (the sweep's start)
};

// The magnitudes of a 2 x 2 block's eigenvalues [[a, b], [c, d]].
EIG_INLINE void block2(double a, double b, double c, double d, double* m1, double* m2) {
  const double half = 0.5 * (a - d), disc = half * half + b * c;
  const double det = a * d - b * c;
  if (disc >= 0.0) {
    const double mid = 0.5 * (a + d), s = std::sqrt(disc);
    const double big = mid >= 0.0 ? mid + s : mid - s;  // no cancellation
    *m1 = std::fabs(big);
    *m2 = big != 0.0 ? std::fabs(det / big) : std::fabs(mid - (mid >= 0.0 ? s : -s));
  } else {  // a complex pair: |lambda|^2 = det
    *m1 = *m2 = std::sqrt(std::max(det, 0.0));
  }
}

// (x, y, z) -> Householder v and beta with (I - beta v v^T) (x, y, z)^T = (alpha, 0, 0)^T; all
// zero: the identity (beta = 0).
EIG_INLINE void householder3(double x, double y, double z, double* v, double* beta, double* alpha) {
  const double m = std::fabs(x) + std::fabs(y) + std::fabs(z);
  if (m == 0.0) {
    v[0] = v[1] = v[2] = 0.0;
    *beta = 0.0;
    *alpha = 0.0;
    return;
  }
  const double xs = x / m, ys = y / m, zs = z / m;
  const double nrm = std::sqrt(xs * xs + ys * ys + zs * zs);
  const double a = xs >= 0.0 ? -nrm : nrm;
  v[0] = xs - a;
  v[1] = ys;
  v[2] = zs;
  *beta = 2.0 / (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
  *alpha = a * m;
}

// Whether a row or a column of a (n x n, row-major) has no off-diagonal entry: its diagonal entry
// is then an eigenvalue that LAPACK's dgebal permutes out before the QR sweeps. Without that
// permutation a triangular block (a causal or sharply peaked attention map with exact zeros) lost
// up to 2 % of its eigenvalue magnitudes in the sweeps, so such a block is left to the caller's
// LAPACK fallback (ok = 0).
bool has_isolated_eigenvalue(const double* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    bool row = true, col = true;
    for (int64_t j = 0; j < n && (row || col); ++j) {
      if (j == i) continue;
      row = row && a[i * n + j] == 0.0;
      col = col && a[j * n + i] == 0.0;
    }
    if (row || col) return true;
  }
  return false;
}

template <int kLanes>
EIG_INLINE void group_body(const double* const* mats, int count, int64_t n, double* const* outs, uint8_t* ok,
                           Buf& hbuf, Buf& wbuf) {
  using Vec = typename lanes::F64<kLanes>::type;  // (kLanes wide: the target's registers)
  // rows ld vectors apart: n = 128 rows of 8 lanes (8 KiB apart) put a column's entries in one
  // L1 set, and the sweeps' column updates (3 columns of every row) missed it (25 % of the time)
  const int64_t ld = n | 1;
  Vec* H = hbuf.zeroed<Vec>(size_t(n * ld));
  Vec* const work = wbuf.zeroed<Vec>(size_t(3 * n));
  Lane L[kLanes];
  auto h = [&](int64_t r, int64_t c) -> Vec& { return H[r * ld + c]; };
  // load, each lane scaled by a power of two near its largest magnitude
  for (int l = 0; l < kLanes; ++l) {
    if (l >= count) continue;  // a zero matrix: deflates at once, written nowhere
    double big = 0.0;
    for (int64_t q = 0; q < n * n; ++q) {  // (a NaN stays: std::max had passed over it, and ok said 1)
      const double a = std::fabs(mats[l][q]);
      big = a > big || a != a ? a : big;
    }
    L[l].scale = lanes::pow2_near(big);
    L[l].failed = !std::isfinite(big) || (n > 1 && has_isolated_eigenvalue(mats[l], n));
    const double inv = L[l].failed ? 0.0 : 1.0 / L[l].scale;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < n; ++c) h(r, c)[l] = mats[l][r * n + c] * inv;
  }
  Vec* v = work;
  Vec* p = work + n;
  // Balancing (Parlett and Reinsch, as LAPACK's dgebal scales): row i times 1/f and column i
  // times f, f a power of two, until the off-diagonal 1-norms of each row and column are within
  // a factor 2 of each other; peaked attention rows (one large entry a row) made the computed
  // eigenvalues 1e3 times less accurate without it
  for (int pass = 0; pass < 100; ++pass) {
    bool changed = false;
    for (int64_t i = 0; i < n; ++i) {
      Vec c = {}, r = {};
      for (int64_t j = 0; j < n; ++j) {
        if (j == i) continue;
        const Vec cj = h(j, i), rj = h(i, j);
        c += cj < 0 ? -cj : cj;
        r += rj < 0 ? -rj : rj;
      }
      Vec f;
      bool any = false;
      for (int l = 0; l < kLanes; ++l) {
        double cl = c[l], rl = r[l], fl = 1.0;
        if (cl > 0.0 && rl > 0.0 && std::isfinite(cl) && std::isfinite(rl)) {
          const double total = cl + rl;
          double g = rl / 2.0;
          while (cl < g && fl < 1e150) {
            fl *= 2.0;
            cl *= 4.0;
          }
          g = rl * 2.0;
          while (cl >= g && fl > 1e-150) {
            fl /= 2.0;
            cl /= 4.0;
          }
          // (cl is now c f^2: the column's norm after the scaling is c f, the row's r / f)
          if (!((cl + rl) / fl < 0.95 * total)) fl = 1.0;  // not worth it
        }
        f[l] = fl;
        any |= fl != 1.0;
      }
      if (!any) continue;
      changed = true;
      const Vec g = 1.0 / f;
      for (int64_t j = 0; j < n; ++j) h(i, j) *= g;
      for (int64_t j = 0; j < n; ++j) h(j, i) *= f;
    }
    if (!changed) break;
  }
  // Householder reduction to upper Hessenberg form, one pass over the rows a step: row r gets
  // the step's left update (r > j), then its right update, and then adds its share of the next
  // step's v^T H (rows j+3..: their weights h(r, j+1) are final once row r is done; the first
  // row's weight, v0 - alpha, waits for the column's norm and is added at the next step)
  Vec* pnext = work + 2 * n;
  for (int64_t j = 0; j + 2 < n; ++j) {
    Vec ss = {};
    for (int64_t i = j + 1; i < n; ++i) ss += h(i, j) * h(i, j);
    Vec beta = {}, alpha = {};
    const Vec x0 = h(j + 1, j);
    Vec v0 = {};
    for (int l = 0; l < kLanes; ++l) {
      const double nrm = std::sqrt(ss[l]);
      const double a = x0[l] >= 0.0 ? -nrm : nrm;
      const double w0 = x0[l] - a;
      const double vv = ss[l] - x0[l] * x0[l] + w0 * w0;
      alpha[l] = a;
      v0[l] = w0;
      beta[l] = vv > 0.0 ? 2.0 / vv : 0.0;
    }
    v[j + 1] = v0;
    for (int64_t i = j + 2; i < n; ++i) v[i] = h(i, j);
    // p = beta v^T H (columns j+1..)
    {
      const Vec* row = &h(j + 1, 0);
      if (j == 0) {
        for (int64_t c = j + 1; c < n; ++c) p[c] = v0 * row[c];
        for (int64_t i = j + 2; i < n; ++i) {
          const Vec vi = v[i];
          const Vec* ri = &h(i, 0);
          for (int64_t c = j + 1; c < n; ++c) p[c] += vi * ri[c];
        }
      } else {
        for (int64_t c = j + 1; c < n; ++c) p[c] = pnext[c] + v0 * row[c];
      }
      for (int64_t c = j + 1; c < n; ++c) p[c] *= beta;
    }
    // column j: alpha where the reflection acts, as it was where it is the identity
    for (int l = 0; l < kLanes; ++l)
      if (beta[l] != 0.0) {
        h(j + 1, j)[l] = alpha[l];
        for (int64_t i = j + 2; i < n; ++i) h(i, j)[l] = 0.0;
      }
    const bool next = j + 3 < n;
    if (next)
      for (int64_t c = j + 2; c < n; ++c) pnext[c] = Vec{};
    for (int64_t r = 0; r < n; ++r) {
      Vec* row = &h(r, 0);
      // from the left (r > j: columns j+1..; rows above get vr = 0), with the right update's
      // dot product (four partial sums: one would wait on the previous addition every column)
      Vec q0 = {}, q1 = {}, q2 = {}, q3 = {};
      const Vec vr = r > j ? v[r] : Vec{};
      int64_t c = j + 1;
      for (; c + 3 < n; c += 4) {
        const Vec x0 = row[c] - vr * p[c], x1 = row[c + 1] - vr * p[c + 1];
        const Vec x2 = row[c + 2] - vr * p[c + 2], x3 = row[c + 3] - vr * p[c + 3];
        row[c] = x0;
        row[c + 1] = x1;
        row[c + 2] = x2;
        row[c + 3] = x3;
        q0 += x0 * v[c];
        q1 += x1 * v[c + 1];
        q2 += x2 * v[c + 2];
        q3 += x3 * v[c + 3];
      }
      for (; c < n; ++c) {
        const Vec x = row[c] - vr * p[c];
        row[c] = x;
        q0 += x * v[c];
      }
      Vec q = (q0 + q1) + (q2 + q3);
      q *= beta;
      // from the right: columns j+1.., with the next step's v^T H (all but its first row)
      if (next && r >= j + 3) {
        const Vec w = row[j + 1] - q * v[j + 1];
        row[j + 1] = w;
        for (int64_t i = j + 2; i < n; ++i) {
          const Vec x = row[i] - q * v[i];
          row[i] = x;
          pnext[i] += w * x;
        }
      } else {
        for (int64_t i = j + 1; i < n; ++i) row[i] -= q * v[i];
      }
    }
  }
  const double ulp = DBL_EPSILON, small = DBL_MIN * (double(n) / ulp);
  const int64_t max_its = 30 * std::max<int64_t>(10, n);
  for (int l = 0; l < kLanes; ++l) {
    L[l].hi = n - 1;
    double a = 0.0;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = std::max<int64_t>(0, r - 1); c < n; ++c) a = std::max(a, std::fabs(h(r, c)[l]));
    L[l].anorm = a;
    if (L[l].failed || !std::isfinite(a)) {
      L[l].failed = true;
      L[l].hi = -1;
    }
  }
  while (true) {
    bool any = false, sweeps = false;
    int64_t kmin = n, kmax = -1;
    for (int l = 0; l < kLanes; ++l) {
      Lane& s = L[l];
      s.sweep = false;
    // after a deflation the lane looks again at once, so that it sweeps in this round (a round
    // spent deflating left its lane idle in the sweep: 310 rounds for 230 sweeps a lane at n = 128)
    again:
      if (s.hi < 0) continue;
      any = true;
      const int64_t hi = s.hi;
      int64_t lo = 0;
      for (int64_t k = hi; k >= 1; --k) {
        double tst = std::fabs(h(k - 1, k - 1)[l]) + std::fabs(h(k, k)[l]);
        if (tst == 0.0) tst = s.anorm;
        const double sub = std::fabs(h(k, k - 1)[l]);
        if (sub <= ulp * tst || sub <= small) {
          h(k, k - 1)[l] = 0.0;
          lo = k;
          break;
        }
      }
      double* dst = outs[l];
      if (lo == hi) {  // a 1 x 1 block
        if (dst) dst[s.found] = std::fabs(h(hi, hi)[l]) * s.scale;
        s.found += 1;
        s.hi -= 1;
        s.its = 0;
        goto again;
      }
      if (lo == hi - 1) {  // a 2 x 2 block
        double m1, m2;
        block2(h(hi - 1, hi - 1)[l], h(hi - 1, hi)[l], h(hi, hi - 1)[l], h(hi, hi)[l], &m1, &m2);
        if (dst) {
          dst[s.found] = m1 * s.scale;
          dst[s.found + 1] = m2 * s.scale;
        }
        s.found += 2;
        s.hi -= 2;
        s.its = 0;
        goto again;
      }
      if (++s.its > max_its) {
        s.failed = true;
        s.hi = -1;
        continue;
      }
      // the shifts: the trailing 2 x 2 block's eigenvalues, or exceptional ones every 10 sweeps
      double a, b, c, d;
      if (s.its % 10 == 0) {
        const double e = (s.its / 10) % 2 ? std::fabs(h(hi, hi - 1)[l]) + std::fabs(h(hi - 1, hi - 2)[l])
                                          : std::fabs(h(lo + 1, lo)[l]) + std::fabs(h(lo + 2, lo + 1)[l]);
        a = 0.75 * e + ((s.its / 10) % 2 ? h(hi, hi)[l] : h(lo, lo)[l]);
        b = -0.4375 * e;
        c = e;
        d = a;
      } else {
        a = h(hi - 1, hi - 1)[l];
        b = h(hi - 1, hi)[l];
        c = h(hi, hi - 1)[l];
        d = h(hi, hi)[l];
      }
      const double tr = a + d, det = a * d - b * c;
      const double h00 = h(lo, lo)[l], h10 = h(lo + 1, lo)[l];
      s.x = h00 * h00 + h(lo, lo + 1)[l] * h10 - tr * h00 + det;
      s.y = h10 * (h00 + h(lo + 1, lo + 1)[l] - tr);
      s.z = h10 * h(lo + 2, lo + 1)[l];
      s.lo = lo;
      s.sweep = true;
      sweeps = true;
      kmin = std::min(kmin, lo);
      kmax = std::max(kmax, hi - 1);
    }
    if (!any) break;
    if (!sweeps) continue;
    // eigenvalues only: rows and columns of the sweeping windows (their union; outside a lane's
    // own window the updates touch only its coupling blocks, which no eigenvalue reads)
    int64_t cmax = 0;
    for (int l = 0; l < kLanes; ++l)
      if (L[l].sweep) cmax = std::max(cmax, L[l].hi);
    // one double-shift sweep on every sweeping lane's window, chasing the bulge down
    for (int64_t k = kmin; k <= kmax; ++k) {
      Vec v0 = {}, v1 = {}, v2 = {}, beta = {};
      bool fix[kLanes] = {};
      double alpha[kLanes] = {};
      bool third = false;  // some lane's reflection has three rows
      for (int l = 0; l < kLanes; ++l) {
        const Lane& s = L[l];
        if (!s.sweep || k < s.lo || k > s.hi - 1) continue;
        double x, y, z;
        const bool three = k + 2 <= s.hi;
        if (k == s.lo) {
          x = s.x;
          y = s.y;
          z = three ? s.z : 0.0;
        } else {
          x = h(k, k - 1)[l];
          y = h(k + 1, k - 1)[l];
          z = three ? h(k + 2, k - 1)[l] : 0.0;
          fix[l] = true;
        }
        double w[3], bt, al;
        householder3(x, y, z, w, &bt, &al);
        v0[l] = w[0];
        v1[l] = w[1];
        v2[l] = w[2];
        beta[l] = bt;
        alpha[l] = al;
        third |= three;
      }
      const bool rows3 = third && k + 2 < n;
      // rows k, k+1 (, k+2) from the left, columns k-1..
      const int64_t c0 = std::max<int64_t>(0, k - 1);
      Vec* r0 = &h(k, 0);
      Vec* r1 = &h(k + 1, 0);
      if (rows3) {
        Vec* r2 = &h(k + 2, 0);
        for (int64_t c = c0; c <= cmax; ++c) {
          const Vec t = (v0 * r0[c] + v1 * r1[c] + v2 * r2[c]) * beta;
          r0[c] -= t * v0;
          r1[c] -= t * v1;
          r2[c] -= t * v2;
        }
      } else {
        for (int64_t c = c0; c <= cmax; ++c) {
          const Vec t = (v0 * r0[c] + v1 * r1[c]) * beta;
          r0[c] -= t * v0;
          r1[c] -= t * v1;
        }
      }
      // columns k, k+1 (, k+2) from the right, rows kmin..k+3
      const int64_t rend = std::min(cmax, k + 3);
      for (int64_t r = kmin; r <= rend; ++r) {
        Vec* row = &h(r, 0);
        if (rows3) {
          const Vec t = (row[k] * v0 + row[k + 1] * v1 + row[k + 2] * v2) * beta;
          row[k] -= t * v0;
          row[k + 1] -= t * v1;
          row[k + 2] -= t * v2;
        } else {
          const Vec t = (row[k] * v0 + row[k + 1] * v1) * beta;
          row[k] -= t * v0;
          row[k + 1] -= t * v1;
        }
      }
      // the bulge's column k-1 as the reflection leaves it: (alpha, 0, 0) exactly
      for (int l = 0; l < kLanes; ++l)
        if (fix[l] && beta[l] != 0.0) {
          h(k, k - 1)[l] = alpha[l];
          h(k + 1, k - 1)[l] = 0.0;
          if (k + 2 <= L[l].hi) h(k + 2, k - 1)[l] = 0.0;
        }
    }
  }
  for (int l = 0; l < count; ++l) {
    ok[l] = !L[l].failed && L[l].found == n;
    if (!ok[l])
      for (int64_t q = 0; q < n; ++q) outs[l][q] = std::numeric_limits<double>::quiet_NaN();
  }
}

using GroupFn = void (*)(const double* const*, int, int64_t, double* const*, uint8_t*, Buf&, Buf&);

void group_generic(const double* const* m, int count, int64_t n, double* const* o, uint8_t* ok,
                   Buf& H, Buf& w) {
  group_body<2>(m, count, n, o, ok, H, w);
}
#if EMBGEOM_X86
EMBGEOM_AVX2 void group_avx2(const double* const* m, int count, int64_t n, double* const* o, uint8_t* ok,
                             Buf& H, Buf& w) {
  group_body<4>(m, count, n, o, ok, H, w);
}
EMBGEOM_AVX512 void group_avx512(const double* const* m, int count, int64_t n, double* const* o, uint8_t* ok,
                                 Buf& H, Buf& w) {
  group_body<8>(m, count, n, o, ok, H, w);
}
#endif

lanes::Picked<GroupFn> pick_group(const char** name) {
  return lanes::pick_lanes<GroupFn>(group_generic, EMBGEOM_IF_X86(group_avx2), EMBGEOM_IF_X86(group_avx512), name);
}

}  // namespace

const char* eigvals_abs_path() { return picked_name(pick_group); }

void eigvals_abs(const double* a, int64_t k, int64_t n, double* out, uint8_t* ok, int threads) {
  EMBGEOM_CHECK(k >= 0 && n >= 0, "eigvals_abs: bad shape");
  lanes::run_groups(pick_group, k, n, ok, threads, [&](GroupFn fn, int W, int64_t g, int count, Buf& H, Buf& work) {
    const double* mats[kMaxLanes];
    double* outs[kMaxLanes];
    for (int l = 0; l < W; ++l) {
      mats[l] = l < count ? a + (g * W + l) * n * n : nullptr;
      outs[l] = l < count ? out + (g * W + l) * n : nullptr;
    }
    fn(mats, count, n, outs, ok + g * W, H, work);
  });
}

}  // namespace embgeom
