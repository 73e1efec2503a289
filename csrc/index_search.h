#pragma once
#include <cstdint>

namespace embgeom {

// A search of a few queries over an index's stored rows in one call (python/embgeom/index.py,
// Index._search_few; the rule is docs/metrics.md, prepared index): the scan (rows_dot), its
// scale, bias and zero rows, the kk best scan values (scores_topk), each query's threshold,
// the float64 values of the candidates at or above it (pair_values, pair_cosines) and their order, with the
// float operations of the general path (Index._search), so the same bits. One call instead of
// some forty numpy operations: after a scan of 154 MB the first touch of each one's code and
// data cost 50-100 us.
struct FewSearch {
  int64_t Q = 0, D = 0, N = 0;
  // the scan: float32 queries against float32 rows or bf16 rows (bit patterns), ld values apart
  const float* qscan = nullptr;
  const float* rows_f32 = nullptr;
  const uint16_t* rows_bf16 = nullptr;
  int64_t ldr = 0;
  const float* scale = nullptr;       // (N,) the scan value times it (float32), or null
  const float* bias = nullptr;        // (N,) then plus it (float32), or null
  const double* zero_rows = nullptr;  // (N,) norms: a row of norm 0 scans -inf (cosine), or null
  int64_t kk = 0, k = 0;              // the scan's kk best of each query; k results
  const double* margin = nullptr;     // (Q,) each query's scan margin
  double widen = 0.0;                 // a bf16 product's output rounding (2.1 BF16_OUT), else 0
  // the float64 values: the stored float32 rows (N x D, contiguous) and the queries as given
  const float* rows = nullptr;
  const float* qexact_f32 = nullptr;
  const double* qexact_f64 = nullptr;
  const double* qnorm = nullptr;      // (Q,) float64 query norms (cosine: a zero query answers nothing)
  int metric = 0;                     // 0 cosine, 1 dot, 2 l2 (distance)
};

// vals, ids (Q x k): each query's results by (value desc | distance asc, id asc), NaN / -1 past
// its last. false (nothing written past the scan): some query's kk best all reach its threshold,
// so that rows past them might too (the caller scans again with more).
bool few_search(const FewSearch& a, double* vals, int64_t* ids);

}  // namespace embgeom
