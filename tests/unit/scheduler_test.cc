// Batcher tests on a FakeClock: time moves only when a test advances it, and
// FakeClock::BlockUntilWaiting tells when the scheduler has gone to sleep on
// the clock, so no test sleeps. A fake backend records each batch by task id
// (carried in params.seqlen_q; it reads no tensors) and can hold its callers
// until released.
#include "scheduler/scheduler.h"

#include <atomic>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "attention/job.h"
#include "backends/backend.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "scheduler/fake_clock.h"

namespace attnserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::UnorderedElementsAre;

// Bounds a wait that a correct scheduler ends at once; it only turns a hang
// into a failure.
constexpr absl::Duration kHangGuard = absl::Seconds(30);

class FakeBackend : public Backend {
 public:
  explicit FakeBackend(std::string name) { info_.name = std::move(name); }

  const BackendInfo& info() const override { return info_; }
  absl::Status Supports(const AttentionParams&) const override { return absl::OkStatus(); }

  absl::Status Run(absl::Span<const AttentionParams> batch) override {
    absl::MutexLock lock(&mu_);
    std::vector<int> ids;
    for (const AttentionParams& p : batch) ids.push_back(p.seqlen_q);
    batches_.push_back(std::move(ids));
    ++running_;
    mu_.Await(absl::Condition(
        +[](bool* hold) { return !*hold; }, &hold_));
    --running_;
    return status_;
  }

  // Run() blocks until Release().
  void Hold() {
    absl::MutexLock lock(&mu_);
    hold_ = true;
  }
  void Release() {
    absl::MutexLock lock(&mu_);
    hold_ = false;
  }
  void set_status(absl::Status s) {
    absl::MutexLock lock(&mu_);
    status_ = std::move(s);
  }

  // Waits until `n` calls are inside Run() at once.
  bool WaitUntilRunning(int n) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return running_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), kHangGuard);
  }

  std::vector<std::vector<int>> batches() {
    absl::MutexLock lock(&mu_);
    return batches_;
  }

 private:
  BackendInfo info_;
  absl::Mutex mu_;
  bool hold_ ABSL_GUARDED_BY(mu_) = false;
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<int>> batches_ ABSL_GUARDED_BY(mu_);
};

struct TaskSpec {
  int id = 0;
  Backend* backend = nullptr;
  DType dtype = DType::kF32;
  Variant variant = Variant::kSoftmax;
  double flops = 1;
  int64_t bytes = 100;
  int32_t priority = 0;
  absl::Time deadline = absl::InfiniteFuture();
  std::function<bool()> is_cancelled = nullptr;
  TaskStage* stage = nullptr;
};

struct Outcome {
  int calls = 0;
  absl::Status status;
  TaskTiming timing;
  bool job_returned = false;  // `done` got this task's job back
};

// Makes tasks and records what their `done` callbacks receive.
class Recorder {
 public:
  Task MakeTask(const TaskSpec& spec) {
    auto job = std::make_unique<AttentionJob>();
    job->params.dtype = spec.dtype;
    job->params.variant = spec.variant;
    job->params.seqlen_q = spec.id;
    job->flops = spec.flops;
    job->cost = spec.flops;
    job->input_bytes = spec.bytes;
    Task task;
    task.job = std::move(job);
    task.backend = spec.backend;
    task.priority = spec.priority;
    task.deadline = spec.deadline;
    task.is_cancelled = spec.is_cancelled;
    task.stage = spec.stage;
    const int id = spec.id;
    task.done = [this, id](absl::Status status, std::unique_ptr<AttentionJob> job,
                           const TaskTiming& timing) {
      absl::MutexLock lock(&mu_);
      Outcome& o = outcomes_[id];
      ++o.calls;
      ++total_calls_;
      o.status = std::move(status);
      o.timing = timing;
      o.job_returned = job != nullptr && job->params.seqlen_q == id;
    };
    return task;
  }

  void NoteAdmitted(int id) {
    absl::MutexLock lock(&mu_);
    admitted_.push_back(id);
  }

  // Waits until `done` has been called `n` times in all.
  bool WaitForDone(int n) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return total_calls_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), kHangGuard);
  }

  int admitted() {
    absl::MutexLock lock(&mu_);
    return static_cast<int>(admitted_.size());
  }

  Outcome outcome(int id) {
    absl::MutexLock lock(&mu_);
    return outcomes_[id];
  }

  // Every admitted task was answered exactly once, and no rejected one was.
  void ExpectEachAdmittedDoneOnce() {
    absl::MutexLock lock(&mu_);
    int admitted_calls = 0;
    for (int id : admitted_) {
      EXPECT_EQ(outcomes_[id].calls, 1) << "task " << id;
      EXPECT_TRUE(outcomes_[id].job_returned) << "task " << id;
      admitted_calls += outcomes_[id].calls;
    }
    EXPECT_EQ(total_calls_, admitted_calls) << "a rejected task's done was called";
  }

 private:
  absl::Mutex mu_;
  std::map<int, Outcome> outcomes_ ABSL_GUARDED_BY(mu_);
  std::vector<int> admitted_ ABSL_GUARDED_BY(mu_);
  int total_calls_ ABSL_GUARDED_BY(mu_) = 0;
};

class RecordingObserver : public SchedulerObserver {
 public:
  struct BatchEvent {
    std::string backend;
    int32_t batch_size;
    double flops;
    absl::Duration compute;
  };
  void OnBatch(const std::string& backend, int32_t batch_size, double flops,
               absl::Duration compute) override {
    absl::MutexLock lock(&mu_);
    batches.push_back({backend, batch_size, flops, compute});
  }
  void OnDequeue(absl::Duration queued) override {
    absl::MutexLock lock(&mu_);
    dequeued.push_back(queued);
  }
  void OnQueueDepth(int64_t depth) override {
    absl::MutexLock lock(&mu_);
    depths.push_back(depth);
  }

  absl::Mutex mu_;
  std::vector<BatchEvent> batches ABSL_GUARDED_BY(mu_);
  std::vector<absl::Duration> dequeued ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> depths ABSL_GUARDED_BY(mu_);
};

class SchedulerTest : public ::testing::Test {
 protected:
  void TearDown() override {
    backend_.Release();
    other_backend_.Release();
    scheduler_.reset();  // drains: every admitted task gets its answer
    recorder_.ExpectEachAdmittedDoneOnce();
  }

  void Start(SchedulerOptions options, SchedulerObserver* observer = nullptr) {
    absl::StatusOr<std::unique_ptr<Scheduler>> s = Scheduler::Create(options, &clock_, observer);
    ASSERT_TRUE(s.ok()) << s.status();
    scheduler_ = *std::move(s);
  }

  absl::Status Submit(TaskSpec spec) {
    if (spec.backend == nullptr) spec.backend = &backend_;
    absl::Status s = scheduler_->Submit(recorder_.MakeTask(spec));
    if (s.ok()) recorder_.NoteAdmitted(spec.id);
    return s;
  }

  FakeClock clock_;
  const absl::Time start_ = clock_.Now();
  FakeBackend backend_{"fake"};
  FakeBackend other_backend_{"other"};
  Recorder recorder_;
  std::unique_ptr<Scheduler> scheduler_;  // last: destroyed first
};

SchedulerOptions Options(int32_t max_batch_size, absl::Duration delay) {
  SchedulerOptions o;
  o.max_batch_size = max_batch_size;
  o.max_queue_delay_us = absl::ToInt64Microseconds(delay);
  return o;
}

TEST_F(SchedulerTest, FullBatchRunsAtOnce) {
  Start(Options(4, absl::Seconds(1)));
  for (int id = 1; id <= 3; ++id) ASSERT_TRUE(Submit({.id = id}).ok());
  ASSERT_TRUE(clock_.BlockUntilWaiting(start_ + absl::Seconds(1)));
  EXPECT_THAT(backend_.batches(), IsEmpty());  // three of four: waits to fill

  ASSERT_TRUE(Submit({.id = 4}).ok());
  ASSERT_TRUE(recorder_.WaitForDone(4));
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(1, 2, 3, 4)));
  for (int id = 1; id <= 4; ++id) {
    const Outcome o = recorder_.outcome(id);
    EXPECT_TRUE(o.status.ok()) << o.status;
    EXPECT_EQ(o.timing.batch_size, 4);
    EXPECT_EQ(o.timing.queue, absl::ZeroDuration());  // the clock never moved
  }
}

TEST_F(SchedulerTest, PartialBatchFlushesExactlyAtTheDelay) {
  const absl::Duration delay = absl::Microseconds(500);
  Start(Options(8, delay));
  ASSERT_TRUE(Submit({.id = 1}).ok());
  ASSERT_TRUE(Submit({.id = 2}).ok());
  ASSERT_TRUE(clock_.BlockUntilWaiting(start_ + delay));

  clock_.Advance(delay - absl::Microseconds(1));
  ASSERT_TRUE(clock_.BlockUntilWaiting(start_ + delay));  // woke, looked, went back to sleep
  EXPECT_THAT(backend_.batches(), IsEmpty());
  EXPECT_EQ(scheduler_->queue_depth(), 2);

  clock_.Advance(absl::Microseconds(1));
  ASSERT_TRUE(recorder_.WaitForDone(2));
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(1, 2)));
  EXPECT_EQ(recorder_.outcome(1).timing.queue, delay);
  EXPECT_EQ(recorder_.outcome(2).timing.batch_size, 2);
  EXPECT_EQ(scheduler_->queue_depth(), 0);
}

TEST_F(SchedulerTest, DelayCountsFromTheOldestTask) {
  const absl::Duration delay = absl::Microseconds(500);
  Start(Options(8, delay));
  ASSERT_TRUE(Submit({.id = 1}).ok());
  clock_.Advance(absl::Microseconds(300));
  ASSERT_TRUE(Submit({.id = 2}).ok());
  ASSERT_TRUE(clock_.BlockUntilWaiting(start_ + delay));
  clock_.Advance(absl::Microseconds(200));
  ASSERT_TRUE(recorder_.WaitForDone(2));
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(1, 2)));
  EXPECT_EQ(recorder_.outcome(1).timing.queue, absl::Microseconds(500));
  EXPECT_EQ(recorder_.outcome(2).timing.queue, absl::Microseconds(200));
}

TEST_F(SchedulerTest, ZeroDelayRunsEachTaskWithoutWaiting) {
  Start(Options(8, absl::ZeroDuration()));
  ASSERT_TRUE(Submit({.id = 1}).ok());
  ASSERT_TRUE(recorder_.WaitForDone(1));
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(1)));
}

TEST_F(SchedulerTest, FlopsBudgetSplitsBatches) {
  const absl::Duration delay = absl::Microseconds(500);
  SchedulerOptions options = Options(8, delay);
  options.max_batch_flops = 100;
  Start(options);
  ASSERT_TRUE(Submit({.id = 1, .flops = 40}).ok());
  ASSERT_TRUE(Submit({.id = 2, .flops = 40}).ok());
  ASSERT_TRUE(Submit({.id = 3, .flops = 40}).ok());  // 120 queued: over budget, so "full"
  ASSERT_TRUE(recorder_.WaitForDone(2));
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(1, 2)));
  EXPECT_EQ(scheduler_->queue_depth(), 1);

  ASSERT_TRUE(clock_.BlockUntilWaiting(start_ + delay));
  clock_.Advance(delay);
  ASSERT_TRUE(recorder_.WaitForDone(3));
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(1, 2), ElementsAre(3)));
}

TEST_F(SchedulerTest, TaskOverTheFlopsBudgetRunsAlone) {
  SchedulerOptions options = Options(8, absl::Seconds(1));
  options.max_batch_flops = 100;
  RecordingObserver observer;
  Start(options, &observer);
  ASSERT_TRUE(Submit({.id = 1, .flops = 30}).ok());
  ASSERT_TRUE(Submit({.id = 2, .flops = 500}).ok());
  ASSERT_TRUE(recorder_.WaitForDone(2));  // both flushed at once, no delay
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(1), ElementsAre(2)));
  absl::MutexLock lock(&observer.mu_);
  ASSERT_EQ(observer.batches.size(), 2u);
  EXPECT_EQ(observer.batches[0].flops, 30);
  EXPECT_EQ(observer.batches[1].flops, 500);
}

TEST_F(SchedulerTest, IncompatibleTasksAreNotBatchedTogether) {
  const absl::Duration delay = absl::Microseconds(500);
  Start(Options(2, delay));
  ASSERT_TRUE(Submit({.id = 1}).ok());
  ASSERT_TRUE(Submit({.id = 2, .dtype = DType::kF16}).ok());
  ASSERT_TRUE(Submit({.id = 3, .backend = &other_backend_}).ok());
  ASSERT_TRUE(Submit({.id = 4, .variant = Variant::kLinear}).ok());
  ASSERT_TRUE(Submit({.id = 5}).ok());  // fills {1, 5}
  ASSERT_TRUE(recorder_.WaitForDone(2));
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(1, 5)));

  ASSERT_TRUE(clock_.BlockUntilWaiting(start_ + delay));
  clock_.Advance(delay);
  ASSERT_TRUE(recorder_.WaitForDone(5));
  EXPECT_THAT(backend_.batches(),
              UnorderedElementsAre(ElementsAre(1, 5), ElementsAre(2), ElementsAre(4)));
  EXPECT_THAT(other_backend_.batches(), ElementsAre(ElementsAre(3)));
}

TEST_F(SchedulerTest, ExpiredTaskIsAnsweredAndNeverComputed) {
  const absl::Duration delay = absl::Microseconds(500);
  Start(Options(8, delay));
  ASSERT_TRUE(Submit({.id = 1, .deadline = start_ + absl::Microseconds(100)}).ok());
  ASSERT_TRUE(Submit({.id = 2, .deadline = start_ + absl::Seconds(1)}).ok());
  ASSERT_TRUE(clock_.BlockUntilWaiting(start_ + delay));
  clock_.Advance(delay);
  ASSERT_TRUE(recorder_.WaitForDone(2));
  EXPECT_EQ(recorder_.outcome(1).status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(recorder_.outcome(1).timing.batch_size, 0);
  EXPECT_EQ(recorder_.outcome(1).timing.queue, delay);
  EXPECT_TRUE(recorder_.outcome(2).status.ok());
  EXPECT_EQ(recorder_.outcome(2).timing.batch_size, 1);
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(2)));
}

TEST_F(SchedulerTest, BatchOfOnlyExpiredTasksNeverCallsTheBackend) {
  const absl::Duration delay = absl::Microseconds(500);
  Start(Options(2, delay));
  ASSERT_TRUE(Submit({.id = 1, .deadline = start_}).ok());  // already passed
  ASSERT_TRUE(Submit({.id = 2, .deadline = start_}).ok());  // full: taken at once
  ASSERT_TRUE(recorder_.WaitForDone(2));
  EXPECT_EQ(recorder_.outcome(1).status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(recorder_.outcome(2).status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(backend_.batches(), IsEmpty());
}

TEST_F(SchedulerTest, CancelledTaskIsAnsweredAndNeverComputed) {
  const absl::Duration delay = absl::Microseconds(500);
  Start(Options(8, delay));
  std::atomic<bool> cancelled{false};
  ASSERT_TRUE(Submit({.id = 1, .is_cancelled = [&] { return cancelled.load(); }}).ok());
  ASSERT_TRUE(Submit({.id = 2, .is_cancelled = [] { return false; }}).ok());
  cancelled = true;
  ASSERT_TRUE(clock_.BlockUntilWaiting(start_ + delay));
  clock_.Advance(delay);
  ASSERT_TRUE(recorder_.WaitForDone(2));
  EXPECT_EQ(recorder_.outcome(1).status.code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(recorder_.outcome(2).status.ok());
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(2)));
}

TEST_F(SchedulerTest, FullQueueByCountRejectsAtOnce) {
  SchedulerOptions options = Options(1, absl::Seconds(1));
  options.queue_capacity = 1;
  Start(options);
  backend_.Hold();
  ASSERT_TRUE(Submit({.id = 1}).ok());
  ASSERT_TRUE(backend_.WaitUntilRunning(1));  // started: no longer counts against capacity
  ASSERT_TRUE(Submit({.id = 2}).ok());
  const absl::Status rejected = Submit({.id = 3});
  EXPECT_EQ(rejected.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(rejected.message(), HasSubstr("queue_capacity is 1"));
  EXPECT_EQ(scheduler_->queue_depth(), 1);
  EXPECT_EQ(scheduler_->in_flight(), 2);

  backend_.Release();
  ASSERT_TRUE(recorder_.WaitForDone(2));
  EXPECT_EQ(recorder_.outcome(3).calls, 0);
}

TEST_F(SchedulerTest, FullQueueByBytesRejectsAtOnce) {
  SchedulerOptions options = Options(8, absl::Seconds(1));
  options.queue_capacity_bytes = 1000;
  Start(options);
  ASSERT_TRUE(Submit({.id = 1, .bytes = 400}).ok());
  ASSERT_TRUE(Submit({.id = 2, .bytes = 400}).ok());
  const absl::Status rejected = Submit({.id = 3, .bytes = 400});
  EXPECT_EQ(rejected.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(rejected.message(), HasSubstr("queue_capacity_bytes 1000"));
  EXPECT_TRUE(Submit({.id = 4, .bytes = 200}).ok());  // exactly at the limit
  EXPECT_EQ(scheduler_->queue_depth(), 3);
}

TEST_F(SchedulerTest, HighPriorityRunsFirst) {
  Start(Options(1, absl::Seconds(1)));
  backend_.Hold();
  ASSERT_TRUE(Submit({.id = 0}).ok());
  ASSERT_TRUE(backend_.WaitUntilRunning(1));  // the only worker is busy
  ASSERT_TRUE(Submit({.id = 1, .priority = 0}).ok());
  clock_.Advance(absl::Microseconds(1));  // the normal tasks are strictly older
  ASSERT_TRUE(Submit({.id = 2, .priority = 0}).ok());
  clock_.Advance(absl::Microseconds(1));
  ASSERT_TRUE(Submit({.id = 3, .priority = 1}).ok());
  ASSERT_TRUE(Submit({.id = 4, .priority = 1}).ok());
  backend_.Release();
  ASSERT_TRUE(recorder_.WaitForDone(5));
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(0), ElementsAre(3), ElementsAre(4),
                                              ElementsAre(1), ElementsAre(2)));
}

TEST_F(SchedulerTest, HighPriorityFillsBatchesBeforeNormal) {
  Start(Options(2, absl::Seconds(1)));
  backend_.Hold();
  ASSERT_TRUE(Submit({.id = 0}).ok());
  ASSERT_TRUE(Submit({.id = 9}).ok());
  ASSERT_TRUE(backend_.WaitUntilRunning(1));
  ASSERT_TRUE(Submit({.id = 1, .priority = 0}).ok());
  ASSERT_TRUE(Submit({.id = 2, .priority = 1}).ok());
  ASSERT_TRUE(Submit({.id = 3, .priority = 0}).ok());
  ASSERT_TRUE(Submit({.id = 4, .priority = 1}).ok());
  backend_.Release();
  ASSERT_TRUE(recorder_.WaitForDone(6));
  EXPECT_THAT(backend_.batches(),
              ElementsAre(ElementsAre(0, 9), ElementsAre(2, 4), ElementsAre(1, 3)));
}

TEST_F(SchedulerTest, NormalPriorityAgesAndIsNotStarved) {
  SchedulerOptions options = Options(1, absl::Seconds(1));
  options.low_priority_aging_us = 1000;
  Start(options);
  backend_.Hold();
  ASSERT_TRUE(Submit({.id = 0}).ok());
  ASSERT_TRUE(backend_.WaitUntilRunning(1));
  ASSERT_TRUE(Submit({.id = 1, .priority = 0}).ok());  // t=0: ranks as t=1000us
  clock_.Advance(absl::Microseconds(600));
  ASSERT_TRUE(Submit({.id = 2, .priority = 1}).ok());  // t=600us: overtakes 1
  clock_.Advance(absl::Microseconds(600));
  ASSERT_TRUE(Submit({.id = 3, .priority = 1}).ok());  // t=1200us: after 1
  ASSERT_TRUE(Submit({.id = 4, .priority = 0}).ok());  // t=1200us: ranks as 2200us
  backend_.Release();
  ASSERT_TRUE(recorder_.WaitForDone(5));
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(0), ElementsAre(2), ElementsAre(1),
                                              ElementsAre(3), ElementsAre(4)));
}

TEST_F(SchedulerTest, DrainFinishesAdmittedWorkAndRejectsNew) {
  Start(Options(8, absl::Seconds(1)));
  for (int id = 1; id <= 3; ++id) ASSERT_TRUE(Submit({.id = id}).ok());
  // The batch is not full and the clock never moves: only draining flushes it.
  EXPECT_TRUE(scheduler_->Drain(absl::InfiniteDuration()).ok());
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(1, 2, 3)));
  for (int id = 1; id <= 3; ++id) EXPECT_TRUE(recorder_.outcome(id).status.ok());
  EXPECT_EQ(scheduler_->in_flight(), 0);

  const absl::Status rejected = Submit({.id = 4});
  EXPECT_EQ(rejected.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(scheduler_->Drain(absl::Seconds(1)).ok());  // idempotent
}

TEST_F(SchedulerTest, DrainTimesOutWithABlockedBackend) {
  Start(Options(1, absl::Seconds(1)));
  backend_.Hold();
  ASSERT_TRUE(Submit({.id = 1}).ok());
  ASSERT_TRUE(backend_.WaitUntilRunning(1));
  ASSERT_TRUE(Submit({.id = 2}).ok());  // queued behind the blocked worker

  const absl::Duration timeout = absl::Milliseconds(10);
  absl::Status drained;
  std::thread drainer([&] { drained = scheduler_->Drain(timeout); });
  ASSERT_TRUE(clock_.BlockUntilWaiting(start_ + timeout));  // Drain is waiting
  EXPECT_EQ(Submit({.id = 3}).code(), absl::StatusCode::kUnavailable);
  clock_.Advance(timeout);
  // This backend never polls its cancel tokens: Drain waits one more second
  // for the running task to stop, then gives up on it.
  ASSERT_TRUE(clock_.BlockUntilWaiting(start_ + timeout + absl::Seconds(1)));
  clock_.Advance(absl::Seconds(1));
  drainer.join();
  EXPECT_EQ(drained.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(drained.message(), HasSubstr("1 queued tasks answered UNAVAILABLE"));
  EXPECT_THAT(drained.message(), HasSubstr("1 still running"));
  EXPECT_EQ(recorder_.outcome(2).status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(recorder_.outcome(1).calls, 0);  // still computing
  EXPECT_EQ(scheduler_->in_flight(), 1);

  backend_.Release();
  ASSERT_TRUE(recorder_.WaitForDone(2));
  EXPECT_TRUE(recorder_.outcome(1).status.ok());
  EXPECT_TRUE(scheduler_->Drain(absl::InfiniteDuration()).ok());  // nothing left to time out
  EXPECT_EQ(scheduler_->in_flight(), 0);
}

// Computes each job of a batch at once, except those whose id (seqlen_q) is
// in `spin`: they run until their cancel token asks them to stop, polling it
// as a real backend does between work items. Throws std::bad_alloc for a
// batch holding the id in `oom` (as a backend that runs out of memory does).
class StoppableBackend : public Backend {
 public:
  StoppableBackend() { info_.name = "stoppable"; }
  const BackendInfo& info() const override { return info_; }
  absl::Status Supports(const AttentionParams&) const override { return absl::OkStatus(); }
  absl::Status Run(absl::Span<const AttentionParams> batch) override {
    for (const AttentionParams& p : batch) {
      if (p.seqlen_q == oom) throw std::bad_alloc();
    }
    for (const AttentionParams& p : batch) {
      if (p.seqlen_q != spin) continue;
      spinning.store(true);
      const absl::Time give_up = absl::Now() + kHangGuard;
      while (!StopRequested(p) && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(1));
    }
    return absl::OkStatus();
  }
  int spin = -1;
  int oom = -1;
  std::atomic<bool> spinning{false};

 private:
  BackendInfo info_;
};

bool WaitFor(const std::atomic<bool>& flag) {
  const absl::Time give_up = absl::Now() + kHangGuard;
  while (!flag.load() && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(1));
  return flag.load();
}

TEST_F(SchedulerTest, RunningTaskStopsWhenItsCallerCancels) {
  StoppableBackend backend;
  backend.spin = 1;
  Start(Options(2, absl::ZeroDuration()));
  std::atomic<bool> cancelled{false};
  ASSERT_TRUE(Submit({.id = 1, .backend = &backend, .is_cancelled = [&] { return cancelled.load(); }})
                  .ok());
  ASSERT_TRUE(WaitFor(backend.spinning));
  cancelled.store(true);
  ASSERT_TRUE(recorder_.WaitForDone(1));
  EXPECT_EQ(recorder_.outcome(1).status.code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(recorder_.outcome(1).status.message(), HasSubstr("while computing"));
}

TEST_F(SchedulerTest, RunningTaskStopsAtItsDeadlineAndTheRestOfTheBatchIsAnswered) {
  StoppableBackend backend;
  backend.spin = 1;
  Start(Options(2, absl::Seconds(1)));
  ASSERT_TRUE(Submit({.id = 1, .backend = &backend, .deadline = start_ + absl::Seconds(5)}).ok());
  ASSERT_TRUE(Submit({.id = 2, .backend = &backend}).ok());  // fills the batch
  ASSERT_TRUE(WaitFor(backend.spinning));
  clock_.Advance(absl::Seconds(5));
  ASSERT_TRUE(recorder_.WaitForDone(2));
  EXPECT_EQ(recorder_.outcome(1).status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(recorder_.outcome(1).status.message(), HasSubstr("while computing"));
  EXPECT_TRUE(recorder_.outcome(2).status.ok()) << recorder_.outcome(2).status;
}

TEST_F(SchedulerTest, DrainTimeoutStopsRunningTasks) {
  StoppableBackend backend;
  backend.spin = 1;
  Start(Options(1, absl::ZeroDuration()));
  ASSERT_TRUE(Submit({.id = 1, .backend = &backend}).ok());
  ASSERT_TRUE(WaitFor(backend.spinning));
  const absl::Duration timeout = absl::Milliseconds(10);
  absl::Status drained;
  std::thread drainer([&] { drained = scheduler_->Drain(timeout); });
  ASSERT_TRUE(clock_.BlockUntilWaiting(start_ + timeout));
  clock_.Advance(timeout);
  drainer.join();  // the task stops within one poll; no need to advance the grace second
  EXPECT_EQ(drained.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(drained.message(), HasSubstr("running tasks stopped"));
  EXPECT_EQ(recorder_.outcome(1).status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(scheduler_->in_flight(), 0);
}

TEST_F(SchedulerTest, OutOfMemoryFailsOnlyTheTaskThatNeedsIt) {
  StoppableBackend backend;
  backend.oom = 2;
  Start(Options(3, absl::Seconds(1)));
  for (int id = 1; id <= 3; ++id) ASSERT_TRUE(Submit({.id = id, .backend = &backend}).ok());
  ASSERT_TRUE(recorder_.WaitForDone(3));
  EXPECT_TRUE(recorder_.outcome(1).status.ok());
  EXPECT_EQ(recorder_.outcome(2).status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(recorder_.outcome(2).status.message(), HasSubstr("out of memory"));
  EXPECT_TRUE(recorder_.outcome(3).status.ok());
}

TEST_F(SchedulerTest, OutputsAreAllocatedWhenTheBatchRuns) {
  Start(Options(1, absl::ZeroDuration()));
  std::atomic<int64_t> output_bytes_at_submit{-1};
  std::atomic<int64_t> output_bytes_at_done{-1};
  Task task = recorder_.MakeTask({.id = 7});
  task.backend = &backend_;
  AttentionParams& p = task.job->params;
  p.batch = 1, p.num_heads_q = 2, p.value_dim = 4;  // Lq comes from the id: 7
  task.job->outputs.lse = true;
  output_bytes_at_submit = static_cast<int64_t>(task.job->output.data.size());
  auto record = std::move(task.done);
  task.done = [&, record](absl::Status s, std::unique_ptr<AttentionJob> job, const TaskTiming& t) {
    output_bytes_at_done = static_cast<int64_t>(job->output.data.size() + job->lse.data.size());
    record(std::move(s), std::move(job), t);
  };
  ASSERT_TRUE(scheduler_->Submit(std::move(task)).ok());
  recorder_.NoteAdmitted(7);
  ASSERT_TRUE(recorder_.WaitForDone(1));
  EXPECT_EQ(output_bytes_at_submit.load(), 0);
  EXPECT_EQ(output_bytes_at_done.load(), 7 * 2 * 4 * 4 + 2 * 7 * 4);  // output F32 + lse
}

TEST_F(SchedulerTest, WorkersRunBatchesConcurrently) {
  SchedulerOptions options = Options(1, absl::Seconds(1));
  options.workers = 2;
  Start(options);
  backend_.Hold();
  ASSERT_TRUE(Submit({.id = 1}).ok());
  ASSERT_TRUE(Submit({.id = 2}).ok());
  EXPECT_TRUE(backend_.WaitUntilRunning(2));
  backend_.Release();
  ASSERT_TRUE(recorder_.WaitForDone(2));
}

TEST_F(SchedulerTest, BackendErrorReachesEveryTaskInTheBatch) {
  Start(Options(2, absl::Seconds(1)));
  backend_.set_status(absl::InternalError("device lost"));
  ASSERT_TRUE(Submit({.id = 1}).ok());
  ASSERT_TRUE(Submit({.id = 2}).ok());
  ASSERT_TRUE(recorder_.WaitForDone(2));
  for (int id : {1, 2}) {
    EXPECT_EQ(recorder_.outcome(id).status, absl::InternalError("device lost"));
    EXPECT_EQ(recorder_.outcome(id).timing.batch_size, 2);
  }
}

TEST_F(SchedulerTest, TimingAndObserverHooks) {
  const absl::Duration delay = absl::Microseconds(500);
  RecordingObserver observer;
  Start(Options(8, delay), &observer);
  backend_.Hold();
  ASSERT_TRUE(Submit({.id = 1, .flops = 7}).ok());
  ASSERT_TRUE(clock_.BlockUntilWaiting(start_ + delay));
  clock_.Advance(delay);
  ASSERT_TRUE(backend_.WaitUntilRunning(1));
  clock_.Advance(absl::Microseconds(300));  // the backend call takes 300us
  backend_.Release();
  ASSERT_TRUE(recorder_.WaitForDone(1));

  const TaskTiming timing = recorder_.outcome(1).timing;
  EXPECT_EQ(timing.queue, delay);
  EXPECT_EQ(timing.compute, absl::Microseconds(300));
  EXPECT_EQ(timing.batch_size, 1);
  absl::MutexLock lock(&observer.mu_);
  ASSERT_EQ(observer.batches.size(), 1u);
  EXPECT_EQ(observer.batches[0].backend, "fake");
  EXPECT_EQ(observer.batches[0].batch_size, 1);
  EXPECT_EQ(observer.batches[0].flops, 7);
  EXPECT_EQ(observer.batches[0].compute, absl::Microseconds(300));
  EXPECT_THAT(observer.dequeued, ElementsAre(delay));
  EXPECT_THAT(observer.depths, ElementsAre(1, 0));
}

TEST_F(SchedulerTest, RejectsMalformedTasks) {
  Start(Options(8, absl::Seconds(1)));
  EXPECT_THAT(Submit({.id = 1, .priority = 2}).message(), HasSubstr("task.priority"));
  Task no_done = recorder_.MakeTask({.id = 2, .backend = &backend_});
  no_done.done = nullptr;
  EXPECT_EQ(scheduler_->Submit(std::move(no_done)).code(), absl::StatusCode::kInvalidArgument);
  Task no_backend = recorder_.MakeTask({.id = 3});
  EXPECT_THAT(scheduler_->Submit(std::move(no_backend)).message(), HasSubstr("task.backend"));
}

TEST(SchedulerOptionsTest, CreateRejectsOutOfRangeOptionsNamingTheField) {
  FakeClock clock;
  struct Case {
    const char* field;
    void (*spoil)(SchedulerOptions&);
  };
  const Case cases[] = {
      {"queue_capacity", [](SchedulerOptions& o) { o.queue_capacity = 0; }},
      {"queue_capacity_bytes", [](SchedulerOptions& o) { o.queue_capacity_bytes = -1; }},
      {"max_batch_size", [](SchedulerOptions& o) { o.max_batch_size = 0; }},
      {"max_batch_flops", [](SchedulerOptions& o) { o.max_batch_flops = 0; }},
      {"max_queue_delay_us", [](SchedulerOptions& o) { o.max_queue_delay_us = -5; }},
      {"workers", [](SchedulerOptions& o) { o.workers = 0; }},
      {"workers", [](SchedulerOptions& o) { o.workers = 100000; }},
      {"low_priority_aging_us", [](SchedulerOptions& o) { o.low_priority_aging_us = -1; }},
  };
  for (const Case& c : cases) {
    SchedulerOptions options;
    c.spoil(options);
    absl::StatusOr<std::unique_ptr<Scheduler>> s = Scheduler::Create(options, &clock);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(s.status().message(), HasSubstr(c.field));
  }
}

// Many threads, several workers, the real clock, deadlines and cancellations
// at random: whatever the interleaving, every admitted task is answered
// exactly once and drain leaves nothing behind.
TEST(SchedulerStressTest, EveryAdmittedTaskIsAnsweredExactlyOnce) {
  SchedulerOptions options;
  options.workers = 3;
  options.max_batch_size = 4;
  options.max_queue_delay_us = 50;
  options.queue_capacity = 64;
  absl::StatusOr<std::unique_ptr<Scheduler>> created = Scheduler::Create(options);
  ASSERT_TRUE(created.ok()) << created.status();
  std::unique_ptr<Scheduler> scheduler = *std::move(created);
  FakeBackend backend_a("a");
  FakeBackend backend_b("b");
  FakeBackend* const backends[] = {&backend_a, &backend_b};
  Recorder recorder;

  constexpr int kThreads = 4;
  constexpr int kPerThread = 500;
  std::vector<std::thread> submitters;
  for (int t = 0; t < kThreads; ++t) {
    submitters.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const int id = t * kPerThread + i;
        TaskSpec spec{.id = id, .backend = backends[id % 2]};
        spec.dtype = id % 3 == 0 ? DType::kF16 : DType::kF32;
        spec.priority = id % 5 == 0 ? 1 : 0;
        if (id % 7 == 0) spec.deadline = absl::Now();  // expires while queued
        if (id % 11 == 0) spec.is_cancelled = [] { return true; };
        if (scheduler->Submit(recorder.MakeTask(spec)).ok()) recorder.NoteAdmitted(id);
      }
    });
  }
  for (std::thread& t : submitters) t.join();
  EXPECT_TRUE(scheduler->Drain(absl::InfiniteDuration()).ok());
  EXPECT_EQ(scheduler->in_flight(), 0);
  EXPECT_EQ(scheduler->queue_depth(), 0);
  EXPECT_GE(recorder.admitted(), options.queue_capacity);
  recorder.ExpectEachAdmittedDoneOnce();
  for (FakeBackend* b : backends) {
    for (const std::vector<int>& batch : b->batches()) {
      EXPECT_LE(batch.size(), 4u);
      for (int id : batch) {
        EXPECT_NE(id % 7, 0) << "expired task " << id << " was computed";
        EXPECT_NE(id % 11, 0) << "cancelled task " << id << " was computed";
      }
    }
  }
}

// A gang (one BatchDecode) is never split across backend calls, counts as its
// jobs in max_batch_size, runs without waiting for a batch to fill, and is
// answered once with a null job.
TEST(SchedulerGangTest, RunsAtOnceInOneBackendCallAndIsAnsweredOnce) {
  FakeClock clock;  // never advances: a gang that waited would not run
  FakeBackend backend("fake");
  auto scheduler = *Scheduler::Create(Options(4, absl::Hours(1)), &clock);
  absl::Notification answered;
  std::vector<std::unique_ptr<AttentionJob>> jobs;
  Task gang;
  for (int id = 10; id < 16; ++id) {  // six jobs: more than max_batch_size
    jobs.push_back(std::make_unique<AttentionJob>());
    jobs.back()->params.seqlen_q = id;
    jobs.back()->cost = 1;
    gang.gang.push_back(jobs.back().get());
  }
  absl::Mutex mu;
  int calls = 0;
  bool null_job = false;
  int32_t batch_size = 0;
  gang.backend = &backend;
  gang.done = [&](absl::Status status, std::unique_ptr<AttentionJob> job, const TaskTiming& t) {
    absl::MutexLock lock(&mu);
    EXPECT_TRUE(status.ok()) << status;
    ++calls;
    null_job = job == nullptr;
    batch_size = t.batch_size;
    answered.Notify();
  };
  ASSERT_TRUE(scheduler->Submit(std::move(gang)).ok());
  ASSERT_TRUE(answered.WaitForNotificationWithTimeout(kHangGuard));
  ASSERT_TRUE(scheduler->Drain(kHangGuard).ok());
  EXPECT_THAT(backend.batches(), ElementsAre(ElementsAre(10, 11, 12, 13, 14, 15)));
  absl::MutexLock lock(&mu);
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(null_job);
  EXPECT_EQ(batch_size, 6);
}

TEST(SchedulerGangTest, RejectsAJobWithAGangAndMixedDtypes) {
  FakeClock clock;
  FakeBackend backend("fake");
  auto scheduler = *Scheduler::Create(Options(4, absl::Milliseconds(1)), &clock);
  AttentionJob a, b;
  b.params.dtype = DType::kBF16;
  Task mixed;
  mixed.backend = &backend;
  mixed.done = [](absl::Status, std::unique_ptr<AttentionJob>, const TaskTiming&) {};
  mixed.gang = {&a, &b};
  EXPECT_THAT(scheduler->Submit(std::move(mixed)).message(), HasSubstr("task.gang[1]"));
  Task both;
  both.backend = &backend;
  both.done = [](absl::Status, std::unique_ptr<AttentionJob>, const TaskTiming&) {};
  both.job = std::make_unique<AttentionJob>();
  both.gang = {&a};
  EXPECT_EQ(scheduler->Submit(std::move(both)).code(), absl::StatusCode::kInvalidArgument);
}

// A task stage that records the members of each Prepare and Finish call (by
// task id) and can fail its Prepare.
class RecordingStage final : public TaskStage {
 public:
  RecordingStage(int id, const void* group, std::vector<std::string>* log,
                 absl::Status prepare = absl::OkStatus())
      : id_(id), group_(group), log_(log), prepare_(std::move(prepare)) {}
  const void* group() const override { return group_; }
  absl::Status Prepare(absl::Span<TaskStage* const> members) override {
    Log("prepare", members);
    return prepare_;
  }
  absl::Status Finish(absl::Span<TaskStage* const> members) override {
    Log("finish", members);
    return absl::OkStatus();
  }

 private:
  void Log(const char* what, absl::Span<TaskStage* const> members) {
    std::string line = what;
    for (TaskStage* m : members) line += " " + std::to_string(static_cast<RecordingStage*>(m)->id_);
    log_->push_back(line);  // on the one worker thread
  }
  int id_;
  const void* group_;
  std::vector<std::string>* log_;
  absl::Status prepare_;
};

TEST_F(SchedulerTest, StagesOfOneGroupRunTogetherAndAFailedPrepareLeavesTheBatch) {
  Start(Options(4, absl::Seconds(1)));
  std::vector<std::string> log;
  const int group_a = 0, group_b = 0;
  RecordingStage s1(1, &group_a, &log), s4(4, &group_a, &log);
  RecordingStage s3(3, &group_b, &log, absl::InternalError("projection failed"));
  ASSERT_TRUE(Submit({.id = 1, .stage = &s1}).ok());
  ASSERT_TRUE(Submit({.id = 2}).ok());  // no stage
  ASSERT_TRUE(Submit({.id = 3, .stage = &s3}).ok());
  ASSERT_TRUE(Submit({.id = 4, .stage = &s4}).ok());
  ASSERT_TRUE(recorder_.WaitForDone(4));
  // One Prepare per group, in admission order; task 3 left the backend call
  // with its stage's error and was not finished.
  EXPECT_THAT(log, ElementsAre("prepare 1 4", "prepare 3", "finish 1 4"));
  EXPECT_THAT(backend_.batches(), ElementsAre(ElementsAre(1, 2, 4)));
  for (int id : {1, 2, 4}) EXPECT_TRUE(recorder_.outcome(id).status.ok()) << id;
  EXPECT_EQ(recorder_.outcome(3).status, absl::InternalError("projection failed"));
}

}  // namespace
}  // namespace attnserve
