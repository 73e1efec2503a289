// Exceptions inside OpenMP parallel regions. One that leaves a region's thread calls
// std::terminate: the process aborts with no message (a std::bad_alloc of a thread's row lists
// had ended Python with SIGABRT). Work inside a region runs through run(); the first exception
// is kept, later work is skipped, and rethrow() raises it once the region has ended.
#pragma once

#include <atomic>
#include <exception>
#include <mutex>

namespace embgeom {

class ParallelErrors {
 public:
  template <class F>
  void run(F&& work) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return;
    try {
      work();
    } catch (...) {
      std::lock_guard<std::mutex> hold(mutex_);
      if (!first_) first_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::exception_ptr first_;
  std::mutex mutex_;
};

}  // namespace embgeom
