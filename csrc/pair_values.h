#pragma once
#include <cstdint>

namespace embgeom {

// Exact pair values for an index's rescoring: for p < P, out[p] = sum_d rows[ci[p]][d] * q[qi[p]][d]
// (sqdist: sum_d (rows[ci[p]][d] - q[qi[p]][d])^2), float32 rows widened to double, double
// queries, accumulated in double in one fixed order (sixteen running sums over d mod 16, then
// halves added pairwise: (s_l + s_l+8), then + the term 4 on, then 2 on, then the two): a
// pair's value never depends on the batch or thread it came in, nor (float32 queries, dot) on
// the vector level.
// rows: N x D row-major; q: Q x D row-major, double or float (widened exactly: the same sums);
// indices must be in range (checked by the caller).
void pair_values(const float* rows, const double* q, int64_t D, const int64_t* qi, const int64_t* ci,
                 int64_t P, bool sqdist, double* out);
void pair_values(const float* rows, const float* q, int64_t D, const int64_t* qi, const int64_t* ci,
                 int64_t P, bool sqdist, double* out);

// The build the float32 dot products take at the current vector level (cpu/isa.h).
const char* pair_values_path();

}  // namespace embgeom
