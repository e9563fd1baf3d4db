// The one place that maps absl::Status (the core's errors) to grpc::Status.
// The code numbers are the same in both; only the types differ.
#ifndef ATTNSERVE_SERVER_STATUS_H_
#define ATTNSERVE_SERVER_STATUS_H_

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace attnserve {

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace attnserve

#endif  // ATTNSERVE_SERVER_STATUS_H_
