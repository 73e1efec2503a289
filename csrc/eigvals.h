#pragma once
#include <cstdint>

namespace embgeom {

// Eigenvalue magnitudes |lambda| of k real n x n matrices (row-major float64, matrix i at
// a + i * n * n): out (k, n), each matrix's magnitudes in no particular order. The real
// double-shift QR algorithm (balancing, Householder reduction to Hessenberg form, then Francis
// double-shift sweeps with per-matrix deflation), run in lockstep over several matrices, one per
// vector lane (docs/architecture.md, eigvals.cpp): the von Neumann entropy of `embgeom text --matrices`,
// where LAPACK's dgeev took about 4.5 ms a 128 x 128 block one matrix at a time. ok[i] = 0 where
// matrix i did not converge within 30 max(10, n) sweeps without a deflation, holds a value
// that is not finite, or has a row or column without off-diagonal entries (an eigenvalue LAPACK
// permutes out, which the sweeps lose digits of in triangular blocks); its magnitudes are then
// not to be used: the caller computes them another way.
// threads: OpenMP threads over groups of them (0: the default).
void eigvals_abs(const double* a, int64_t k, int64_t n, double* out, uint8_t* ok, int threads);

// The build eigvals_abs takes at the current vector level (cpu/isa.h).
const char* eigvals_abs_path();

}  // namespace embgeom
