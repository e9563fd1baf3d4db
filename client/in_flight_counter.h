// InFlightCounter: counts the calls and streams of an AttnClient that still
// hold a reference to its channel, so that the client's destructor can wait
// for them. Without the wait, the last reference to a channel could be
// dropped inside one of that channel's own callbacks, which tears the channel
// down under gRPC's feet (seen as a double free in gRPC 1.51).
// Thread-safe.
#ifndef ATTNSERVE_CLIENT_IN_FLIGHT_COUNTER_H_
#define ATTNSERVE_CLIENT_IN_FLIGHT_COUNTER_H_

#include <cstdint>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace attnserve::client {

class InFlightCounter {
 public:
  // Holds one count from construction to destruction. Declare it as the
  // first member of the object that owns the grpc::ClientContext, so the
  // context is destroyed before the count is released. Move-only.
  class Guard {
   public:
    Guard() = default;
    explicit Guard(std::shared_ptr<InFlightCounter> counter) : counter_(std::move(counter)) {
      if (counter_) counter_->Add(1);
    }
    Guard(Guard&&) = default;
    Guard& operator=(Guard&& other) {
      Reset();
      counter_ = std::move(other.counter_);
      return *this;
    }
    ~Guard() { Reset(); }

   private:
    void Reset() {
      // The counter stays alive while this guard holds it, so its mutex is
      // never destroyed under the Add.
      if (counter_) counter_->Add(-1);
      counter_.reset();
    }
    std::shared_ptr<InFlightCounter> counter_;
  };

  // Blocks until every Guard is gone.
  void WaitForZero() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](int64_t* n) { return *n == 0; }, &count_));
  }

 private:
  void Add(int64_t delta) {
    absl::MutexLock lock(&mu_);
    count_ += delta;
  }

  absl::Mutex mu_;
  int64_t count_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_IN_FLIGHT_COUNTER_H_
