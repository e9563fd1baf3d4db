// The batching scheduler behind Scheduler::Create.
//
// Queued tasks live in one TaskGroup per compatibility key (backend, dtype,
// variant), each holding a FIFO per priority level. A free worker looks for a
// ready group: one that is full (max_batch_size tasks or max_batch_flops
// FLOPs queued), whose oldest task has waited max_queue_delay_us, or any group
// while draining. Among ready groups it takes the one whose next task has the
// smallest order key, and fills a batch from that group in order-key order.
// If no group is ready it sleeps on the clock until the earliest flush time or
// a signal. Tasks stay in the queue until taken, so queue_depth() and the
// admission limits count them.
//
// Order key: the admission time for a high task, the admission time plus
// low_priority_aging_us for a normal one. Worked example with the default
// 10 ms: a normal task admitted at t=0 runs before a high task admitted at
// t=12 ms but after one admitted at t=5 ms.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <new>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "core/cancel_token.h"
#include "scheduler/scheduler.h"

namespace attnserve {
namespace {

enum Level { kNormal = 0, kHigh = 1, kNumLevels = 2 };

struct QueuedTask {
  Task task;
  absl::Time admitted;
  absl::Time order_key;
};

// Tasks that may share one Backend::Run call.
using GroupKey = std::tuple<Backend*, DType, Variant>;

struct TaskGroup {
  std::deque<QueuedTask> levels[kNumLevels];  // each in admission order
  double flops = 0;                           // sum over the queued tasks
  int64_t gangs = 0;                          // queued tasks that are gangs

  int64_t size() const {
    return static_cast<int64_t>(levels[kNormal].size() + levels[kHigh].size());
  }
  bool empty() const { return levels[kNormal].empty() && levels[kHigh].empty(); }

  // The level whose front task runs next, or null when empty. Ties go to high.
  std::deque<QueuedTask>* Next() {
    std::deque<QueuedTask>& high = levels[kHigh];
    std::deque<QueuedTask>& normal = levels[kNormal];
    if (high.empty()) return normal.empty() ? nullptr : &normal;
    if (normal.empty()) return &high;
    return normal.front().order_key < high.front().order_key ? &normal : &high;
  }

  absl::Time oldest_admitted() const {
    absl::Time t = absl::InfiniteFuture();
    for (const std::deque<QueuedTask>& level : levels) {
      if (!level.empty()) t = std::min(t, level.front().admitted);
    }
    return t;
  }
};

// What a worker took from the queue: tasks to compute and tasks to answer
// DEADLINE_EXCEEDED. `run` is non-empty or `expired` is.
struct TakenBatch {
  Backend* backend = nullptr;
  std::vector<QueuedTask> run;
  std::vector<QueuedTask> expired;
};

// A task's jobs: its one job, or its gang.
std::vector<AttentionJob*> JobsOf(Task& t) {
  if (t.job != nullptr) return {t.job.get()};
  return t.gang;
}

const AttentionJob& FirstJob(const Task& t) { return t.job != nullptr ? *t.job : *t.gang.front(); }

int64_t JobCount(const Task& t) {
  return t.job != nullptr ? 1 : static_cast<int64_t>(t.gang.size());
}

double CostOf(const Task& t) {
  if (t.job != nullptr) return t.job->cost;
  double cost = 0;
  for (const AttentionJob* j : t.gang) cost += j->cost;
  return cost;
}

int64_t InputBytesOf(const Task& t) {
  if (t.job != nullptr) return std::max<int64_t>(t.job->input_bytes, 0);
  int64_t bytes = 0;
  for (const AttentionJob* j : t.gang) bytes += std::max<int64_t>(j->input_bytes, 0);
  return bytes;
}

absl::Status CheckJobs(const Task& t) {
  if (t.job == nullptr && t.gang.empty()) {
    return absl::InvalidArgumentError("task.job: expected a job or a gang, got none");
  }
  if (t.job != nullptr && !t.gang.empty()) {
    return absl::InvalidArgumentError("task.gang: expected empty with a job, got jobs");
  }
  for (size_t i = 0; i < t.gang.size(); ++i) {
    const AttentionJob* j = t.gang[i];
    if (j == nullptr) return absl::InvalidArgumentError(absl::StrCat("task.gang[", i, "]: null"));
    if (j->params.dtype != t.gang[0]->params.dtype ||
        j->params.variant != t.gang[0]->params.variant) {
      return absl::InvalidArgumentError(
          absl::StrCat("task.gang[", i, "]: expected the dtype and variant of task.gang[0]"));
    }
  }
  return absl::OkStatus();
}

SchedulerObserver* NoOpObserver() {
  static SchedulerObserver* const observer = new SchedulerObserver;
  return observer;
}

// How long a timed-out Drain waits for running tasks to notice that they
// were stopped (one work item each) before it returns.
constexpr absl::Duration kAbortGrace = absl::Seconds(1);

absl::Duration NonNegative(absl::Duration d) { return std::max(d, absl::ZeroDuration()); }

void Answer(QueuedTask& t, absl::Status status, const TaskTiming& timing) {
  t.task.done(std::move(status), std::move(t.task.job), timing);
}

class BatchingScheduler final : public Scheduler {
 public:
  BatchingScheduler(const SchedulerOptions& options, Clock* clock, SchedulerObserver* observer)
      : options_(options),
        clock_(clock),
        observer_(observer != nullptr ? observer : NoOpObserver()),
        max_queue_delay_(absl::Microseconds(options.max_queue_delay_us)),
        aging_(absl::Microseconds(options.low_priority_aging_us)) {
    absl::MutexLock lock(&mu_);
    for (int i = 0; i < options_.workers; ++i) {
      workers_.emplace_back([this] { WorkerLoop(); });
    }
  }

  ~BatchingScheduler() override {
    Drain(absl::InfiniteDuration()).IgnoreError();  // cannot time out
    JoinWorkers();
  }

  absl::Status Submit(Task task) override {
    if (absl::Status s = CheckJobs(task); !s.ok()) return s;
    if (task.backend == nullptr) {
      return absl::InvalidArgumentError("task.backend: expected a backend, got null");
    }
    if (!task.done) return absl::InvalidArgumentError("task.done: expected a callback, got none");
    if (task.priority != 0 && task.priority != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("task.priority: expected 0 or 1, got ", task.priority));
    }
    const int64_t bytes = InputBytesOf(task);
    absl::MutexLock lock(&mu_);
    if (draining_) return absl::UnavailableError("scheduler is draining; not admitting tasks");
    if (queued_ >= options_.queue_capacity) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "scheduler queue is full: ", queued_, " tasks queued, queue_capacity is ",
          options_.queue_capacity));
    }
    if (queued_bytes_ + bytes > options_.queue_capacity_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "scheduler queue is full: ", queued_bytes_, " input bytes queued plus ", bytes,
          " for this task exceed queue_capacity_bytes ", options_.queue_capacity_bytes));
    }
    const absl::Time now = clock_->Now();
    const Level level = task.priority == 1 ? kHigh : kNormal;
    const AttentionJob& first = FirstJob(task);
    TaskGroup& group = groups_[GroupKey(task.backend, first.params.dtype, first.params.variant)];
    group.flops += CostOf(task);
    if (!task.gang.empty()) ++group.gangs;
    group.levels[level].push_back(
        QueuedTask{std::move(task), now, level == kHigh ? now : now + aging_});
    ++queued_;
    queued_bytes_ += bytes;
    ++in_flight_;
    observer_->OnQueueDepth(queued_);
    // Every idle worker is equivalent; one re-evaluates, and passes the
    // signal on (WorkerLoop) if it leaves work behind.
    work_cv_.Signal();
    return absl::OkStatus();
  }

  absl::Status Drain(absl::Duration timeout) override {
    std::vector<QueuedTask> abandoned;
    bool all_done = false;
    {
      absl::MutexLock lock(&mu_);
      if (!draining_) {
        draining_ = true;
        work_cv_.SignalAll();  // flush now: no more waiting for batches to fill
      }
      const absl::Time deadline = clock_->Now() + timeout;
      while (in_flight_ > 0 && clock_->Now() < deadline) {
        clock_->WaitWithDeadline(idle_cv_, mu_, deadline);
      }
      all_done = in_flight_ == 0;
      if (!all_done) {
        // Out of time: give up on everything. Queued tasks are answered
        // below; running ones see aborting_ through their cancel tokens and
        // stop within one work item.
        aborting_.store(true, std::memory_order_relaxed);
        for (auto& [key, group] : groups_) {
          for (std::deque<QueuedTask>& level : group.levels) {
            for (QueuedTask& t : level) abandoned.push_back(std::move(t));
          }
        }
        groups_.clear();
        queued_ = 0;
        queued_bytes_ = 0;
        observer_->OnQueueDepth(0);
      }
    }
    if (all_done) {
      JoinWorkers();  // they exit once draining with an empty queue
      return absl::OkStatus();
    }
    const absl::Time now = clock_->Now();
    for (QueuedTask& t : abandoned) {
      Answer(t, absl::UnavailableError("scheduler drain timed out before the task started"),
             TaskTiming{NonNegative(now - t.admitted), absl::ZeroDuration(), 0});
    }
    FinishTasks(static_cast<int64_t>(abandoned.size()));
    int64_t still_running = 0;
    {
      absl::MutexLock lock(&mu_);
      const absl::Time deadline = clock_->Now() + kAbortGrace;
      while (in_flight_ > 0 && clock_->Now() < deadline) {
        clock_->WaitWithDeadline(idle_cv_, mu_, deadline);
      }
      still_running = in_flight_;
    }
    // A backend that does not poll its cancel tokens may still be running;
    // the destructor joins its worker.
    if (still_running == 0) JoinWorkers();
    return absl::DeadlineExceededError(absl::StrCat(
        "drain timed out after ", absl::FormatDuration(timeout), ": ", abandoned.size(),
        " queued tasks answered UNAVAILABLE, running tasks stopped",
        still_running == 0 ? "" : absl::StrCat(" (", still_running, " still running)")));
  }

  int64_t queue_depth() const override {
    absl::MutexLock lock(&mu_);
    return queued_;
  }

  int64_t in_flight() const override {
    absl::MutexLock lock(&mu_);
    return in_flight_;
  }

 private:
  void WorkerLoop() {
    mu_.Lock();
    while (true) {
      const absl::Time now = clock_->Now();
      absl::Time next_flush = absl::InfiniteFuture();
      auto group = PickReadyGroup(now, &next_flush);
      if (group != groups_.end()) {
        TakenBatch batch = TakeBatch(group, now);
        if (queued_ > 0) work_cv_.Signal();  // another worker may take the rest
        mu_.Unlock();
        RunBatch(batch);
        mu_.Lock();
        continue;
      }
      if (draining_ && queued_ == 0) break;
      clock_->WaitWithDeadline(work_cv_, mu_, next_flush);
    }
    mu_.Unlock();
  }

  // The ready group whose next task has the smallest order key, or end().
  // Sets *next_flush to the earliest time a group that is not ready will be.
  std::map<GroupKey, TaskGroup>::iterator PickReadyGroup(absl::Time now, absl::Time* next_flush)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto best = groups_.end();
    absl::Time best_key = absl::InfiniteFuture();
    for (auto it = groups_.begin(); it != groups_.end(); ++it) {
      TaskGroup& group = it->second;
      // A gang is a batch already: it does not wait for one to fill.
      const bool full = group.size() >= options_.max_batch_size ||
                        group.flops >= options_.max_batch_flops || group.gangs > 0;
      const absl::Time flush_at = group.oldest_admitted() + max_queue_delay_;
      if (!draining_ && !full && flush_at > now) {
        *next_flush = std::min(*next_flush, flush_at);
        continue;
      }
      const absl::Time key = group.Next()->front().order_key;
      if (best == groups_.end() || key < best_key) {
        best = it;
        best_key = key;
      }
    }
    return best;
  }

  // Removes up to max_batch_size tasks (and max_batch_flops, except that the
  // first task always fits) from `group` in order-key order, setting aside
  // tasks whose deadline has passed; they take no room in the batch.
  TakenBatch TakeBatch(std::map<GroupKey, TaskGroup>::iterator it, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    TaskGroup& group = it->second;
    TakenBatch batch;
    batch.backend = std::get<0>(it->first);
    double flops = 0;
    int64_t jobs = 0;
    while (jobs < options_.max_batch_size) {
      std::deque<QueuedTask>* level = group.Next();
      if (level == nullptr) break;
      QueuedTask& t = level->front();
      const double task_flops = CostOf(t.task);
      const int64_t task_jobs = JobCount(t.task);
      const bool expired = t.task.deadline <= now;
      if (!expired && !batch.run.empty() &&
          (flops + task_flops > options_.max_batch_flops ||
           jobs + task_jobs > options_.max_batch_size)) {
        break;
      }
      --queued_;
      queued_bytes_ -= InputBytesOf(t.task);
      group.flops -= task_flops;
      if (!t.task.gang.empty()) --group.gangs;
      if (expired) {
        batch.expired.push_back(std::move(t));
      } else {
        flops += task_flops;
        jobs += task_jobs;
        batch.run.push_back(std::move(t));
      }
      level->pop_front();
    }
    if (group.empty()) groups_.erase(it);
    observer_->OnQueueDepth(queued_);
    return batch;
  }

  // Answers expired and cancelled tasks, allocates the outputs of the rest,
  // computes them in one backend call, and answers them. Runs without the lock.
  void RunBatch(TakenBatch& batch) {
    const int64_t taken = static_cast<int64_t>(batch.run.size() + batch.expired.size());
    absl::Time now = clock_->Now();
    std::vector<QueuedTask> run;
    run.reserve(batch.run.size());
    for (QueuedTask& t : batch.run) {
      if (aborting_.load(std::memory_order_relaxed)) {
        Answer(t, absl::UnavailableError("scheduler drain timed out before the task started"),
               TaskTiming{NonNegative(now - t.admitted), absl::ZeroDuration(), 0});
      } else if (t.task.deadline <= now) {
        batch.expired.push_back(std::move(t));
      } else if (t.task.is_cancelled && t.task.is_cancelled()) {
        Answer(t, absl::CancelledError("cancelled while queued"),
               TaskTiming{NonNegative(now - t.admitted), absl::ZeroDuration(), 0});
      } else if (absl::Status s = AllocateAll(t.task); !s.ok()) {
        Answer(t, s, TaskTiming{NonNegative(now - t.admitted), absl::ZeroDuration(), 0});
      } else {
        run.push_back(std::move(t));
      }
    }
    for (QueuedTask& t : batch.expired) {
      const absl::Duration queued = NonNegative(now - t.admitted);
      Answer(t,
             absl::DeadlineExceededError(absl::StrCat(
                 "deadline passed while queued (queued for ", absl::FormatDuration(queued), ")")),
             TaskTiming{queued, absl::ZeroDuration(), 0});
    }
    if (!run.empty()) Compute(batch.backend, run);
    FinishTasks(taken);
  }

  // AllocateOutputs for every job of `task`; the first failure.
  static absl::Status AllocateAll(Task& task) {
    for (AttentionJob* job : JobsOf(task)) {
      if (absl::Status s = AllocateOutputs(*job); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  // Runs `run` as one backend call and answers every task: OK, or the reason
  // its work stopped early, or RESOURCE_EXHAUSTED when memory ran out.
  void Compute(Backend* backend, std::vector<QueuedTask>& run) {
    // One token per task: the backend polls it between work items, so a task
    // whose caller left, whose deadline passed or that a timed-out drain gave
    // up on stops within one work item.
    std::vector<std::unique_ptr<CancelToken>> tokens;
    tokens.reserve(run.size());
    std::vector<AttentionParams> params;
    std::vector<size_t> first_param;  // per task, where its params start
    first_param.reserve(run.size() + 1);
    double flops = 0;
    const absl::Time start = clock_->Now();
    for (QueuedTask& t : run) {
      tokens.push_back(std::make_unique<CancelToken>(
          [this, deadline = t.task.deadline, is_cancelled = &t.task.is_cancelled] {
            return aborting_.load(std::memory_order_relaxed) || clock_->Now() >= deadline ||
                   (*is_cancelled && (*is_cancelled)());
          }));
      first_param.push_back(params.size());
      for (AttentionJob* job : JobsOf(t.task)) {
        params.push_back(job->params);
        params.back().cancel = tokens.back().get();
        flops += job->flops;
      }
      observer_->OnDequeue(NonNegative(start - t.admitted));
    }
    first_param.push_back(params.size());
    std::vector<absl::Status> status(run.size());
    RunStages(run, status, &TaskStage::Prepare);
    // The tasks whose stage failed drop out of the backend call.
    std::vector<AttentionParams> ready;
    std::vector<size_t> ready_first;  // per task, where its params start in `ready`
    ready.reserve(params.size());
    for (size_t i = 0; i < run.size(); ++i) {
      ready_first.push_back(ready.size());
      if (!status[i].ok()) continue;
      ready.insert(ready.end(), params.begin() + first_param[i],
                   params.begin() + first_param[i + 1]);
    }
    ready_first.push_back(ready.size());
    const absl::Status batch_status =
        ready.empty() ? absl::OkStatus() : RunGuarded(backend, ready);
    for (absl::Status& s : status) {
      if (s.ok()) s = batch_status;
    }
    if (run.size() > 1 && absl::IsResourceExhausted(batch_status)) {
      // Out of memory for the batch: run each task alone so that only the
      // ones that cannot fit fail.
      for (size_t i = 0; i < run.size(); ++i) {
        if (ready_first[i] == ready_first[i + 1]) continue;
        status[i] = RunGuarded(backend, absl::MakeConstSpan(ready).subspan(
                                            ready_first[i], ready_first[i + 1] - ready_first[i]));
      }
    }
    RunStages(run, status, &TaskStage::Finish);
    const absl::Time end = clock_->Now();
    const int32_t batch_size = static_cast<int32_t>(params.size());
    observer_->OnBatch(backend->info().name, batch_size, flops, end - start);
    for (size_t i = 0; i < run.size(); ++i) {
      QueuedTask& t = run[i];
      if (status[i].ok() && tokens[i]->stopped()) status[i] = StoppedStatus(t, end);
      Answer(t, status[i], TaskTiming{NonNegative(start - t.admitted), end - start, batch_size});
    }
  }

  // Calls `step` (Prepare or Finish) once per group of the stages of the
  // tasks in `run` whose status is OK, and sets their status to its result.
  static void RunStages(std::vector<QueuedTask>& run, std::vector<absl::Status>& status,
                        absl::Status (TaskStage::*step)(absl::Span<TaskStage* const>)) {
    std::vector<bool> done(run.size(), false);
    for (size_t i = 0; i < run.size(); ++i) {
      TaskStage* stage = run[i].task.stage;
      if (stage == nullptr || done[i] || !status[i].ok()) continue;
      std::vector<TaskStage*> members;
      std::vector<size_t> index;
      for (size_t j = i; j < run.size(); ++j) {
        TaskStage* other = run[j].task.stage;
        if (other == nullptr || done[j] || !status[j].ok() || other->group() != stage->group()) {
          continue;
        }
        members.push_back(other);
        index.push_back(j);
        done[j] = true;
      }
      absl::Status result;
      try {
        result = (stage->*step)(members);
      } catch (const std::bad_alloc&) {
        result = absl::ResourceExhaustedError("out of memory in a task's stage (projections)");
      }
      for (size_t j : index) status[j] = result;
    }
  }

  // Backend::Run, with std::bad_alloc turned into RESOURCE_EXHAUSTED.
  static absl::Status RunGuarded(Backend* backend, absl::Span<const AttentionParams> params) {
    try {
      return backend->Run(params);
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError(
          absl::StrCat(backend->info().name, " backend: out of memory while computing"));
    }
  }

  // Why a task's work stopped before it finished.
  absl::Status StoppedStatus(const QueuedTask& t, absl::Time now) const {
    if (aborting_.load(std::memory_order_relaxed)) {
      return absl::UnavailableError("scheduler drain timed out while the task was computing");
    }
    if (now >= t.task.deadline) return absl::DeadlineExceededError("deadline passed while computing");
    return absl::CancelledError("cancelled while computing");
  }

  // Counts `n` answered tasks out of in_flight_.
  void FinishTasks(int64_t n) {
    if (n == 0) return;
    absl::MutexLock lock(&mu_);
    in_flight_ -= n;
    if (in_flight_ == 0) idle_cv_.SignalAll();
  }

  void JoinWorkers() {
    std::vector<std::thread> workers;
    {
      absl::MutexLock lock(&mu_);
      workers.swap(workers_);
    }
    for (std::thread& w : workers) w.join();
  }

  // Constant after construction.
  const SchedulerOptions options_;
  Clock* const clock_;
  SchedulerObserver* const observer_;
  const absl::Duration max_queue_delay_;
  const absl::Duration aging_;

  mutable absl::Mutex mu_;
  absl::CondVar work_cv_;  // a task was admitted, a worker left work behind, or draining began
  absl::CondVar idle_cv_;  // in_flight_ reached 0
  std::map<GroupKey, TaskGroup> groups_ ABSL_GUARDED_BY(mu_);  // no empty groups
  int64_t queued_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  // Set when a drain times out: every running task's cancel token fires.
  std::atomic<bool> aborting_{false};
  std::vector<std::thread> workers_ ABSL_GUARDED_BY(mu_);  // emptied by the first join
};

absl::Status CheckAtLeast(const char* field, int64_t value, int64_t min) {
  if (value >= min) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("SchedulerOptions.", field, ": expected >= ", min, ", got ", value));
}

absl::Status ValidateOptions(const SchedulerOptions& o) {
  for (const absl::Status& s : {
           CheckAtLeast("queue_capacity", o.queue_capacity, 1),
           CheckAtLeast("queue_capacity_bytes", o.queue_capacity_bytes, 1),
           CheckAtLeast("max_batch_size", o.max_batch_size, 1),
           CheckAtLeast("max_queue_delay_us", o.max_queue_delay_us, 0),
           CheckAtLeast("workers", o.workers, 1),
           CheckAtLeast("low_priority_aging_us", o.low_priority_aging_us, 0),
       }) {
    if (!s.ok()) return s;
  }
  if (!(o.max_batch_flops > 0)) {  // also rejects NaN
    return absl::InvalidArgumentError(absl::StrFormat(
        "SchedulerOptions.max_batch_flops: expected > 0, got %g", o.max_batch_flops));
  }
  constexpr int32_t kMaxWorkers = 1024;
  if (o.workers > kMaxWorkers) {
    return absl::InvalidArgumentError(absl::StrCat("SchedulerOptions.workers: expected <= ",
                                                   kMaxWorkers, ", got ", o.workers));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(const SchedulerOptions& options,
                                                             Clock* clock,
                                                             SchedulerObserver* observer) {
  if (absl::Status s = ValidateOptions(options); !s.ok()) return s;
  if (clock == nullptr) return absl::InvalidArgumentError("clock: expected a clock, got null");
  return std::make_unique<BatchingScheduler>(options, clock, observer);
}

}  // namespace attnserve
