#pragma once
// Small float64 matrices processed in lockstep, one per vector lane: W lanes, W the target's
// register width in doubles (8 inside EMBGEOM_AVX512 functions, 4 inside EMBGEOM_AVX2 ones, 2
// for SSE2 and NEON). A vector wider than the target's registers is not split cleanly (cpu/simd.h):
// eight lanes in an AVX2 function kept their accumulators in memory, moved through general
// registers, and ran eigvals_abs 3x slower than the AVX-512 build and 1.7x slower than SSE2.
// Shared by eigvals.cpp and sym_counts.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/isa.h"

#ifdef EMBGEOM_OPENMP
#include <omp.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"  // vectors by value in inlined helpers only

namespace embgeom {
namespace lanes {

constexpr int kMaxLanes = 8;

template <int W>
struct F64 {
  static_assert(W == 2 || W == 4 || W == 8, "2, 4 or 8 float64 lanes");
  typedef double type __attribute__((vector_size(8 * W)));
};

// A thread's buffer of vectors, 64-byte aligned (std::vector of a vector type is not: its
// allocator takes the alignment of the build's baseline, and an AVX-512 load of a misaligned
// element faults).
struct Buf {
  std::vector<double> raw;
  template <class V>
  V* zeroed(size_t count) {
    raw.assign(count * (sizeof(V) / sizeof(double)) + 8, 0.0);  // (+ 64 bytes: room to align)
    const uintptr_t at = (reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63);
    return reinterpret_cast<V*>(at);
  }
};

// A group kernel and its lane count, as a level's pick gives them.
template <class Fn>
struct Picked {
  Fn fn;
  int lanes;
};

// The build of a group kernel for the current level (cpu/isa.h): avx512 (8 lanes) where the
// level is AVX-512, else avx2 (4 lanes) or generic (2 lanes); *name says which.
template <class Fn>
Picked<Fn> pick_lanes(Fn generic, Fn avx2, Fn avx512, const char** name) {
#if EMBGEOM_X86
  if (isa_level() == Isa::avx512) {
    *name = "avx512";
    return {avx512, 8};
  }
#endif
  (void)avx512;
  const Fn fn = pick_avx2_or_generic<Fn>(generic, avx2, "avx2", name);
  return {fn, fn == generic ? 2 : 4};
}

// The build `pick` gives for the current level run over k matrices of n x n in groups of its
// lanes, over OpenMP threads (0: the default), each thread with its own two buffers:
// group(fn, lanes, g, count, H, work) for each group g (the last may hold fewer: count). k = 0 or
// n = 0: every ok[i] = 1 and nothing runs.
template <class Fn, class F>
void run_groups(Picked<Fn> (*pick)(const char**), int64_t k, int64_t n, uint8_t* ok, int threads, F&& group) {
  if (k == 0 || n == 0) {
    std::fill_n(ok, k, uint8_t(1));
    return;
  }
  const char* name = "";
  const Picked<Fn> picked = pick(&name);
  const int lanes = picked.lanes;
  const int64_t groups = (k + lanes - 1) / lanes;
#ifdef EMBGEOM_OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
#endif
  (void)threads;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) if (groups > 1)
  {
    Buf H, work;
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < groups; ++g)
      group(picked.fn, lanes, g, int(std::min<int64_t>(lanes, k - g * lanes)), H, work);
  }
}

// A power of two near big (2^e with big = m 2^e, m in [0.5, 1)): a matrix divided by it, for its
// largest magnitude big, is scaled exactly into [0.5, 1); 1 for a zero or non-finite big.
inline double pow2_near(double big) {
  int e = 0;
  if (big > 0.0 && std::isfinite(big)) std::frexp(big, &e);
  return std::ldexp(1.0, e);
}

}  // namespace lanes
}  // namespace embgeom
