// The instruction-set layer: which vector level this CPU offers, capped by EMBGEOM_CPU, and the
// target attributes the per-level functions are compiled with (docs/architecture.md, CPU
// dispatch). Only this header and the x86 kernels (cpu/gemm.cpp, pairwise/fused_avx512.cpp,
// attention.cpp, context.cpp, row_pairs.cpp, rows_dot_bf16.cpp) name x86 intrinsics; everything
// else is plain C++ or the vector types of cpu/simd.h (portable loops the compiler vectorises per
// target attribute).
#pragma once
#include <cstdint>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#define EMBGEOM_X86 1
// AVX-512 F/BW/VL/DQ plus FMA: what every EMBGEOM_AVX512 function may use.
#define EMBGEOM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define EMBGEOM_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define EMBGEOM_AVX2 __attribute__((target("avx2,fma")))
// AMX tiles with bf16 products (Intel Sapphire Rapids and later), on top of AVX-512.
#define EMBGEOM_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))
#else
#define EMBGEOM_X86 0
#define EMBGEOM_AVX512
#define EMBGEOM_AVX512BF16
#define EMBGEOM_AVX2
#define EMBGEOM_AMX
#endif

#if defined(__aarch64__)
#define EMBGEOM_NEON 1
#else
#define EMBGEOM_NEON 0
#endif

namespace embgeom {

// Vector levels, ordered: a level may use everything below it. On aarch64 `generic` is the
// baseline NEON build (NEON is part of the architecture), so it is vectorised there too.
enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2 };

// The best level this CPU supports (no cap).
Isa isa_supported();
// The level the kernels use: isa_supported() capped by EMBGEOM_CPU=avx512|avx2|generic (read on
// every call, so a new engine follows a changed variable; an unknown value is an error naming
// EMBGEOM_CPU). A cap above what the CPU supports is no cap.
Isa isa_level();
// The cap as given ("" when EMBGEOM_CPU is unset).
std::string isa_cap();
const char* isa_name(Isa level);  // "avx512" | "avx2" | "generic" (aarch64: "neon")
bool cpu_has_avx512bf16();      // native bf16 dot products (and isa_level() == avx512)
// AMX bf16 tiles usable (and isa_level() == avx512): the CPU has them and the kernel granted this
// process their state (Linux arch_prctl, asked once, on the first call).
bool cpu_has_amx_bf16();
// Names of the CPU features found, e.g. "avx512f avx512bf16 amx-bf16 avx2 fma" or "neon"
// (amx-bf16: usable, as cpu_has_amx_bf16 says, whatever the level cap).
std::string cpu_features();

// One of two builds of a kernel for the current level: `avx2` where the level is AVX2 or above
// (x86), else `generic` (baseline SSE2, or NEON on aarch64); *name says which: avx2_name, or
// "portable-neon" / "portable-generic". A kernel written in x86 intrinsics passes its AVX2
// function as EMBGEOM_IF_X86(f), nullptr elsewhere.
template <class Fn>
Fn pick_avx2_or_generic(Fn generic, Fn avx2, const char* avx2_name, const char** name) {
  if (avx2 != nullptr && isa_level() >= Isa::avx2) {
    *name = avx2_name;
    return avx2;
  }
  *name = EMBGEOM_NEON ? "portable-neon" : "portable-generic";
  return generic;
}

// The name of the build a kernel's pick(&name) chooses now: what every `*_path()` returns.
template <class Fn>
const char* picked_name(Fn (*pick)(const char**)) {
  const char* name = "";
  pick(&name);
  return name;
}

}  // namespace embgeom

#if EMBGEOM_X86
#define EMBGEOM_IF_X86(f) (f)
#else
#define EMBGEOM_IF_X86(f) nullptr
#endif

