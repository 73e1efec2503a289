// Every C++ kernel beside the all-pairs engine, checked against sums computed here in float64
// (long double where the kernel itself sums in float64) on small odd shapes: tails shorter than
// a vector, padding, zero and duplicate rows, ties. Part of `make check-native` (each vector
// level) and `make check-aarch64` (NEON / portable loops under qemu); the Python tests check the
// same kernels through the bindings on the host's own level only.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "attention_sums.h"
#include "cpu/gemm.h"
#include "context.h"
#include "index_search.h"
#include "pair_values.h"
#include "row_pairs.h"
#include "rows_dot.h"
#include "tests/checks.h"
#include "value_histogram.h"

using namespace embgeom;
using embgeom_checks::randn;

namespace {

constexpr double kU32 = 5.9604644775390625e-08;   // 2^-24
constexpr double kU64 = 1.1102230246251565e-16;   // 2^-53
constexpr float kFloatMin = std::numeric_limits<float>::min();

uint16_t to_bf16(float x) {  // the upper half of the float's bits (any bf16 value will do)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>(u >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// softmax rows of (rows, T) scores; keys with key_ok[j] == 0 get probability 0
std::vector<float> softmax_rows(int64_t rows, int64_t T, unsigned seed, float temp, const uint8_t* key_ok) {
  std::vector<float> p = randn(rows * T, seed);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* ok = key_ok;
    double z = 0;
    for (int64_t k = 0; k < T; ++k) {
      const double e = (ok && !ok[k]) ? 0.0 : std::exp(temp * p[r * T + k]);
      p[r * T + k] = float(e);
      z += e;
    }
    for (int64_t k = 0; k < T; ++k) p[r * T + k] = float(p[r * T + k] / z);
  }
  return p;
}

// bf16 (uint16_t) or float32 rows: float32 sums of exact products within the summation bound
template <class T>
void check_rows_dot(int64_t Q, int64_t N, int64_t D, int64_t ldr) {
  std::vector<float> q = randn(Q * D, 21), r = randn(N * ldr, 22);
  std::vector<T> rows(N * ldr);
  for (int64_t i = 0; i < N * ldr; ++i) rows[i] = std::is_same<T, float>::value ? T(r[i]) : T(to_bf16(r[i]));
  auto value = [&](int64_t i) { return std::is_same<T, float>::value ? double(rows[i]) : from_bf16(uint16_t(rows[i])); };
  if (N > 2)
    for (int64_t k = 0; k < D; ++k) rows[2 * ldr + k] = 0;  // a zero row
  std::vector<float> out(Q * N, -7.0f);
  if constexpr (std::is_same<T, float>::value)
    rows_dot_f32(q.data(), Q, rows.data(), ldr, N, D, out.data());
  else
    rows_dot_bf16(q.data(), Q, rows.data(), ldr, N, D, out.data());
  for (int64_t a = 0; a < Q; ++a)
    for (int64_t c = 0; c < N; ++c) {
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < D; ++k) {
        const double t = double(q[a * D + k]) * value(c * ldr + k);
        ref += t;
        mag += std::fabs(t);
      }
      const double tol = (D + 2) * kU32 * mag;
      CHECK(std::fabs(out[a * N + c] - ref) <= tol, "rows_dot %s Q=%lld N=%lld D=%lld (%lld, %lld): %.9g vs %.9g",
            std::is_same<T, float>::value ? "f32" : "bf16", (long long)Q, (long long)N, (long long)D, (long long)a,
            (long long)c, out[a * N + c], ref);
    }
}

// dot_exact_batch: every pair bit-identical to dot_exact (one sequential FMA chain), whatever the
// batch's length (full blocks, padded rests, a few chains side by side) and the rows' alignment
void check_dot_exact_batch(int64_t D) {
  const int64_t rows = 23;
  std::vector<float> x = randn(rows * D + 1, 31);
  std::vector<const float*> pa, pb;
  for (int64_t n = 0; n <= 41; ++n) {
    pa.clear();
    pb.clear();
    for (int64_t q = 0; q < n; ++q) {
      pa.push_back(x.data() + (q * 7 % rows) * D + (q % 2));  // odd offsets: unaligned rows
      pb.push_back(x.data() + (q * 5 % rows) * D);
    }
    std::vector<float> out(n + 1, -9.0f);
    dot_exact_batch(pa.data(), pb.data(), n, D, out.data());
    for (int64_t q = 0; q < n; ++q) {
      const float want = dot_exact(pa[q], pb[q], D);
      CHECK(std::memcmp(&out[q], &want, sizeof want) == 0, "dot_exact_batch n=%lld D=%lld pair %lld: %.9g vs %.9g",
            (long long)n, (long long)D, (long long)q, out[q], want);
    }
    CHECK(out[n] == -9.0f, "dot_exact_batch n=%lld wrote past its batch", (long long)n);
  }
}

// The bf16 tile products (fast mode's): every C[i][j] of R x Cn rows through gemm_tile over all
// panels, against the float64 sum of the rows' round-to-nearest-even bf16 values (denormals as
// zero), within the float32 summation bound. Shapes not a multiple of the micro-tile or of the
// AMX k step; a zero row, a duplicate row and denormal inputs among the rows.
// fast mode's product as EMBGEOM_GEMM=name picks it (the variable restored after)
GemmKernel forced_fast_kernel(const char* name) {
  const char* before = std::getenv("EMBGEOM_GEMM");
  const std::string keep = before ? before : "";
  setenv("EMBGEOM_GEMM", name, 1);
  const GemmKernel k = select_kernel(true);
  if (before) setenv("EMBGEOM_GEMM", keep.c_str(), 1);
  else unsetenv("EMBGEOM_GEMM");
  return k;
}

void check_bf16_product(const GemmKernel& k, int64_t R, int64_t Cn, int64_t D) {
  std::vector<float> a = randn(R * D, 41), b = randn(Cn * D, 42);
  if (R > 2) {
    std::fill_n(a.begin() + D, D, 0.0f);                            // a zero row
    std::copy_n(a.begin(), D, a.begin() + 2 * D);                   // a duplicate row
  }
  for (int64_t q = 0; q < Cn * D; q += 5) b[q] *= 1e-39f;           // denormals: zero in bf16 products
  PackedPanels A, B;
  pack_panels(a.data(), R, D, D, k.a_panels(), A);
  pack_panels(b.data(), Cn, D, D, k.b_panels(), B);
  const int64_t ldc = B.panels * k.nr + 16;
  std::vector<float> C(A.panels * k.mr * ldc, -7.0f);
  gemm_tile(k, A, 0, A.panels, B, 0, B.panels, C.data(), ldc);
  auto bf = [](float x) {
    uint32_t u = uint32_t(embgeom::to_bf16(x)) << 16;
    if ((u & 0x7f800000u) == 0) u = 0;
    float v;
    std::memcpy(&v, &u, 4);
    return double(v);
  };
  const double gam = (D + 2) * kU32 / (1 - (D + 2) * kU32);
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < Cn; ++j) {
      double want = 0, mag = 0;
      for (int64_t t = 0; t < D; ++t) {
        want += bf(a[i * D + t]) * bf(b[j * D + t]);
        mag += std::fabs(bf(a[i * D + t]) * bf(b[j * D + t]));
      }
      const double got = C[i * ldc + j];
      CHECK(std::fabs(got - want) <= gam * mag + 1e-30, "%s R=%lld C=%lld D=%lld (%lld, %lld): %.9g vs %.9g",
            k.name, (long long)R, (long long)Cn, (long long)D, (long long)i, (long long)j, got, want);
    }
}

// (query a, row c) for every a < Q, c < N, in that order -> the number of pairs
int64_t every_pair(int64_t Q, int64_t N, std::vector<int64_t>& qi, std::vector<int64_t>& ci) {
  for (int64_t a = 0; a < Q; ++a)
    for (int64_t c = 0; c < N; ++c) {
      qi.push_back(a);
      ci.push_back(c);
    }
  return static_cast<int64_t>(qi.size());
}

// pair_cosines: the float64 cosine (long double reference), exactly 1 for a row against its own
// values (float32 and float64 queries, every vector level), symmetric, NaN for a zero row, 0 for
// a zero query, float32 queries as their widening, bit for bit
void check_pair_cosines(int64_t D) {
  const int64_t N = 9;
  std::vector<float> rows = randn(N * D, 33);
  for (int64_t k = 0; k < D; ++k) rows[5 * D + k] = 0.0f;  // row 5: zero
  std::vector<double> rows64(rows.begin(), rows.end());
  std::vector<int64_t> qi, ci;
  const int64_t P = every_pair(N, N, qi, ci);
  std::vector<double> got(P), got64(P);
  pair_cosines(rows.data(), rows.data(), D, qi.data(), ci.data(), P, got.data());
  pair_cosines(rows.data(), rows64.data(), D, qi.data(), ci.data(), P, got64.data());
  for (int64_t p = 0; p < P; ++p) {
    const int64_t a = qi[p], c = ci[p];
    CHECK(got[p] == got64[p] || (std::isnan(got[p]) && std::isnan(got64[p])),
          "pair_cosines D=%lld pair %lld: float32 and float64 queries differ", (long long)D, (long long)p);
    if (c == 5) {
      CHECK(std::isnan(got[p]), "pair_cosines D=%lld: a zero row gives %.17g, not NaN", (long long)D, got[p]);
      continue;
    }
    if (a == 5) {
      CHECK(got[p] == 0.0, "pair_cosines D=%lld: a zero query gives %.17g, not 0", (long long)D, got[p]);
      continue;
    }
    if (a == c) {
      CHECK(got[p] == 1.0, "pair_cosines (%s) D=%lld row %lld with itself: %.17g", pair_cosines_path(), (long long)D,
            (long long)a, got[p]);
    }
    CHECK(got[p] == got[c * N + a], "pair_cosines D=%lld: (%lld, %lld) and (%lld, %lld) differ", (long long)D,
          (long long)a, (long long)c, (long long)c, (long long)a);
    long double qc = 0, qq = 0, cc = 0;
    for (int64_t k = 0; k < D; ++k) {
      const long double x = rows[c * D + k], y = rows[a * D + k];
      qc += x * y;
      qq += y * y;
      cc += x * x;
    }
    const double want = double(qc / std::sqrt(qq * cc));
    CHECK(std::fabs(got[p] - want) <= 4 * (D + 4) * kU64, "pair_cosines D=%lld pair %lld: %.17g vs %.17g",
          (long long)D, (long long)p, got[p], want);
  }
}

void check_pair_values(int64_t D) {
  const int64_t N = 9, Q = 4;
  std::vector<float> rows = randn(N * D, 31), qf = randn(Q * D, 32);
  std::vector<double> qd(Q * D);
  for (int64_t i = 0; i < Q * D; ++i) qd[i] = double(qf[i]) * (1.0 + 1e-9 * (i % 7));  // not floats
  std::vector<int64_t> qi, ci;
  const int64_t P = every_pair(Q, N, qi, ci);
  for (bool sqdist : {false, true}) {
    std::vector<double> out(P), outf(P);
    pair_values(rows.data(), qd.data(), D, qi.data(), ci.data(), P, sqdist, out.data());
    pair_values(rows.data(), qf.data(), D, qi.data(), ci.data(), P, sqdist, outf.data());
    for (int64_t p = 0; p < P; ++p) {
      long double ref = 0, reff = 0, mag = 0;
      for (int64_t k = 0; k < D; ++k) {
        const long double x = rows[ci[p] * D + k], y = qd[qi[p] * D + k], yf = qf[qi[p] * D + k];
        ref += sqdist ? (x - y) * (x - y) : x * y;
        reff += sqdist ? (x - yf) * (x - yf) : x * yf;
        mag += sqdist ? (x - y) * (x - y) : std::fabs(x * y);
      }
      const double tol = 2 * (D + 4) * kU64 * double(mag) + 1e-300;
      CHECK(std::fabs(out[p] - double(ref)) <= tol, "pair_values D=%lld sqdist=%d pair %lld", (long long)D, sqdist,
            (long long)p);
      CHECK(std::fabs(outf[p] - double(reff)) <= tol, "pair_values(float q) D=%lld sqdist=%d pair %lld",
            (long long)D, sqdist, (long long)p);
    }
    // a pair's value does not depend on the batch it came in: one pair alone, bit for bit
    for (int64_t p = 0; p < P; p += 5) {
      double one;
      pair_values(rows.data(), qd.data(), D, &qi[p], &ci[p], 1, sqdist, &one);
      CHECK(one == out[p], "pair_values D=%lld: pair %lld alone differs", (long long)D, (long long)p);
    }
    // float32 queries give the float64 sums of the same queries widened, bit for bit, and the
    // dot products are those of the order pair_values.h fixes, whatever the vector level (`make
    // check-native` runs each; products of floats are exact in double, so a compiler's fused
    // multiply-adds cannot change them)
    std::vector<double> qw(qf.begin(), qf.end()), outw(P);
    pair_values(rows.data(), qw.data(), D, qi.data(), ci.data(), P, sqdist, outw.data());
    for (int64_t p = 0; p < P; ++p) {
      double sum[16] = {};
      for (int64_t k = 0; k < D; ++k) {
        const double x = rows[ci[p] * D + k], y = qf[qi[p] * D + k];
        sum[k % 16] += sqdist ? (x - y) * (x - y) : x * y;
      }
      double t[8], u[4];
      for (int l = 0; l < 8; ++l) t[l] = sum[l] + sum[l + 8];
      for (int l = 0; l < 4; ++l) u[l] = t[l] + t[l + 4];
      const double want = (u[0] + u[2]) + (u[1] + u[3]);
      CHECK(outf[p] == outw[p] && (sqdist || outf[p] == want),
            "pair_values (%s) D=%lld sqdist=%d pair %lld: %.17g / %.17g, the order gives %.17g", pair_values_path(),
            (long long)D, sqdist, (long long)p, outf[p], outw[p], want);
    }
  }
}

void check_row_pair_sums(int64_t N, int64_t D) {
  const int64_t lda = D + 3, ldb = D + 1;  // strided rows
  std::vector<float> a = randn(N * lda, 41), b(N * ldb);
  for (int64_t r = 0; r < N; ++r)
    for (int64_t k = 0; k < D; ++k) {
      // nearly equal rows: |a - b| ~ 1e-6 |a|, the case float32 differences lose
      const float x = a[r * lda + k];
      b[r * ldb + k] = r % 3 == 0 ? x : x * (1.0f + 1e-6f * float((k * 7 + r) % 5));
    }
  std::vector<double> out(N * 4);
  row_pair_sums(a.data(), lda, b.data(), ldb, N, D, out.data());
  for (int64_t r = 0; r < N; ++r) {
    long double ref[4] = {0, 0, 0, 0}, mag = 0;
    for (int64_t k = 0; k < D; ++k) {
      const long double x = a[r * lda + k], y = b[r * ldb + k];
      ref[0] += x * x;
      ref[1] += y * y;
      ref[2] += (x - y) * (x - y);
      ref[3] += x * y;
      mag += std::fabs(x * y);
    }
    for (int c = 0; c < 4; ++c) {
      const double scale = c == 2 ? double(ref[2]) : double(c == 3 ? mag : ref[c]);
      CHECK(std::fabs(out[r * 4 + c] - double(ref[c])) <= 2 * (D + 2) * kU64 * scale,
            "row_pair_sums N=%lld D=%lld row %lld column %d: %.17g vs %.17g", (long long)N, (long long)D,
            (long long)r, c, out[r * 4 + c], double(ref[c]));
    }
  }
}

void check_row_moments(int64_t N, int64_t D) {
  const int64_t ld = D + 2;  // strided rows
  std::vector<float> x = randn(N * ld, 43);
  for (int64_t k = 0; k < D; ++k) x[k] = 1000.0f + 1e-3f * x[k];  // row 0: a large mean, tiny spread
  for (int64_t r = 1; r < N; ++r)
    for (int64_t k = 0; k < D; ++k) x[r * ld + k] = std::exp(x[r * ld + k]);  // skewed
  std::vector<double> out(N * 4);
  row_moments(x.data(), ld, N, D, out.data());
  for (int64_t r = 0; r < N; ++r) {
    long double mean = 0, m[5] = {0, 0, 0, 0, 0};
    for (int64_t k = 0; k < D; ++k) mean += x[r * ld + k];
    mean /= D;
    for (int64_t k = 0; k < D; ++k) {
      const long double d = x[r * ld + k] - mean;
      m[2] += d * d, m[3] += d * d * d, m[4] += d * d * d * d;
    }
    const double want[4] = {double(mean), double(m[2] / D), double(m[3] / D), double(m[4] / D)};
    for (int c = 0; c < 4; ++c) {
      // the float64 mean's rounding (delta <= 2^-52 |mean| or so) moves every deviation by delta:
      // m_k by about k delta m2^((k - 1) / 2)
      const double delta = 4.5e-16 * std::fabs(want[0]) * D;
      const double tol = 1e-12 * std::fabs(want[c]) + (c == 0 ? 0.0 : (c + 1) * delta * std::pow(want[1], 0.5 * c));
      CHECK(std::fabs(out[r * 4 + c] - want[c]) <= tol, "row_moments N=%lld D=%lld row %lld moment %d: %.17g vs %.17g",
            (long long)N, (long long)D, (long long)r, c, out[r * 4 + c], want[c]);
    }
  }
}

// (B, T, H, d) head outputs as a hook gives them, read as (B, H, T, d) through strides
void check_context_argmax(int64_t B, int64_t H, int64_t T, int64_t d) {
  std::vector<float> o = randn(B * T * H * d, 51);
  const int64_t sb = T * H * d, sh = d, st = H * d;
  auto at = [&](int64_t b, int64_t h, int64_t t) { return o.data() + b * sb + h * sh + t * st; };
  std::vector<uint8_t> mask(B * T, 1);
  for (int64_t t = T - 2; t < T; ++t) mask[t] = 0;  // text 0 padded at the end
  if (B > 1) {  // text 1: one real token
    std::fill(mask.begin() + T, mask.begin() + 2 * T, 0);
    mask[T + 1] = 1;
  }
  for (int64_t h = 0; h < H; ++h) {
    if (T > 6) {
      std::memcpy(at(0, h, 4), at(0, h, 1), sizeof(float) * d);  // rows 1 and 4 equal: ties by position
      std::memcpy(at(0, h, 5), at(0, h, 3), sizeof(float) * d);  // rows 3 and 5 equal but for one ulp
      at(0, h, 5)[d / 2] = std::nextafter(at(0, h, 5)[d / 2], 100.0f);
    }
  }
  std::vector<int64_t> out(B * H * T, -5);
  context_argmax(o.data(), B, H, T, d, sb, sh, st, mask.data(), out.data());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      int64_t nreal = 0;
      for (int64_t t = 0; t < T; ++t) nreal += mask[b * T + t];
      for (int64_t i = 0; i < T; ++i) {
        int64_t best = i;
        if (mask[b * T + i] && nreal >= 2) {
          long double bv = -std::numeric_limits<long double>::infinity();
          for (int64_t j = 0; j < T; ++j) {
            if (j == i || !mask[b * T + j]) continue;
            long double v = 0;
            for (int64_t k = 0; k < d; ++k) v += (long double)at(b, h, i)[k] * at(b, h, j)[k];
            if (v > bv) bv = v, best = j;  // strict: ties keep the smaller position
          }
        }
        CHECK(out[(b * H + h) * T + i] == best, "context_argmax (%lld, %lld, %lld): %lld vs %lld", (long long)b,
              (long long)h, (long long)i, (long long)out[(b * H + h) * T + i], (long long)best);
      }
    }
}

void check_value_histogram(int64_t B, int64_t H, int64_t T) {
  std::vector<float> p = randn(B * H * T * T, 61);
  for (auto& v : p) v = v * v;  // attention-like: non-negative
  std::vector<uint8_t> mask(B * T, 1);
  mask[T - 1] = 0;  // text 0's last position is padding
  if (H > 1)
    for (int64_t q = T * T; q < 2 * T * T; ++q) p[q] = 0.25f;  // map (0, 1): constant
  if (B > 1)
    for (int64_t q = H * T * T; q < (H + 1) * T * T; ++q) p[q] = -p[q];  // map (1, 0): negative values
  if (H > 2)  // map (0, 2): k / 20 for k = 0..20, values on (or a rounding away from) the edges
    for (int64_t q = 0; q < T * T; ++q) p[2 * T * T + q] = float(double(q % 21) / 20.0);
  for (bool widen : {false, true}) {
    std::vector<int64_t> counts(B * H * kValueBins, -1), zero(B * H, -1);
    value_histogram(p.data(), B, H, T, mask.data(), widen, counts.data(), zero.data());
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H;
      const float* map = p.data() + bh * T * T;
      double lo = INFINITY, hi = -INFINITY;
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = 0; j < T; ++j)
          if (mask[b * T + i] && mask[b * T + j]) lo = std::min(lo, double(map[i * T + j])), hi = std::max(hi, double(map[i * T + j]));
      if (widen) lo = std::min(lo, 0.0), hi = std::max(hi, 0.0);
      // pandas.cut's edges: lo + e (hi - lo) / bins, rounded down to float32 (the last one hi);
      // a value's bin counts the edges below it (right-closed bins)
      float edges[kValueBins];
      for (int e = 1; e < kValueBins; ++e) {
        const double v = e * ((hi - lo) / kValueBins) + lo;
        float f = float(v);
        if (double(f) > v) f = std::nextafter(f, -INFINITY);
        edges[e - 1] = f;
      }
      edges[kValueBins - 1] = float(hi);
      auto bin = [&](float x) {
        int n = 0;
        for (float e : edges) n += e < x;
        return std::min(n, kValueBins - 1);
      };
      int64_t ref[kValueBins] = {};
      if (hi > lo)
        for (int64_t i = 0; i < T; ++i)
          for (int64_t j = 0; j < T; ++j)
            if (mask[b * T + i] && mask[b * T + j]) ++ref[bin(map[i * T + j])];
      for (int k = 0; k < kValueBins; ++k)
        CHECK(counts[bh * kValueBins + k] == ref[k], "value_histogram map %lld widen=%d bin %d: %lld vs %lld",
              (long long)bh, widen, k, (long long)counts[bh * kValueBins + k], (long long)ref[k]);
      if (hi > lo) CHECK(zero[bh] == bin(0.0f), "value_histogram map %lld: zero bin", (long long)bh);
    }
  }
}

void check_attention_sums(int64_t B, int64_t H, int64_t T) {
  const int64_t K = 5;
  std::vector<uint8_t> mask(B * T, 1), keys(B * T * K, 0), other(B * T, 0);
  for (int64_t b = 0; b < B; ++b) {
    // text 0 padded at the end, text 1 at the start (the maps keep weight on padded keys,
    // which no sum may count but row_sum)
    const int64_t first = b == 1 ? 2 : 0, len = b == 0 ? T - 3 : T;
    for (int64_t t = 0; t < T; ++t) mask[b * T + t] = first <= t && t < len;
    keys[(b * T + first) * K + 0] = 1;      // [CLS]
    keys[(b * T + len - 1) * K + 1] = 1;    // [SEP]
    for (int64_t t = first + 1; t + 1 < len; ++t) {
      other[b * T + t] = 1;
      if (t % 4 == 2) keys[(b * T + t) * K + 2] = keys[(b * T + t) * K + 3] = 1;  // '.'
      if (t % 4 == 3) keys[(b * T + t) * K + 2] = keys[(b * T + t) * K + 4] = 1;  // ','
    }
  }
  const std::vector<float> p = softmax_rows(B * H * T, T, 71, 2.0f, nullptr);
  const int64_t R = 2 * T - 1;
  std::vector<double> key_mass(B * H * K), sep_other(B * H), prev(B * H), next(B * H), row_sum(B * H * T),
      offsets(H * R);
  std::vector<float> entropy(B * H * T), entropy_alone(B * H * T);
  attention_sums(p.data(), B, H, T, mask.data(), keys.data(), K, other.data(), key_mass.data(), sep_other.data(),
                 prev.data(), next.data(), row_sum.data(), offsets.data(), entropy.data());
  // the rows' entropies it takes on the way: the entropy kernel's values, bit for bit
  attention_row_entropy(p.data(), B, H, T, mask.data(), 0.0, entropy_alone.data());
  for (int64_t q = 0; q < B * H * T; ++q)
    CHECK(std::memcmp(&entropy[q], &entropy_alone[q], sizeof(float)) == 0, "attention_sums entropy %lld",
          (long long)q);
  std::vector<double> ref_off(H * R, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      const float* m = p.data() + bh * T * T;
      double km[K] = {}, so = 0, pv = 0, nx = 0;
      std::vector<double> rs(T, 0.0);
      for (int64_t i = 0; i < T; ++i) {
        if (!mask[b * T + i]) continue;
        for (int64_t k = 0; k < K; ++k) {
          double s = 0;
          for (int64_t j = 0; j < T; ++j) s += keys[(b * T + j) * K + k] ? double(m[i * T + j]) : 0.0;
          km[k] += s;
          if (k == 1 && other[b * T + i]) so += s;
        }
        if (i >= 1 && mask[b * T + i - 1]) pv += m[i * T + i - 1];
        if (i + 1 < T && mask[b * T + i + 1]) nx += m[i * T + i + 1];
        for (int64_t j = 0; j < T; ++j) {
          rs[j] += m[i * T + j];
          if (other[b * T + j]) ref_off[h * R + j - i + T - 1] += m[i * T + j];
        }
      }
      const double tol = 1e-12;  // float64 sums of the same terms in another order
      for (int64_t k = 0; k < K; ++k)
        CHECK(std::fabs(key_mass[bh * K + k] - km[k]) <= tol, "attention_sums key_mass (%lld, %lld)", (long long)bh,
              (long long)k);
      CHECK(std::fabs(sep_other[bh] - so) <= tol, "attention_sums sep_other %lld", (long long)bh);
      CHECK(std::fabs(prev[bh] - pv) <= 1e-12 && std::fabs(next[bh] - nx) <= 1e-12, "attention_sums prev/next %lld",
            (long long)bh);
      for (int64_t j = 0; j < T; ++j)
        CHECK(std::fabs(row_sum[bh * T + j] - rs[j]) <= 1e-12, "attention_sums row_sum (%lld, %lld)", (long long)bh,
              (long long)j);
    }
  for (int64_t q = 0; q < H * R; ++q)
    CHECK(std::fabs(offsets[q] - ref_off[q]) <= 1e-12, "attention_sums offsets %lld", (long long)q);
}

void check_js_pair_sums(int64_t K, int64_t R, int64_t T) {
  // each head's rows smoothed, the last two keys padding (1/2 in every row: a 0 term); heads 0 and 2
  // equal (exactly 0), head 3 head 0 moved by 1e-4 of each entry (JS ~1e-9 a key: no cancellation
  // allowed), one key 0 in both rows of heads 0 and 1 (no term)
  std::vector<float> P = softmax_rows(K * R, T, 81, 1.5f, nullptr);
  for (int64_t r = 0; r < K * R; ++r)
    for (int64_t j = T - 2; j < T; ++j) P[r * T + j] = 0.5f;
  if (K > 2) std::copy(P.begin(), P.begin() + R * T, P.begin() + 2 * R * T);
  if (K > 3)
    for (int64_t q = 0; q < R * T; ++q) P[3 * R * T + q] = P[q] * (1.0f + 1e-4f * float((q * 7919) % 13 - 6));
  P[0] = P[R * T] = 0.0f;
  std::vector<double> out(K * K, -1.0);
  js_pair_sums(P.data(), K, R, T, out.data());
  for (int64_t a = 0; a < K; ++a)
    for (int64_t b = 0; b < K; ++b) {
      double ref = 0;
      if (a < b)
        for (int64_t q = 0; q < R * T; ++q) {
          const double p = P[a * R * T + q], r = P[b * R * T + q], s = p + r;
          if (p > 0) ref += 0.5 * p * std::log(2 * p / s);
          if (r > 0) ref += 0.5 * r * std::log(2 * r / s);
        }
      CHECK(std::fabs(out[a * K + b] - ref) <= 2e-6 * ref + 1e-15 * double(R * T),
            "js_pair_sums K=%lld R=%lld T=%lld (%lld, %lld): %.9g for %.9g", (long long)K, (long long)R, (long long)T,
            (long long)a, (long long)b, out[a * K + b], ref);
    }
}

// k90's counts: float64 running sums from the left, every prefix counted
void check_prefix_sums_below(int64_t R, int64_t T) {
  std::vector<float> x = softmax_rows(R, T, 101, 3.0f, nullptr);
  for (int64_t r = 0; r < R; ++r) {
    std::sort(x.begin() + r * T, x.begin() + (r + 1) * T, std::greater<float>());
    for (int64_t t = 0; t < T; ++t) x[r * T + t] = -x[r * T + t];  // negated, ascending
  }
  if (R > 1 && T > 2) x[T + 1] = NAN;
  std::vector<int64_t> out(R, -1);
  prefix_sums_below(x.data(), R, T, 0.9, out.data());
  for (int64_t r = 0; r < R; ++r) {
    double s = 0;
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) {
      s -= x[r * T + t];  // (the negation of the kernel's sum, exactly)
      n += s < 0.9;
    }
    CHECK(out[r] == n, "prefix_sums_below row %lld of %lld: %lld vs %lld", (long long)r, (long long)T,
          (long long)out[r], (long long)n);
  }
}

// the row entropy with padded keys and queries and with smoothing (check_engine.cpp checks
// plain rows)
void check_entropy_masked(int64_t B, int64_t H, int64_t T, double smoothing) {
  std::vector<uint8_t> mask(B * T, 1);
  for (int64_t t = T / 2; t < T; ++t) mask[t] = 0;  // text 0: half padding
  std::vector<float> p(B * H * T * T);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<float> rows = softmax_rows(H * T, T, 91 + unsigned(b), 4.0f, mask.data() + b * T);
    std::copy(rows.begin(), rows.end(), p.begin() + b * H * T * T);
  }
  p[T + 1] = 0.0f;                 // a zero and a subnormal probability in a real row
  p[T + 2] = 1e-41f;
  std::vector<float> out(B * H * T);
  attention_row_entropy(p.data(), B, H, T, mask.data(), smoothing, out.data());
  for (int64_t b = 0; b < B; ++b) {
    int64_t nv = 0;
    for (int64_t t = 0; t < T; ++t) nv += mask[b * T + t];
    for (int64_t r = b * H * T; r < (b + 1) * H * T; ++r) {
      const int64_t i = r % T;
      if (!mask[b * T + i]) {
        CHECK(std::isnan(out[r]), "entropy: a padded query row is not NaN");
        continue;
      }
      double ent = 0;
      for (int64_t k = 0; k < T; ++k) {
        if (!mask[b * T + k]) continue;
        const double v = (1 - smoothing) * double(p[r * T + k]) + smoothing / nv;
        if (v >= kFloatMin) ent -= v * std::log(v);
      }
      CHECK(std::fabs(out[r] - ent) <= 1e-5 * (1 + ent), "masked entropy row %lld (smoothing %g): %.7f vs %.7f",
            (long long)r, smoothing, out[r], ent);
    }
  }
}

}  // namespace

// bf16_scan_rows: each value the nearest bf16 of float32(row * scale) (neither neighbour nearer),
// the returned rounding the largest norm of out - row / norm (long double reference, a zero row's
// norm counted as 1e-300); without fill the given bits are read and left; without scale, bf16(row).
void check_bf16_scan_rows(int64_t N, int64_t D) {
  std::vector<float> rows = randn(N * D, 31 + unsigned(D));
  std::vector<double> scale(N), norm(N);
  for (int64_t r = 0; r < N; ++r) {
    if (r == 1)
      for (int64_t k = 0; k < D; ++k) rows[r * D + k] = 0.0f;
    double s = 0;
    for (int64_t k = 0; k < D; ++k) s += double(rows[r * D + k]) * rows[r * D + k];
    norm[r] = std::sqrt(s);
    scale[r] = norm[r] > 0 ? 1.0 / norm[r] : 0.0;
  }
  for (bool scaled : {true, false}) {
    std::vector<uint16_t> out(N * D);
    const double* sc = scaled ? scale.data() : nullptr;
    const double* nr = scaled ? norm.data() : nullptr;
    const double delta = bf16_scan_rows(rows.data(), D, N, D, sc, nr, out.data(), D, true);
    long double worst = 0;
    for (int64_t r = 0; r < N; ++r) {
      long double sq = 0;
      for (int64_t k = 0; k < D; ++k) {
        const float x = rows[r * D + k];
        const float v = scaled ? float(double(x) * scale[r]) : x;
        const uint16_t h = out[r * D + k];
        const float b = from_bf16(h);
        if ((h & 0x7fff) != 0)
          for (uint16_t n : {uint16_t(h + 1), uint16_t(h - 1)})
            CHECK(std::fabs(double(from_bf16(n)) - v) >= std::fabs(double(b) - v),
                  "bf16_scan_rows N=%lld D=%lld (%lld, %lld): %.9g is not the nearest bf16 of %.9g",
                  (long long)N, (long long)D, (long long)r, (long long)k, b, v);
        else
          CHECK(std::fabs(v) <= std::ldexp(1.0, -133), "bf16_scan_rows: %.9g rounded to zero", v);
        const long double e = (long double)b - (scaled ? (long double)x / std::max(norm[r], 1e-300) : (long double)x);
        sq += e * e;
      }
      worst = std::max(worst, std::sqrt(sq));
    }
    CHECK(std::fabs((long double)delta - worst) <= 1e-12L * worst, "bf16_scan_rows N=%lld D=%lld: rounding %.17g vs %.17Lg",
          (long long)N, (long long)D, delta, worst);
    const std::vector<uint16_t> made = out;
    CHECK(bf16_scan_rows(rows.data(), D, N, D, nullptr, nr, out.data(), D, false) == delta && out == made,
          "bf16_scan_rows N=%lld D=%lld: reading the scan changed it or its rounding", (long long)N, (long long)D);
  }
}

// few_search (an Index's search of a few queries in one call): the k nearest of each query
// exactly as float64 brute force orders them (value desc / distance asc, then id), with a zero
// row (never returned under cosine), duplicate rows (equal values: the smaller id first), a
// zero query under cosine (nothing), float32 or bf16 scan rows, and k past the valid rows
void check_few_search(int metric, bool bf16, int64_t Q, int64_t N, int64_t D, int64_t k) {
  std::vector<float> rows = randn(N * D, 61), q = randn(Q * D, 62);
  for (int64_t c = 0; c < D; ++c) rows[3 % N * D + c] = 0.0f;                     // a zero row
  if (N > 7)
    for (int64_t c = 0; c < D; ++c) rows[7 * D + c] = rows[5 * D + c];             // a duplicate
  if (Q > 1)
    for (int64_t c = 0; c < D; ++c) q[1 * D + c] = rows[5 * D + c];               // a query on it
  if (Q > 2 && metric == 0)
    for (int64_t c = 0; c < D; ++c) q[2 * D + c] = 0.0f;                          // a zero query
  std::vector<double> norms(N), qnorm(Q);
  double cmax = 0;
  for (int64_t r = 0; r < N; ++r) {
    double s = 0;
    for (int64_t c = 0; c < D; ++c) s += double(rows[r * D + c]) * rows[r * D + c];
    norms[r] = std::sqrt(s);
    cmax = std::max(cmax, norms[r]);
  }
  std::vector<float> qscan(Q * D), scale, bias;
  for (int64_t a = 0; a < Q; ++a) {
    double s = 0;
    for (int64_t c = 0; c < D; ++c) s += double(q[a * D + c]) * q[a * D + c];
    qnorm[a] = std::sqrt(s);
    for (int64_t c = 0; c < D; ++c) {
      const double x = metric == 0 ? q[a * D + c] / std::max(qnorm[a], 1e-300) : q[a * D + c];
      qscan[a * D + c] = bf16 ? from_bf16(embgeom::to_bf16(float(x))) : float(x);
    }
  }
  std::vector<uint16_t> rows16(N * D);
  for (int64_t i = 0; i < N * D; ++i) rows16[i] = embgeom::to_bf16(rows[i]);
  if (metric == 0) {
    scale.resize(N);
    for (int64_t r = 0; r < N; ++r) scale[r] = norms[r] > 0 ? float(1.0 / norms[r]) : 0.0f;
  }
  if (metric == 2) {
    bias.resize(N);
    for (int64_t r = 0; r < N; ++r) bias[r] = float(-0.5 * norms[r] * norms[r]);
  }
  // a margin well past the scan's error (bf16 rows: 2^-8 of each product; float32: gamma_D)
  std::vector<double> margin(Q);
  for (int64_t a = 0; a < Q; ++a) {
    const double qr = metric == 0 ? 1.0 : qnorm[a];
    margin[a] = (bf16 ? 0.02 : 1e-4) * qr * (metric == 0 ? 1.0 : cmax) * (metric == 2 ? cmax + 1 : 1.0) + 1e-30;
  }
  FewSearch f;
  f.Q = Q;
  f.D = D;
  f.N = N;
  f.qscan = qscan.data();
  if (bf16)
    f.rows_bf16 = rows16.data();
  else
    f.rows_f32 = rows.data();
  f.ldr = D;
  f.scale = metric == 0 ? scale.data() : nullptr;
  f.bias = metric == 2 ? bias.data() : nullptr;
  f.zero_rows = metric == 0 ? norms.data() : nullptr;
  f.kk = bf16 ? N : std::min(N, k + 4);
  f.k = k;
  f.margin = margin.data();
  f.widen = bf16 && metric != 2 ? 2.1 * std::ldexp(1.0, -8) : 0.0;
  f.rows = rows.data();
  f.qexact_f32 = q.data();
  f.qnorm = qnorm.data();
  f.metric = metric;
  std::vector<double> vals(Q * k, -7.0);
  std::vector<int64_t> ids(Q * k, -7);
  CHECK(few_search(f, vals.data(), ids.data()), "few_search metric %d bf16 %d N=%lld D=%lld: short with kk = %lld",
        metric, int(bf16), (long long)N, (long long)D, (long long)f.kk);
  for (int64_t a = 0; a < Q; ++a) {
    std::vector<std::pair<double, int64_t>> ref;  // (key: smaller is nearer, id)
    for (int64_t r = 0; r < N; ++r) {
      if (metric == 0 && (norms[r] == 0 || qnorm[a] == 0)) continue;
      long double s = 0;
      for (int64_t c = 0; c < D; ++c) {
        const long double x = rows[r * D + c], y = q[a * D + c];
        s += metric == 2 ? (x - y) * (x - y) : x * y;
      }
      const double v = metric == 2 ? std::sqrt(double(s)) : metric == 0 ? double(s) / (norms[r] * qnorm[a]) : double(s);
      ref.push_back({metric == 2 ? v : -v, r});
    }
    std::sort(ref.begin(), ref.end());
    for (int64_t t = 0; t < k; ++t) {
      const bool have = t < int64_t(ref.size());
      const int64_t want = have ? ref[t].second : -1;
      CHECK(ids[a * k + t] == want,
            "few_search metric %d bf16 %d N=%lld D=%lld query %lld rank %lld: id %lld, want %lld", metric,
            int(bf16), (long long)N, (long long)D, (long long)a, (long long)t, (long long)ids[a * k + t],
            (long long)want);
      const double wv = have ? (metric == 2 ? ref[t].first : -ref[t].first) : 0.0;
      CHECK(have ? std::fabs(vals[a * k + t] - wv) <= 1e-12 * (1 + std::fabs(wv)) : std::isnan(vals[a * k + t]),
            "few_search metric %d query %lld rank %lld: value %.17g, want %.17g", metric, (long long)a, (long long)t,
            vals[a * k + t], wv);
    }
  }
  // the query on row 5 (and its duplicate, row 7) scores exactly 1 under cosine (pair_cosines)
  if (metric == 0 && Q > 1 && N > 7 && k > 1)
    CHECK(ids[k] == 5 && ids[k + 1] == 7 && vals[k] == 1.0 && vals[k + 1] == 1.0,
          "few_search D=%lld: a query on a stored row scores %.17g, %.17g (ids %lld, %lld), not exactly 1",
          (long long)D, vals[k], vals[k + 1], (long long)ids[k], (long long)ids[k + 1]);
}

void embgeom_checks::check_kernels() {
  std::printf("rows dot %s, pair values %s, pair cosines %s, context argmax %s, row pair sums %s, attention sums %s, "
              "js pair sums %s\n", rows_dot_path(), pair_values_path(), pair_cosines_path(), context_argmax_path(),
              row_pair_sums_path(), attention_sums_path(), js_pair_sums_path());
  for (int64_t Q : {1, 3, 4})
    for (int64_t D : {1, 7, 16, 37}) {
      check_rows_dot<uint16_t>(Q, 19, D, D + (D % 3));
      check_rows_dot<float>(Q, 19, D, D + (D % 3));
    }
  check_rows_dot<uint16_t>(2, 0, 8, 8);
  check_rows_dot<float>(2, 0, 8, 8);
  // more rows than one cache block (and a block tail), five queries: two groups a block
  check_rows_dot<uint16_t>(5, 777, 384, 390);
  check_rows_dot<float>(5, 777, 384, 390);
  for (int metric : {0, 1, 2})
    for (bool bf16 : {false, true}) {
      check_few_search(metric, bf16, 4, 300, 37, 10);
      check_few_search(metric, bf16, 3, 9, 16, 12);  // k past the rows
      check_few_search(metric, bf16, 1, 1, 5, 3);
    }
  for (int64_t D : {1, 7, 384}) check_bf16_scan_rows(9, D);
  check_bf16_scan_rows(0, 5);
  for (int64_t D : {1, 3, 4, 13, 15, 16, 17, 64, 384}) {
    check_pair_values(D);
    check_pair_cosines(D);
  }
  for (int64_t D : {1, 7, 16, 17, 384}) check_dot_exact_batch(D);
  for (const char* name : {"avx512bf16", "amx"}) {
    const GemmKernel k = forced_fast_kernel(name);
    const bool here = k.bf16 && std::strncmp(k.name, name, std::strlen(name)) == 0;
    std::printf("bf16 product %s: %s\n", name, here ? k.name : "not at this level / on this CPU");
    if (!here) continue;
    for (int64_t D : {1, 2, 31, 32, 33, 384}) check_bf16_product(k, 33, 45, D);
    check_bf16_product(k, 1, 1, 5);
    check_bf16_product(k, 64, 64, 64);
  }
  for (int64_t D : {1, 5, 8, 33, 384}) check_row_pair_sums(7, D);
  for (int64_t D : {1, 3, 20, 37, 384}) check_row_moments(5, D);
  check_context_argmax(2, 3, 13, 7);
  check_context_argmax(1, 2, 37, 64);
  check_context_argmax(3, 1, 2, 5);
  check_value_histogram(2, 3, 11);
  check_value_histogram(1, 2, 1);
  check_attention_sums(2, 3, 13);
  check_attention_sums(1, 2, 40);
  check_js_pair_sums(3, 5, 11);
  check_js_pair_sums(4, 2, 33);
  for (int64_t T : {1, 2, 17, 128}) check_prefix_sums_below(5, T);
  check_prefix_sums_below(0, 4);
  check_entropy_masked(2, 3, 19, 0.0);
  check_entropy_masked(2, 2, 9, 0.01);
}
