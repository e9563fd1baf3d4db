#include "backends/registry.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "backends/cpu/cpu_backend.h"
#include "backends/onednn/onednn_backend.h"
#include "backends/reference_backend.h"
#ifdef ATTNSERVE_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif

namespace attnserve {
namespace {

struct Entry {
  const char* name;
  BackendFactory factory;
};

// Default first.
const std::vector<Entry>& Entries() {
  static const auto* entries = new std::vector<Entry>{
      {"cpu", CreateCpuBackend},
      {"reference", CreateReferenceBackend},
      {"onednn", CreateOnednnBackend},
#ifdef ATTNSERVE_HAVE_CUDA
      {"cuda", CreateCudaBackend},
#endif
  };
  return *entries;
}

}  // namespace

std::vector<std::string> AvailableBackends() {
  std::vector<std::string> names;
  for (const Entry& e : Entries()) names.emplace_back(e.name);
  return names;
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(std::string_view name,
                                                       const BackendOptions& options) {
  for (const Entry& e : Entries()) {
    if (name == e.name) return e.factory(options);
  }
  return absl::NotFoundError(absl::StrCat("backend: expected one of ",
                                          absl::StrJoin(AvailableBackends(), ", "), ", got \"",
                                          absl::string_view(name.data(), name.size()), "\""));
}

}  // namespace attnserve
