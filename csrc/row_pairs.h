#pragma once
#include <cstdint>

namespace embgeom {

// Float64 sums over the rows of two float32 (N, D) matrices a and b (rows at a + r * lda and
// b + r * ldb, D contiguous): out (N, 4) = |a_r|^2, |b_r|^2, |a_r - b_r|^2 and a_r . b_r. Every
// product of two floats is exact in float64 and the difference is taken of the float64 values,
// so |a - b| keeps its digits where a and b nearly coincide (the layer-to-layer steps of
// `embgeom text`, docs/metrics.md, evolution).
void row_pair_sums(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t N, int64_t D, double* out);

// The loop row_pair_sums takes at the current vector level (cpu/isa.h).
const char* row_pair_sums_path();

// Float64 mean and central moments of each row of x (N, D) float32 (rows at x + r * ldx, D
// contiguous): out (N, 4) = mean, m2, m3, m4, with m_k = sum_i (x_i - mean)^k / D; two passes
// over the row (the mean first, then the deviations from it), float64 throughout (the K^2
// Gaussianity test of `embgeom text --gaussianity`, docs/metrics.md).
void row_moments(const float* x, int64_t ldx, int64_t N, int64_t D, double* out);

}  // namespace embgeom
