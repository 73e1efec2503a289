#pragma once
#include <cstdint>

namespace embgeom {

// Householder reduction of k real symmetric n x n matrices (row-major float64, matrix i at
// a + i * n * n; only the lower triangle is read) to tridiagonal form, run in lockstep over several
// matrices, one per vector lane (as eigvals_abs): d (k, n) the diagonals, e (k, n - 1) the
// off-diagonals (n = 0 or 1: none), orthogonally similar to the matrix up to LAPACK dsytd2's
// rounding. Each matrix is scaled by a power of two near its largest magnitude while it is
// reduced (exact; undone on d and e). ok[i] = 0 where matrix i holds a value that is not finite
// or d, e do not come out finite. threads: OpenMP threads over groups of them (0: the default).
// sv_counts (analysis/heads/matrices.py) counts the squared singular values of `embgeom text
// --matrices`' blocks on these, where LAPACK's dsyevd took 0.6-0.75 ms a 128 x 128 Gram matrix.
void sym_tridiagonal(const double* a, int64_t k, int64_t n, double* d, double* e, uint8_t* ok, int threads);

// Sturm counts of the symmetric tridiagonal matrices (d (k, n), e (k, n - 1)): counts[i * T + t]
// = the number of eigenvalues of matrix i below x[i * T + t] (LAPACK dstebz's count: a pivot of
// magnitude below pivmin counts as negative, so an eigenvalue equal to x may count; the count is
// exact for a matrix within a few ulps of each entry).
void tridiag_count_below(const double* d, const double* e, int64_t k, int64_t n, const double* x, int64_t T,
                         int64_t* counts);

// The largest eigenvalue of each symmetric tridiagonal matrix, from above: hi[i] >= lambda_max
// >= hi[i] - tol[i] (bisection with Sturm counts from a Gershgorin bound; tol 0: to the
// float64 resolution). n = 0: 0.
void tridiag_largest(const double* d, const double* e, int64_t k, int64_t n, const double* tol, double* hi);

// The build sym_tridiagonal takes at the current vector level (cpu/isa.h).
const char* sym_tridiagonal_path();

}  // namespace embgeom
