// Packed tile GEMM for all-pairs kernels: C = A * B^T with A (rows x d) and B (cols x d)
// row-major fp32. Whole matrices are packed once into k-major micro-panels; a tile product
// then reads panels only (BLIS-style, k-blocked), through a micro-kernel picked at runtime:
// AVX-512 (fp32 or bf16 dot-products), AVX2+FMA, or portable scalar.
//
// OpenBLAS (cpu/blas.h) is the other product source: GemmKernel::blas, rows unpacked.
//
// Every own fp32 kernel computes each C[i][j] as the same sequential FMA chain
// acc = fma(a[k], b[k], acc), k = 0..d-1, starting from 0, so a pair's value does not depend on
// the kernel, the tile it falls in or its position in a micro-tile; `dot_exact` reproduces it
// bit for bit (used to rescore bf16 candidates).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace embgeom {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// 64-byte aligned buffer, zero-initialised unless the caller writes every element itself.
template <class T>
struct AlignedBuf {
  std::unique_ptr<T[], FreeDeleter> p;
  int64_t n = 0;
  void reset(int64_t count, bool zero = true);
  T* data() { return p.get(); }
  const T* data() const { return p.get(); }
};

// std::vector's allocator that leaves new elements uninitialised: resize value-initialises,
// a serial zero fill (and its page faults) of row buffers every element of which is written
// next, in parallel.
template <class T>
struct NoInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = NoInitAllocator<U>;
  };
  NoInitAllocator() = default;
  template <class U>
  NoInitAllocator(const NoInitAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* q) noexcept {
    ::new (static_cast<void*>(q)) U;
  }
  template <class U, class... Args>
  void construct(U* q, Args&&... args) {
    ::new (static_cast<void*>(q)) U(std::forward<Args>(args)...);
  }
};
using RowBuffer = std::vector<float, NoInitAllocator<float>>;

using MicroKernel = void (*)(int64_t kc, const void* a, const void* b, float* c, int64_t ldc,
                             bool accumulate);

// How a micro-panel holds its rows.
enum class PanelLayout : int {
  f32,         // [k][r] float32
  bf16_pairs,  // [k/2][r][2] bf16: the dot-product kernels' operands, and AMX's B tiles
  bf16_rows,   // [r][k/2][2] bf16, each row's k contiguous: AMX's A tiles
};

// One side's panels: `width` rows each, kernel k units padded to a multiple of `k_multiple`.
struct PanelSpec {
  int width = 1;
  PanelLayout layout = PanelLayout::f32;
  int k_multiple = 1;
};

struct GemmKernel {
  int mr = 0, nr = 0;     // micro-tile rows (from A) and columns (from B)
  bool bf16 = false;      // panels hold bf16 pairs, kc counts pairs of k
  bool amx = false;       // AMX tiles: A panels in bf16_rows, k in steps of 16 pairs, one k-block
  int64_t kc_block = 0;   // k-block length (in kernel k units); 0: the whole k in one block
  MicroKernel ukr = nullptr;
  bool blas = false;      // products from blas_sgemm_nt on unpacked rows (no panels, no ukr)
  const char* name = "";
  PanelSpec a_panels() const;
  PanelSpec b_panels() const;
};

// Best product for this CPU at isa_level() (cpu/isa.h). fast=true asks for bf16 products (AMX
// tiles where the CPU has them, else the AVX-512 bf16 dot where it beats fp32; falls back to the
// exact product elsewhere; check .bf16).
// EMBGEOM_GEMM=avx512|avx2|scalar|openblas forces one fp32 product, EMBGEOM_GEMM=avx512bf16|amx
// fast mode's bf16 product (tests, benchmarks; exact mode keeps its own).
GemmKernel select_kernel(bool fast);
// Why fast mode runs the exact product here ("" where it runs a bf16 product).
const char* fast_product_note();

// Matrix packed into micro-panels of `width` rows: panel p holds rows [p*width, p*width+width)
// in its spec's layout, zero padded in rows and k.
struct PackedPanels {
  int64_t rows = 0, d = 0, width = 0, panels = 0;
  int64_t kdim = 0;  // kernel k units per panel: d (fp32) or ceil(d/2) (bf16), padded to k_multiple
  bool bf16 = false;
  AlignedBuf<float> f32;
  AlignedBuf<uint32_t> b16;  // two bf16 per word, low half = even k
  const void* panel(int64_t p, int64_t k0) const;  // start of panel p at kernel k unit k0
};

// Pack `rows` rows of `x` (row stride ld floats, d columns) into panels as `spec` says
// (a kernel's a_panels() or b_panels()).
void pack_panels(const float* x, int64_t rows, int64_t d, int64_t ld, const PanelSpec& spec,
                 PackedPanels& out, int threads = 1);

// C[(p - pa0)*mr + r][(q - pb0)*nr + c] = A-panel p row r . B-panel q row c for p in [pa0, pa1),
// q in [pb0, pb1); C has ldc >= (pb1 - pb0) * nr floats per row and (pa1 - pa0) * mr rows.
void gemm_tile(const GemmKernel& k, const PackedPanels& A, int64_t pa0, int64_t pa1,
               const PackedPanels& B, int64_t pb0, int64_t pb1, float* C, int64_t ldc);

// The fp32 value the fp32 kernels produce for one pair (same FMA chain).
float dot_exact(const float* a, const float* b, int64_t d);

// out[q] = dot_exact(a[q], b[q], d) for q < n, several chains interleaved (throughput-bound).
void dot_exact_batch(const float* const* a, const float* const* b, int64_t n, int64_t d, float* out);

// Round-to-nearest-even fp32 -> bf16 bits (finite inputs), saturating: a value past bf16's
// largest finite one (|x| >= 0x1.ff8p127, 3.3961e38) becomes it, not inf, so its rounding error
// stays finite and inside fast mode's bound (an inf had made inf * 0 = NaN products that no
// filter passes, pairs lost). Inline: packing calls it per element.
inline uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
  if ((r & 0x7f800000u) == 0x7f800000u && (u & 0x7f800000u) != 0x7f800000u)
    return static_cast<uint16_t>(((u >> 16) & 0x8000u) | 0x7f7fu);
  return static_cast<uint16_t>(r >> 16);
}

}  // namespace embgeom
