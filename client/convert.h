// Conversions between the wire API (attnserve.v1 protos) and the core types,
// as the client sees them: core request in, wire request out; wire response
// in, owned core tensors out. The server has its own adapter; this one is the
// client's. Also the one place a grpc::Status becomes an absl::Status.
// Pure functions; thread-safe.
#ifndef ATTNSERVE_CLIENT_CONVERT_H_
#define ATTNSERVE_CLIENT_CONVERT_H_

#include <optional>
#include <string>

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "attention/request.h"
#include "attnserve/v1/attention.pb.h"
#include "core/tensor.h"

namespace attnserve::client {

// Per-call settings that are not part of the attention itself.
struct CallOptions {
  std::string request_id;  // echoed back; streaming callers match on it
  std::string backend;     // empty: the server's default
  int32_t priority = 0;    // 0 normal, 1 high
  absl::Duration deadline = absl::ZeroDuration();  // zero: the client's default
};

// Where the server spent the time (AttendResponse.timing).
struct ServerTiming {
  int64_t queue_us = 0;
  int64_t compute_us = 0;
  int32_t batch_size = 0;
  int64_t total_us = 0;
};

// An Attend result with owned tensors; optional outputs are present only when
// requested.
struct AttendResult {
  std::string request_id;
  Tensor output;
  std::optional<Tensor> lse;
  std::optional<Tensor> weights;
  std::optional<Tensor> top_k_indices;
  std::optional<Tensor> top_k_weights;
  ServerTiming timing;
  std::string backend;
};

v1::DType ToProto(DType dtype);
// INVALID_ARGUMENT for DTYPE_UNSPECIFIED or an unknown value.
absl::StatusOr<DType> FromProto(v1::DType dtype);

// Copies the view's bytes into `out`.
void ToProto(const TensorView& view, v1::Tensor* out);
// INVALID_ARGUMENT when the dtype is unknown, a dim is negative or the data
// length does not match shape and dtype. `field` names the tensor in messages.
absl::StatusOr<Tensor> FromProto(const v1::Tensor& t, absl::string_view field);

// Builds the wire request. Does not validate: the server does, and answers
// INVALID_ARGUMENT naming the field.
v1::AttendRequest ToProto(const AttentionRequest& request, const CallOptions& call);

// Moves the tensors out of `response` (which is left empty-ish).
absl::StatusOr<AttendResult> FromProto(v1::AttendResponse&& response);

// The one place a gRPC status becomes an absl::Status (codes share values).
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_CONVERT_H_
