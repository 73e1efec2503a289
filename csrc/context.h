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

// Context similarity's sums over one layer's argmax j (B, H, T) (context_argmax's output) for the
// queries i that are real in a text with >= 2 real tokens (mask (B, T) bytes): counts (6, H) of
// [rows, sum |j - i|, hits on sep, hits on a token with i's id, hits in i's sentence, hits on
// stop], hist (H, T) counts of |j - i|, and focus (B, H) the position with the most hits (ties
// to the smaller; 0 in a text without such queries). sentence (B, T) and stop (B, T) may be
// nullptr: their counts stay 0. One pass over j where torch's version took 15 ops a layer
// (2.5 ms of a 32 x 128 batch's layer).
void context_summaries(const int64_t* j, int64_t B, int64_t H, int64_t T, const uint8_t* mask, const uint8_t* sep,
                       const int64_t* ids, const int64_t* sentence, const uint8_t* stop, int64_t* counts,
                       int64_t* hist, int64_t* focus);

// The product loop context_argmax uses at the current vector level (cpu/isa.h).
const char* context_argmax_path();

}  // namespace embgeom
