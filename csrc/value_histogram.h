#pragma once
#include <cstdint>

namespace embgeom {

// The geometry-of-BERT code's value histogram of attention maps (pandas.cut into kValueBins
// equal-width bins; docs/metrics.md, attention heads): for each map (b, h) of p (B, H, T, T)
// float32, over its real entries (mask (B, T) bytes: query and key real), lo / hi = their min /
// max (widened to take 0 when widen_to_zero: the map zero-padded), inner edges
// lo + b (hi - lo) / kValueBins in float64 rounded down to float32, the last edge hi; a value's
// bin is the number of edges below it (right-closed bins, the min in bin 0). counts (B, H,
// kValueBins): all zero for a map whose lo == hi; zero_bin (B, H): the bin of 0 (the padding's),
// -1 for a map whose real entries hold NaN or inf (its counts all zero).
constexpr int kValueBins = 20;
void value_histogram(const float* p, int64_t B, int64_t H, int64_t T, const uint8_t* mask, bool widen_to_zero,
                     int64_t* counts, int64_t* zero_bin);

}  // namespace embgeom
