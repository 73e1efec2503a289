#pragma once
#include <cstdint>

namespace embgeom {

// The scan of an index for a few queries: out (Q, N) float32, out[q * N + r] = sum_k q[q][k] *
// rows[r][k], float32 sums of exact products (any order; the index's scan margin bounds the
// rounding, docs/metrics.md, prepared index). q: Q x D row-major float32; rows: N rows of D
// contiguous values at rows + r * ldr. A few queries are bound by memory: the rows are read once
// in blocks that stay in cache while every query passes over them, on the core's own threads
// (numpy's BLAS threads and this core's OpenMP pool spinning on the same two cores made a
// one-query search 2x slower).
//   rows_dot_f32:  float32 rows (a float32 index).
//   rows_dot_bf16: bf16 rows (the upper halves of float32 bit patterns; a bf16 index on a CPU
//                  without bf16 dot instructions): they widen exactly to float32, half the bytes.
void rows_dot_f32(const float* q, int64_t Q, const float* rows, int64_t ldr, int64_t N, int64_t D, float* out);
void rows_dot_bf16(const float* q, int64_t Q, const uint16_t* rows, int64_t ldr, int64_t N, int64_t D,
                   float* out);

// The scan rows of a bf16 index (its own half-size copy of the corpus). fill: out[r * ldo + k] =
// bf16(float32(rows[r][k] * scale[r])), the float64 product rounded to float32 and then to bf16,
// both to nearest even (torch's conversion of float64 values to bfloat16); scale null:
// bf16(rows[r][k]); not fill: out holds the scan already (a loaded index) and is only read.
// Returns the largest float64 norm over rows of out[r] - rows[r] / norm[r] (norm null: out[r] -
// rows[r]), the scan's rounding that the index's margins take; a norm of 0 counts as 1e-300.
// Rows must be finite and their scaled values within float32's range.
double bf16_scan_rows(const float* rows, int64_t ldr, int64_t N, int64_t D, const double* scale,
                      const double* norm, uint16_t* out, int64_t ldo, bool fill);

// The k largest values of each of Q rows of scores (Q x N, row-major) and their columns, largest
// first, equal values by column (an index's scan of a few queries: one pass a row, an 8-wide
// test against the running k-th best before any insertion). NaN counts as -inf. Rows with fewer
// than k values: vals padded with -inf, idx with -1.
void scores_topk(const float* scores, int64_t Q, int64_t N, int64_t k, float* vals, int64_t* idx);

// The loop both take at the current vector level (cpu/isa.h).
const char* rows_dot_path();

}  // namespace embgeom
