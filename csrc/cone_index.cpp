#include "cone_index.h"

#include <cmath>
#include <vector>

#include "check.h"
#include "cpu/isa.h"

namespace embgeom {
namespace {

// A chunk of one set's rows [t0, t1) (row t at rows + t * st; mask: the set's T bytes or
// nullptr): each valid row's squared norm in float64 over 8 interleaved partial sums (a fixed
// order, so the result does not depend on the vector level), then acc += row / |row| for the
// non-zero ones. The norms of the whole chunk come first, so that one row's sqrt and division
// are not on the way of the next row's sums: a layer's head outputs (rows of 32) took 88 ns a row
// row by row, most of it waiting on them. Plain loops the compiler vectorises per target
// (baseline SSE2/NEON, AVX2+FMA); the same operations in the same order as row by row.
constexpr int64_t kChunk = 512;

__attribute__((always_inline)) inline void add_unit_rows_body(const float* rows, int64_t st, int64_t t0, int64_t t1,
                                                              const uint8_t* mask, int64_t D, double* acc,
                                                              int64_t* used, int64_t* zero) {
  constexpr int W = 8;
  double inv[kChunk];
  for (int64_t t = t0; t < t1; ++t) {
    inv[t - t0] = -1.0;  // (a padded row)
    if (mask && !mask[t]) continue;
    const float* row = rows + t * st;
    double part[W] = {};
    int64_t k = 0;
    for (; k + W <= D; k += W)
      for (int l = 0; l < W; ++l) part[l] += double(row[k + l]) * double(row[k + l]);
    for (; k < D; ++k) part[0] += double(row[k]) * double(row[k]);
    double sq = 0.0;
    for (int l = 0; l < W; ++l) sq += part[l];
    inv[t - t0] = sq == 0.0 ? 0.0 : 1.0 / std::sqrt(sq);
  }
  for (int64_t t = t0; t < t1; ++t) {
    const double f = inv[t - t0];
    if (f == 0.0) {
      ++*zero;
    } else if (!(f < 0.0)) {  // (a row holding NaN is used, as row by row: its NaN reaches the sum)
      const float* row = rows + t * st;
      for (int64_t q = 0; q < D; ++q) acc[q] += double(row[q]) * f;
      ++*used;
    }
  }
}

using AddUnitRowsFn = void (*)(const float*, int64_t, int64_t, int64_t, const uint8_t*, int64_t, double*, int64_t*,
                               int64_t*);

void add_unit_rows_generic(const float* rows, int64_t st, int64_t t0, int64_t t1, const uint8_t* mask, int64_t D,
                           double* acc, int64_t* used, int64_t* zero) {
  add_unit_rows_body(rows, st, t0, t1, mask, D, acc, used, zero);
}
EMBGEOM_AVX2 void add_unit_rows_avx2(const float* rows, int64_t st, int64_t t0, int64_t t1, const uint8_t* mask,
                                     int64_t D, double* acc, int64_t* used, int64_t* zero) {
  add_unit_rows_body(rows, st, t0, t1, mask, D, acc, used, zero);
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
  for (int64_t b = 0; b < sets; ++b) {
    n_used[b] = 0;
    n_zero[b] = 0;
    for (int64_t k = 0; k < D; ++k) unit_sum[b * D + k] = 0.0;
  }
  // Parallel over (set, row chunk) so one huge set (B = 1) still uses every core; per-chunk
  // partial sums are added in chunk order, so the result does not depend on the thread count.
  const int64_t chunk = kChunk;
  const int64_t chunks_per_set = (T + chunk - 1) / chunk;
  const int64_t work = sets * chunks_per_set;
  std::vector<double> partial(static_cast<size_t>(work) * D, 0.0);
  std::vector<int64_t> used(work, 0), zero(work, 0);
  const char* name = "";
  const AddUnitRowsFn add_unit_rows = pick_add_unit_rows(&name);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t w = 0; w < work; ++w) {
    const int64_t set = w / chunks_per_set, g = set / std::max<int64_t>(B, 1), b = set % std::max<int64_t>(B, 1);
    const int64_t t0 = (w % chunks_per_set) * chunk;
    const int64_t t1 = std::min(T, t0 + chunk);
    add_unit_rows(x + g * sg + b * sb, st, t0, t1, mask ? mask + b * T : nullptr, D, partial.data() + w * D,
                  &used[w], &zero[w]);
  }
  for (int64_t w = 0; w < work; ++w) {
    const int64_t set = w / chunks_per_set;
    for (int64_t k = 0; k < D; ++k) unit_sum[set * D + k] += partial[w * D + k];
    n_used[set] += used[w];
    n_zero[set] += zero[w];
  }
}

}  // namespace embgeom
