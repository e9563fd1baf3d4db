// FakeClock: a Clock whose time moves only when a test calls Advance(), so
// batching, deadline and drain tests run without sleeping. A test learns that
// the code under test has gone to sleep on the clock with BlockUntilWaiting().
//
// Thread-safe. Lock order: a waiter's own mutex, then the clock's; Advance()
// takes a waiter's mutex only after releasing the clock's. Objects that wait on
// a FakeClock must not be destroyed while another thread is inside Advance().
#ifndef ATTNSERVE_SCHEDULER_FAKE_CLOCK_H_
#define ATTNSERVE_SCHEDULER_FAKE_CLOCK_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "scheduler/clock.h"

namespace attnserve {

class FakeClock : public Clock {
 public:
  // Starts at `start` (a fixed, arbitrary instant by default).
  explicit FakeClock(absl::Time start = absl::FromUnixSeconds(1'700'000'000));

  absl::Time Now() override;

  // Waits on `cv` until the owner signals it or until Advance() is called;
  // every Advance() wakes every waiter (a spurious wakeup for those whose
  // deadline has not passed), so callers must re-check their state. Returns
  // true when `deadline` has passed on this clock.
  bool WaitWithDeadline(absl::CondVar& cv, absl::Mutex& mu, absl::Time deadline) override;

  // Moves time forward by `d` (>= 0) and wakes every waiter.
  void Advance(absl::Duration d);

  // Blocks until at least `count` threads are waiting on this clock with
  // exactly `deadline`, each having started its wait after the latest
  // Advance() (so each has seen the current time). An idle waiter waits with
  // absl::InfiniteFuture(). Returns false if that has not happened within
  // `timeout` of real time, a guard that turns a hang into a test failure.
  [[nodiscard]] bool BlockUntilWaiting(absl::Time deadline, int count = 1,
                                       absl::Duration timeout = absl::Seconds(30));

  // Threads waiting on this clock now.
  int waiters();

 private:
  struct Waiter {
    absl::CondVar* cv;
    absl::Mutex* mu;
    absl::Time deadline;
    int64_t epoch;  // value of epoch_ when the wait started
  };

  absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
  int64_t epoch_ ABSL_GUARDED_BY(mu_) = 0;  // number of Advance() calls
  std::vector<std::shared_ptr<Waiter>> waiters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace attnserve

#endif  // ATTNSERVE_SCHEDULER_FAKE_CLOCK_H_
