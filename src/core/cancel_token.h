// CancelToken: tells running work that nobody waits for its result any more.
// A backend polls StopRequested() between work items (query tiles, key
// chunks, query rows) and skips the rest of a job once it answers true; the
// caller of Backend::Run then reads stopped() to learn that the job's outputs
// are incomplete. Other jobs of the same batch are not affected.
//
// Thread-safe: StopRequested() may be called from many threads at once.
#ifndef ATTNSERVE_CORE_CANCEL_TOKEN_H_
#define ATTNSERVE_CORE_CANCEL_TOKEN_H_

#include <atomic>
#include <functional>
#include <utility>

namespace attnserve {

class CancelToken {
 public:
  CancelToken() = default;
  // `should_stop` is polled by StopRequested() until it first answers true
  // (the caller cancelled, the deadline passed, the server gave up); it must
  // be cheap (well under a microsecond) and thread-safe.
  explicit CancelToken(std::function<bool()> should_stop) : should_stop_(std::move(should_stop)) {}

  CancelToken(const CancelToken&) = delete;
  CancelToken& operator=(const CancelToken&) = delete;

  // True once the work should stop; latched, so every later call (and
  // stopped()) answers true too.
  bool StopRequested() const {
    if (stopped_.load(std::memory_order_relaxed)) return true;
    if (should_stop_ && should_stop_()) {
      stopped_.store(true, std::memory_order_relaxed);
      return true;
    }
    return false;
  }

  // Whether StopRequested() ever answered true: the work may have been cut
  // short and its outputs must not be used.
  bool stopped() const { return stopped_.load(std::memory_order_relaxed); }

 private:
  std::function<bool()> should_stop_;
  mutable std::atomic<bool> stopped_{false};
};

}  // namespace attnserve

#endif  // ATTNSERVE_CORE_CANCEL_TOKEN_H_
