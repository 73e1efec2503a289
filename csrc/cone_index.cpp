#include "cone_index.h"

#include <cmath>
#include <vector>

#include "check.h"
#include "cpu/isa.h"

namespace embgeom {
namespace {

// One row: its squared norm in float64 over 8 interleaved partial sums (a fixed order, so the
// result does not depend on the vector level), then acc += row / |row|. Plain loops the
// compiler vectorises per target (baseline SSE2/NEON, AVX2+FMA).
__attribute__((always_inline)) inline bool add_unit_row_body(const float* row, int64_t D, double* acc) {
  constexpr int W = 8;
  double part[W] = {};
  int64_t k = 0;
  for (; k + W <= D; k += W)
    for (int l = 0; l < W; ++l) part[l] += double(row[k + l]) * double(row[k + l]);
  for (; k < D; ++k) part[0] += double(row[k]) * double(row[k]);
  double sq = 0.0;
  for (int l = 0; l < W; ++l) sq += part[l];
  if (sq == 0.0) return false;
  const double inv = 1.0 / std::sqrt(sq);
  for (int64_t q = 0; q < D; ++q) acc[q] += double(row[q]) * inv;
  return true;
}

bool add_unit_row_generic(const float* row, int64_t D, double* acc) { return add_unit_row_body(row, D, acc); }
EMBGEOM_AVX2 bool add_unit_row_avx2(const float* row, int64_t D, double* acc) {
  return add_unit_row_body(row, D, acc);
}

using AddUnitRowFn = bool (*)(const float*, int64_t, double*);

AddUnitRowFn pick_add_unit_row(const char** name) {
  return pick_avx2_or_generic<AddUnitRowFn>(add_unit_row_generic, add_unit_row_avx2, "portable-avx2", name);
}

}  // namespace

const char* cone_index_path() { return picked_name(pick_add_unit_row); }

void cone_unit_sums(const float* x, int64_t B, int64_t T, int64_t D, const uint8_t* mask,
                    double* unit_sum, int64_t* n_used, int64_t* n_zero) {
  EMBGEOM_CHECK(B >= 0 && T >= 0 && D >= 1, "cone_unit_sums: bad shape (" << B << ", " << T << ", " << D << ")");
  for (int64_t b = 0; b < B; ++b) {
    n_used[b] = 0;
    n_zero[b] = 0;
    for (int64_t k = 0; k < D; ++k) unit_sum[b * D + k] = 0.0;
  }
  // Parallel over (set, row chunk) so one huge set (B = 1) still uses every core; per-chunk
  // partial sums are added in chunk order, so the result does not depend on the thread count.
  const int64_t chunk = 512;
  const int64_t chunks_per_set = (T + chunk - 1) / chunk;
  const int64_t work = B * chunks_per_set;
  std::vector<double> partial(static_cast<size_t>(work) * D, 0.0);
  std::vector<int64_t> used(work, 0), zero(work, 0);
  const char* name = "";
  const AddUnitRowFn add_unit_row = pick_add_unit_row(&name);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t w = 0; w < work; ++w) {
    const int64_t b = w / chunks_per_set;
    const int64_t t0 = (w % chunks_per_set) * chunk;
    const int64_t t1 = std::min(T, t0 + chunk);
    double* acc = partial.data() + w * D;
    for (int64_t t = t0; t < t1; ++t) {
      if (mask && !mask[b * T + t]) continue;
      if (add_unit_row(x + (b * T + t) * D, D, acc))
        ++used[w];
      else
        ++zero[w];
    }
  }
  for (int64_t w = 0; w < work; ++w) {
    const int64_t b = w / chunks_per_set;
    for (int64_t k = 0; k < D; ++k) unit_sum[b * D + k] += partial[w * D + k];
    n_used[b] += used[w];
    n_zero[b] += zero[w];
  }
}

}  // namespace embgeom
