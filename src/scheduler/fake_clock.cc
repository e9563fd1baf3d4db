#include "scheduler/fake_clock.h"

#include <algorithm>
#include <utility>

#include "absl/base/internal/raw_logging.h"

namespace attnserve {

FakeClock::FakeClock(absl::Time start) : now_(start) {}

absl::Time FakeClock::Now() {
  absl::MutexLock lock(&mu_);
  return now_;
}

bool FakeClock::WaitWithDeadline(absl::CondVar& cv, absl::Mutex& mu, absl::Time deadline) {
  auto waiter = std::make_shared<Waiter>();
  {
    absl::MutexLock lock(&mu_);
    if (now_ >= deadline) return true;
    waiter->cv = &cv;
    waiter->mu = &mu;
    waiter->deadline = deadline;
    waiter->epoch = epoch_;
    waiters_.push_back(waiter);
  }
  // The caller holds `mu` from here until Wait() releases it, and Advance()
  // signals only while holding `mu`, so no wakeup can be lost in between.
  cv.Wait(&mu);
  absl::MutexLock lock(&mu_);
  waiters_.erase(std::find(waiters_.begin(), waiters_.end(), waiter));
  return now_ >= deadline;
}

void FakeClock::Advance(absl::Duration d) {
  ABSL_RAW_CHECK(d >= absl::ZeroDuration(), "FakeClock cannot go back in time");
  std::vector<std::shared_ptr<Waiter>> to_wake;
  {
    absl::MutexLock lock(&mu_);
    now_ += d;
    ++epoch_;
    to_wake = waiters_;
  }
  for (const std::shared_ptr<Waiter>& w : to_wake) {
    absl::MutexLock lock(w->mu);
    w->cv->SignalAll();
  }
}

bool FakeClock::BlockUntilWaiting(absl::Time deadline, int count, absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    int n = 0;
    for (const std::shared_ptr<Waiter>& w : waiters_) {
      if (w->deadline == deadline && w->epoch == epoch_) ++n;
    }
    return n >= count;
  };
  return mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
}

int FakeClock::waiters() {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(waiters_.size());
}

}  // namespace attnserve
