// A small portable SIMD layer: GCC/Clang vector extensions, so one source compiles to SSE2, AVX2
// (inside EMBGEOM_AVX2 functions) or NEON, the compiler splitting a 32-byte vector into two
// 16-byte registers where the target has no wider ones. Plain loops over fixed-size arrays were
// the first try: GCC vectorised the pass's clamp and moments but left the flag tests scalar and
// kept the accumulators in memory (the AVX2 pass ran at a third of the AVX-512 one's speed).
//
// Comparisons give lane masks (-1 or 0); `select(mask, a, b)` is the lane-wise mask ? a : b.
// Only always_inline helpers: their callers carry the target attributes.
#pragma once
#include <cstdint>
#include <cstring>

#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors by value in inlined helpers only

namespace embgeom {
namespace simd {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));

#define EMBGEOM_SIMD_INLINE __attribute__((always_inline)) inline

template <class V, class T>
EMBGEOM_SIMD_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V, class T>
EMBGEOM_SIMD_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
template <class V, class T>
EMBGEOM_SIMD_INLINE V splat(T x) {
  V v = {};
  return v + x;
}
template <class M, class V>
EMBGEOM_SIMD_INLINE V select(M mask, V a, V b) {
  return mask ? a : b;
}

// The two 4-lane halves of an 8-lane vector, and back.
EMBGEOM_SIMD_INLINE f32x4 low(f32x8 v) {
  f32x4 h;
  std::memcpy(&h, &v, 16);
  return h;
}
EMBGEOM_SIMD_INLINE f32x4 high(f32x8 v) {
  f32x4 h;
  std::memcpy(&h, reinterpret_cast<const char*>(&v) + 16, 16);
  return h;
}
EMBGEOM_SIMD_INLINE i32x8 join(i32x4 lo, i32x4 hi) {
  i32x8 v;
  std::memcpy(&v, &lo, 16);
  std::memcpy(reinterpret_cast<char*>(&v) + 16, &hi, 16);
  return v;
}

EMBGEOM_SIMD_INLINE f64x4 to_f64(f32x4 v) { return __builtin_convertvector(v, f64x4); }
// 64-bit lane masks to 32-bit ones (-1 stays -1).
EMBGEOM_SIMD_INLINE i32x4 narrow(i64x4 m) { return __builtin_convertvector(m, i32x4); }

// Whether any lane is non-zero.
EMBGEOM_SIMD_INLINE bool any(i32x8 m) {
  uint64_t w[4];
  std::memcpy(w, &m, 32);
  return (w[0] | w[1] | w[2] | w[3]) != 0;
}

EMBGEOM_SIMD_INLINE double sum(f64x4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

}  // namespace simd
}  // namespace embgeom
