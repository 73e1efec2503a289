#pragma once
#include <cstdint>

namespace embgeom {

// Exact pair values for an index's rescoring: for p < P, out[p] = sum_d rows[ci[p]][d] * q[qi[p]][d]
// (sqdist: sum_d (rows[ci[p]][d] - q[qi[p]][d])^2), float32 rows widened to double, double
// queries, accumulated in double in one fixed order (four running sums over d mod 4, then
// (s0 + s1) + (s2 + s3)): a pair's value never depends on the batch or thread it came in.
// rows: N x D row-major; q: Q x D row-major, double or float (widened exactly: the same sums);
// indices must be in range (checked by the caller).
void pair_values(const float* rows, const double* q, int64_t D, const int64_t* qi, const int64_t* ci,
                 int64_t P, bool sqdist, double* out);
void pair_values(const float* rows, const float* q, int64_t D, const int64_t* qi, const int64_t* ci,
                 int64_t P, bool sqdist, double* out);

}  // namespace embgeom
