// Argument checks that surface in Python as ValueError (pybind11 maps std::invalid_argument).
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#define EMBGEOM_CHECK(cond, msg)                                  \
  do {                                                            \
    if (!(cond)) {                                                \
      std::ostringstream embgeom_check_os_;                       \
      embgeom_check_os_ << msg;                                   \
      throw std::invalid_argument(embgeom_check_os_.str());       \
    }                                                             \
  } while (0)

namespace embgeom {
// Bounds of the counts a caller passes (the Python layer checks memory first; these keep a
// direct call from wrapping a size or asking OpenMP for a billion threads, where a failure
// inside a parallel region ends the process instead of raising).
constexpr int kMaxThreads = 4096;
// (a thread's row list is a reservoir of up to 1.5 k entries counted in int32)
constexpr long long kMaxRowList = 1LL << 30;

inline void check_threads(int threads) {
  EMBGEOM_CHECK(threads >= 0 && threads <= kMaxThreads,
                "threads: expected 0 (OpenMP's default) to " << kMaxThreads << ", got " << threads);
}
}  // namespace embgeom
