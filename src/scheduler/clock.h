// Clock: the scheduler's source of time, injected so batching tests can run on
// a FakeClock instead of sleeping. Thread-safe.
#ifndef ATTNSERVE_SCHEDULER_CLOCK_H_
#define ATTNSERVE_SCHEDULER_CLOCK_H_

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace attnserve {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() = 0;
  // Blocks on `cv` (with `mu` held) until signalled or `deadline` passes on
  // this clock. Returns true on timeout. A FakeClock times out only when the
  // test advances it.
  virtual bool WaitWithDeadline(absl::CondVar& cv, absl::Mutex& mu, absl::Time deadline) = 0;

  static Clock* Real();  // process-wide real-time clock; never deleted
};

}  // namespace attnserve

#endif  // ATTNSERVE_SCHEDULER_CLOCK_H_
