#include "client/load_generator.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <random>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/attend_stream.h"

namespace attnserve::client {
namespace {

using Clock = std::chrono::steady_clock;

double MillisBetween(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

Clock::duration ToClock(absl::Duration d) {
  return std::chrono::duration_cast<Clock::duration>(absl::ToChronoNanoseconds(d));
}

// Sleeps until `t`: the OS sleep gets close, a short spin does the rest, so
// open-loop arrivals leave on time at rates of tens of thousands per second.
void SleepUntil(Clock::time_point t) {
  constexpr auto kSpin = std::chrono::microseconds(100);
  auto now = Clock::now();
  if (t - now > kSpin) std::this_thread::sleep_for(t - now - kSpin);
  while (Clock::now() < t) std::this_thread::yield();
}

// One AttendStream and the request copies in flight on it. Each copy carries
// its own request_id ("slot number"), so ids are unique among the stream's
// outstanding requests; a copy is reused once its response is back.
//
// The server ends a stream at its first failed request (RESOURCE_EXHAUSTED
// under overload, say), failing what was in flight on it; the lane then opens
// a new stream for the next request, as a real caller would, so a run goes on
// through errors. Ended streams are kept until the lane is destroyed, because
// an AttendStream must not be destroyed from its own callbacks.
class StreamLane {
 public:
  StreamLane(AttnClient* client, const v1::AttendRequest& request, absl::Duration deadline)
      : client_(client), request_(request), deadline_(deadline),
        stream_(client->OpenStream(deadline)) {}

  // Sends a copy of the request; `done` runs once with its outcome.
  void Send(AttendStream::ResponseCallback done) {
    const v1::AttendRequest* slot = AcquireSlot();
    // The callback is shared between attempts: Send consumes it only when it
    // accepts the request.
    auto shared_done = std::make_shared<AttendStream::ResponseCallback>(std::move(done));
    absl::Status sent;
    // The stream may have ended before its error callbacks marked it so; it
    // then refuses at once (UNAVAILABLE) and one fresh stream is tried.
    AttendStream* refused = nullptr;
    for (int attempt = 0; attempt < 2; ++attempt) {
      AttendStream* stream = CurrentStream(refused);
      sent = stream->Send(slot, [this, stream, slot, shared_done](
                                    absl::StatusOr<v1::AttendResponse> response) {
        {
          absl::MutexLock lock(&mu_);
          free_.push_back(slot);
          if (!response.ok() && stream == stream_.get()) stream_ended_ = true;
        }
        std::move(*shared_done)(std::move(response));
      });
      if (!absl::IsUnavailable(sent)) break;
      refused = stream;
    }
    if (!sent.ok()) {
      {
        absl::MutexLock lock(&mu_);
        free_.push_back(slot);
      }
      std::move(*shared_done)(sent);
    }
  }

  // Half-closes the current stream and waits for every stream to end.
  void Finish() {
    std::vector<std::unique_ptr<AttendStream>> streams;
    {
      absl::MutexLock lock(&mu_);
      streams = std::move(ended_);
      streams.push_back(std::move(stream_));
    }
    for (auto& s : streams) s->Finish().IgnoreError();
  }

 private:
  const v1::AttendRequest* AcquireSlot() {
    absl::MutexLock lock(&mu_);
    if (!free_.empty()) {
      const v1::AttendRequest* slot = free_.back();
      free_.pop_back();
      return slot;
    }
    auto copy = std::make_unique<v1::AttendRequest>(request_);
    copy->set_request_id(absl::StrCat(slots_.size()));
    slots_.push_back(std::move(copy));
    return slots_.back().get();
  }

  // The stream to send on: a new one when the current one has ended or is
  // `refused`, the one that just refused a request.
  AttendStream* CurrentStream(const AttendStream* refused) {
    absl::MutexLock lock(&mu_);
    if (stream_ended_ || stream_.get() == refused) {
      ended_.push_back(std::move(stream_));
      stream_ = client_->OpenStream(deadline_);
      stream_ended_ = false;
    }
    return stream_.get();
  }

  AttnClient* const client_;
  const v1::AttendRequest& request_;
  const absl::Duration deadline_;

  absl::Mutex mu_;
  std::unique_ptr<AttendStream> stream_ ABSL_GUARDED_BY(mu_);
  bool stream_ended_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::unique_ptr<AttendStream>> ended_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<v1::AttendRequest>> slots_ ABSL_GUARDED_BY(mu_);
  std::vector<const v1::AttendRequest*> free_ ABSL_GUARDED_BY(mu_);
};

class LoadRun {
 public:
  // requests[i] goes on clients[i].
  LoadRun(const std::vector<AttnClient*>& clients,
          const std::vector<const v1::AttendRequest*>& requests, const LoadOptions& options)
      : clients_(clients), requests_(requests), options_(options) {}

  LoadReport Run(const std::function<void(const LoadProgress&)>& progress) {
    if (options_.stream) {
      const absl::Duration stream_deadline =
          options_.warmup + options_.duration + options_.call_deadline;
      for (size_t c = 0; c < clients_.size(); ++c) {
        for (int i = 0; i < options_.streams; ++i) {
          lanes_.push_back(
              std::make_unique<StreamLane>(clients_[c], *requests_[c], stream_deadline));
        }
      }
    }
    start_ = Clock::now();
    measure_start_ = start_ + ToClock(options_.warmup);
    end_ = measure_start_ + ToClock(options_.duration);

    std::thread sender;
    if (options_.rate_qps > 0) {
      sender = std::thread([this] { SendOpenLoop(); });
    } else {
      for (int i = 0; i < options_.concurrency; ++i) Issue(static_cast<size_t>(i), Clock::now());
    }

    ReportProgressUntilEnd(progress);
    if (sender.joinable()) sender.join();
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](int64_t* in_flight) { return *in_flight == 0; }, &in_flight_));
    }
    for (auto& lane : lanes_) lane->Finish();

    LoadReport report;
    absl::MutexLock lock(&mu_);
    report.sent = sent_;
    report.latency = stats_.Summary();
    const Clock::time_point last = std::max(last_completion_, measure_start_);
    report.elapsed_s = std::chrono::duration<double>(last - measure_start_).count();
    if (report.elapsed_s > 0) report.qps = static_cast<double>(report.latency.ok) / report.elapsed_s;
    return report;
  }

 private:
  void ReportProgressUntilEnd(const std::function<void(const LoadProgress&)>& progress) {
    if (!progress || options_.progress_interval <= absl::ZeroDuration()) {
      SleepUntil(end_);
      return;
    }
    Clock::time_point previous = Clock::now();
    while (previous < end_) {
      const Clock::time_point next = std::min(end_, previous + ToClock(options_.progress_interval));
      std::this_thread::sleep_until(next);
      LoadProgress p;
      const Clock::time_point now = Clock::now();
      p.elapsed_s = std::chrono::duration<double>(now - start_).count();
      p.interval_s = std::chrono::duration<double>(now - previous).count();
      p.interval = stats_.SummarizeInterval();
      {
        absl::MutexLock lock(&mu_);
        p.in_flight = in_flight_;
      }
      progress(p);
      previous = now;
    }
  }

  void SendOpenLoop() {
    std::mt19937_64 rng(options_.seed);
    std::exponential_distribution<double> gap_s(options_.rate_qps);
    Clock::time_point t = start_;
    size_t index = 0;
    while (true) {
      t += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap_s(rng)));
      if (t >= end_) break;
      SleepUntil(t);
      bool backlogged;
      {
        absl::MutexLock lock(&mu_);
        backlogged = in_flight_ >= options_.max_in_flight;
      }
      if (backlogged) {
        if (t >= measure_start_) stats_.RecordError("CLIENT_BACKLOG", 0);
        continue;
      }
      Issue(index++, t);
    }
  }

  // Starts one call. `worker` picks the client or stream lane; `intended` is
  // when the call should have started, the origin of its latency.
  void Issue(size_t worker, Clock::time_point intended) {
    {
      absl::MutexLock lock(&mu_);
      ++in_flight_;
      ++sent_;
    }
    if (options_.stream) {
      lanes_[worker % lanes_.size()]->Send(
          [this, worker, intended](absl::StatusOr<v1::AttendResponse> response) {
            Complete(worker, intended, response);
          });
    } else {
      const size_t c = worker % clients_.size();
      clients_[c]->AttendAsync(
          *requests_[c],
          [this, worker, intended](absl::StatusOr<v1::AttendResponse> response) {
            Complete(worker, intended, response);
          },
          options_.call_deadline);
    }
  }

  void Complete(size_t worker, Clock::time_point intended,
                const absl::StatusOr<v1::AttendResponse>& response) {
    const Clock::time_point now = Clock::now();
    const bool measured = intended >= measure_start_ && intended < end_;
    if (measured) {
      const double ms = MillisBetween(intended, now);
      if (response.ok()) {
        const v1::Timing& t = response->timing();
        stats_.RecordOk(ms, t.queue_us(), t.compute_us(), t.batch_size());
      } else {
        stats_.RecordError(response.status().code(), ms);
      }
    }
    // Closed loop: the worker goes on until the end. The new call is counted
    // in flight before this one leaves, so the drain never sees a false zero.
    const bool again = options_.rate_qps <= 0 && now < end_;
    if (again) Issue(worker, now);
    absl::MutexLock lock(&mu_);
    --in_flight_;
    if (measured) last_completion_ = std::max(last_completion_, now);
  }

  // Constant during the run.
  const std::vector<AttnClient*>& clients_;
  const std::vector<const v1::AttendRequest*>& requests_;  // one per client
  const LoadOptions& options_;
  std::vector<std::unique_ptr<StreamLane>> lanes_;
  Clock::time_point start_, measure_start_, end_;

  LatencyStats stats_;  // thread-safe itself
  absl::Mutex mu_;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t sent_ ABSL_GUARDED_BY(mu_) = 0;
  Clock::time_point last_completion_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::Status ValidateLoadOptions(const LoadOptions& o) {
  if (o.rate_qps < 0) {
    return absl::InvalidArgumentError(absl::StrCat("rate: expected >= 0, got ", o.rate_qps));
  }
  if (o.rate_qps == 0 && o.concurrency <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("concurrency: expected >= 1 in closed loop, got ", o.concurrency));
  }
  if (o.stream && o.streams <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("streams: expected >= 1, got ", o.streams));
  }
  if (o.duration <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("duration: expected > 0, got ", absl::FormatDuration(o.duration)));
  }
  if (o.warmup < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("warmup: expected >= 0, got ", absl::FormatDuration(o.warmup)));
  }
  if (o.call_deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("deadline: expected > 0, got ", absl::FormatDuration(o.call_deadline)));
  }
  if (o.max_in_flight <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_in_flight: expected >= 1, got ", o.max_in_flight));
  }
  return absl::OkStatus();
}

absl::StatusOr<LoadReport> RunLoad(const std::vector<AttnClient*>& clients,
                                   const v1::AttendRequest& request, const LoadOptions& options,
                                   const std::function<void(const LoadProgress&)>& progress) {
  if (absl::Status s = ValidateLoadOptions(options); !s.ok()) return s;
  if (clients.empty()) {
    return absl::InvalidArgumentError("clients: expected at least one, got none");
  }
  const std::vector<const v1::AttendRequest*> requests(clients.size(), &request);
  LoadRun run(clients, requests, options);
  return run.Run(progress);
}

absl::StatusOr<LoadReport> RunLoad(const std::vector<AttnClient*>& clients,
                                   const std::vector<v1::AttendRequest>& requests,
                                   const LoadOptions& options,
                                   const std::function<void(const LoadProgress&)>& progress) {
  if (absl::Status s = ValidateLoadOptions(options); !s.ok()) return s;
  if (clients.empty() || requests.size() != clients.size()) {
    return absl::InvalidArgumentError(absl::StrCat("clients, requests: expected as many of each (",
                                                   "at least one), got ", clients.size(), " and ",
                                                   requests.size()));
  }
  std::vector<const v1::AttendRequest*> pointers;
  for (const v1::AttendRequest& r : requests) pointers.push_back(&r);
  LoadRun run(clients, pointers, options);
  return run.Run(progress);
}

}  // namespace attnserve::client
