#include "cpu/blas.h"

#include <dlfcn.h>

#include <mutex>

#include "check.h"

namespace embgeom {
namespace {

// CBLAS enum values (cblas.h): row-major 101, no transpose 111, transpose 112.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);
using SetThreadsFn = void (*)(int);
using CharFn = char* (*)();

struct Blas {
  std::mutex mu;
  SgemmFn sgemm = nullptr;
  std::string status = "not loaded";
};
Blas& blas() {
  static Blas b;
  return b;
}

}  // namespace

bool blas_load(const std::string& path) {
  Blas& b = blas();
  std::lock_guard<std::mutex> lock(b.mu);
  if (b.sgemm) return true;
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = dlerror();
    b.status = std::string("cannot open ") + path + ": " + (e ? e : "?");
    return false;
  }
  auto sgemm = reinterpret_cast<SgemmFn>(dlsym(h, "scipy_cblas_sgemm"));
  auto set_threads = reinterpret_cast<SetThreadsFn>(dlsym(h, "scipy_openblas_set_num_threads"));
  auto corename = reinterpret_cast<CharFn>(dlsym(h, "scipy_openblas_get_corename"));
  auto config = reinterpret_cast<CharFn>(dlsym(h, "scipy_openblas_get_config"));
  if (!sgemm || !set_threads) {
    b.status = path + " lacks scipy_cblas_sgemm / scipy_openblas_set_num_threads";
    return false;
  }
  // one tile per OpenMP thread: OpenBLAS must not start threads of its own
  set_threads(1);
  std::string s = "openblas";
  if (config) {
    const std::string c = config();
    s += " (" + c.substr(0, c.find(' ', c.find(' ') + 1)) + ")";
  }
  if (corename) s += std::string(" core=") + corename();
  b.status = s;
  b.sgemm = sgemm;
  return true;
}

bool blas_available() { return blas().sgemm != nullptr; }

std::string blas_status() { return blas().status; }

void blas_set_unavailable(const std::string& why) {
  Blas& b = blas();
  std::lock_guard<std::mutex> lock(b.mu);
  if (!b.sgemm) b.status = why;
}

void blas_sgemm_nt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
                   int64_t ldb, float* C, int64_t ldc) {
  SgemmFn f = blas().sgemm;
  EMBGEOM_CHECK(f != nullptr, "blas: no BLAS library loaded");
  if (m <= 0 || n <= 0) return;
  f(kRowMajor, kNoTrans, kTrans, int(m), int(n), int(k), 1.0f, A, int(lda), B, int(ldb), 0.0f, C,
    int(ldc));
}

}  // namespace embgeom
