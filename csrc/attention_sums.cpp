#include "attention_sums.h"

#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"
#include "check.h"
#include "cpu/isa.h"

namespace embgeom {
namespace {

constexpr int kMaxKeys = 8;

// One (b, h) map's row loop (the same source compiled per vector level; the float64 loops over a
// row vectorise at the target's width). The key masses are not taken row by row: summed over the
// real rows, sum_i sum_j p[i, j] keys[j, k] is sum_j row_sum[j] keys[j, k], added once per map
// (a float32 dot product per key and row had been half the pass's time, 17 of 33 ms a batch of
// 32 x 128 tokens, Emerald Rapids). [SEP]'s mass of the `other` rows is gathered from the [SEP]
// columns (sep_cols, n_sep of them). of (T doubles): `other` keys as 0/1 weights.
__attribute__((always_inline)) inline void map_sums(const float* p, int64_t T, const uint8_t* mask,
                                                    const int64_t* sep_cols, int64_t n_sep, const uint8_t* other,
                                                    const double* of, double& sep_other, double& prev, double& next,
                                                    double* row_sum, double* offsets, RowEntropyFn entropy_of,
                                                    const float* wf, float* entropy) {
  for (int64_t i = 0; i < T; ++i) {
    if (!mask[i]) {
      if (entropy) entropy[i] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float* row = p + i * T;
    // the row's entropy while it is in L1 (the entropy kernel's own call: the same value)
    if (entropy) entropy[i] = static_cast<float>(entropy_of(row, wf, T, 1.0f, 0.0f));
    if (other[i])
      for (int64_t c = 0; c < n_sep; ++c) sep_other += double(row[sep_cols[c]]);
    if (i >= 1 && mask[i - 1]) prev += double(row[i - 1]);
    if (i + 1 < T && mask[i + 1]) next += double(row[i + 1]);
    double* bins = offsets + (T - 1 - i);  // key j lands at j - i + T - 1
    for (int64_t j = 0; j < T; ++j) {
      const double x = double(row[j]);
      row_sum[j] += x;
      bins[j] += x * of[j];
    }
  }
}

using MapFn = void (*)(const float*, int64_t, const uint8_t*, const int64_t*, int64_t, const uint8_t*, const double*,
                       double&, double&, double&, double*, double*, RowEntropyFn, const float*, float*);

void map_generic(const float* p, int64_t T, const uint8_t* mask, const int64_t* sep_cols, int64_t n_sep,
                 const uint8_t* other, const double* of, double& sep_other, double& prev, double& next,
                 double* row_sum, double* offsets, RowEntropyFn entropy_of, const float* wf, float* entropy) {
  map_sums(p, T, mask, sep_cols, n_sep, other, of, sep_other, prev, next, row_sum, offsets, entropy_of, wf, entropy);
}

#if EMBGEOM_X86
EMBGEOM_AVX2 void map_avx2(const float* p, int64_t T, const uint8_t* mask, const int64_t* sep_cols, int64_t n_sep,
                           const uint8_t* other, const double* of, double& sep_other, double& prev, double& next,
                           double* row_sum, double* offsets, RowEntropyFn entropy_of, const float* wf,
                           float* entropy) {
  map_sums(p, T, mask, sep_cols, n_sep, other, of, sep_other, prev, next, row_sum, offsets, entropy_of, wf, entropy);
}

EMBGEOM_AVX512 void map_avx512(const float* p, int64_t T, const uint8_t* mask, const int64_t* sep_cols,
                               int64_t n_sep, const uint8_t* other, const double* of, double& sep_other,
                               double& prev, double& next, double* row_sum, double* offsets,
                               RowEntropyFn entropy_of, const float* wf, float* entropy) {
  map_sums(p, T, mask, sep_cols, n_sep, other, of, sep_other, prev, next, row_sum, offsets, entropy_of, wf, entropy);
}
#endif

MapFn pick_map(const char** name) {
#if EMBGEOM_X86
  if (isa_level() >= Isa::avx512) {
    *name = "portable-avx512";
    return map_avx512;
  }
#endif
  return pick_avx2_or_generic<MapFn>(map_generic, EMBGEOM_IF_X86(map_avx2), "portable-avx2", name);
}

}  // namespace

const char* attention_sums_path() { return picked_name(pick_map); }

void attention_sums(const float* p, int64_t B, int64_t H, int64_t T, const uint8_t* mask,
                    const uint8_t* keys, int64_t K, const uint8_t* other, double* key_mass,
                    double* sep_other, double* prev, double* next, double* row_sum, double* offsets,
                    float* entropy) {
  EMBGEOM_CHECK(B >= 0 && H >= 0 && T >= 0, "attention_sums: bad shape");
  EMBGEOM_CHECK(K >= 0 && K <= kMaxKeys, "keys: expected at most " << kMaxKeys << " columns, got " << K);
  const char* name = "";
  const MapFn map = pick_map(&name);
  const RowEntropyFn entropy_of = pick_row_entropy(&name);
  const int64_t R = T > 0 ? 2 * T - 1 : 0;
  for (int64_t q = 0; q < H * R; ++q) offsets[q] = 0.0;
  for (int64_t q = 0; q < B * H; ++q) sep_other[q] = prev[q] = next[q] = 0.0;
  for (int64_t q = 0; q < B * H * T; ++q) row_sum[q] = 0.0;
  // offsets are summed over texts: one buffer per (b, h), added up in text order afterwards (the
  // sums do not depend on the thread count)
  std::vector<double> part(size_t(B * H * R), 0.0);
#pragma omp parallel
  {
    std::vector<double> of(static_cast<size_t>(T));
    std::vector<float> wf(static_cast<size_t>(T));
    // the text's columns of each key, key k's at cols[starts[k], starts[k + 1]) ([SEP]: k = 1)
    std::vector<int64_t> cols, starts(static_cast<size_t>(K + 1));
    int64_t loaded = -1;
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        if (loaded != b) {  // the text's key columns and weights
          cols.clear();
          for (int64_t k = 0; k < K; ++k) {
            starts[size_t(k)] = int64_t(cols.size());
            for (int64_t j = 0; j < T; ++j)
              if (keys[(b * T + j) * K + k]) cols.push_back(j);
          }
          starts[size_t(K)] = int64_t(cols.size());
          for (int64_t j = 0; j < T; ++j) {
            of[j] = other[b * T + j] ? 1.0 : 0.0;
            wf[j] = mask[b * T + j] ? 1.0f : 0.0f;
          }
          loaded = b;
        }
        const int64_t bh = b * H + h;
        double* sums = row_sum + bh * T;
        const int64_t* sep_cols = cols.data() + (K > 1 ? starts[1] : 0);
        const int64_t n_sep = K > 1 ? starts[2] - starts[1] : 0;
        map(p + bh * T * T, T, mask + b * T, sep_cols, n_sep, other + b * T, of.data(), sep_other[bh], prev[bh],
            next[bh], sums, part.data() + bh * R, entropy_of, wf.data(), entropy ? entropy + bh * T : nullptr);
        // a real row holding NaN / inf makes every key mass and [SEP]'s mass of the other rows
        // NaN, as the row-by-row dot products (and torch's) take them
        bool finite = true;
        for (int64_t j = 0; j < T; ++j) finite &= std::fabs(sums[j]) <= std::numeric_limits<double>::max();
        for (int64_t k = 0; k < K; ++k) {
          double m = 0.0;
          for (int64_t c = starts[size_t(k)]; c < starts[size_t(k) + 1]; ++c) m += sums[cols[size_t(c)]];
          key_mass[bh * K + k] = finite ? m : std::numeric_limits<double>::quiet_NaN();
        }
        if (!finite) sep_other[bh] = std::numeric_limits<double>::quiet_NaN();
      }
    }
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = 0; q < H * R; ++q) offsets[q] += part[size_t(b * H * R + q)];
}

}  // namespace embgeom
