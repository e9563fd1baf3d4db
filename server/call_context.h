// Small pieces shared by the RPC handlers: a call's deadline as absl::Time,
// the error every handler gives while the server drains, and the reactor of
// a unary call whose work is queued. Thread-safe.
#ifndef ATTNSERVE_SERVER_CALL_CONTEXT_H_
#define ATTNSERVE_SERVER_CALL_CONTEXT_H_

#include <atomic>
#include <chrono>
#include <exception>
#include <new>
#include <stdexcept>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/server_callback.h"
#include "core/memory_budget.h"
#include "metrics/metrics.h"

namespace attnserve {

inline absl::Time DeadlineOf(const grpc::CallbackServerContext* context) {
  const std::chrono::system_clock::time_point deadline = context->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

inline absl::Status Draining() {
  return absl::UnavailableError("server is draining for shutdown; retry on another replica");
}

// Runs `admit` (a handler's checks and admission), turning an exception into
// a status: memory that ran out while a request was checked is
// RESOURCE_EXHAUSTED for that request, and the handler still finishes its call
// (an exception escaping into gRPC would leave the call, and whatever it
// holds, unfinished).
template <typename Admit>
absl::Status AdmitNoThrow(Admit&& admit) {
  try {
    return admit();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory while checking the request");
  } catch (const std::length_error&) {
    return absl::ResourceExhaustedError("out of memory while checking the request");
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("while checking the request: ", e.what()));
  }
}

// A unary call with its own reactor (rather than the context's default one)
// so that cancellation arrives as OnCancel: queued and running tasks poll
// cancelled() instead of the context, and the metrics count cancellations
// when they happen. It holds the call's memory reservation until the response
// is sent. Deletes itself when gRPC is done with the call.
class CancellableUnaryReactor : public grpc::ServerUnaryReactor {
 public:
  // `metrics` is not owned; `method` names the call in the metrics.
  CancellableUnaryReactor(Metrics* metrics, const char* method)
      : metrics_(metrics), method_(method) {}

  bool cancelled() const { return cancelled_.load(); }
  void OnCancel() override {
    cancelled_.store(true);
    metrics_->RecordCancellation(method_);
  }
  void OnDone() override { delete this; }

  // The call's bytes from the memory budget, released when gRPC is done with
  // the response (OnDone). Set once, by the thread that submits the call.
  MemoryBudget::Reservation reservation;

 private:
  Metrics* const metrics_;
  const char* const method_;
  std::atomic<bool> cancelled_{false};
};

}  // namespace attnserve

#endif  // ATTNSERVE_SERVER_CALL_CONTEXT_H_
