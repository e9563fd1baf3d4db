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
  // Model-shaped runs: the tokens of each layer's cache, for
  // expected_context_tokens.
  std::vector<int64_t> layer_tokens;
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
    if (options_.model_shaped()) {
      ModelLoop(progress, &report);
    } else {
      DecodeLoop(progress, &report);
    }
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
    spec.num_layers = options_.layers;
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
    const bool model = options_.model_shaped();
    for (int64_t done = 0; done < options_.context_tokens && !Interrupted(options_);) {
      const int64_t n = std::min(chunk_tokens_, options_.context_tokens - done);
      // Tokens are the outer dim, so the first n tokens are a prefix.
      SetTensor(request.mutable_key(), options_.dtype, {n, options_.heads_kv, options_.head_dim},
                k.data.substr(0, n * row_bytes));
      SetTensor(request.mutable_value(), options_.dtype,
                {n, options_.heads_kv, options_.head_dim}, v.data.substr(0, n * row_bytes));
      // Every layer takes the chunk, in layer order (the server requires it).
      for (int32_t layer = 0; layer < options_.layers; ++layer) {
        request.set_layer(layer);
        if (model) request.set_expected_context_tokens(done);
        absl::StatusOr<v1::DecodeResponse> r =
            slot.client->Decode(request, options_.call_deadline);
        if (!r.ok()) {
          return absl::Status(r.status().code(),
                              absl::StrCat("prefill of layer ", layer, " after ", done,
                                           " tokens: ", r.status().message()));
        }
        slot.context_tokens = r->context_tokens();
        absl::MutexLock lock(&mu_);
        ++prefill_calls_;
      }
      done += n;
      absl::MutexLock lock(&mu_);
      prefill_tokens_ += n;
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

  // --- model-shaped decode ---------------------------------------------------

  // Generates tokens until the duration passes: each token steps every layer
  // in order over the sessions still alive, one layer-step at a time.
  void ModelLoop(const std::function<void(const LoadProgress&)>& progress,
                 SessionLoadReport* report) {
    const bool report_progress = progress && options_.progress_interval > absl::ZeroDuration();
    std::vector<size_t> alive;
    for (size_t i = 0; i < slots_.size(); ++i) {
      slots_[i].layer_tokens.assign(static_cast<size_t>(options_.layers),
                                    slots_[i].context_tokens);
      alive.push_back(i);
    }
    if (options_.batched) {
      batch_request_.set_backend(options_.backend);
    }
    std::vector<double> layer_ms;
    start_ = Clock::now();
    end_ = start_ + ToClock(options_.duration);
    Clock::time_point last = start_;
    Clock::time_point previous = start_;
    Clock::time_point next_report = start_ + ToClock(options_.progress_interval);
    for (int64_t token = 0; !alive.empty() && Clock::now() < end_; ++token) {
      bool stopped = false;
      for (int32_t layer = 0; layer < options_.layers && !alive.empty(); ++layer) {
        if (Interrupted(options_)) {
          stopped = true;
          break;
        }
        const Clock::time_point started = Clock::now();
        std::vector<bool> failed = options_.batched ? BatchLayerStep(layer, token, alive)
                                                    : DecodeLayerStep(layer, token, alive);
        const Clock::time_point now = Clock::now();
        layer_ms.push_back(std::chrono::duration<double, std::milli>(now - started).count());
        std::vector<size_t> kept;
        for (size_t j = 0; j < alive.size(); ++j) {
          if (failed[j]) {
            ++report->sessions_dropped;
          } else {
            kept.push_back(alive[j]);
          }
        }
        alive = std::move(kept);
        if (report_progress && now >= next_report) {
          LoadProgress p;
          p.elapsed_s = SecondsBetween(start_, now);
          p.interval_s = SecondsBetween(previous, now);
          p.interval = stats_.SummarizeInterval();
          progress(p);
          previous = now;
          next_report = now + ToClock(options_.progress_interval);
        }
      }
      if (stopped) {
        report->interrupted = true;
        break;
      }
      // The sessions left have taken this token through every layer.
      report->tokens += static_cast<int64_t>(alive.size()) * options_.decode_tokens;
      last = Clock::now();
    }
    if (!report->interrupted && Interrupted(options_)) report->interrupted = true;
    report->elapsed_s = SecondsBetween(start_, last);
    report->latency = stats_.Summary();
    report->sent = report->latency.ok + report->latency.errors_total;
    report->layer_steps = static_cast<int64_t>(layer_ms.size());
    report->layer_p50_ms = Percentile(layer_ms, 0.50);
    report->layer_p99_ms = Percentile(layer_ms, 0.99);
    if (report->elapsed_s > 0) {
      report->steps_per_s = static_cast<double>(report->latency.ok) / report->elapsed_s;
      report->tokens_per_s = static_cast<double>(report->tokens) / report->elapsed_s;
    }
  }

  const StepData& StepVariant(int64_t token, size_t index) const {
    return variants_[static_cast<size_t>(token + static_cast<int64_t>(index)) % variants_.size()];
  }

  // Records one session's layer-step; returns whether it failed.
  bool RecordLayerStep(size_t index, int32_t layer, double ms,
                       const absl::StatusOr<int64_t>& context_tokens, const v1::Timing& timing) {
    if (!context_tokens.ok()) {
      stats_.RecordError(context_tokens.status().code(), ms);
      return true;
    }
    stats_.RecordOk(ms, timing.queue_us(), timing.compute_us(), timing.batch_size());
    SessionSlot& s = slots_[index];
    s.layer_tokens[static_cast<size_t>(layer)] = *context_tokens;
    s.context_tokens = *context_tokens;
    return false;
  }

  // One layer-step as one BatchDecode over the `alive` sessions. Returns
  // which of them failed.
  std::vector<bool> BatchLayerStep(int32_t layer, int64_t token, const std::vector<size_t>& alive) {
    const int64_t n = options_.decode_tokens;
    batch_request_.set_layer(layer);
    // Entries are rebuilt only when a session was dropped.
    if (batch_request_.entries_size() != static_cast<int>(alive.size())) {
      batch_request_.clear_entries();
      for (size_t index : alive) {
        v1::BatchDecodeEntry* e = batch_request_.add_entries();
        e->set_session_id(slots_[index].id);
        SetTensor(e->mutable_query(), options_.dtype, {n, options_.heads_q, options_.head_dim}, "");
        SetTensor(e->mutable_key(), options_.dtype, {n, options_.heads_kv, options_.head_dim}, "");
        SetTensor(e->mutable_value(), options_.dtype, {n, options_.heads_kv, options_.head_dim},
                  "");
      }
    }
    for (size_t j = 0; j < alive.size(); ++j) {
      const StepData& d = StepVariant(token, alive[j]);
      v1::BatchDecodeEntry* e = batch_request_.mutable_entries(static_cast<int>(j));
      e->mutable_query()->set_data(d.q);
      e->mutable_key()->set_data(d.k);
      e->mutable_value()->set_data(d.v);
      e->set_expected_context_tokens(slots_[alive[j]].layer_tokens[static_cast<size_t>(layer)]);
    }
    const Clock::time_point started = Clock::now();
    absl::StatusOr<v1::BatchDecodeResponse> response =
        clients_[0]->BatchDecode(batch_request_, options_.call_deadline);
    const double ms =
        std::chrono::duration<double, std::milli>(Clock::now() - started).count();
    std::vector<bool> failed(alive.size(), false);
    for (size_t j = 0; j < alive.size(); ++j) {
      absl::StatusOr<int64_t> tokens = int64_t{0};
      if (!response.ok()) {
        tokens = response.status();
      } else {
        if (static_cast<size_t>(response->results_size()) != alive.size()) {
          tokens = absl::InternalError("results: expected one per entry");
        } else if (const v1::BatchDecodeResult& r = response->results(static_cast<int>(j));
                   r.code() != 0) {
          tokens = absl::Status(static_cast<absl::StatusCode>(r.code()), r.message());
        } else {
          tokens = r.context_tokens();
        }
      }
      failed[j] = RecordLayerStep(alive[j], layer, ms, tokens,
                                  response.ok() ? response->timing() : v1::Timing());
    }
    return failed;
  }

  // One layer-step as one Decode per `alive` session, up to `concurrency` in
  // flight; returns once every one has answered, with which of them failed.
  std::vector<bool> DecodeLayerStep(int32_t layer, int64_t token,
                                    const std::vector<size_t>& alive) {
    for (size_t index : alive) {
      SessionSlot& s = slots_[index];
      const StepData& d = StepVariant(token, index);
      s.request.set_layer(layer);
      s.request.set_expected_context_tokens(s.layer_tokens[static_cast<size_t>(layer)]);
      s.request.mutable_query()->set_data(d.q);
      s.request.mutable_key()->set_data(d.k);
      s.request.mutable_value()->set_data(d.v);
    }
    {
      absl::MutexLock lock(&mu_);
      layer_alive_ = &alive;
      layer_number_ = layer;
      layer_next_ = 0;
      layer_done_ = 0;
      layer_failed_.assign(alive.size(), false);
    }
    const size_t first = std::min(alive.size(), static_cast<size_t>(options_.concurrency));
    for (size_t j = 0; j < first; ++j) IssueLayerCall();
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(this, &SessionLoadRun::LayerStepDone));
    layer_alive_ = nullptr;
    return layer_failed_;
  }

  bool LayerStepDone() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return layer_done_ == layer_alive_->size();
  }

  // Sends the next Decode of the current layer-step, if one is left.
  void IssueLayerCall() {
    size_t j;
    size_t index;
    {
      absl::MutexLock lock(&mu_);
      if (layer_next_ >= layer_alive_->size()) return;
      j = layer_next_++;
      index = (*layer_alive_)[j];
    }
    SessionSlot& s = slots_[index];
    const Clock::time_point started = Clock::now();
    s.client->DecodeAsync(
        s.request,
        [this, j, index, started](absl::StatusOr<v1::DecodeResponse> response) {
          const double ms =
              std::chrono::duration<double, std::milli>(Clock::now() - started).count();
          int32_t layer;
          {
            absl::MutexLock lock(&mu_);
            layer = layer_number_;
          }
          absl::StatusOr<int64_t> tokens =
              response.ok() ? absl::StatusOr<int64_t>(response->context_tokens())
                            : absl::StatusOr<int64_t>(response.status());
          const bool failed = RecordLayerStep(index, layer, ms, tokens,
                                              response.ok() ? response->timing() : v1::Timing());
          // The next call goes out before this one counts as done, so the
          // layer-step never looks finished while calls remain.
          IssueLayerCall();
          absl::MutexLock lock(&mu_);
          layer_failed_[j] = failed;
          ++layer_done_;
        },
        options_.call_deadline);
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
  // Model-shaped runs: the batched layer-step's request (caller's thread
  // only), and the state of the unbatched layer-step in progress.
  v1::BatchDecodeRequest batch_request_;
  const std::vector<size_t>* layer_alive_ ABSL_GUARDED_BY(mu_) = nullptr;
  int32_t layer_number_ ABSL_GUARDED_BY(mu_) = 0;
  size_t layer_next_ ABSL_GUARDED_BY(mu_) = 0;  // the next of layer_alive_ to send
  size_t layer_done_ ABSL_GUARDED_BY(mu_) = 0;  // answered
  std::vector<bool> layer_failed_ ABSL_GUARDED_BY(mu_);
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
                             {"layers", o.layers},
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
