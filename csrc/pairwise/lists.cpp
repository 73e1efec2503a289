#include "pairwise/lists.h"

#include <cmath>
#include <cstring>

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
    // merged at a quarter of the list's length: each entry moves a few times in all, and the
    // waiting offers add at most a quarter to the list's memory
    if (fresh.size() >= std::max<size_t>(kLazyK, e.size() / 4)) settle();
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

void PairList::settle() {
  if (fresh.empty()) return;
  std::sort(fresh.begin(), fresh.end(), pair_better);
  const size_t mid = e.size();
  e.insert(e.end(), fresh.begin(), fresh.end());
  std::inplace_merge(e.begin(), e.begin() + mid, e.end(), pair_better);
  // a pair offered twice (same value) sits next to itself
  e.erase(std::unique(e.begin(), e.end(),
                      [](const PairEntry& a, const PairEntry& b) { return a.i == b.i && a.j == b.j && a.key == b.key; }),
          e.end());
  if (static_cast<int64_t>(e.size()) > k) e.resize(k);
  fresh.clear();
}

void RowLists::init(int64_t rows, int64_t kk, bool is_top) {
  n = rows;
  k = kk;
  top = is_top;
  if (k <= 0) {
    val.clear();
    col.clear();
    cnt.clear();
    thr.clear();
    return;
  }
  val.assign(n * k, std::numeric_limits<float>::quiet_NaN());
  col.assign(n * k, -1);
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

void RowLists::offer(int64_t row, float v, int32_t c) {
  float* rv = val.data() + row * k;
  int32_t* rc = col.data() + row * k;
  int32_t n_ = cnt[row];
  auto better = [&](float v1, int32_t c1, float v2, int32_t c2) {
    if (v1 != v2) return top ? v1 > v2 : v1 < v2;
    return c1 < c2;
  };
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


void RowCands::offer(int64_t row, float v, int32_t c) {
  float* rv = val.data() + row * cap;
  int32_t* rc = col.data() + row * cap;
  int64_t nn = cnt[row];
  if (out_of_band(v, shared[row])) return;
  if (nn == cap) {
    if (!better(v, c, rv[cap - 1], rc[cap - 1])) {
      spill.push_back({int32_t(row), c, v});
      return;
    }
    spill.push_back({int32_t(row), rc[cap - 1], rv[cap - 1]});
    --nn;
  }
  int64_t pos = nn;
  while (pos > 0 && better(v, c, rv[pos - 1], rc[pos - 1])) {
    rv[pos] = rv[pos - 1];
    rc[pos] = rc[pos - 1];
    --pos;
  }
  rv[pos] = v;
  rc[pos] = c;
  ++nn;
  if (nn >= k) {
    // k real pairs with values within M of rv[k-1]: publish that bound
    publish_threshold(shared + row, widened_bound(rv[k - 1], M, top), top);
    const double b = top ? double(rv[k - 1]) - M : double(rv[k - 1]) + M;
    const double bound = top ? std::max(b, double(shared[row])) : std::min(b, double(shared[row]));
    while (nn > k && out_of_band(rv[nn - 1], bound)) --nn;
  }
  cnt[row] = static_cast<int32_t>(nn);
}

}  // namespace embgeom
