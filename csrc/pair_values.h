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

// Exact cosines of the same pairs: out[p] = s_qc / sqrt(s_qq * s_cc), clamped to [-1, 1], with all
// three sums (q . row, q . q, row . row) in pair_values' fixed order in one pass; NaN for a zero
// row, 0 for a zero query. A row and a query of the same values (a stored row searched for)
// give three equal sums, and sqrt(s * s) = s in binary floating point: exactly 1, where the
// product of the two norms, each rounded on its own, gave 1 - 2^-52 about a quarter of the time.
// The denominator is symmetric, so (i, j) and (j, i) give the same value. q's squared sum must
// not underflow: the caller scales a float64 query set by powers of two (exact, cosine unchanged).
void pair_cosines(const float* rows, const double* q, int64_t D, const int64_t* qi, const int64_t* ci,
                  int64_t P, double* out);
void pair_cosines(const float* rows, const float* q, int64_t D, const int64_t* qi, const int64_t* ci,
                  int64_t P, double* out);
// float64 rows (a float64 point cloud's exact neighbour graph): the same order, every product
// rounded once; the rows' squared sums must neither overflow nor underflow (the caller scales
// each row by a power of two). A pair's value depends on its two rows alone, so identical rows
// tie exactly wherever they sit (a matrix product's blocking had set them an ulp apart).
void pair_cosines(const double* rows, const double* q, int64_t D, const int64_t* qi, const int64_t* ci,
                  int64_t P, double* out);

// The builds the float32 dot products and cosines take at the current vector level (cpu/isa.h).
const char* pair_values_path();
const char* pair_cosines_path();

}  // namespace embgeom
