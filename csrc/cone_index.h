#pragma once
#include <cstdint>

namespace embgeom {

// For each of the G * B sets (g, b) (row t of set (g, b) at x + g * sg + b * sb + t * st, its D
// floats contiguous; mask: B x T bytes shared by the G groups, or nullptr = all valid),
// accumulate the sum of unit vectors x_i/||x_i|| over valid, non-zero rows into
// unit_sum (G * B x D, double, overwritten) and count them in n_used (G * B). Zero-norm valid rows
// are counted in n_zero. The cone index is ||unit_sum[s]||; returning the sum (not the norm)
// lets callers stream a huge set in chunks and add the partial sums. The strides let
// `embgeom text` read a layer's head outputs (B, T, H, d) in place as G = H groups.
void cone_unit_sums(const float* x, int64_t G, int64_t B, int64_t T, int64_t D, int64_t sg, int64_t sb, int64_t st,
                    const uint8_t* mask, double* unit_sum, int64_t* n_used, int64_t* n_zero);

// The per-row loop cone_unit_sums uses at the current vector level (cpu/isa.h).
const char* cone_index_path();

}  // namespace embgeom
