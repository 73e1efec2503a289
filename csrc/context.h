#pragma once
#include <cstdint>

namespace embgeom {

// Context similarity's argmax (docs/metrics.md, context similarity): o (B, H, T, d) float32,
// the heads' outputs O, row (b, h, t) at o + b * sb + h * sh + t * st (floats; d contiguous:
// a hook's (B, T, H, d) tensor is read in place); mask (B, T) bytes (1 = real token). For every real query i of
// a sequence with >= 2 real tokens, out[b, h, i] = the real j != i maximising o_i . o_j, ties to
// the smaller j, decided in float64: the products are computed in float32 and every key within
// the float32 error bound of the row's maximum is rescored in float64. Other rows get i.
void context_argmax(const float* o, int64_t B, int64_t H, int64_t T, int64_t d, int64_t sb, int64_t sh,
                    int64_t st, const uint8_t* mask, int64_t* out);

// The product loop context_argmax uses at the current vector level (cpu/isa.h).
const char* context_argmax_path();

}  // namespace embgeom
