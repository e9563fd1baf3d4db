// LoadGenerator: drives one Attend request shape against a server, the engine
// of `attnctl bench`.
//
// Closed loop (rate_qps == 0): `concurrency` calls are always in flight; each
// completion issues the next. Open loop (rate_qps > 0): calls start at Poisson
// arrival times whatever the server does, and latency is measured from the
// intended start time, so a slow server cannot hide its queueing by slowing
// the sender down (no coordinated omission). Either mode runs unary calls or
// AttendStream streams. Calls use the callback API, never a thread per call.
//
// Run blocks its caller for the duration plus the drain of calls in flight.
// Not thread-safe: one Run at a time.
#ifndef ATTNSERVE_CLIENT_LOAD_GENERATOR_H_
#define ATTNSERVE_CLIENT_LOAD_GENERATOR_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "attnserve/v1/attention.pb.h"
#include "client/client.h"
#include "client/latency_stats.h"

namespace attnserve::client {

struct LoadOptions {
  int concurrency = 1;    // closed loop: calls in flight (over all streams)
  double rate_qps = 0;    // > 0: open loop at this mean rate (Poisson arrivals)
  bool stream = false;    // AttendStream instead of unary Attend
  int streams = 1;        // streams per client, with `stream`
  absl::Duration duration = absl::Seconds(10);
  absl::Duration warmup = absl::ZeroDuration();  // run first, not measured
  absl::Duration call_deadline = absl::Seconds(10);  // unary calls
  // Open loop: arrivals beyond this many calls in flight are not sent and are
  // counted as CLIENT_BACKLOG errors, so an overloaded server cannot make the
  // client run out of memory.
  int64_t max_in_flight = 100000;
  uint64_t seed = 1;  // arrival times
  // Progress: called about every progress_interval from Run's thread with what
  // happened since the previous call; zero disables it.
  absl::Duration progress_interval = absl::ZeroDuration();
};

struct LoadProgress {
  double elapsed_s = 0;
  double interval_s = 0;
  int64_t in_flight = 0;
  LatencySummary interval;
};

struct LoadReport {
  double elapsed_s = 0;  // from the first call to the last completion
  double qps = 0;        // successful calls per second
  int64_t sent = 0;
  LatencySummary latency;
};

// INVALID_ARGUMENT naming the option when it is out of range.
absl::Status ValidateLoadOptions(const LoadOptions& options);

// Runs the load over `clients` (borrowed; calls are spread round-robin, one
// client per connection) with `request` (borrowed; copied per stream slot).
// Returns the validation error, or the report; call failures are counted in
// the report, not returned.
absl::StatusOr<LoadReport> RunLoad(const std::vector<AttnClient*>& clients,
                                   const v1::AttendRequest& request, const LoadOptions& options,
                                   const std::function<void(const LoadProgress&)>& progress = {});
// Same with requests[i] sent on clients[i] (as many of each), e.g. requests
// naming each connection's shared memory (LoadShmRegions).
absl::StatusOr<LoadReport> RunLoad(const std::vector<AttnClient*>& clients,
                                   const std::vector<v1::AttendRequest>& requests,
                                   const LoadOptions& options,
                                   const std::function<void(const LoadProgress&)>& progress = {});

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_LOAD_GENERATOR_H_
