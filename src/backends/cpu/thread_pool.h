// ThreadPool: a fixed set of worker threads, started once, that run
// ParallelFor loops over independent work items. The calling thread takes part
// as thread 0, so a pool of N threads starts N-1 workers.
//
// Thread safety: ParallelFor may be called from several threads at once; the
// calls are serialised (one loop runs at a time).
#ifndef ATTNSERVE_BACKENDS_CPU_THREAD_POOL_H_
#define ATTNSERVE_BACKENDS_CPU_THREAD_POOL_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace attnserve {

class ThreadPool {
 public:
  // `num_threads` >= 1 counts the caller; values below 1 are taken as 1.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();  // joins the workers; no loop may be running

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Calls fn(item, thread_index) once for every item in [0, num_items), items
  // handed out dynamically in increasing order; thread_index is in
  // [0, num_threads()). Blocks until every item is done. `fn` must not throw
  // and must not call ParallelFor on this pool.
  void ParallelFor(int64_t num_items, const std::function<void(int64_t, int)>& fn);

 private:
  void WorkerLoop(int thread_index);
  void RunItems(int thread_index);

  const int num_threads_;
  std::vector<std::thread> workers_;

  absl::Mutex run_mu_;  // serialises ParallelFor callers

  absl::Mutex mu_;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;  // bumped for every loop
  int busy_workers_ ABSL_GUARDED_BY(mu_) = 0;     // workers still inside the loop
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // The current loop; written under mu_ before generation_ is bumped, read by
  // workers after they observe the new generation.
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t num_items_ = 0;
  std::atomic<int64_t> next_item_{0};
};

}  // namespace attnserve

#endif  // ATTNSERVE_BACKENDS_CPU_THREAD_POOL_H_
