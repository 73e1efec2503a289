#include "cone_index.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "check.h"
#include "cpu/isa.h"

namespace embgeom {
namespace {

// A chunk of rows [t0, t1) of the G groups of one b (row t of group g at rows + g * sg + t * st;
// mask: the set's T bytes or nullptr): each valid row's squared norm in float64 over 8
// interleaved partial sums (a fixed order; the AVX2 build fuses the multiply-adds, so its sums
// may differ from the portable build's in the last bits), then acc[g] += row / |row| for the
// non-zero ones, used[g] / zero[g] counted. The norms of the whole chunk come first, so that
// one row's sqrt and division are not on the way of the next row's sums (a layer's head
// outputs, rows of 32, took 88 ns a row row by row, most of it waiting on them). The groups are walked token by token: a layer's head outputs (B, T, H, d)
// are then read in address order (a head at a time read 128 of every 1,536 bytes: twice the
// time). Each set's rows are added in row order whatever the grouping. Plain loops the compiler
// vectorises per target (baseline SSE2/NEON, AVX2+FMA).
constexpr int64_t kChunk = 512;

__attribute__((always_inline)) inline void add_unit_rows_body(const float* rows, int64_t G, int64_t sg, int64_t st,
                                                              int64_t t0, int64_t t1, const uint8_t* mask,
                                                              int64_t D, double* inv, double* acc, int64_t* used,
                                                              int64_t* zero) {
  constexpr int W = 8;
  constexpr double kPadded = -1.0, kZero = -2.0;  // inv's marks for rows that add nothing
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t g = 0; g < G; ++g) {
      double& f = inv[(t - t0) * G + g];
      f = kPadded;
      if (mask && !mask[t]) continue;
      const float* row = rows + g * sg + t * st;
      double part[W] = {};
      int64_t k = 0;
      for (; k + W <= D; k += W)
        for (int l = 0; l < W; ++l) part[l] += double(row[k + l]) * double(row[k + l]);
      for (; k < D; ++k) part[0] += double(row[k]) * double(row[k]);
      double sq = 0.0;
      for (int l = 0; l < W; ++l) sq += part[l];
      f = sq == 0.0 ? kZero : 1.0 / std::sqrt(sq);  // (a row holding inf: 0, used as torch's x / |x|)
    }
  }
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t g = 0; g < G; ++g) {
      const double f = inv[(t - t0) * G + g];
      if (f == kZero) {
        ++zero[g];
      } else if (f != kPadded) {  // (a row holding NaN is used too: its NaN reaches the sum)
        const float* row = rows + g * sg + t * st;
        double* a = acc + g * D;
        for (int64_t q = 0; q < D; ++q) a[q] += double(row[q]) * f;
        ++used[g];
      }
    }
  }
}

using AddUnitRowsFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, const uint8_t*, int64_t,
                               double*, double*, int64_t*, int64_t*);

void add_unit_rows_generic(const float* rows, int64_t G, int64_t sg, int64_t st, int64_t t0, int64_t t1,
                           const uint8_t* mask, int64_t D, double* inv, double* acc, int64_t* used, int64_t* zero) {
  add_unit_rows_body(rows, G, sg, st, t0, t1, mask, D, inv, acc, used, zero);
}
EMBGEOM_AVX2 void add_unit_rows_avx2(const float* rows, int64_t G, int64_t sg, int64_t st, int64_t t0, int64_t t1,
                                     const uint8_t* mask, int64_t D, double* inv, double* acc, int64_t* used,
                                     int64_t* zero) {
  add_unit_rows_body(rows, G, sg, st, t0, t1, mask, D, inv, acc, used, zero);
}

AddUnitRowsFn pick_add_unit_rows(const char** name) {
  return pick_avx2_or_generic<AddUnitRowsFn>(add_unit_rows_generic, add_unit_rows_avx2, "portable-avx2", name);
}

}  // namespace

const char* cone_index_path() { return picked_name(pick_add_unit_rows); }

void cone_unit_sums(const float* x, int64_t G, int64_t B, int64_t T, int64_t D, int64_t sg, int64_t sb, int64_t st,
                    const uint8_t* mask, double* unit_sum, int64_t* n_used, int64_t* n_zero) {
  EMBGEOM_CHECK(G >= 0 && B >= 0 && T >= 0 && D >= 1,
                "cone_unit_sums: bad shape (" << G << ", " << B << ", " << T << ", " << D << ")");
  const int64_t sets = G * B;
  for (int64_t s = 0; s < sets; ++s) {
    n_used[s] = 0;
    n_zero[s] = 0;
    for (int64_t k = 0; k < D; ++k) unit_sum[s * D + k] = 0.0;
  }
  if (sets == 0 || T == 0) return;
  // Parallel over (b, row chunk, block of groups) so one huge set (B = 1) still uses every core;
  // per-chunk partial sums are added in chunk order, so the result does not depend on the thread
  // count. A block holds every group unless that leaves too few items to share out.
  const int64_t chunk = kChunk;
  const int64_t chunks_per_set = (T + chunk - 1) / chunk;
  const int64_t gblock = B * chunks_per_set >= 16 ? G : 1;
  const int64_t gblocks = (G + gblock - 1) / gblock;
  const int64_t work = B * chunks_per_set * gblocks;
  // per item: gblock groups' sums and counts, each item's in its own cache lines (counts of
  // neighbouring items written row by row by two threads had shared a line)
  const int64_t stride = (gblock * D + 7) / 8 * 8, cstride = (2 * gblock + 7) / 8 * 8;
  std::vector<double> partial(static_cast<size_t>(work * stride), 0.0);
  std::vector<int64_t> counts(static_cast<size_t>(work * cstride), 0);
  const char* name = "";
  const AddUnitRowsFn add_unit_rows = pick_add_unit_rows(&name);
#pragma omp parallel
  {
    std::vector<double> inv(static_cast<size_t>(gblock * chunk));
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t gb = w % gblocks, c = (w / gblocks) % chunks_per_set, b = w / gblocks / chunks_per_set;
      const int64_t g0 = gb * gblock, ng = std::min(G, g0 + gblock) - g0;
      const int64_t t0 = c * chunk, t1 = std::min(T, t0 + chunk);
      int64_t* cnt = counts.data() + w * cstride;
      add_unit_rows(x + g0 * sg + b * sb, ng, sg, st, t0, t1, mask ? mask + b * T : nullptr, D, inv.data(),
                    partial.data() + w * stride, cnt, cnt + gblock);
    }
  }
  for (int64_t w = 0; w < work; ++w) {  // (b, chunk) ascending: each set's chunks in order
    const int64_t gb = w % gblocks, b = w / gblocks / chunks_per_set;
    const int64_t g0 = gb * gblock, ng = std::min(G, g0 + gblock) - g0;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t set = (g0 + g) * B + b;
      const double* p = partial.data() + w * stride + g * D;
      for (int64_t k = 0; k < D; ++k) unit_sum[set * D + k] += p[k];
      n_used[set] += counts[size_t(w * cstride + g)];
      n_zero[set] += counts[size_t(w * cstride + gblock + g)];
    }
  }
}

}  // namespace embgeom
