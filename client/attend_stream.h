// AttendStream: many Attend requests in flight on one bidirectional
// AttendStream RPC. Responses may come back in any order; they are matched to
// their requests by request_id. Thread-safe: Send may be called from any
// thread, including from a callback of this stream.
#ifndef ATTNSERVE_CLIENT_ATTEND_STREAM_H_
#define ATTNSERVE_CLIENT_ATTEND_STREAM_H_

#include <cstdint>
#include <memory>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "client/in_flight_counter.h"

namespace attnserve::client {

class AttendStream {
 public:
  using ResponseCallback = absl::AnyInvocable<void(absl::StatusOr<v1::AttendResponse>) &&>;

  // Starts the RPC on `stub` (borrowed; it must outlive the stream).
  // `deadline` bounds the whole RPC; zero means none. `guard` is held until
  // the RPC's last reference to the channel is gone (see InFlightCounter).
  AttendStream(v1::AttentionService::Stub* stub, absl::Duration deadline,
               InFlightCounter::Guard guard = {});
  // Cancels the RPC if Finish was not called, then waits for it to end.
  ~AttendStream();
  AttendStream(const AttendStream&) = delete;
  AttendStream& operator=(const AttendStream&) = delete;

  // Queues `request` for sending and returns at once. `request` is borrowed
  // until `done` runs; its request_id must be unique among this stream's
  // outstanding requests. On OK, `done` runs exactly once, on a gRPC thread,
  // with the matching response or, if the stream ends first, with the
  // stream's final status. The server ends a stream at the first request that
  // fails, so one error fails every request outstanding on the stream.
  // Otherwise `done` is not called and the error says why: INVALID_ARGUMENT
  // for a duplicate id, FAILED_PRECONDITION after Finish, UNAVAILABLE when
  // the stream has already ended (open a new one).
  absl::Status Send(const v1::AttendRequest* request, ResponseCallback done);

  // Requests sent whose callback has not run yet.
  int64_t outstanding() const;

  // Half-closes the stream after the queued requests, blocks until every
  // outstanding response has arrived and the server has closed, and returns
  // the RPC's final status. Call at most once.
  absl::Status Finish();

 private:
  class Reactor;
  std::shared_ptr<Reactor> reactor_;
  bool finished_ = false;
};

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_ATTEND_STREAM_H_
