#include "attention_sums.h"

#include <limits>
#include <vector>

#include "attention.h"
#include "check.h"
#include "cpu/isa.h"
#include "cpu/simd.h"

namespace embgeom {
namespace {

constexpr int kLanes = 8;    // partial sums per dot product (plain arrays the compiler vectorises)
constexpr int kMaxKeys = 8;

// The K key masses of one padded row: kLanes partial sums a key, all K keys in one pass over the
// row (K independent chains of additions; a key at a time was one chain waiting on each add,
// most of the kernel's time), each key's sums in the same order as a key at a time.
template <int K, int W>
__attribute__((always_inline)) inline void key_masses_k(const float* padded, int64_t Tp, const float* kf,
                                                        float* mass) {
  // the kLanes partial sums of a key in kLanes / W vectors of the target's width (cpu/simd.h:
  // plain arrays of accumulators were kept on the stack)
  using f32 = typename simd::Lanes<W>::f32;
  constexpr int V = kLanes / W;
  f32 acc[K][V] = {};
  for (int64_t j = 0; j < Tp; j += kLanes)
    for (int v = 0; v < V; ++v) {
      const f32 x = simd::load<f32>(padded + j + v * W);
      for (int k = 0; k < K; ++k) acc[k][v] += x * simd::load<f32>(kf + k * Tp + j + v * W);
    }
  for (int k = 0; k < K; ++k) {
    float m = 0.0f;
    for (int l = 0; l < kLanes; ++l) m += acc[k][l / W][l % W];
    mass[k] = m;
  }
}

template <int W>
__attribute__((always_inline)) inline void key_masses(const float* padded, int64_t Tp, const float* kf, int64_t K,
                                                      float* mass) {
  static_assert(kMaxKeys == 8, "one case per key count");
  switch (K) {
    case 0: return;
    case 1: return key_masses_k<1, W>(padded, Tp, kf, mass);
    case 2: return key_masses_k<2, W>(padded, Tp, kf, mass);
    case 3: return key_masses_k<3, W>(padded, Tp, kf, mass);
    case 4: return key_masses_k<4, W>(padded, Tp, kf, mass);
    case 5: return key_masses_k<5, W>(padded, Tp, kf, mass);
    case 6: return key_masses_k<6, W>(padded, Tp, kf, mass);
    case 7: return key_masses_k<7, W>(padded, Tp, kf, mass);
    default: return key_masses_k<8, W>(padded, Tp, kf, mass);
  }
}

// One (b, h) map (W: the target's float lanes, cpu/simd.h). kf (K x Tp floats) and of (Tp floats): the key indicators and `other` as
// 0/1 weights, zero past T; Tp = T rounded up to kLanes. Float32 sums within a row, float64
// across rows.
template <int W>
__attribute__((always_inline)) inline void map_sums(const float* p, int64_t T, int64_t Tp, const uint8_t* mask,
                                                    const float* kf, int64_t K, const uint8_t* other,
                                                    const float* of, float* padded, double* key_mass,
                                                    double& sep_other, double& prev, double& next,
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
    for (int64_t j = 0; j < T; ++j) padded[j] = row[j];  // zero tail: whole blocks below
    float mass[kMaxKeys];
    key_masses<W>(padded, Tp, kf, K, mass);
    for (int64_t k = 0; k < K; ++k) key_mass[k] += double(mass[k]);
    if (other[i] && K > 1) sep_other += double(mass[1]);
    if (i >= 1 && mask[i - 1]) prev += double(row[i - 1]);
    if (i + 1 < T && mask[i + 1]) next += double(row[i + 1]);
    for (int64_t j = 0; j < T; ++j) row_sum[j] += double(row[j]);
    double* bins = offsets + (T - 1 - i);  // key j lands at j - i + T - 1
    for (int64_t j = 0; j < T; ++j) bins[j] += double(row[j] * of[j]);
  }
}

using MapFn = void (*)(const float*, int64_t, int64_t, const uint8_t*, const float*, int64_t, const uint8_t*,
                       const float*, float*, double*, double&, double&, double&, double*, double*, RowEntropyFn,
                       const float*, float*);

void map_generic(const float* p, int64_t T, int64_t Tp, const uint8_t* mask, const float* kf, int64_t K,
                 const uint8_t* other, const float* of, float* padded, double* key_mass, double& sep_other,
                 double& prev, double& next, double* row_sum, double* offsets, RowEntropyFn entropy_of,
                 const float* wf, float* entropy) {
  map_sums<4>(p, T, Tp, mask, kf, K, other, of, padded, key_mass, sep_other, prev, next, row_sum, offsets,
              entropy_of, wf, entropy);
}

#if EMBGEOM_X86
EMBGEOM_AVX2 void map_avx2(const float* p, int64_t T, int64_t Tp, const uint8_t* mask, const float* kf,
                           int64_t K, const uint8_t* other, const float* of, float* padded, double* key_mass,
                           double& sep_other, double& prev, double& next, double* row_sum, double* offsets,
                           RowEntropyFn entropy_of, const float* wf, float* entropy) {
  map_sums<8>(p, T, Tp, mask, kf, K, other, of, padded, key_mass, sep_other, prev, next, row_sum, offsets,
              entropy_of, wf, entropy);
}

// the AVX2 loop's sums in the same order (8 partial sums a key), the float64 row sums and offsets
// in 512-bit vectors
EMBGEOM_AVX512 void map_avx512(const float* p, int64_t T, int64_t Tp, const uint8_t* mask, const float* kf,
                               int64_t K, const uint8_t* other, const float* of, float* padded, double* key_mass,
                               double& sep_other, double& prev, double& next, double* row_sum, double* offsets,
                               RowEntropyFn entropy_of, const float* wf, float* entropy) {
  map_sums<8>(p, T, Tp, mask, kf, K, other, of, padded, key_mass, sep_other, prev, next, row_sum, offsets,
              entropy_of, wf, entropy);
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
  const int64_t Tp = (T + kLanes - 1) / kLanes * kLanes;
  const int64_t R = T > 0 ? 2 * T - 1 : 0;
  for (int64_t q = 0; q < H * R; ++q) offsets[q] = 0.0;
  for (int64_t q = 0; q < B * H * K; ++q) key_mass[q] = 0.0;
  for (int64_t q = 0; q < B * H; ++q) sep_other[q] = prev[q] = next[q] = 0.0;
  for (int64_t q = 0; q < B * H * T; ++q) row_sum[q] = 0.0;
  // offsets are summed over texts: one buffer per (b, h), added up in text order afterwards (the
  // sums do not depend on the thread count)
  std::vector<double> part(size_t(B * H * R), 0.0);
#pragma omp parallel
  {
    std::vector<float> kf(static_cast<size_t>(K * Tp)), of(static_cast<size_t>(Tp)), padded(static_cast<size_t>(Tp), 0.0f),
        wf(static_cast<size_t>(T));
    int64_t loaded = -1;
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        if (loaded != b) {  // the text's key weights
          for (int64_t k = 0; k < K; ++k)
            for (int64_t j = 0; j < Tp; ++j) kf[k * Tp + j] = j < T && keys[(b * T + j) * K + k] ? 1.0f : 0.0f;
          for (int64_t j = 0; j < Tp; ++j) of[j] = j < T && other[b * T + j] ? 1.0f : 0.0f;
          for (int64_t j = 0; j < T; ++j) wf[j] = mask[b * T + j] ? 1.0f : 0.0f;
          loaded = b;
        }
        const int64_t bh = b * H + h;
        map(p + bh * T * T, T, Tp, mask + b * T, kf.data(), K, other + b * T, of.data(), padded.data(),
            key_mass + bh * K, sep_other[bh], prev[bh], next[bh], row_sum + bh * T, part.data() + bh * R,
            entropy_of, wf.data(), entropy ? entropy + bh * T : nullptr);
      }
    }
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = 0; q < H * R; ++q) offsets[q] += part[size_t(b * H * R + q)];
}

}  // namespace embgeom
