#include "client/session_load.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <memory>
#include <optional>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/convert.h"
#include "client/shapes.h"

namespace attnserve::client {
namespace {

using Clock = std::chrono::steady_clock;

// Random q/k/v sets a session's steps cycle through: enough that consecutive
// steps differ, few enough to cost nothing to keep.
constexpr int kStepVariants = 8;
constexpr auto kPollInterval = std::chrono::milliseconds(50);

double SecondsBetween(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

Clock::duration ToClock(absl::Duration d) {
  return std::chrono::duration_cast<Clock::duration>(absl::ToChronoNanoseconds(d));
}

bool Interrupted(const SessionLoadOptions& o) {
  return o.interrupted != nullptr && o.interrupted->load(std::memory_order_relaxed);
}

void SetTensor(v1::Tensor* t, DType dtype, std::vector<int64_t> shape, std::string data) {
  t->set_dtype(ToProto(dtype));
  t->mutable_shape()->Assign(shape.begin(), shape.end());
  t->set_data(std::move(data));
}

// One open session and its decode request, refilled for each step. Touched
// by one thread at a time: a session has at most one step in flight.
struct SessionSlot {
  std::string id;
  AttnClient* client = nullptr;
  v1::DecodeRequest request;
  int64_t context_tokens = 0;
  int64_t steps = 0;
};

struct StepData {
  std::string q, k, v;
};

class SessionLoadRun {
 public:
  SessionLoadRun(const std::vector<AttnClient*>& clients, const SessionLoadOptions& options)
      : clients_(clients), options_(options), slots_(options.sessions) {
    for (size_t i = 0; i < slots_.size(); ++i) slots_[i].client = clients_[i % clients_.size()];
  }

  absl::StatusOr<SessionLoadReport> Run(const std::function<void(const LoadProgress&)>& progress) {
    SessionLoadReport report;
    const Clock::time_point prefill_start = Clock::now();
    absl::Status prefilled = Prefill(&report);
    report.prefill_s = SecondsBetween(prefill_start, Clock::now());
    if (prefilled.ok() && Interrupted(options_)) {
      prefilled = absl::CancelledError("interrupted during the prefill");
    }
    if (!prefilled.ok()) {
      CloseAll();
      return prefilled;
    }

    MakeStepData();
    DecodeLoop(progress, &report);
    report.close_errors = CloseAll();
    for (const SessionSlot& s : slots_) {
      report.context_tokens_max = std::max(report.context_tokens_max, s.context_tokens);
    }
    return report;
  }

 private:
  // --- prefill -------------------------------------------------------------

  // Opens every session and fills it with context_tokens tokens, from up to
  // `concurrency` threads. Returns the first failure.
  absl::Status Prefill(SessionLoadReport* report) {
    const int64_t wire_size = DTypeSize(options_.dtype);
    const int64_t token_bytes = 2 * int64_t{options_.heads_kv} * options_.head_dim * wire_size;
    const int64_t query_bytes = int64_t{options_.heads_q} * options_.head_dim * wire_size;
    // Half the message limit leaves room for the framing and the query.
    const int64_t budget = std::max<int64_t>(options_.max_request_bytes / 2 - query_bytes, 0);
    chunk_tokens_ = std::clamp<int64_t>(budget / token_bytes, 1,
                                        std::max<int64_t>(options_.context_tokens, 1));
    const Tensor k = RandomTensor(options_.dtype,
                                  {chunk_tokens_, options_.heads_kv, options_.head_dim},
                                  options_.seed * 7919 + 1);
    const Tensor v = RandomTensor(options_.dtype,
                                  {chunk_tokens_, options_.heads_kv, options_.head_dim},
                                  options_.seed * 7919 + 2);
    const Tensor q = RandomTensor(options_.dtype, {1, options_.heads_q, options_.head_dim},
                                  options_.seed * 7919 + 3);

    const int threads = std::min(options_.concurrency, options_.sessions);
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([this, t, threads, &k, &v, &q] {
        for (int i = t; i < options_.sessions && !Failed() && !Interrupted(options_);
             i += threads) {
          absl::Status s = PrefillOne(slots_[i], k, v, q);
          if (!s.ok()) Fail(absl::Status(s.code(), absl::StrCat("session ", i, ": ", s.message())));
        }
      });
    }
    for (std::thread& w : workers) w.join();
    absl::MutexLock lock(&mu_);
    report->prefill_tokens = prefill_tokens_;
    report->prefill_calls = prefill_calls_;
    return first_error_;
  }

  absl::Status PrefillOne(SessionSlot& slot, const Tensor& k, const Tensor& v, const Tensor& q) {
    SessionSpec spec;
    spec.num_kv_heads = options_.heads_kv;
    spec.head_dim = options_.head_dim;
    spec.cache_dtype = options_.cache_dtype;
    absl::StatusOr<CreatedSession> created =
        slot.client->CreateSession(spec, options_.call_deadline);
    if (!created.ok()) {
      return absl::Status(created.status().code(),
                          absl::StrCat("CreateSession: ", created.status().message()));
    }
    slot.id = created->session_id;

    v1::DecodeRequest request;
    request.set_session_id(slot.id);
    request.set_backend(options_.backend);
    SetTensor(request.mutable_query(), options_.dtype, q.shape, q.data);
    const int64_t row_bytes = int64_t{options_.heads_kv} * options_.head_dim *
                              static_cast<int64_t>(DTypeSize(options_.dtype));
    for (int64_t done = 0; done < options_.context_tokens && !Interrupted(options_);) {
      const int64_t n = std::min(chunk_tokens_, options_.context_tokens - done);
      // Tokens are the outer dim, so the first n tokens are a prefix.
      SetTensor(request.mutable_key(), options_.dtype, {n, options_.heads_kv, options_.head_dim},
                k.data.substr(0, n * row_bytes));
      SetTensor(request.mutable_value(), options_.dtype,
                {n, options_.heads_kv, options_.head_dim}, v.data.substr(0, n * row_bytes));
      absl::StatusOr<v1::DecodeResponse> r = slot.client->Decode(request, options_.call_deadline);
      if (!r.ok()) {
        return absl::Status(r.status().code(),
                            absl::StrCat("prefill after ", done, " tokens: ", r.status().message()));
      }
      done += n;
      slot.context_tokens = r->context_tokens();
      absl::MutexLock lock(&mu_);
      prefill_tokens_ += n;
      ++prefill_calls_;
    }
    return absl::OkStatus();
  }

  bool Failed() {
    absl::MutexLock lock(&mu_);
    return !first_error_.ok();
  }

  void Fail(absl::Status status) {
    absl::MutexLock lock(&mu_);
    if (first_error_.ok()) first_error_ = std::move(status);
  }

  // Closes every opened session; returns how many closes failed.
  int64_t CloseAll() {
    int64_t failed = 0;
    for (SessionSlot& s : slots_) {
      if (s.id.empty()) continue;
      if (!s.client->CloseSession(s.id, options_.call_deadline).ok()) ++failed;
      s.id.clear();
    }
    return failed;
  }

  // --- decode --------------------------------------------------------------

  void MakeStepData() {
    const int64_t n = options_.decode_tokens;
    for (int i = 0; i < kStepVariants; ++i) {
      const uint64_t seed = options_.seed * 104729 + 3 * static_cast<uint64_t>(i);
      StepData d;
      d.q = RandomTensor(options_.dtype, {n, options_.heads_q, options_.head_dim}, seed).data;
      d.k = RandomTensor(options_.dtype, {n, options_.heads_kv, options_.head_dim}, seed + 1).data;
      d.v = RandomTensor(options_.dtype, {n, options_.heads_kv, options_.head_dim}, seed + 2).data;
      variants_.push_back(std::move(d));
    }
    for (SessionSlot& s : slots_) {
      s.request.set_session_id(s.id);
      s.request.set_backend(options_.backend);
      SetTensor(s.request.mutable_query(), options_.dtype, {n, options_.heads_q, options_.head_dim},
                "");
      SetTensor(s.request.mutable_key(), options_.dtype, {n, options_.heads_kv, options_.head_dim},
                "");
      SetTensor(s.request.mutable_value(), options_.dtype,
                {n, options_.heads_kv, options_.head_dim}, "");
    }
  }

  void DecodeLoop(const std::function<void(const LoadProgress&)>& progress,
                  SessionLoadReport* report) {
    start_ = Clock::now();
    end_ = start_ + ToClock(options_.duration);
    std::vector<size_t> first;
    {
      absl::MutexLock lock(&mu_);
      for (size_t i = 0; i < slots_.size(); ++i) {
        if (i < static_cast<size_t>(options_.concurrency)) {
          first.push_back(i);
        } else {
          ready_.push_back(i);
        }
      }
    }
    for (size_t i : first) Issue(i);

    report->interrupted = WaitForEnd(progress);
    stop_.store(true);
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](int64_t* in_flight) { return *in_flight == 0; }, &in_flight_));
      report->sent = sent_;
      const Clock::time_point last = std::max(last_completion_, start_);
      report->elapsed_s = SecondsBetween(start_, last);
    }
    report->latency = stats_.Summary();
    if (report->elapsed_s > 0) {
      report->steps_per_s = static_cast<double>(report->latency.ok) / report->elapsed_s;
      report->tokens_per_s = report->steps_per_s * options_.decode_tokens;
    }
  }

  // Sleeps until the end of the run, reporting progress. Returns true when
  // interrupted first.
  bool WaitForEnd(const std::function<void(const LoadProgress&)>& progress) {
    const bool report_progress = progress && options_.progress_interval > absl::ZeroDuration();
    Clock::time_point previous = Clock::now();
    Clock::time_point next_report = previous + ToClock(options_.progress_interval);
    while (true) {
      if (Interrupted(options_)) return true;
      const Clock::time_point now = Clock::now();
      if (now >= end_) return false;
      if (report_progress && now >= next_report) {
        LoadProgress p;
        p.elapsed_s = SecondsBetween(start_, now);
        p.interval_s = SecondsBetween(previous, now);
        p.interval = stats_.SummarizeInterval();
        {
          absl::MutexLock lock(&mu_);
          p.in_flight = in_flight_;
        }
        progress(p);
        previous = now;
        next_report = now + ToClock(options_.progress_interval);
      }
      Clock::time_point wake = std::min(end_, now + kPollInterval);
      if (report_progress) wake = std::min(wake, next_report);
      std::this_thread::sleep_until(wake);
    }
  }

  // Starts the next step of session `index`.
  void Issue(size_t index) {
    SessionSlot& s = slots_[index];
    const StepData& d = variants_[static_cast<size_t>(s.steps + index) % variants_.size()];
    ++s.steps;
    s.request.mutable_query()->set_data(d.q);
    s.request.mutable_key()->set_data(d.k);
    s.request.mutable_value()->set_data(d.v);
    {
      absl::MutexLock lock(&mu_);
      ++in_flight_;
      ++sent_;
    }
    const Clock::time_point started = Clock::now();
    s.client->DecodeAsync(
        s.request,
        [this, index, started](absl::StatusOr<v1::DecodeResponse> response) {
          Complete(index, started, response);
        },
        options_.call_deadline);
  }

  void Complete(size_t index, Clock::time_point started,
                const absl::StatusOr<v1::DecodeResponse>& response) {
    const Clock::time_point now = Clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - started).count();
    if (response.ok()) {
      const v1::Timing& t = response->timing();
      stats_.RecordOk(ms, t.queue_us(), t.compute_us(), t.batch_size());
      slots_[index].context_tokens = response->context_tokens();
    } else {
      stats_.RecordError(response.status().code(), ms);
    }
    // Closed loop: this session goes to the back of the line and the one at
    // the front steps next. The new step is counted in flight before this
    // one leaves, so the drain never sees a false zero.
    std::optional<size_t> next;
    if (!stop_.load() && now < end_) {
      absl::MutexLock lock(&mu_);
      ready_.push_back(index);
      next = ready_.front();
      ready_.pop_front();
    }
    if (next.has_value()) Issue(*next);
    absl::MutexLock lock(&mu_);
    --in_flight_;
    last_completion_ = std::max(last_completion_, now);
  }

  // Constant during the run.
  const std::vector<AttnClient*>& clients_;
  const SessionLoadOptions& options_;
  int64_t chunk_tokens_ = 1;
  std::vector<StepData> variants_;
  Clock::time_point start_, end_;

  // One writer at a time per slot (see SessionSlot).
  std::vector<SessionSlot> slots_;

  LatencyStats stats_;  // thread-safe itself
  std::atomic<bool> stop_{false};
  absl::Mutex mu_;
  absl::Status first_error_ ABSL_GUARDED_BY(mu_);
  int64_t prefill_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t prefill_calls_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<size_t> ready_ ABSL_GUARDED_BY(mu_);  // sessions waiting to step
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t sent_ ABSL_GUARDED_BY(mu_) = 0;
  Clock::time_point last_completion_ ABSL_GUARDED_BY(mu_);
};

absl::Status Positive(absl::string_view name, int64_t value) {
  if (value > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(name, ": expected >= 1, got ", value));
}

}  // namespace

absl::Status ValidateSessionLoadOptions(const SessionLoadOptions& o) {
  for (auto [name, value] : {std::pair<const char*, int64_t>{"sessions", o.sessions},
                             {"decode_tokens", o.decode_tokens},
                             {"concurrency", o.concurrency},
                             {"hq", o.heads_q},
                             {"hkv", o.heads_kv},
                             {"d", o.head_dim},
                             {"max_request_bytes", o.max_request_bytes}}) {
    if (absl::Status s = Positive(name, value); !s.ok()) return s;
  }
  if (o.context_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("context: expected >= 0, got ", o.context_tokens));
  }
  if (o.concurrency > o.sessions) {
    return absl::InvalidArgumentError(absl::StrCat(
        "concurrency: expected at most --sessions (", o.sessions,
        "; a session has one step in flight at a time), got ", o.concurrency));
  }
  if (o.heads_q % o.heads_kv != 0) {
    return absl::InvalidArgumentError(absl::StrCat("hq: expected a multiple of hkv (", o.heads_kv,
                                                   "), got ", o.heads_q));
  }
  for (auto [name, dtype] : {std::pair{"dtype", o.dtype}, std::pair{"cache_dtype", o.cache_dtype}}) {
    if (dtype == DType::kI32) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": expected f32, f16 or bf16, got ", DTypeName(dtype)));
    }
  }
  if (o.duration <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("duration: expected > 0, got ", absl::FormatDuration(o.duration)));
  }
  if (o.call_deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("deadline: expected > 0, got ", absl::FormatDuration(o.call_deadline)));
  }
  return absl::OkStatus();
}

absl::StatusOr<SessionLoadReport> RunSessionLoad(
    const std::vector<AttnClient*>& clients, const SessionLoadOptions& options,
    const std::function<void(const LoadProgress&)>& progress) {
  if (absl::Status s = ValidateSessionLoadOptions(options); !s.ok()) return s;
  if (clients.empty()) {
    return absl::InvalidArgumentError("clients: expected at least one, got none");
  }
  SessionLoadRun run(clients, options);
  return run.Run(progress);
}

}  // namespace attnserve::client
