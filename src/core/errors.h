// The one form of INVALID_ARGUMENT the project answers with: the field (with
// its index when it has one), what was expected, and what was received.
#ifndef ATTNSERVE_CORE_ERRORS_H_
#define ATTNSERVE_CORE_ERRORS_H_

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace attnserve {

// "<field>: expected <expected>, got <got>"
inline absl::Status InvalidField(absl::string_view field, absl::string_view expected,
                                 absl::string_view got) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": expected ", expected, ", got ", got));
}

}  // namespace attnserve

#endif  // ATTNSERVE_CORE_ERRORS_H_
