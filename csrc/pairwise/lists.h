// Ranked lists of the all-pairs engine (docs/metrics.md, ranked lists): the global pair lists,
// the per-row lists of exact values, and fast mode's per-row candidate lists.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace embgeom {

struct PairEntry {
  double key;  // larger is better
  float v;
  int64_t i, j;
};

// The k best pairs under (key desc, i asc, j asc); duplicates of a pair are ignored.
// Short lists insert each offer in place. Long ones (k > kLazyK: the outside-pairs list, up to
// millions of pairs on the index's pairs paths) append offers to `fresh` and merge them in
// batches: an insertion in the middle of a long sorted vector moved half of it, and the outside
// list of a band of near-duplicate rows took 2 s of a 5 s run (190 s at k = 2^21).
// `e` (sorted best first, at most k) is the list once settle() has run; its last entry is a
// valid threshold at any time (the k-th best of real pairs), only a looser one while offers wait.
struct PairList {
  static constexpr int64_t kLazyK = 256;
  int64_t k = 0;
  std::vector<PairEntry> e;
  std::vector<PairEntry> fresh;  // offers not merged into e yet (long lists only)
  bool full() const { return static_cast<int64_t>(e.size()) >= k; }
  bool offer(double key, float v, int64_t i, int64_t j);
  void settle();  // merge `fresh` into `e`: call before reading `e` as the list
  // src's pairs offered to this list (src settled): one linear merge of the two sorted lists
  // where they are long (a thread's outside list of 0.7 M pairs, offered one by one, took as
  // long as its rescoring)
  void absorb(PairList& src);
};

// Per-row k best neighbours: larger value first (top) or smaller first (bottom), then column.
// Two layouts share the arrays: the state's lists (stride k, each row sorted best first) and a
// thread's lists during a run (a reservoir: stride > k, each row's entries unsorted).
struct RowLists {
  int64_t n = 0, k = 0;
  int64_t stride = 0;  // slots a row: k, or a reservoir's capacity
  bool top = true;
  std::vector<float> val;     // n * stride
  std::vector<int32_t> col;   // n * stride, compact column index
  std::vector<int32_t> cnt;   // n
  std::vector<float> thr;     // n: k-th best value once k are held, else -inf (top) / +inf (bottom)
  // During a run, each thread keeps its own lists but they all publish their thresholds into
  // one shared array (max for top, min for bottom), which the filters read: any published
  // value is the k-th best of k real pairs, so a pair below it cannot make the merged list.
  float* shared = nullptr;
  std::vector<float> scratch;      // a reservoir's compaction
  std::vector<std::pair<int32_t, float>> ties;
  const float* filter_thr() const { return shared ? shared : thr.data(); }
  // reservoir: a thread's lists (push); else the state's (offer)
  void init(int64_t rows, int64_t kk, bool is_top, bool reservoir = false);
  bool better(float v1, int32_t c1, float v2, int32_t c2) const {
    if (v1 != v2) return top ? v1 > v2 : v1 < v2;
    return c1 < c2;
  }
  // The state's lists: each row sorted best first; an offer is inserted in place.
  void offer(int64_t row, float v, int32_t c);
  // A thread's lists during a run: an offer is appended to the row's reservoir, and a full
  // reservoir keeps its k best (a selection, linear in the capacity), whose worst becomes the
  // row's threshold. A heap cost log k cache-missing steps an offer, the reservoir one store:
  // with k = 117 on the vocabulary the heap pushes were 60 % of the product's time, and
  // sorted insertion twice the product. Each pair is pushed once.
  void push(int64_t row, float v, int32_t c) {
    const int64_t at = row * stride + cnt[row];
    val[at] = v;
    col[at] = c;
    if (++cnt[row] >= k) reservoir_filled(row);
  }
  // Rows [r0, r1) of this (sorted) list merged with the same rows of `srcs` (reservoirs or
  // sorted): the k best of all, a pair held by several kept once.
  void merge_rows(const std::vector<const RowLists*>& srcs, int64_t r0, int64_t r1);

 private:
  void reservoir_filled(int64_t row);  // k or `stride` entries held: a new threshold
  void keep_best(int64_t row);         // a full reservoir's row down to its k best
};

// Fast mode's per-row lists during a run: candidates kept by their bf16-product value v, which
// is within M of the exact value. Any k of them with v >= t prove the row's final k-th best
// exact value is >= t - M, so the filter (v >= bound - M) and the pruning (drop v < t - 2M)
// never lose a pair of the final list, and only the survivors are rescored, once, at the end
// of the run (instead of every candidate that passes a filter still loose early in the run).
// Mirrored for bottom lists.
// Each row is a reservoir like RowLists' (an offer is one store): when it first holds k, their
// worst is published; a full reservoir is compacted: its k-th best t is published (widened by M),
// entries out of the band of t are dropped and at most `keep` stay, the rest of the band going
// to `spill` (still candidates). A sorted insertion per offer made row top-101 in fast mode
// slower than exact mode on the vocabulary (it shifted up to 2k entries an offer).
struct RowCands {
  struct Spilled {
    int32_t row, col;
    float v;
  };
  int64_t n = 0, k = 0, cap = 0, keep = 0;
  bool top = true;
  double M = 0.0;
  std::vector<float> val;  // n * cap, unsorted
  std::vector<int32_t> col;
  std::vector<int32_t> cnt;
  std::vector<Spilled> spill;  // pushed out of a full row while still within the band
  float* shared = nullptr;     // per row: bound on the final k-th best exact value
  std::vector<float> scratch;  // a compaction's selection (3 * cap) and kept values (cap + 1)
  std::vector<int32_t> scratch_col;

  void init(int64_t rows, int64_t kk, bool is_top, double margin, float* bounds) {
    n = rows;
    k = kk;
    top = is_top;
    M = margin;
    keep = k + std::max<int64_t>(k / 2, 8);
    cap = keep + std::max<int64_t>(k / 2, 8);
    val.assign(n * cap, 0.0f);
    col.assign(n * cap, -1);
    cnt.assign(n, 0);
    spill.clear();
    scratch.assign(4 * cap + 1, 0.0f);
    scratch_col.assign(cap + 1, 0);
    shared = bounds;
  }
  // v can be dropped: its exact value is strictly worse than the bound's
  bool out_of_band(float v, double bound) const {
    return top ? double(v) + M < bound : double(v) - M > bound;
  }
  void offer(int64_t row, float v, int32_t c) {
    if (out_of_band(v, shared[row])) return;
    const int64_t at = row * cap + cnt[row];
    val[at] = v;
    col[at] = c;
    const int32_t m = ++cnt[row];
    if (m == k || m == cap) settle(row);
  }

 private:
  void settle(int64_t row);  // the first k held, or a full reservoir: publish, prune, spill
  float band_edge(double bound) const;
};

// The r-th largest (0-based) of a[0, n), which is not changed; buf: room for 3 * n floats.
float rank_largest(const float* a, int64_t n, int64_t r, float* buf);

// Raise (top) or lower (bottom) a shared threshold with a CAS on its bits. Readers use plain
// loads: a stale value is an earlier, looser bound, so the result does not depend on timing.
void publish_threshold(float* slot, float v, bool top);

// A bound on a row's final k-th best exact value from the k-th best of k real pairs' values that
// are each within M of exact: kth - M (top) or kth + M (bottom), rounded outwards to float.
float widened_bound(float kth, double M, bool top);

}  // namespace embgeom
