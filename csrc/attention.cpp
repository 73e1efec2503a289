#include "attention.h"

#include <cmath>
#include <limits>

#include "check.h"

namespace embgeom {

void attention_row_entropy(const float* p, int64_t B, int64_t H, int64_t T, const uint8_t* mask,
                           double smoothing, float* out) {
  EMBGEOM_CHECK(B >= 0 && H >= 0 && T >= 0, "attention_row_entropy: bad shape");
  EMBGEOM_CHECK(smoothing >= 0.0 && smoothing <= 1.0,
                "smoothing: expected a value in [0, 1], got " << smoothing);
  const float nan = std::numeric_limits<float>::quiet_NaN();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const uint8_t* m = mask ? mask + b * T : nullptr;
      int64_t n_valid = T;
      if (m) {
        n_valid = 0;
        for (int64_t t = 0; t < T; ++t) n_valid += m[t] ? 1 : 0;
      }
      const double uniform = n_valid > 0 ? smoothing / double(n_valid) : 0.0;
      const double keep = 1.0 - smoothing;
      for (int64_t q = 0; q < T; ++q) {
        float* dst = out + (b * H + h) * T + q;
        if (m && !m[q]) {
          *dst = nan;
          continue;
        }
        const float* row = p + ((b * H + h) * T + q) * T;
        double ent = 0.0;
        for (int64_t k = 0; k < T; ++k) {
          if (m && !m[k]) continue;
          const double v = keep * double(row[k]) + uniform;
          if (v > 0.0) ent -= v * std::log(v);
        }
        *dst = static_cast<float>(ent);
      }
    }
  }
}

}  // namespace embgeom
