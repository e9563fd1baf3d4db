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

namespace attnserve::client {

class AttendStream {
 public:
  using ResponseCallback = absl::AnyInvocable<void(absl::StatusOr<v1::AttendResponse>) &&>;

  // Starts the RPC on `stub` (borrowed; it must outlive the stream).
  // `deadline` bounds the whole RPC; zero means none.
  AttendStream(v1::AttentionService::Stub* stub, absl::Duration deadline);
  // Cancels the RPC if Finish was not called, then waits for it to end.
  ~AttendStream();
  AttendStream(const AttendStream&) = delete;
  AttendStream& operator=(const AttendStream&) = delete;

  // Queues `request` for sending and returns at once. `request` is borrowed
  // until `done` runs; its request_id must be unique among this stream's
  // outstanding requests. `done` runs exactly once, on a gRPC thread (or
  // inline for an immediate error): with the matching response, with
  // INVALID_ARGUMENT for a duplicate id, FAILED_PRECONDITION after Finish, or
  // with the stream's status if the stream ends first.
  void Send(const v1::AttendRequest* request, ResponseCallback done);

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
