// Packed tile GEMM: micro-kernels (AVX-512 fp32/bf16, AVX2, scalar), packing, dispatch.
#include "cpu/gemm.h"

#include "cpu/isa.h"
#if EMBGEOM_X86
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "check.h"
#include "cpu/blas.h"

#ifdef EMBGEOM_OPENMP
#include <omp.h>
#endif

namespace embgeom {

template <class T>
void AlignedBuf<T>::reset(int64_t count, bool zero) {
  n = count;
  size_t bytes = (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
  if (bytes == 0) bytes = 64;
  void* q = std::aligned_alloc(64, bytes);
  if (!q) throw std::bad_alloc();
  if (zero) std::memset(q, 0, bytes);
  p.reset(static_cast<T*>(q));
}
template struct AlignedBuf<float>;
template struct AlignedBuf<uint32_t>;
template struct AlignedBuf<int32_t>;

// ---------------------------------------------------------------------------------------------
// micro-kernels: a is an A micro-panel at k0 ([k][MR]), b a B micro-panel ([k][NR]); the MR x NR
// block of C is written in full (C buffers cover whole panels).
// ---------------------------------------------------------------------------------------------

#if EMBGEOM_X86
template <int MR, int NV>
EMBGEOM_AVX512 void ukr_avx512(int64_t kc, const void* av, const void* bv, float* c, int64_t ldc,
                               bool acc) {
  const float* a = static_cast<const float*>(av);
  const float* b = static_cast<const float*>(bv);
  __m512 r[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      r[m][v] = acc ? _mm512_loadu_ps(c + m * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512 bb[NV];
    for (int v = 0; v < NV; ++v) bb[v] = _mm512_load_ps(b + 16 * v);
    for (int m = 0; m < MR; ++m) {
      const __m512 aa = _mm512_set1_ps(a[m]);
      for (int v = 0; v < NV; ++v) r[m][v] = _mm512_fmadd_ps(aa, bb[v], r[m][v]);
    }
    a += MR;
    b += 16 * NV;
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + m * ldc + 16 * v, r[m][v]);
}

template <int MR, int NV>
EMBGEOM_AVX512BF16 void ukr_avx512bf16(int64_t kc, const void* av, const void* bv, float* c,
                                       int64_t ldc, bool acc) {
  const int32_t* a = static_cast<const int32_t*>(av);
  const uint32_t* b = static_cast<const uint32_t*>(bv);
  __m512 r[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      r[m][v] = acc ? _mm512_loadu_ps(c + m * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512i bb[NV];
    for (int v = 0; v < NV; ++v) bb[v] = _mm512_load_si512(reinterpret_cast<const void*>(b + 16 * v));
    for (int m = 0; m < MR; ++m) {
      const __m512i aa = _mm512_set1_epi32(a[m]);
      for (int v = 0; v < NV; ++v)
        r[m][v] = _mm512_dpbf16_ps(r[m][v], (__m512bh)aa, (__m512bh)bb[v]);
    }
    a += MR;
    b += 16 * NV;
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + m * ldc + 16 * v, r[m][v]);
}

// AMX: a 32 x 32 block of C in four 16 x 16 float32 tiles (tmm0-3), from A's two 16-row halves
// (tmm4, tmm5) and B's two 16-column halves (tmm6, tmm7), 16 pairs of k (64 bytes a tile row) per
// step. `a` is an A panel in bf16_rows (row stride kc words: one k-block), `b` a B panel in
// bf16_pairs of width 32 (row stride 32 words); kc is a multiple of 16 (the panels are padded).
// TDPBF16PS rounds like VDPBF16PS (bf16 denormal inputs as zero, float32 sums, round to nearest
// even), so fast mode's error bound and rescoring hold as they are. The tiles are configured
// once per gemm_tile call (amx_configure), not per block: LDTILECFG in every call made the
// vocabulary's bare bf16 product 0.226 s against 0.176 s (Emerald Rapids, medians of 10
// alternating runs).
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
static const AmxTileConfig kAmxTiles;

EMBGEOM_AMX void ukr_amx_32x32(int64_t kc, const void* av, const void* bv, float* c, int64_t ldc,
                               bool acc) {
  const char* a = static_cast<const char*>(av);
  const char* b = static_cast<const char*>(bv);
  const long sa = long(kc) * 4, sc = long(ldc) * 4;
  if (acc) {
    _tile_loadd(0, c, sc);
    _tile_loadd(1, c + 16, sc);
    _tile_loadd(2, c + 16 * ldc, sc);
    _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < kc; k += 16) {
    _tile_loadd(4, a + k * 4, sa);
    _tile_loadd(5, a + 16 * sa + k * 4, sa);
    _tile_loadd(6, b + k * 128, 128);
    _tile_loadd(7, b + k * 128 + 64, 128);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, sc);
  _tile_stored(1, c + 16, sc);
  _tile_stored(2, c + 16 * ldc, sc);
  _tile_stored(3, c + 16 * ldc + 16, sc);
  __asm__ volatile("" ::: "memory");  // the tile stores are asm the compiler cannot see into
}

// Tiles configured at the start of a gemm_tile call, and back to their initial state once it is
// done: a thread's context switches then skip saving its 8 KB of tile data (XSAVE's init
// optimisation).
EMBGEOM_AMX static void amx_configure() { _tile_loadconfig(&kAmxTiles); }
EMBGEOM_AMX static void amx_release() { _tile_release(); }

// 6 x 16 with named accumulators: GCC keeps an array of twelve __m256 in memory and stores it
// on every k step (half the FMA peak on the dev host); named variables stay in the 16 ymm
// registers (12 accumulators, 2 B vectors, 1 broadcast) and run at the FMA peak.
EMBGEOM_AVX2 void ukr_avx2_6x16(int64_t kc, const void* av, const void* bv, float* c, int64_t ldc,
                                bool acc) {
  const float* a = static_cast<const float*>(av);
  const float* b = static_cast<const float*>(bv);
#define EMBGEOM_ROW_INIT(m)                                                      \
  __m256 c##m##0 = acc ? _mm256_loadu_ps(c + (m) * ldc) : _mm256_setzero_ps(); \
  __m256 c##m##1 = acc ? _mm256_loadu_ps(c + (m) * ldc + 8) : _mm256_setzero_ps();
#define EMBGEOM_ROW_FMA(m)                   \
  x = _mm256_broadcast_ss(a + (m));          \
  c##m##0 = _mm256_fmadd_ps(x, b0, c##m##0); \
  c##m##1 = _mm256_fmadd_ps(x, b1, c##m##1);
#define EMBGEOM_ROW_STORE(m)                \
  _mm256_storeu_ps(c + (m) * ldc, c##m##0); \
  _mm256_storeu_ps(c + (m) * ldc + 8, c##m##1);
  EMBGEOM_ROW_INIT(0) EMBGEOM_ROW_INIT(1) EMBGEOM_ROW_INIT(2)
  EMBGEOM_ROW_INIT(3) EMBGEOM_ROW_INIT(4) EMBGEOM_ROW_INIT(5)
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    __m256 x;
    EMBGEOM_ROW_FMA(0) EMBGEOM_ROW_FMA(1) EMBGEOM_ROW_FMA(2)
    EMBGEOM_ROW_FMA(3) EMBGEOM_ROW_FMA(4) EMBGEOM_ROW_FMA(5)
    a += 6;
    b += 16;
  }
  EMBGEOM_ROW_STORE(0) EMBGEOM_ROW_STORE(1) EMBGEOM_ROW_STORE(2)
  EMBGEOM_ROW_STORE(3) EMBGEOM_ROW_STORE(4) EMBGEOM_ROW_STORE(5)
#undef EMBGEOM_ROW_INIT
#undef EMBGEOM_ROW_FMA
#undef EMBGEOM_ROW_STORE
}

#endif  // EMBGEOM_X86

template <int MR, int NR>
void ukr_scalar(int64_t kc, const void* av, const void* bv, float* c, int64_t ldc, bool acc) {
  const float* a = static_cast<const float*>(av);
  const float* b = static_cast<const float*>(bv);
  float r[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) r[m][n] = acc ? c[m * ldc + n] : 0.0f;
  for (int64_t k = 0; k < kc; ++k) {
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) r[m][n] = std::fma(a[m], b[n], r[m][n]);
    a += MR;
    b += NR;
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) c[m * ldc + n] = r[m][n];
}

// ---------------------------------------------------------------------------------------------
// dispatch
// ---------------------------------------------------------------------------------------------

namespace {

GemmKernel make(int mr, int nr, bool bf16, int64_t kc, MicroKernel f, const char* name) {
  GemmKernel k;
  k.mr = mr;
  k.nr = nr;
  k.bf16 = bf16;
  k.kc_block = kc;
  k.ukr = f;
  k.name = name;
  return k;
}

GemmKernel kernel_scalar() { return make(4, 8, false, 256, ukr_scalar<4, 8>, "scalar-4x8"); }

GemmKernel kernel_blas() {
  GemmKernel k;
  k.blas = true;
  k.name = "openblas-sgemm";
  return k;
}

#if EMBGEOM_X86
GemmKernel kernel_avx2() { return make(6, 16, false, 384, ukr_avx2_6x16, "avx2-6x16"); }
GemmKernel kernel_bf16() { return make(14, 32, true, 192, ukr_avx512bf16<14, 2>, "avx512bf16-14x32"); }
GemmKernel kernel_amx() {
  GemmKernel k = make(32, 32, true, 0, ukr_amx_32x32, "amx-bf16-32x32");
  k.amx = true;
  return k;
}

// k-blocks of 384 k values (192 bf16 pairs): d = 384 in one pass, and on the dev machine's
// Zen 5 cores 8-15 % faster over the tiles than 256 (fp32) or 128 pairs (bf16); the values do
// not depend on the block length (C is stored and reloaded exactly between blocks).
GemmKernel kernel_avx512() {
  const char* s = std::getenv("EMBGEOM_UKR");  // benchmarking hook: "6x32", "8x32", ...
  const std::string u = s ? s : "";
  if (u == "6x32") return make(6, 32, false, 256, ukr_avx512<6, 2>, "avx512-6x32");
  if (u == "8x32") return make(8, 32, false, 256, ukr_avx512<8, 2>, "avx512-8x32");
  if (u == "12x32") return make(12, 32, false, 256, ukr_avx512<12, 2>, "avx512-12x32");
  if (u == "4x64") return make(4, 64, false, 128, ukr_avx512<4, 4>, "avx512-4x64");
  if (u == "6x64") return make(6, 64, false, 128, ukr_avx512<6, 4>, "avx512-6x64");
  return make(14, 32, false, 384, ukr_avx512<14, 2>, "avx512-14x32");
}
#endif

}  // namespace

// Per level (docs/architecture.md, CPU dispatch): AVX-512 keeps its own 14x32 kernel and, for
// `fast`, AMX tiles where the CPU has them, else the bf16 dot-product kernel where that outruns
// fp32 (bf16_dot_beats_fp32); AVX2 its own 6x16 kernel. Over panels packed once per run
// they beat OpenBLAS called per tile (which packs both operands again on every call): on the dev
// host's Zen 5 the own AVX2 kernel computes the default vocabulary's unique pairs in 1.44 s,
// OpenBLAS's Haswell sgemm per tile in about 2 s. The own kernels also compute every pair as one
// FMA chain whatever the tile (block-invariant values; `fast`'s rescoring reproduces them). The
// generic level (and aarch64) takes OpenBLAS's sgemm when the library is loaded, else the
// portable kernel. `fast` without a bf16 product that pays runs the exact product: the
// scipy-openblas32 wheel exports no sbgemm (built without bfloat16), no bf16 product is faster
// there, and `fast` must not be slower than `exact`.
// Intel's cores issue VDPBF16PS on one port, so a bf16 dot step (two products) takes the time of
// two fp32 FMAs and the bf16 kernel gains nothing: on an Emerald Rapids host (forced with
// EMBGEOM_GEMM=avx512bf16) the vocabulary's bare bf16 product took 1.505 s against the fp32
// kernel's 0.877 s. AMD's Zen 4 and Zen 5 issue it on two (0.83 s against 1.63 s on Zen 4).
static bool bf16_dot_beats_fp32() {
#if EMBGEOM_X86
  static const bool intel = __builtin_cpu_is("intel");
  return !intel;
#else
  return false;
#endif
}

// Why `fast` runs the exact product here: a forced product or a capped level is named before the
// CPU (EMBGEOM_GEMM=scalar on an AMX host had been said "bf16 dot no faster than fp32 on this CPU").
const char* fast_product_note() {
  if (select_kernel(true).bf16) return "";
  const char* forced = std::getenv("EMBGEOM_GEMM");
  const std::string force = forced ? forced : "";
  if (!force.empty() && force != "amx" && force != "avx512bf16") return "EMBGEOM_GEMM forces a product without bf16";
  const std::string features = cpu_features();  // (the CPU's, whatever the cap)
  const bool bf16_cpu = features.find("avx512bf16") != std::string::npos ||
                        features.find("amx-bf16") != std::string::npos;
  if (bf16_cpu && isa_level() != isa_supported()) return "EMBGEOM_CPU caps the vector level below avx512";
  return bf16_cpu ? "bf16 dot no faster than fp32 on this CPU" : "no native bf16 dot";
}

GemmKernel select_kernel(bool fast) {
  const char* f = std::getenv("EMBGEOM_GEMM");
  const std::string force = f ? f : "";
  EMBGEOM_CHECK(force.empty() || force == "avx512" || force == "avx2" || force == "scalar" ||
                    force == "openblas" || force == "avx512bf16" || force == "amx",
                "EMBGEOM_GEMM: expected 'avx512', 'avx2', 'scalar', 'openblas', 'avx512bf16' or 'amx', got '"
                    << force << "'");
  const Isa level = isa_level();
  if (force == "scalar") return kernel_scalar();
  if (force == "openblas") {
    EMBGEOM_CHECK(blas_available(), "EMBGEOM_GEMM=openblas: " << blas_status());
    return kernel_blas();
  }
#if EMBGEOM_X86
  if (force == "avx2" && level >= Isa::avx2) return kernel_avx2();
  if (force == "avx512" && level >= Isa::avx512) return kernel_avx512();
  if (fast && (force.empty() || force == "amx") && cpu_has_amx_bf16()) return kernel_amx();
  if (fast && (force == "avx512bf16" || (force.empty() && bf16_dot_beats_fp32())) && cpu_has_avx512bf16())
    return kernel_bf16();
  if (level == Isa::avx512) return kernel_avx512();
  if (level == Isa::avx2) return kernel_avx2();
  if (blas_available()) return kernel_blas();
#else
  (void)fast;
  (void)level;  // one vector level off x86: NEON (portable code), the product from OpenBLAS
  if (blas_available()) return kernel_blas();
#endif
  return kernel_scalar();
}

// ---------------------------------------------------------------------------------------------
// packing and the tile driver
// ---------------------------------------------------------------------------------------------

PanelSpec GemmKernel::a_panels() const {
  PanelSpec s;
  s.width = mr;
  s.layout = amx ? PanelLayout::bf16_rows : bf16 ? PanelLayout::bf16_pairs : PanelLayout::f32;
  s.k_multiple = amx ? 16 : 1;
  return s;
}

PanelSpec GemmKernel::b_panels() const {
  PanelSpec s;
  s.width = nr;
  s.layout = bf16 ? PanelLayout::bf16_pairs : PanelLayout::f32;
  s.k_multiple = amx ? 16 : 1;
  return s;
}

// bf16_rows panels start at k0 = 0 only (the AMX kernel takes the whole k in one block)
const void* PackedPanels::panel(int64_t p, int64_t k0) const {
  const int64_t off = (p * kdim + k0) * width;
  return bf16 ? static_cast<const void*>(b16.data() + off) : static_cast<const void*>(f32.data() + off);
}

void pack_panels(const float* x, int64_t rows, int64_t d, int64_t ld, const PanelSpec& spec,
                 PackedPanels& out, int threads) {
  const int width = spec.width;
  const bool bf16 = spec.layout != PanelLayout::f32;
  out.rows = rows;
  out.d = d;
  out.width = width;
  out.bf16 = bf16;
  out.panels = (rows + width - 1) / width;
  out.kdim = bf16 ? (d + 1) / 2 : d;
  out.kdim = (out.kdim + spec.k_multiple - 1) / spec.k_multiple * spec.k_multiple;
  const int64_t total = out.panels * out.kdim * width;
  // (each panel is written in full below, by the thread that packs it)
  if (bf16) {
    out.b16.reset(total, false);
    out.f32.reset(0);
  } else {
    out.f32.reset(total, false);
    out.b16.reset(0);
  }
#ifdef EMBGEOM_OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
#endif
  (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
  for (int64_t p = 0; p < out.panels; ++p) {
    const int64_t r0 = p * width;
    const int64_t nr = std::min<int64_t>(width, rows - r0);
    if (bf16) {
      uint32_t* dst = out.b16.data() + p * out.kdim * width;
      if (nr < width) std::fill_n(dst, out.kdim * width, 0u);  // the last panel's padding rows
      // a pair's word sits at [kk][r] (bf16_pairs) or [r][kk] (bf16_rows)
      const bool by_rows = spec.layout == PanelLayout::bf16_rows;
      const int64_t row_step = by_rows ? out.kdim : 1, k_step = by_rows ? 1 : width;
      const int64_t pairs = (d + 1) / 2;
      for (int64_t r = 0; r < nr; ++r) {
        const float* src = x + (r0 + r) * ld;
        uint32_t* row = dst + r * row_step;
        for (int64_t kk = 0; kk < pairs; ++kk) {
          const uint32_t lo = to_bf16(src[2 * kk]);
          const uint32_t hi = (2 * kk + 1 < d) ? to_bf16(src[2 * kk + 1]) : 0u;
          row[kk * k_step] = lo | (hi << 16);
        }
        for (int64_t kk = pairs; kk < out.kdim; ++kk) row[kk * k_step] = 0u;  // k padding
      }
    } else {
      // k outer: contiguous writes; the panel's nr source rows stay in L1
      float* dst = out.f32.data() + p * out.kdim * width;
      if (nr < width) std::fill_n(dst, out.kdim * width, 0.0f);  // the last panel's padding rows
      const float* src = x + r0 * ld;
      for (int64_t k = 0; k < d; ++k)
        for (int64_t r = 0; r < nr; ++r) dst[k * width + r] = src[r * ld + k];
    }
  }
}

void gemm_tile(const GemmKernel& kern, const PackedPanels& A, int64_t pa0, int64_t pa1,
               const PackedPanels& B, int64_t pb0, int64_t pb1, float* C, int64_t ldc) {
  const int64_t kdim = A.kdim;
  const int64_t kcb = kern.kc_block > 0 ? kern.kc_block : kdim;
  if (kdim == 0) {
    for (int64_t r = 0; r < (pa1 - pa0) * kern.mr; ++r)
      std::memset(C + r * ldc, 0, sizeof(float) * (pb1 - pb0) * kern.nr);
    return;
  }
#if EMBGEOM_X86
  if (kern.amx) amx_configure();
#endif
  for (int64_t k0 = 0; k0 < kdim; k0 += kcb) {
    const int64_t kc = std::min(kcb, kdim - k0);
    const bool acc = k0 > 0;
    for (int64_t q = pb0; q < pb1; ++q) {
      const void* bp = B.panel(q, k0);
      float* cq = C + (q - pb0) * kern.nr;
      for (int64_t p = pa0; p < pa1; ++p)
        kern.ukr(kc, A.panel(p, k0), bp, cq + (p - pa0) * kern.mr * ldc, ldc, acc);
    }
  }
#if EMBGEOM_X86
  if (kern.amx) amx_release();
#endif
}

#if EMBGEOM_X86
// Sequential FMA chain, as in the kernels. Compiled for FMA when the CPU has it (std::fma is
// exact either way; the hardware path is just faster).
EMBGEOM_AVX2 static float dot_exact_fma(const float* a, const float* b, int64_t d) {
  float acc = 0.0f;
  for (int64_t k = 0; k < d; ++k) acc = __builtin_fmaf(a[k], b[k], acc);
  return acc;
}

#endif  // EMBGEOM_X86

static float dot_exact_portable(const float* a, const float* b, int64_t d) {
  float acc = 0.0f;
  for (int64_t k = 0; k < d; ++k) acc = std::fma(a[k], b[k], acc);
  return acc;
}

#if EMBGEOM_X86
// W independent chains side by side (the same sequential FMA chain per pair): a lone chain waits
// on each FMA's latency, W of them fill the pipes.
template <int W>
EMBGEOM_AVX2 static inline void dot_exact_chains(const float* const* pa, const float* const* pb, int64_t d,
                                                 float* acc) {
  for (int w = 0; w < W; ++w) acc[w] = 0.0f;
  for (int64_t k = 0; k < d; ++k)
    for (int w = 0; w < W; ++w) acc[w] = __builtin_fmaf(pa[w][k], pb[w][k], acc[w]);
}

// Pairs [q0, n) (fewer than W) as one block of W, the missing ones repeating the last pair:
// rescoring calls come per band with a few candidates each, and one chain at a time waits on
// every FMA's latency (3 % of a fast run's samples on the vocabulary, Zen 4).
template <int W>
static inline void pad_pairs(const float* const* a, const float* const* b, int64_t q0, int64_t n, const float** pa,
                             const float** pb) {
  for (int w = 0; w < W; ++w) {
    const int64_t q = std::min<int64_t>(q0 + w, n - 1);
    pa[w] = a[q];
    pb[w] = b[q];
  }
}

// The rest [q0, n) of a batch, fewer than 8 pairs: four or eight chains side by side
EMBGEOM_AVX2 static void dot_exact_rest(const float* const* a, const float* const* b, int64_t q0, int64_t n,
                                        int64_t d, float* out) {
  const float* pa[8];
  const float* pb[8];
  alignas(32) float acc[8];
  for (; q0 < n; q0 += 8) {
    if (n - q0 > 4) {
      pad_pairs<8>(a, b, q0, n, pa, pb);
      dot_exact_chains<8>(pa, pb, d, acc);
    } else {
      pad_pairs<4>(a, b, q0, n, pa, pb);
      dot_exact_chains<4>(pa, pb, d, acc);
    }
    for (int64_t q = q0; q < std::min<int64_t>(n, q0 + 8); ++q) out[q] = acc[q - q0];
  }
}

EMBGEOM_AVX2 static void dot_exact_batch_fma(const float* const* a, const float* const* b,
                                             int64_t n, int64_t d, float* out) {
  constexpr int W = 8;
  int64_t q0 = 0;
  for (; q0 + W <= n; q0 += W) dot_exact_chains<W>(a + q0, b + q0, d, out + q0);
  dot_exact_rest(a, b, q0, n, d, out);
}

// r[w] (lane l) <- r[l] (lane w): the 16 x 16 transpose of a register block.
EMBGEOM_AVX512 static inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int q = 0; q < 16; q += 2) {
    t[q] = _mm512_unpacklo_ps(r[q], r[q + 1]);
    t[q + 1] = _mm512_unpackhi_ps(r[q], r[q + 1]);
  }
  for (int q = 0; q < 16; q += 4) {
    r[q] = _mm512_shuffle_ps(t[q], t[q + 2], 0x44);
    r[q + 1] = _mm512_shuffle_ps(t[q], t[q + 2], 0xEE);
    r[q + 2] = _mm512_shuffle_ps(t[q + 1], t[q + 3], 0x44);
    r[q + 3] = _mm512_shuffle_ps(t[q + 1], t[q + 3], 0xEE);
  }
  for (int q = 0; q < 16; q += 8) {
    for (int u = 0; u < 4; ++u) {
      t[q + u] = _mm512_shuffle_f32x4(r[q + u], r[q + u + 4], 0x88);
      t[q + u + 4] = _mm512_shuffle_f32x4(r[q + u], r[q + u + 4], 0xDD);
    }
  }
  for (int u = 0; u < 8; ++u) {
    r[u] = _mm512_shuffle_f32x4(t[u], t[u + 8], 0x88);
    r[u + 8] = _mm512_shuffle_f32x4(t[u], t[u + 8], 0xDD);
  }
}

// 16 pairs (pointers pa, pb) into acc16, one per lane: load 16 consecutive k of each row,
// transpose, then the same sequential FMA chain per lane as the scalar code (bit-identical
// results), with no scalar loads. Rescoring candidates is most of `fast` mode's cost beyond the
// bf16 GEMM.
EMBGEOM_AVX512 static inline void dot_exact_block16(const float* const* pa, const float* const* pb, int64_t d,
                                                    float* acc16) {
  __m512 acc = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= d; k += 16) {
    __m512 ra[16], rb[16];
    for (int w = 0; w < 16; ++w) {
      ra[w] = _mm512_loadu_ps(pa[w] + k);
      rb[w] = _mm512_loadu_ps(pb[w] + k);
    }
    transpose16(ra);
    transpose16(rb);
    for (int kk = 0; kk < 16; ++kk) acc = _mm512_fmadd_ps(ra[kk], rb[kk], acc);
  }
  _mm512_store_ps(acc16, acc);
  for (int w = 0; w < 16; ++w) {
    float v = acc16[w];
    for (int64_t kt = k; kt < d; ++kt) v = __builtin_fmaf(pa[w][kt], pb[w][kt], v);
    acc16[w] = v;
  }
}

EMBGEOM_AVX512 static void dot_exact_batch_avx512(const float* const* a, const float* const* b,
                                                  int64_t n, int64_t d, float* out) {
  int64_t q0 = 0;
  alignas(64) float acc[16];
  for (; q0 + 16 <= n; q0 += 16) {
    dot_exact_block16(a + q0, b + q0, d, acc);
    for (int w = 0; w < 16; ++w) out[q0 + w] = acc[w];
  }
  // the rest: a padded block of 16, or for a few pairs chains side by side
  if (n - q0 > 8) {
    const float* pa[16];
    const float* pb[16];
    pad_pairs<16>(a, b, q0, n, pa, pb);
    dot_exact_block16(pa, pb, d, acc);
    for (int64_t q = q0; q < n; ++q) out[q] = acc[q - q0];
  } else {
    dot_exact_rest(a, b, q0, n, d, out);
  }
}

#endif  // EMBGEOM_X86

// Rescoring only runs for bf16 products (AVX-512 hosts), but stays correct on any level.
void dot_exact_batch(const float* const* a, const float* const* b, int64_t n, int64_t d, float* out) {
#if EMBGEOM_X86
  static const bool no_vec = std::getenv("EMBGEOM_SCALAR_RESCORE") != nullptr;
  const Isa level = isa_level();
  if (level == Isa::avx512 && !no_vec) return dot_exact_batch_avx512(a, b, n, d, out);
  if (level >= Isa::avx2) return dot_exact_batch_fma(a, b, n, d, out);
#endif
  for (int64_t q = 0; q < n; ++q) out[q] = dot_exact_portable(a[q], b[q], d);
}

// bit-identical either way (std::fma is exact): the hardware FMA is only faster
float dot_exact(const float* a, const float* b, int64_t d) {
#if EMBGEOM_X86
  static const bool fma = __builtin_cpu_supports("fma");
  if (fma) return dot_exact_fma(a, b, d);
#endif
  return dot_exact_portable(a, b, d);
}

}  // namespace embgeom
