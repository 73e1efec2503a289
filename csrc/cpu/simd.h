// A small portable SIMD layer: GCC/Clang vector extensions, so one source compiles to SSE2, AVX2
// (inside EMBGEOM_AVX2 functions) or NEON. Plain loops over fixed-size arrays were the first
// try: GCC vectorised the pass's clamp and moments but left the flag tests scalar and kept the
// accumulators in memory (the AVX2 pass ran at a third of the AVX-512 one's speed).
//
// Lanes<L> names the vectors of L floats (and of L/2 doubles: one float vector widened is two
// double vectors). L is the target's register width: 8 inside EMBGEOM_AVX2 functions, 4 for
// SSE2 and NEON. A vector wider than the target's registers is not split cleanly: GCC lowers
// some of its operations (compares, masks) one lane at a time.
//
// Comparisons give lane masks (-1 or 0); `select(mask, a, b)` is the lane-wise mask ? a : b.
// Only always_inline helpers: their callers carry the target attributes.
#pragma once
#include <cstdint>
#include <cstring>

#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors by value in inlined helpers only

namespace embgeom {
namespace simd {

template <int L>
struct Lanes {
  static_assert(L == 4 || L == 8, "4 or 8 float lanes");
  typedef float f32 __attribute__((vector_size(4 * L)));
  typedef int32_t i32 __attribute__((vector_size(4 * L)));
  typedef float f32h __attribute__((vector_size(2 * L)));     // half: L/2 floats
  typedef int32_t i32h __attribute__((vector_size(2 * L)));
  typedef double f64h __attribute__((vector_size(4 * L)));    // L/2 doubles
  typedef int64_t i64h __attribute__((vector_size(4 * L)));
};

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

// The two halves of a vector (H: the half type), and two halves joined.
template <class H, class V>
EMBGEOM_SIMD_INLINE H low(V v) {
  static_assert(2 * sizeof(H) == sizeof(V), "half");
  H h;
  std::memcpy(&h, &v, sizeof(H));
  return h;
}
template <class H, class V>
EMBGEOM_SIMD_INLINE H high(V v) {
  static_assert(2 * sizeof(H) == sizeof(V), "half");
  H h;
  std::memcpy(&h, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
  return h;
}
template <class V, class H>
EMBGEOM_SIMD_INLINE V join(H lo, H hi) {
  static_assert(2 * sizeof(H) == sizeof(V), "half");
  V v;
  std::memcpy(&v, &lo, sizeof(H));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(H), &hi, sizeof(H));
  return v;
}

// Lane-wise conversion (float to double, 64-bit masks to 32-bit ones, truncation to int).
template <class To, class From>
EMBGEOM_SIMD_INLINE To convert(From v) {
  return __builtin_convertvector(v, To);
}

// Whether any lane is non-zero.
template <class V>
EMBGEOM_SIMD_INLINE bool any(V m) {
#if defined(__x86_64__) || defined(__i386__)
  // 32-byte vectors exist only inside EMBGEOM_AVX2 functions: one vptest (the portable OR of
  // the words took four extracts before the branch; perf: a fifth of the AVX2 pass's samples)
  // (inline asm: the builtin is not declared outside AVX functions, and an intrinsic would not
  // inline into this untargeted helper)
  if constexpr (sizeof(V) == 32) {
    bool nonzero;
    asm("vptest %1, %1" : "=@ccnz"(nonzero) : "x"(m));
    return nonzero;
  }
#endif
  constexpr int words = sizeof(V) / 8;
  uint64_t w[words];
  std::memcpy(w, &m, sizeof(V));
  uint64_t acc = 0;
  for (int q = 0; q < words; ++q) acc |= w[q];
  return acc != 0;
}

// Sum of the lanes, in lane order.
template <class V>
EMBGEOM_SIMD_INLINE auto sum(V v) -> decltype(v[0] + v[0]) {
  decltype(v[0] + v[0]) s = 0;
  for (unsigned q = 0; q < sizeof(V) / sizeof(v[0]); ++q) s += v[q];
  return s;
}

// Asks for the cache lines of a row of D values before it is read (pair_values: scattered pair
// rows; rows_dot: the rows a few KiB ahead of a scan); any target, no intrinsics.
template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* b = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(b + off, 0, 3);
}

}  // namespace simd
}  // namespace embgeom
