#include "context.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "check.h"
#include "cpu/isa.h"
#include "cpu/simd.h"

namespace embgeom {
namespace {

constexpr int kRows = 4;   // query rows sharing one pass over the keys
constexpr int kCols = 16;  // keys a register block holds (kt's rows are padded to a multiple)

// Scores of kRows query rows against the keys of kt (d rows of ldk floats, key-major, zero
// beyond the n keys), into acc (kRows rows of ldk): a kRows x kCols block of accumulators stays
// in registers over all d. Vectors of W lanes (cpu/simd.h): 8 inside EMBGEOM_AVX2, else 4
// (SSE2/NEON). Plain arrays were kept in memory by GCC, each step waiting on a store.
template <int W>
__attribute__((always_inline)) inline void scores_body(const float* const* q, const float* kt, int64_t ldk,
                                                       int64_t d, float* acc) {
  using namespace simd;
  using f32 = typename Lanes<W>::f32;
  constexpr int V = kCols / W;
  for (int64_t c0 = 0; c0 < ldk; c0 += kCols) {
    f32 a[kRows][V] = {};
    for (int64_t k = 0; k < d; ++k) {
      f32 col[V];
      for (int v = 0; v < V; ++v) col[v] = load<f32>(kt + k * ldk + c0 + v * W);
      for (int r = 0; r < kRows; ++r) {
        const f32 x = splat<f32>(q[r][k]);
        for (int v = 0; v < V; ++v) a[r][v] += x * col[v];
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < V; ++v) store(acc + r * ldk + c0 + v * W, a[r][v]);
  }
}

using ScoresFn = void (*)(const float* const*, const float*, int64_t, int64_t, float*);

void scores_generic(const float* const* q, const float* kt, int64_t n, int64_t d, float* acc) {
  scores_body<4>(q, kt, n, d, acc);
}

#if EMBGEOM_X86
EMBGEOM_AVX2 void scores_avx2(const float* const* q, const float* kt, int64_t n, int64_t d, float* acc) {
  scores_body<8>(q, kt, n, d, acc);
}
#endif

ScoresFn pick_scores(const char** name) {
#if EMBGEOM_X86
  if (isa_level() >= Isa::avx2) {
    *name = "portable-avx2";
    return scores_avx2;
  }
#endif
  *name = EMBGEOM_NEON ? "portable-neon" : "portable-generic";
  return scores_generic;
}

// max of s[0, n), n a multiple of kCols: kCols running maxima (a select the compiler vectorises;
// one running maximum is a chain of dependent compares)
float block_max(const float* s, int64_t n) {
  float m[kCols];
  for (int l = 0; l < kCols; ++l) m[l] = s[l];
  for (int64_t c = kCols; c < n; c += kCols)
    for (int l = 0; l < kCols; ++l) m[l] = s[c + l] > m[l] ? s[c + l] : m[l];
  float top = m[0];
  for (int l = 1; l < kCols; ++l) top = m[l] > top ? m[l] : top;
  return top;
}

// float64 dot product of float32 rows, four partial sums (a single sum waits on each add)
double dot64(const float* a, const float* b, int64_t d) {
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= d; k += 4)
    for (int l = 0; l < 4; ++l) s[l] += double(a[k + l]) * double(b[k + l]);
  for (; k < d; ++k) s[0] += double(a[k]) * double(b[k]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

}  // namespace

const char* context_argmax_path() {
  const char* name = "";
  pick_scores(&name);
  return name;
}

void context_argmax(const float* o, int64_t B, int64_t H, int64_t T, int64_t d, int64_t sb, int64_t sh,
                    int64_t st, const uint8_t* mask, int64_t* out) {
  EMBGEOM_CHECK(B >= 0 && H >= 0 && T >= 0 && d >= 0, "context_argmax: bad shape");
  const char* name = "";
  const ScoresFn scores = pick_scores(&name);
  // |fl(a . b) - a . b| <= gamma_d |a| |b| for a float32 dot product of length d (any order)
  const double u = std::ldexp(1.0, -24);
  const double gamma = double(d) * u / (1.0 - double(d) * u);
#pragma omp parallel
  {
    std::vector<int64_t> pos;
    std::vector<float> kt, acc;
    std::vector<int32_t> cand;
    std::vector<double> qnorm;
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const float* ob = o + b * sb + h * sh;  // row t at ob + t * st
        int64_t* dst = out + (b * H + h) * T;
        for (int64_t t = 0; t < T; ++t) dst[t] = t;  // rows without an answer point at themselves
        pos.clear();
        for (int64_t t = 0; t < T; ++t)
          if (!mask || mask[b * T + t]) pos.push_back(t);
        const int64_t n = static_cast<int64_t>(pos.size());
        if (n < 2) continue;
        const int64_t ldk = (n + kCols - 1) / kCols * kCols;
        kt.assign(d * ldk, 0.0f);
        qnorm.resize(n);
        double kmax = 0.0;
        for (int64_t c = 0; c < n; ++c) {
          const float* row = ob + pos[c] * st;
          for (int64_t k = 0; k < d; ++k) kt[k * ldk + c] = row[k];
          qnorm[c] = std::sqrt(dot64(row, row, d));
          kmax = std::max(kmax, qnorm[c]);
        }
        acc.resize(kRows * ldk);
        cand.resize(ldk);
        for (int64_t c0 = 0; c0 < n; c0 += kRows) {
          const float* q[kRows];
          for (int r = 0; r < kRows; ++r) q[r] = ob + pos[std::min(n - 1, c0 + r)] * st;
          scores(q, kt.data(), ldk, d, acc.data());
          for (int r = 0; r < kRows && c0 + r < n; ++r) {
            const int64_t self = c0 + r;
            float* s = acc.data() + r * ldk;
            s[self] = -std::numeric_limits<float>::infinity();
            for (int64_t c = n; c < ldk; ++c) s[c] = -std::numeric_limits<float>::infinity();
            const float top = block_max(s, ldk);
            // keys whose exact product may reach the row's maximum (a float bound rounded
            // down), then rescored in float64
            const double reach = double(top) - 2.02 * gamma * qnorm[self] * kmax;
            float reach_f = static_cast<float>(reach);
            if (double(reach_f) > reach) reach_f = std::nextafter(reach_f, -std::numeric_limits<float>::infinity());
            int64_t nc = 0;
            for (int64_t c = 0; c < ldk; ++c)
              if (s[c] >= reach_f) cand[nc++] = static_cast<int32_t>(c);  // rare: predicted
            int64_t best = -1;
            double best_v = -std::numeric_limits<double>::infinity();
            for (int64_t t = 0; t < nc; ++t) {
              const int64_t c = cand[t];
              const double v = dot64(q[r], ob + pos[c] * st, d);
              if (v > best_v) {  // strictly: the smaller position keeps a tie
                best_v = v;
                best = c;
              }
            }
            dst[pos[self]] = pos[best];
          }
        }
      }
    }
  }
}

}  // namespace embgeom
