#pragma once
#include <cstdint>

namespace embgeom {

// The attention summaries of `embgeom text` for one layer in one pass over the maps
// (docs/metrics.md, attention targets; Clark et al., arXiv 1906.04341): p (B, H, T, T) float32
// rows of attention; mask (B, T) real tokens; keys (B, T, K) key indicators ([CLS], [SEP],
// punctuation, '.', ','; column 1 is [SEP]); other (B, T) real tokens that are neither [CLS]
// nor [SEP] (bytes, 1 = yes). Sums over the real query rows i, in float64 across rows:
//   key_mass (B, H, K)  sum_i sum_j p[i, j] keys[j, k]
//   sep_other (B, H)    the same for [SEP] over the rows i that are `other`
//   prev, next (B, H)   p[i, i - 1] where i - 1 is real, p[i, i + 1] where i + 1 is real
//   row_sum (B, H, T)   sum_i p[i, :]
//   offsets (H, 2T - 1) sum over b and i of p[i, j] for `other` keys j, at index j - i + T - 1
// Every sum is of float64 terms (the key masses from row_sum: sum_j row_sum[j] keys[j, k]); a
// real row holding NaN or inf makes the map's key_mass and sep_other NaN.
// entropy (B, H, T) or nullptr: each real row's entropy over the real keys, NaN for padded rows,
// the values attention_row_entropy(p, mask, 0) gives (one pass over the maps for both).
void attention_sums(const float* p, int64_t B, int64_t H, int64_t T, const uint8_t* mask,
                    const uint8_t* keys, int64_t K, const uint8_t* other, double* key_mass,
                    double* sep_other, double* prev, double* next, double* row_sum, double* offsets,
                    float* entropy);

// The loop attention_sums takes at the current vector level (cpu/isa.h).
const char* attention_sums_path();

}  // namespace embgeom
