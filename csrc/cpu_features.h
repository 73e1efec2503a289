// CPU features the kernels dispatch on: one target attribute and one run-time check for the
// AVX-512 paths, shared by every source that has such a path.
#pragma once

// AVX-512 F/BW/VL/DQ plus FMA: what every EMBGEOM_AVX512 function may use.
#define EMBGEOM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace embgeom {

inline bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma");
}

}  // namespace embgeom
