// All-pairs statistics engine (docs/metrics.md, all-pairs statistics): a deterministic schedule of tiles, each a packed GEMM
// into a thread-local buffer followed by one fused pass over the requested reductions.
// Inputs are fp32 rows; self mode (no y) visits pairs i < j, cross mode all (i, j).
// Indices inside the engine are "compact" (zero-norm rows dropped for cosine); the state
// accessors map them back to original row indices.
#pragma once
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "pairwise/lists.h"

namespace embgeom {

// Every field is set by the caller (bindings.cpp from python/embgeom/engine/config.py, where the
// defaults live); the initial values here mean "nothing asked for", not defaults.
struct PairwiseOptions {
  std::string metric = "cosine";     // cosine | dot | euclidean
  std::string precision = "exact";   // exact | fast (bf16 products, candidates rescored)
  int64_t block = 0;  // tile edge, >= 1
  int64_t bins = 0;   // 0 = no histogram over [lo, hi)
  double lo = 0.0, hi = 0.0;
  int64_t topk = 0, bottomk = 0;
  bool has_near = false;
  double near = 0.0;
  int64_t near_k = 0;
  int64_t row_topk = 0, row_bottomk = 0;
  bool has_outside = false;
  double out_a = 0.0, out_b = 0.0;
  int64_t outside_limit = 0;
  int threads = 0;  // 0 = OpenMP default
  // Moments are summed as v - moment_shift (a value near the mean, chosen by the caller), so the
  // variance does not cancel when std << |mean| (docs/metrics.md, moments).
  double moment_shift = 0.0;
};

struct PairwiseState {
  int64_t tiles_done = 0;
  int64_t count = 0;
  double shifted_sum = 0.0, shifted_sumsq = 0.0;  // sums of (v - moment_shift) and its square
  PairList max1, min1, top, bottom, near, outside_pairs;
  std::vector<int64_t> hist;  // bins + 2, or empty
  RowLists row_top, row_bottom;
  int64_t outside_count = 0;
  std::vector<int64_t> outside_rows, outside_cols;  // compact indices
  // every pair list's waiting offers merged (after a run, after an import)
  void settle_pair_lists() {
    for (PairList* l : {&max1, &min1, &top, &bottom, &near, &outside_pairs}) l->settle();
  }
};

// A ranked-list entry with original row / column indices.
struct OrigPair {
  double v = 0.0;
  int64_t i = 0, j = 0;
};

// The engine state with original indices and moments as (count, mean, M2): what bindings.cpp
// converts to and from Python objects (state_io.cpp; docs/architecture.md, engine state).
struct ExportedState {
  int64_t tiles_done = 0, count = 0;
  double mean = 0.0, m2 = 0.0;
  // the shifted sums mean and m2 came from (NaN: unknown); an import around the same shift
  // takes them as they are, so a resumed run continues exactly
  double moment_shift = std::numeric_limits<double>::quiet_NaN();
  double shifted_sum = std::numeric_limits<double>::quiet_NaN();
  double shifted_sumsq = std::numeric_limits<double>::quiet_NaN();
  bool has_min = false, has_max = false;
  OrigPair min, max;
  std::vector<int64_t> hist;  // bins + 2 slots, empty when no histogram
  std::vector<OrigPair> top, bottom, near, outside_pairs;
  // per-row lists: n_orig x k, values NaN and indices -1 past a row's count; k = 0: not asked
  int64_t row_top_k = 0, row_bottom_k = 0;
  std::vector<float> row_top_val, row_bottom_val;
  std::vector<int64_t> row_top_idx, row_bottom_idx;
  int64_t outside_count = 0;
  bool has_outside_rows = false, has_outside_cols = false;
  std::vector<int64_t> outside_rows, outside_cols;  // per original row / column
  std::vector<int64_t> excluded_rows, excluded_cols;
  double hist_error_bound = 0.0;
};

// Max over rows of |row|, |bf16(row)| and |bf16(row) - row| (fast_bound.cpp).
struct RoundingNorms {
  double full = 0, rounded = 0, delta = 0;
};
RoundingNorms bf16_rounding_norms(const float* rows, int64_t n, int64_t d, int threads);

struct FusedArgs;

// The column rows of a cross-mode run, prepared (compacted, normalised for cosine, packed for
// the product kernel) once and shared by the engines of many runs: a prepared index scans its
// corpus without preparing it again for every batch of queries. Valid for the metric,
// precision and product kernel it was prepared with (`key`); engines check it.
struct PreparedColumns {
  std::string key;                 // metric / precision / kernel name
  int64_t m0 = 0, m = 0, d = 0;    // original and compact row counts, width
  std::vector<int64_t> map, inv;   // compact -> original, original -> compact (-1: excluded)
  RowBuffer rows;                  // compact fp32 rows where the kernel or rescoring reads them
  std::vector<float> n2;           // squared norms (euclidean)
  PackedPanels panels;             // B panels of the own kernels (empty for BLAS products)
  RoundingNorms bf16_norms;        // fast mode: the rows' bf16 rounding (error bound)
};
std::shared_ptr<const PreparedColumns> prepare_columns(const float* y, int64_t m, int64_t d,
                                                       const PairwiseOptions& opt);

class PairwiseEngine {
 public:
  // x: n x d, y: m x d (nullptr = self mode), both row-major fp32, read during construction only.
  PairwiseEngine(const float* x, int64_t n, const float* y, int64_t m, int64_t d,
                 const PairwiseOptions& opt);
  // Cross mode against prepared columns (their key must match this engine's options).
  PairwiseEngine(const float* x, int64_t n, std::shared_ptr<const PreparedColumns> columns,
                 const PairwiseOptions& opt);

  int64_t num_tiles() const { return num_tiles_; }
  int64_t tile_pairs(int64_t begin, int64_t end) const;
  // Process tiles [begin, end) of the schedule; begin must equal tiles_done (or the engine is
  // fresh, e.g. one shard of the schedule).
  void run(int64_t begin, int64_t end);
  // Whether a run() is under way: the binding releases the GIL for it, and refuses every other
  // call on this engine meanwhile (a second run from another thread had counted tiles twice).
  bool running() const { return running_.load(); }

  const PairwiseOptions& options() const { return opt_; }
  bool self_mode() const { return self_; }
  int64_t n() const { return n_; }
  int64_t m() const { return self_ ? n_ : m_; }
  int64_t d() const { return d_; }
  const std::vector<int64_t>& x_map() const { return xmap_; }  // compact -> original
  const std::vector<int64_t>& y_map() const { return self_ ? xmap_ : ys_->map; }
  std::vector<int64_t> excluded_rows() const;
  std::vector<int64_t> excluded_cols() const;
  double hist_error_bound() const { return err_bound_; }
  const char* kernel_name() const { return kern_.name; }
  Isa isa() const { return isa_; }                  // vector level (cpu/isa.h) at construction
  const char* fused_name() const;                   // the fused pass variant
  bool fast() const { return fast_; }
  // For benchmarks only: later runs compute the products of the same schedule (tiles, bands,
  // packed panels) and skip the fused pass, so the state stays meaningless. The bare product's
  // time is what the statistics on top of it are measured against (docs/architecture.md).
  void discard_statistics();
  // Per-row top lists of the values >= floor only: a row holds its row_topk best values among
  // those >= floor (fewer where it has fewer), for a caller that reads nothing below the floor
  // (Index.search_stored's floored lists: paraphrase mining). Before the first run; the state
  // does not record it. NaN: no floor.
  void set_row_top_floor(float floor);
  // The caller reads the per-row lists and the outside counts and pairs only (an index's
  // candidates, pairs_above's pairs): the pass skips the moments and extremes, and the state keeps
  // no count, moments or extremes. Before the first run; needs metric cosine or dot and no
  // histogram, global or near lists.
  void keep_lists_only();

  const PairwiseState& state() const { return st_; }
  // The state with original indices (state_io.cpp), and back: import_state checks every index
  // and size (std::invalid_argument naming the state field) and replaces the state.
  ExportedState export_state() const;
  void import_state(const ExportedState& s);
  // Replace the state (compact indices; use load_state_original to map from original ones).
  void set_state(PairwiseState s);
  PairwiseState empty_state() const;
  int64_t n_orig() const { return n0_; }
  int64_t m_orig() const { return m0_; }

  // Used by the fused pass.
  float exact_value(int64_t ci, int64_t cj) const;  // compact indices
  // Metric value from the fp32 dot. Euclidean: sqrt(|a|^2 + |b|^2 - 2 a.b), except where that
  // cancels (numerics::is_near_duplicate): there numerics::direct_distance. Either way a
  // deterministic function of the pair.
  float transform(float dot, int64_t ci, int64_t cj) const;
  float direct_distance(int64_t ci, int64_t cj) const;
  const float* xrow(int64_t ci) const { return xr_.data() + ci * d_; }
  const float* yrow(int64_t cj) const { return (self_ ? xr_ : ys_->rows).data() + cj * d_; }
  int64_t compact_x(int64_t orig) const { return xinv_[orig]; }
  int64_t compact_y(int64_t orig) const { return self_ ? xinv_[orig] : ys_->inv[orig]; }

  struct Tile {
    int64_t I, J;
  };
  Tile tile(int64_t t) const;

  struct ThreadCtx;  // per-thread partial state (defined in pairwise/fused.h)

 private:
  void process_tile(int64_t t, ThreadCtx& c, double* tsum, double* tsumsq) const;
  FusedArgs fused_args(const ThreadCtx& c, bool diag) const;  // the pass's settings for a tile
  // rows of a tile's product handed to the fused pass at a time (rounded down to whole A panels)
  static constexpr int64_t kBandRows = 48;
  void settle_row_candidates(std::vector<std::unique_ptr<ThreadCtx>>& ctx, bool top, int nth);

  PairwiseOptions opt_;
  bool self_ = true, fast_ = false;
  int metric_ = 0;  // 0 cosine, 1 dot, 2 euclidean
  int64_t n0_ = 0, m0_ = 0;  // original counts
  int64_t n_ = 0, m_ = 0, d_ = 0, bs_ = 512;
  int64_t nbx_ = 0, nby_ = 0, num_tiles_ = 0;
  std::vector<int64_t> row_off_;  // self: first tile index of tile-row I
  std::vector<int64_t> xmap_, xinv_;
  RowBuffer xr_;            // compact fp32 rows (normalised for cosine), kept for rescoring
  std::vector<float> xn2_;  // squared norms (euclidean)
  // the column side; in self mode only its panels (x packed as B panels; null with BLAS products)
  std::shared_ptr<const PreparedColumns> ys_;
  void init(const float* x, int64_t n, std::shared_ptr<const PreparedColumns> columns, int64_t d);
  GemmKernel kern_;
  Isa isa_ = Isa::generic;
  using FusedFn = void (*)(const FusedArgs&, ThreadCtx&, float*, int64_t, int64_t, int64_t, int64_t,
                           int64_t, double*, double*);
  FusedFn fused_ = nullptr;
  PackedPanels pa_;
  const PackedPanels& pb() const { return ys_->panels; }  // B panels (self mode: x's own)
  bool tile_is_cold(const ThreadCtx& c) const;
  void prefetch_row_lists(const ThreadCtx& c, int64_t r0, int64_t r1, int64_t c0, int64_t c1) const;
  double err_bound_ = 0.0;
  // per-row starting bounds of the row-list filters, from a sample of columns
  std::vector<float> prime_top_, prime_bottom_;
  float row_top_floor_ = -std::numeric_limits<float>::infinity();
  bool lists_only_ = false;  // keep_lists_only
  static constexpr int64_t kPrimeSample = 256;
  void prime_row_bounds(int threads);
  PairwiseState st_;
  bool fresh_ = true;
  std::atomic<bool> running_{false};
};

}  // namespace embgeom
