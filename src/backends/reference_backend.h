// The `reference` backend: runs RunReferenceAttention (exact, slow) on the
// calling thread. It supports everything, so it doubles as the fallback and as
// the oracle the conformance suite compares other backends with. Thread-safe.
#ifndef ATTNSERVE_BACKENDS_REFERENCE_BACKEND_H_
#define ATTNSERVE_BACKENDS_REFERENCE_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "backends/backend.h"

namespace attnserve {

absl::StatusOr<std::unique_ptr<Backend>> CreateReferenceBackend(const BackendOptions& options);

}  // namespace attnserve

#endif  // ATTNSERVE_BACKENDS_REFERENCE_BACKEND_H_
