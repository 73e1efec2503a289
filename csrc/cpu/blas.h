// Tile products from a tuned BLAS: OpenBLAS as shipped in the `scipy-openblas32` wheel (the
// build numpy uses; its kernels are chosen at run time per CPU: Haswell, Zen, SkylakeX,
// Cooperlake, Neoverse...). The library is opened at run time (dlopen), so the core builds and
// runs without it and falls back to its own kernels (docs/architecture.md, CPU dispatch).
// Each OpenMP thread calls sgemm on its own tile with OpenBLAS's own threading set to 1.
#pragma once
#include <cstdint>
#include <string>

namespace embgeom {

// Open the library at `path` (e.g. <wheel>/lib/libscipy_openblas.so). Returns false and keeps
// the reason (blas_status()) when it cannot be opened or lacks the functions. Idempotent: the
// first successful load wins.
bool blas_load(const std::string& path);
bool blas_available();
// "openblas <version> core=<kernel family>" when loaded, else why not.
std::string blas_status();
// Record why no library was loaded (e.g. the wheel is not installed).
void blas_set_unavailable(const std::string& why);

// C (m x n, row stride ldc) = A (m x k, row stride lda) * B^T (B: n x k, row stride ldb).
void blas_sgemm_nt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
                   int64_t ldb, float* C, int64_t ldc);

}  // namespace embgeom
