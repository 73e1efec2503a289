#include "cone_index.h"

#include <cmath>
#include <vector>

#include "check.h"

namespace embgeom {

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
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t w = 0; w < work; ++w) {
    const int64_t b = w / chunks_per_set;
    const int64_t t0 = (w % chunks_per_set) * chunk;
    const int64_t t1 = std::min(T, t0 + chunk);
    double* acc = partial.data() + w * D;
    for (int64_t t = t0; t < t1; ++t) {
      if (mask && !mask[b * T + t]) continue;
      const float* row = x + (b * T + t) * D;
      double sq = 0.0;
      for (int64_t k = 0; k < D; ++k) sq += double(row[k]) * double(row[k]);
      if (sq == 0.0) {
        ++zero[w];
        continue;
      }
      const double inv = 1.0 / std::sqrt(sq);
      for (int64_t k = 0; k < D; ++k) acc[k] += double(row[k]) * inv;
      ++used[w];
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
