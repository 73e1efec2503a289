#pragma once
#include <cstdint>

namespace embgeom {

// The scan of a bf16 index for a few queries on a CPU without bf16 dot instructions: out (Q, N)
// float32, out[q * N + r] = sum_k q[q][k] * float(rows[r][k]). The bf16 rows (the upper halves
// of float32 bit patterns) widen exactly to float32 and each product is exact in the FMA, so the
// only rounding is the float32 accumulation (any order; the index's scan margin bounds it,
// docs/metrics.md, prepared index). Reads each row once for all queries: half the bytes of the
// float32 rows, the memory-bound part of a one-query search. q: Q x D row-major float32; rows:
// N rows of D contiguous bf16 at rows + r * ldr.
void rows_dot_bf16(const float* q, int64_t Q, const uint16_t* rows, int64_t ldr, int64_t N, int64_t D,
                   float* out);

// The loop rows_dot_bf16 takes at the current vector level (cpu/isa.h).
const char* rows_dot_bf16_path();

}  // namespace embgeom
