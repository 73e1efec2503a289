#include "cpu/isa.h"

#include <cstdlib>

#include "check.h"

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

std::string cpu_features() {
  std::string s;
#if EMBGEOM_X86
  if (__builtin_cpu_supports("avx512f")) s += "avx512f ";
  if (__builtin_cpu_supports("avx512bf16")) s += "avx512bf16 ";
  if (__builtin_cpu_supports("avx2")) s += "avx2 ";
  if (__builtin_cpu_supports("fma")) s += "fma ";
#elif EMBGEOM_NEON
  s = "neon ";
#endif
  if (!s.empty()) s.pop_back();
  return s;
}

}  // namespace embgeom
