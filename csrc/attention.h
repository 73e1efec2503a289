#pragma once
#include <cstdint>

namespace embgeom {

// Row entropy of attention probabilities p: (B, H, T, T) row-major, rows = queries.
// mask: (B, T) bytes (1 = real token) or nullptr. Keys outside the mask are ignored; query rows
// outside the mask get NaN. With smoothing e > 0 each valid row becomes (1-e) p + e/n_valid.
// out: (B, H, T) float, H = -sum p ln p in nats (0 ln 0 = 0).
void attention_row_entropy(const float* p, int64_t B, int64_t H, int64_t T, const uint8_t* mask,
                           double smoothing, float* out);

// The row-entropy loop attention_row_entropy uses at the current vector level (cpu/isa.h).
const char* attention_entropy_path();

// One row's entropy -sum v ln v, v = keep * row[k] + uniform over the keys with weight[k] != 0
// (weight: T floats 0/1, nullptr: every key), float32 terms summed in float64; the loop
// attention_row_entropy calls per row (attention_sums calls it too, on the row it reads).
using RowEntropyFn = double (*)(const float* row, const float* weight, int64_t T, float keep, float uniform);
RowEntropyFn pick_row_entropy(const char** name);

// Clark's head distance: P (K, R, T) float32, each head's R smoothed rows (> 0; padded keys 1/2 in
// every row, so that they add 0); out (K, K): for a < b, out[a * K + b] = the JS divergences of the
// row pairs (P[a][r], P[b][r]) summed over r, each key's term 1/2 [p ln(2p/s) + q ln(2q/s)] taken
// without cancellation (attention.cpp); float32 terms, float64 sums in a fixed order; the rest 0.
void js_pair_sums(const float* P, int64_t K, int64_t R, int64_t T, double* out);
const char* js_pair_sums_path();

// k90's count (the fewest largest entries of an attention row whose sum reaches a mass, as the
// geometry-of-BERT code takes it): x (R, T) float32, each row the row's entries negated and
// sorted ascending (numpy.sort(-p)); out[r] = the number of t in [0, T) with
// -(x[r, 0] + ... + x[r, t]) < mass, the sums in float64 from the left (numpy.cumsum's order;
// every prefix counts, so a row with negative or NaN entries gets numpy's count too).
void prefix_sums_below(const float* x, int64_t R, int64_t T, double mass, int64_t* out);

}  // namespace embgeom
