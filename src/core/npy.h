// Reading and writing NumPy .npy files (format versions 1.0-3.0, little-endian,
// C order), so attnctl and the tests exchange tensors with any tool.
// Supported dtypes: <f4 (F32), <f2 (F16), <i4 (I32); <f8 is read as F32; BF16
// has no NumPy dtype and is written as <f4 by callers. Thread-compatible.
#ifndef ATTNSERVE_CORE_NPY_H_
#define ATTNSERVE_CORE_NPY_H_

#include <string>

#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace attnserve {

// Reads `path`. INVALID_ARGUMENT for a malformed or unsupported file (the
// message says what was found), NOT_FOUND if it cannot be opened.
absl::StatusOr<Tensor> ReadNpy(const std::string& path);

// Parses .npy bytes already in memory (same errors as ReadNpy).
absl::StatusOr<Tensor> ParseNpy(std::string_view bytes);

// Writes `t` (F32, F16 or I32; BF16 is widened to <f4). Returns an error if
// the file cannot be written.
absl::Status WriteNpy(const std::string& path, const Tensor& t);

}  // namespace attnserve

#endif  // ATTNSERVE_CORE_NPY_H_
