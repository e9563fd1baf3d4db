// Small helpers shared by the RPC handlers: a call's deadline as absl::Time
// and the error every handler gives while the server drains. Thread-safe.
#ifndef ATTNSERVE_SERVER_CALL_CONTEXT_H_
#define ATTNSERVE_SERVER_CALL_CONTEXT_H_

#include <chrono>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "grpcpp/server_context.h"

namespace attnserve {

inline absl::Time DeadlineOf(const grpc::CallbackServerContext* context) {
  const std::chrono::system_clock::time_point deadline = context->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

inline absl::Status Draining() {
  return absl::UnavailableError("server is draining for shutdown; retry on another replica");
}

}  // namespace attnserve

#endif  // ATTNSERVE_SERVER_CALL_CONTEXT_H_
