#include "pairwise/lists.h"

#include <cmath>
#include <cstring>
#include <functional>

namespace embgeom {

namespace {
constexpr float kInf = std::numeric_limits<float>::infinity();

inline bool pair_better(const PairEntry& a, const PairEntry& b) {
  if (a.key != b.key) return a.key > b.key;
  if (a.i != b.i) return a.i < b.i;
  return a.j < b.j;
}
}  // namespace

bool PairList::offer(double key, float v, int64_t i, int64_t j) {
  if (k <= 0) return false;
  const PairEntry x{key, v, i, j};
  if (full() && !pair_better(x, e.back())) return false;
  if (k > kLazyK) {
    fresh.push_back(x);
    // merged once the list would pass k (until then it has no threshold to keep, and the
    // outside list of 1.4 M pairs spent more time re-merging than listing), then at a quarter
    // of its length: each entry moves a few times in all, and the waiting offers add at most a
    // quarter to the list's memory
    if (e.size() + fresh.size() > static_cast<size_t>(k) && fresh.size() >= std::max<size_t>(kLazyK, e.size() / 4))
      settle();
    return true;
  }
  auto pos = std::upper_bound(e.begin(), e.end(), x, pair_better);  // first worse than x
  if (pos != e.begin()) {
    const PairEntry& p = *(pos - 1);
    if (p.i == i && p.j == j) return false;  // already listed
  }
  e.insert(pos, x);
  if (static_cast<int64_t>(e.size()) > k) e.pop_back();
  return true;
}

namespace {
// a pair offered twice (same value) sits next to itself in a sorted list: kept once, and the
// list cut to its k best
void drop_repeats(std::vector<PairEntry>& e, int64_t k) {
  e.erase(std::unique(e.begin(), e.end(),
                      [](const PairEntry& a, const PairEntry& b) { return a.i == b.i && a.j == b.j && a.key == b.key; }),
          e.end());
  if (static_cast<int64_t>(e.size()) > k) e.resize(k);
}
}  // namespace

void PairList::settle() {
  if (fresh.empty()) return;
  std::sort(fresh.begin(), fresh.end(), [](const PairEntry& a, const PairEntry& b) { return pair_better(a, b); });
  if (e.empty()) {
    e.swap(fresh);
  } else {
    const size_t mid = e.size();
    e.insert(e.end(), fresh.begin(), fresh.end());
    std::inplace_merge(e.begin(), e.begin() + mid, e.end(),
                       [](const PairEntry& a, const PairEntry& b) { return pair_better(a, b); });
  }
  drop_repeats(e, k);
  fresh.clear();
}

void PairList::absorb(PairList& src) {
  src.settle();
  if (k <= 0 || src.e.empty()) return;
  if (k <= kLazyK) {
    for (const PairEntry& x : src.e) offer(x.key, x.v, x.i, x.j);
    return;
  }
  settle();
  std::vector<PairEntry> out(e.size() + src.e.size());
  std::merge(e.begin(), e.end(), src.e.begin(), src.e.end(), out.begin(),
             [](const PairEntry& a, const PairEntry& b) { return pair_better(a, b); });
  drop_repeats(out, k);
  e.swap(out);
}

void RowLists::init(int64_t rows, int64_t kk, bool is_top, bool reservoir) {
  n = rows;
  k = kk;
  top = is_top;
  if (k <= 0) {
    stride = 0;
    val.clear();
    col.clear();
    cnt.clear();
    thr.clear();
    return;
  }
  // a compaction every (stride - k) offers costs O(stride): a few steps an offer
  stride = reservoir ? k + std::max<int64_t>(k / 2, 8) : k;
  val.assign(n * stride, std::numeric_limits<float>::quiet_NaN());
  col.assign(n * stride, -1);
  cnt.assign(n, 0);
  thr.assign(n, top ? -kInf : kInf);
}

void publish_threshold(float* slot, float v, bool top) {
  uint32_t* bits = reinterpret_cast<uint32_t*>(slot);
  uint32_t cur = __atomic_load_n(bits, __ATOMIC_RELAXED);
  uint32_t want;
  std::memcpy(&want, &v, sizeof want);
  for (;;) {
    float f;
    std::memcpy(&f, &cur, sizeof f);
    if (top ? !(v > f) : !(v < f)) return;
    if (__atomic_compare_exchange_n(bits, &cur, want, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return;
  }
}

void RowLists::reservoir_filled(int64_t row) {
  const int64_t m = cnt[row];
  if (m == stride) {
    keep_best(row);
    cnt[row] = static_cast<int32_t>(k);
  } else if (m == k) {  // the first k: their worst is a threshold already
    const float* rv = val.data() + row * stride;
    const int32_t* rc = col.data() + row * stride;
    int64_t w = 0;
    for (int64_t q = 1; q < k; ++q)
      if (better(rv[w], rc[w], rv[q], rc[q])) w = q;
    thr[row] = rv[w];
  } else {
    return;
  }
  if (shared) publish_threshold(shared + row, thr[row], top);
}

// The r-th largest (0-based) of a[0, n): a quickselect whose partitions store every value to
// both sides and advance one by a comparison, with no branch on the data (a library
// nth_element mispredicted about every other comparison: 7 us a compaction of 234 values).
// buf holds 3 * n floats; a is not changed.
float rank_largest(const float* a, int64_t n, int64_t r, float* buf) {
  const float* cur = a;
  const int64_t cap = n;
  int in = -1;  // the buffer cur is in (-1: a)
  while (n > 16) {
    const float x = cur[0], y = cur[n / 2], z = cur[n - 1];
    const float p = std::max(std::min(x, y), std::min(std::max(x, y), z));  // median of three
    const int gi = in == 0 ? 1 : 0, li = in == 2 ? 1 : 2;  // the two buffers cur is not in
    float* g = buf + gi * cap;
    float* l = buf + li * cap;
    int64_t ng = 0, nl = 0;
    for (int64_t q = 0; q < n; ++q) {
      const float v = cur[q];
      g[ng] = v;
      l[nl] = v;
      ng += v > p;
      nl += v < p;
    }
    if (r < ng) {
      cur = g;
      in = gi;
      n = ng;
    } else if (r < n - nl) {
      return p;
    } else {
      r -= n - nl;
      cur = l;
      in = li;
      n = nl;
    }
  }
  float small[16];
  std::copy(cur, cur + n, small);
  std::sort(small, small + n, std::greater<float>());
  return small[r];
}

void RowLists::keep_best(int64_t row) {
  float* rv = val.data() + row * stride;
  int32_t* rc = col.data() + row * stride;
  // the k-th best value (bottom lists: of the negated values), then the entries better than it
  // and, of those equal to it, as many as fit by column
  scratch.resize(4 * stride);
  float* vals = scratch.data() + 3 * stride;
  const float sign = top ? 1.0f : -1.0f;
  for (int64_t q = 0; q < stride; ++q) vals[q] = sign * rv[q];
  const float t = sign * rank_largest(vals, stride, k - 1, scratch.data());
  ties.resize(stride);
  int64_t m = 0, nt = 0;
  for (int64_t q = 0; q < stride; ++q) {
    const float v = rv[q];
    const int32_t c = rc[q];
    rv[m] = v;
    rc[m] = c;
    m += top ? v > t : v < t;
    ties[nt] = {c, v};  // (a tie keeps its own value: 0 and -0 are equal)
    nt += v == t;
  }
  // m < k <= m + nt: the k - m equal entries of smallest column join
  std::sort(ties.begin(), ties.begin() + nt);
  for (int64_t q = 0; m < k; ++q, ++m) {
    rc[m] = ties[q].first;
    rv[m] = ties[q].second;
  }
  thr[row] = t;
}

void RowLists::merge_rows(const std::vector<const RowLists*>& srcs, int64_t r0, int64_t r1) {
  std::vector<std::pair<float, int32_t>> buf;
  auto order = [&](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return better(a.first, a.second, b.first, b.second);
  };
  for (int64_t r = r0; r < r1; ++r) {
    buf.clear();
    for (int32_t q = 0; q < cnt[r]; ++q) buf.emplace_back(val[r * k + q], col[r * k + q]);
    for (const RowLists* s : srcs)
      for (int32_t q = 0; q < s->cnt[r]; ++q) buf.emplace_back(s->val[r * s->stride + q], s->col[r * s->stride + q]);
    std::sort(buf.begin(), buf.end(), order);
    buf.erase(std::unique(buf.begin(), buf.end()), buf.end());  // one pair, one value
    const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(buf.size()));
    for (int64_t q = 0; q < m; ++q) {
      val[r * k + q] = buf[q].first;
      col[r * k + q] = buf[q].second;
    }
    cnt[r] = static_cast<int32_t>(m);
    if (m == k) thr[r] = val[r * k + k - 1];
  }
}

void RowLists::offer(int64_t row, float v, int32_t c) {
  float* rv = val.data() + row * k;
  int32_t* rc = col.data() + row * k;
  int32_t n_ = cnt[row];
  if (n_ == k && !better(v, c, rv[k - 1], rc[k - 1])) return;
  int32_t p = n_ < k ? n_ : static_cast<int32_t>(k - 1);  // slot the shift starts from
  // from the worst end: an offer that passed the filter mostly lands near the threshold
  int32_t pos = p;
  while (pos > 0 && better(v, c, rv[pos - 1], rc[pos - 1])) --pos;
  if (pos > 0 && rc[pos - 1] == c) return;  // already listed
  for (int32_t q = p; q > pos; --q) {
    rv[q] = rv[q - 1];
    rc[q] = rc[q - 1];
  }
  rv[pos] = v;
  rc[pos] = c;
  if (n_ < k) cnt[row] = ++n_;
  if (n_ == k) {
    thr[row] = rv[k - 1];
    if (shared) publish_threshold(shared + row, thr[row], top);
  }
}

float widened_bound(float kth, double M, bool top) {
  const double b = top ? double(kth) - M : double(kth) + M;
  float f = static_cast<float>(b);
  if (top ? double(f) > b : double(f) < b) f = std::nextafter(f, top ? -kInf : kInf);
  return f;
}


// The float edge of the band: out_of_band(v, bound) <=> v <= edge (top) or v >= edge (bottom).
// double(v) +- M is monotone in v, so the floats it drops are exactly those up to (down to) the
// last one it drops; the test per entry is then one float comparison.
float RowCands::band_edge(double bound) const {
  const float dir = top ? -kInf : kInf;
  // nothing dropped (an infinite or NaN bound): a NaN edge, which every test passes
  if (!out_of_band(dir, bound)) return std::numeric_limits<float>::quiet_NaN();
  float f = static_cast<float>(top ? bound - M : bound + M);
  while (!out_of_band(f, bound)) f = std::nextafter(f, dir);            // the first dropped
  for (float g = std::nextafter(f, -dir); out_of_band(g, bound); g = std::nextafter(g, -dir)) f = g;
  return f;
}

void RowCands::settle(int64_t row) {
  float* rv = val.data() + row * cap;
  int32_t* rc = col.data() + row * cap;
  const int64_t m = cnt[row];
  // the k-th best of the m held (r-th largest: k - 1 for top, m - k for bottom)
  const float t = rank_largest(rv, m, top ? k - 1 : m - k, scratch.data());
  publish_threshold(shared + row, widened_bound(t, M, top), top);
  if (m < cap) return;  // the first k: all are needed
  const double b = top ? double(t) - M : double(t) + M;
  const double bound = top ? std::max(b, double(shared[row])) : std::min(b, double(shared[row]));
  const float edge = band_edge(bound);
  // keep the entries at least as good as t first (at least k of them: the next t is no worse),
  // then the rest of the band, up to `keep`; the band beyond that is spilled. Both passes
  // store every entry and advance by the test (whose outcomes follow no pattern a branch
  // predictor could learn); the store one past the last selected entry needs kv's extra slot.
  float* kv = scratch.data() + 3 * cap;
  int32_t* kc = scratch_col.data();
  int64_t w = 0;
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t q = 0; q < m; ++q) {
      const float v = rv[q];
      const bool good = top ? v >= t : v <= t;
      const bool in_band = !(top ? v <= edge : v >= edge);  // (NaN stays, as out_of_band keeps it)
      kv[w] = v;
      kc[w] = rc[q];
      w += (good == (pass == 0)) & in_band;
    }
  const int64_t kept = std::min(w, keep);
  for (int64_t q = kept; q < w; ++q) spill.push_back({int32_t(row), kc[q], kv[q]});
  std::copy(kv, kv + kept, rv);
  std::copy(kc, kc + kept, rc);
  cnt[row] = static_cast<int32_t>(kept);
}

}  // namespace embgeom
