// RefusedCases: the cases of a backend test suite that a backend's Supports()
// refuses, judged against what its BackendInfo claims. The conformance and
// batch-invariance suites both use it, so neither drops a case silently: every
// refusal is counted and listed, and refusing a case whose dtype, features
// (RequestSpec::Features) and head dims the backend claims is a test failure.
// Not thread-safe; one per suite run.
#ifndef ATTNSERVE_TESTS_UNIT_REFUSED_CASES_H_
#define ATTNSERVE_TESTS_UNIT_REFUSED_CASES_H_

#include <algorithm>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "backends/backend.h"
#include "core/dtype.h"
#include "gtest/gtest.h"
#include "random_request.h"

namespace attnserve {

// What `spec` in `dtype` uses that `info` does not claim: feature names, the
// dtype's name, and "head_dim" when D or Dv is over info.max_head_dim. Empty
// when the backend claims everything the case needs.
inline std::vector<std::string> UnclaimedFeatures(const BackendInfo& info, const RequestSpec& spec,
                                                  DType dtype) {
  std::vector<std::string> missing;
  for (const std::string& f : spec.Features()) {
    if (std::find(info.features.begin(), info.features.end(), f) == info.features.end()) {
      missing.push_back(f);
    }
  }
  if (std::find(info.dtypes.begin(), info.dtypes.end(), dtype) == info.dtypes.end()) {
    missing.push_back(DTypeName(dtype));
  }
  if (std::max(spec.head_dim, spec.value_dim) > info.max_head_dim) missing.push_back("head_dim");
  return missing;
}

class RefusedCases {
 public:
  // Asks `backend` whether it runs `params` (prepared from `spec` in `dtype`).
  // Returns true if it does. A refusal is recorded; when the backend claims
  // everything the case uses, it is also a non-fatal test failure naming the
  // backend, the case, the dtype and the refusal message.
  bool Check(const Backend& backend, const RequestSpec& spec, DType dtype,
             const AttentionParams& params) {
    const absl::Status supported = backend.Supports(params);
    if (supported.ok()) return true;
    const std::vector<std::string> unclaimed = UnclaimedFeatures(backend.info(), spec, dtype);
    if (unclaimed.empty()) {
      ADD_FAILURE() << "backend " << backend.info().name << " refuses case " << spec.name << " "
                    << DTypeName(dtype)
                    << " although its BackendInfo claims the dtype and every feature the case "
                       "uses; Supports() said: "
                    << supported;
    }
    const std::string claims =
        unclaimed.empty() ? "all claimed" : "not claimed: " + absl::StrJoin(unclaimed, ", ");
    refused_.push_back(
        absl::StrCat(spec.name, " ", DTypeName(dtype), " (", claims, "; ", supported.message(), ")"));
    return false;
  }

  size_t count() const { return refused_.size(); }

  // "N refused by Supports()", then ": case DTYPE (...); ..." when N > 0.
  std::string Summary() const {
    return absl::StrCat(refused_.size(), " refused by Supports()", refused_.empty() ? "" : ": ",
                        absl::StrJoin(refused_, "; "));
  }

 private:
  std::vector<std::string> refused_;
};

}  // namespace attnserve

#endif  // ATTNSERVE_TESTS_UNIT_REFUSED_CASES_H_
