#pragma once
#include <cstdint>

namespace embgeom {

// For each of the B sets (x: B x T x D row-major, mask: B x T bytes or nullptr = all valid),
// accumulate the sum of unit vectors x_i/||x_i|| over valid, non-zero rows into
// unit_sum (B x D, double, overwritten) and count them in n_used (B). Zero-norm valid rows are
// counted in n_zero (B). The cone index is ||unit_sum[b]||; returning the sum (not the norm)
// lets callers stream a huge set in chunks and add the partial sums.
void cone_unit_sums(const float* x, int64_t B, int64_t T, int64_t D, const uint8_t* mask,
                    double* unit_sum, int64_t* n_used, int64_t* n_zero);

// The per-row loop cone_unit_sums uses at the current vector level (cpu/isa.h).
const char* cone_index_path();

}  // namespace embgeom
