#include "value_histogram.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "check.h"

namespace embgeom {
namespace {

// the number of edges below x (edges non-decreasing): from a guess one step at a time
inline int bin_of(float x, const float* edges, double lo, double inv_step) {
  int g = static_cast<int>(std::min(std::max((double(x) - lo) * inv_step, 0.0), double(kValueBins - 1)));
  while (g > 0 && x <= edges[g - 1]) --g;
  while (g < kValueBins && x > edges[g]) ++g;
  return g;
}

}  // namespace

void value_histogram(const float* p, int64_t B, int64_t H, int64_t T, const uint8_t* mask, bool widen_to_zero,
                     int64_t* counts, int64_t* zero_bin) {
  EMBGEOM_CHECK(B >= 0 && H >= 0 && T >= 0, "value_histogram: bad shape");
#pragma omp parallel
  {
    std::vector<int64_t> real;
    real.reserve(T);
#pragma omp for schedule(dynamic, 4)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H;
      real.clear();
      for (int64_t t = 0; t < T; ++t)
        if (mask[b * T + t]) real.push_back(t);
      const float* map = p + bh * T * T;
      int64_t* cnt = counts + bh * kValueBins;
      std::fill(cnt, cnt + kValueBins, int64_t(0));
      zero_bin[bh] = 0;
      if (real.empty()) continue;
      float mn = std::numeric_limits<float>::infinity(), mx = -mn;
      bool finite = true;
      for (int64_t i : real)
        for (int64_t j : real) {
          const float v = map[i * T + j];
          finite &= std::fabs(v) <= std::numeric_limits<float>::max();
          mn = std::min(mn, v);
          mx = std::max(mx, v);
        }
      if (!finite) {  // NaN / inf among the real entries: no histogram (a NaN's bin had been INT_MIN)
        zero_bin[bh] = -1;
        continue;
      }
      double lo = mn, hi = mx;
      if (widen_to_zero) {
        lo = std::min(lo, 0.0);
        hi = std::max(hi, 0.0);
      }
      const double step = (hi - lo) / kValueBins;
      if (!(step > 0)) continue;  // a constant map: entropy 0
      float edges[kValueBins];
      for (int e = 1; e < kValueBins; ++e) {
        const double v = e * step + lo;  // as numpy's linspace, pandas.cut's edges
        float f = static_cast<float>(v);
        if (double(f) > v) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
        edges[e - 1] = f;
      }
      edges[kValueBins - 1] = static_cast<float>(hi);
      const double inv = kValueBins / (hi - lo);
      for (int64_t i : real) {
        const float* row = map + i * T;
        for (int64_t j : real) ++cnt[std::min(bin_of(row[j], edges, lo, inv), kValueBins - 1)];
      }
      zero_bin[bh] = std::min(bin_of(0.0f, edges, lo, inv), kValueBins - 1);
    }
  }
}

}  // namespace embgeom
