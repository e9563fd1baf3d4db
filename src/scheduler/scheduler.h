// Scheduler: admits attention tasks into a bounded queue, groups compatible
// tasks (same backend, dtype, variant) into batches, and runs each batch as one
// Backend::Run call on a pool of worker threads (TensorFlow batching style).
//
// Life of a task: Submit() admits it or rejects it at once; a worker takes it
// into a batch no later than max_queue_delay_us after it was admitted (sooner
// when a batch fills), allocates its outputs (AllocateOutputs: a queued job
// holds none) and runs the batch; tasks whose deadline passed or whose caller
// cancelled are answered without compute, and a running task whose deadline
// passes or whose caller cancels stops within one work item (its cancel
// token, see core/cancel_token.h); `done` is called exactly once for every
// admitted task. Drain() stops admission and finishes what was admitted.
//
// Thread safety: all methods are thread-safe. `done` runs on a worker thread
// and must not block for long.
#ifndef ATTNSERVE_SCHEDULER_SCHEDULER_H_
#define ATTNSERVE_SCHEDULER_SCHEDULER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "attention/job.h"
#include "backends/backend.h"
#include "scheduler/clock.h"

namespace attnserve {

struct SchedulerOptions {
  int64_t queue_capacity = 1024;                     // admitted, not yet started tasks
  int64_t queue_capacity_bytes = int64_t{1} << 30;   // their input bytes
  int32_t max_batch_size = 32;                       // tasks per backend call
  double max_batch_flops = 2e11;                     // cost (AttentionCost) per backend call
  int64_t max_queue_delay_us = 500;                  // longest wait for a batch to fill
  int32_t workers = 1;                               // executor threads
  // Priority: a high task goes before a normal one admitted up to this long
  // before it, so a normal task is overtaken only by high tasks admitted within
  // this window after it and never starves.
  int64_t low_priority_aging_us = 10'000;
};

struct TaskTiming {
  absl::Duration queue;    // admission to start of compute
  absl::Duration compute;  // the backend call
  int32_t batch_size = 0;
};

// Work a task does on its worker around its backend call: a model layer's
// input projections before the attention and its output projection after.
// The tasks of one backend call whose stages share a group() run theirs
// together, so that their rows share one pass over the weights.
class TaskStage {
 public:
  virtual ~TaskStage() = default;
  // Tasks whose stages return the same pointer are prepared and finished
  // together (e.g. the weights of one model layer).
  virtual const void* group() const = 0;
  // Before the backend call, for `members` (every stage of the call with this
  // group(), this one among them, in admission order): fills their jobs'
  // inputs. An error fails every member; std::bad_alloc is answered
  // RESOURCE_EXHAUSTED.
  virtual absl::Status Prepare(absl::Span<TaskStage* const> members) = 0;
  // After the backend call, for the members whose compute succeeded: turns
  // their jobs' outputs into the task's result. Errors as Prepare.
  virtual absl::Status Finish(absl::Span<TaskStage* const> members) = 0;
};

struct Task {
  std::unique_ptr<AttentionJob> job;
  // Instead of `job`: jobs computed together in one backend call, all or
  // nothing (one BatchDecode). Not owned: they must live until `done` runs,
  // which then receives a null job. All the same dtype and variant.
  std::vector<AttentionJob*> gang;
  Backend* backend = nullptr;  // not owned; must outlive the scheduler
  // Not owned; null for a plain attention task. Must live until `done` runs.
  // Its Prepare and Finish time counts as compute.
  TaskStage* stage = nullptr;
  int32_t priority = 0;        // 0 normal, 1 high
  absl::Time deadline = absl::InfiniteFuture();
  // Polled before compute; a true answer drops the task with CANCELLED. May be null.
  std::function<bool()> is_cancelled;
  // Called exactly once: OK with the computed job, or DEADLINE_EXCEEDED,
  // CANCELLED (before or during compute), UNAVAILABLE (drain timed out),
  // RESOURCE_EXHAUSTED (out of memory for the outputs or the backend's
  // scratch; never thrown), or the backend's error.
  std::function<void(absl::Status, std::unique_ptr<AttentionJob>, const TaskTiming&)> done;
};

// Hooks for metrics. Default: no-ops. OnQueueDepth runs with the scheduler's
// lock held (on the submitting or a worker thread) so that depths arrive in
// order; no hook may call back into the scheduler.
class SchedulerObserver {
 public:
  virtual ~SchedulerObserver() = default;
  virtual void OnBatch(const std::string& /*backend*/, int32_t /*batch_size*/, double /*flops*/,
                       absl::Duration /*compute*/) {}
  virtual void OnDequeue(absl::Duration /*queued*/) {}  // per task that reaches compute
  virtual void OnQueueDepth(int64_t /*depth*/) {}
};

class Scheduler {
 public:
  // INVALID_ARGUMENT for out-of-range options. `clock` and `observer` are not
  // owned and must outlive the scheduler; null observer = none.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(const SchedulerOptions& options,
                                                           Clock* clock = Clock::Real(),
                                                           SchedulerObserver* observer = nullptr);
  virtual ~Scheduler() = default;

  // Admits `task` without blocking. OK: `task.done` will be called exactly
  // once. RESOURCE_EXHAUSTED: the queue is full by count or bytes. UNAVAILABLE:
  // draining. INVALID_ARGUMENT: no job (or both a job and a gang, or a gang of
  // mixed dtypes), backend or done, or a priority other than 0 or 1. On error
  // `done` is not called. A gang counts as one task in the queue and as its
  // jobs in a batch (max_batch_size), is never split across batches, and
  // does not wait max_queue_delay_us for a batch to fill: its group runs as
  // soon as a worker is free (with the tasks queued beside it that fit).
  virtual absl::Status Submit(Task task) = 0;

  // Stops admission and waits until every admitted task is done or `timeout`
  // passes; then tasks still queued are answered UNAVAILABLE and running ones
  // are stopped through their cancel tokens (answered UNAVAILABLE), which
  // Drain waits for up to one more second. Returns OK if all finished in
  // time, DEADLINE_EXCEEDED otherwise. Idempotent. Must not be called from
  // `done` (it joins the worker threads).
  virtual absl::Status Drain(absl::Duration timeout) = 0;

  virtual int64_t queue_depth() const = 0;  // admitted, not yet started
  virtual int64_t in_flight() const = 0;    // admitted, not yet done
};

}  // namespace attnserve

#endif  // ATTNSERVE_SCHEDULER_SCHEDULER_H_
