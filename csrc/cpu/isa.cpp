#include "cpu/isa.h"

#include <cstdlib>

#include "check.h"

#if EMBGEOM_X86
#include <cpuid.h>
#endif
#if EMBGEOM_X86 && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace embgeom {

Isa isa_supported() {
#if EMBGEOM_X86
  static const Isa best = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma"))
      return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
    return Isa::generic;
  }();
  return best;
#else
  return Isa::generic;
#endif
}

std::string isa_cap() {
  const char* s = std::getenv("EMBGEOM_CPU");
  return s ? std::string(s) : std::string();
}

Isa isa_level() {
  const std::string cap = isa_cap();
  Isa c = Isa::avx512;
  if (cap == "generic") c = Isa::generic;
  else if (cap == "avx2") c = Isa::avx2;
  else EMBGEOM_CHECK(cap.empty() || cap == "avx512",
                     "EMBGEOM_CPU: expected 'avx512', 'avx2' or 'generic', got '" << cap << "'");
  const Isa s = isa_supported();
  return static_cast<int>(c) < static_cast<int>(s) ? c : s;
}

const char* isa_name(Isa level) {
  switch (level) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return EMBGEOM_NEON ? "neon" : "generic";
  }
}

bool cpu_has_avx512bf16() {
#if EMBGEOM_X86
  static const bool bf = __builtin_cpu_supports("avx512bf16");
  return bf && isa_level() == Isa::avx512;
#else
  return false;
#endif
}

// AMX-TILE and AMX-BF16 in CPUID, then the tile data state for this process: Linux enables it
// per process on request (ARCH_REQ_XCOMP_PERM), and a tile instruction before that faults.
static bool amx_bf16_granted() {
#if EMBGEOM_X86 && defined(__linux__) && defined(SYS_arch_prctl)
  static const bool granted = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
    if (!amx_bf16 || !amx_tile) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

bool cpu_has_amx_bf16() { return amx_bf16_granted() && isa_level() == Isa::avx512; }

std::string cpu_features() {
  std::string s;
#if EMBGEOM_X86
  if (__builtin_cpu_supports("avx512f")) s += "avx512f ";
  if (__builtin_cpu_supports("avx512bf16")) s += "avx512bf16 ";
  if (amx_bf16_granted()) s += "amx-bf16 ";
  if (__builtin_cpu_supports("avx2")) s += "avx2 ";
  if (__builtin_cpu_supports("fma")) s += "fma ";
#elif EMBGEOM_NEON
  s = "neon ";
#endif
  if (!s.empty()) s.pop_back();
  return s;
}

}  // namespace embgeom
