// BackendRegistry: creates backends by name. The built-in backends are listed
// in registry.cc (explicitly, so static linking cannot drop a registration).
// Thread-safe: read-only after construction.
#ifndef ATTNSERVE_BACKENDS_REGISTRY_H_
#define ATTNSERVE_BACKENDS_REGISTRY_H_

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "backends/backend.h"

namespace attnserve {

using BackendFactory =
    std::function<absl::StatusOr<std::unique_ptr<Backend>>(const BackendOptions&)>;

// Names of the backends compiled into this binary, default first.
std::vector<std::string> AvailableBackends();

// Creates backend `name`. NOT_FOUND for an unknown name (the message lists the
// known ones); FAILED_PRECONDITION when it is compiled in but cannot start here
// (e.g. no GPU).
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(std::string_view name,
                                                       const BackendOptions& options = {});

}  // namespace attnserve

#endif  // ATTNSERVE_BACKENDS_REGISTRY_H_
