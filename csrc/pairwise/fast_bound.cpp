// Fast mode's error bound (docs/metrics.md, precision modes): the rounding norms of the rows'
// bf16 copies that numerics::fast_error_bound takes.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/gemm.h"
#include "pairwise/engine.h"

namespace embgeom {

// Max over rows of |row|, |bf16(row)| and |bf16(row) - row| (float64). bf16 inputs the
// dot-product instruction treats as zero (denormals) count as rounded to zero.
RoundingNorms bf16_rounding_norms(const float* r, int64_t rows, int64_t d, int threads) {
  double full = 0, bf = 0, delta = 0;
#pragma omp parallel for schedule(static) num_threads(std::max(1, threads)) reduction(max : full, bf, delta)
  for (int64_t q = 0; q < rows; ++q) {
    double s = 0, sb = 0, sd = 0;
    for (int64_t k = 0; k < d; ++k) {
      const float v = r[q * d + k];
      uint32_t u = uint32_t(to_bf16(v)) << 16;
      if ((u & 0x7f800000u) == 0) u = 0;  // DAZ
      float vb;
      std::memcpy(&vb, &u, 4);
      s += double(v) * v;
      sb += double(vb) * vb;
      sd += (double(vb) - v) * (double(vb) - v);
    }
    full = std::max(full, std::sqrt(s));
    bf = std::max(bf, std::sqrt(sb));
    delta = std::max(delta, std::sqrt(sd));
  }
  RoundingNorms n;
  n.full = full;
  n.rounded = bf;
  n.delta = delta;
  return n;
}

}  // namespace embgeom
