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

void RowLists::push(int64_t row, float v, int32_t c) {
  float* hv = val.data() + row * k;
  int32_t* hc = col.data() + row * k;
  int64_t m = cnt[row];
  if (m == k) {
    if (!better(v, c, hv[0], hc[0])) return;
    // replace the worst (the root) and sift down: the worse child moves up
    int64_t p = 0;
    for (;;) {
      const int64_t a = 2 * p + 1, b = a + 1;
      if (a >= k) break;
      const int64_t w = (b < k && better(hv[a], hc[a], hv[b], hc[b])) ? b : a;
      if (!better(v, c, hv[w], hc[w])) break;
      hv[p] = hv[w];
      hc[p] = hc[w];
      p = w;
    }
    hv[p] = v;
    hc[p] = c;
  } else {
    int64_t p = m++;
    while (p > 0) {  // sift up past better parents
      const int64_t q = (p - 1) / 2;
      if (!better(hv[q], hc[q], v, c)) break;
      hv[p] = hv[q];
      hc[p] = hc[q];
      p = q;
    }
    hv[p] = v;
    hc[p] = c;
    cnt[row] = static_cast<int32_t>(m);
  }
  if (m == k) {
    thr[row] = hv[0];
    if (shared) publish_threshold(shared + row, thr[row], top);
  }
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
      for (int32_t q = 0; q < s->cnt[r]; ++q) buf.emplace_back(s->val[r * k + q], s->col[r * k + q]);
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
