// Shared by the stand-alone checks of the C++ core (check_engine.cpp, check_kernels.cpp).
#pragma once
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace embgeom_checks {

inline int failures = 0;

inline std::vector<float> randn(int64_t n, unsigned seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> N(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = N(g);
  return v;
}

// Every C++ kernel outside the all-pairs engine against float64 (or wider) sums computed here.
void check_kernels();

}  // namespace embgeom_checks

#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      ++embgeom_checks::failures;                          \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);     \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
    }                                                      \
  } while (0)
