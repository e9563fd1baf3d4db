#include "core/tensor.h"

#include <limits>

#include "absl/base/internal/raw_logging.h"
#include "absl/strings/str_join.h"

namespace attnserve {

Tensor Tensor::Zeros(DType dtype, std::vector<int64_t> shape) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  const int64_t element_bytes = static_cast<int64_t>(DTypeSize(dtype));
  const int64_t n = CheckedElementCount(t.shape, INT64_MAX / element_bytes);
  if (n < 0) {
    ABSL_RAW_LOG(FATAL, "Tensor::Zeros: shape %s x %s has a negative dim or over INT64_MAX bytes",
                 ShapeString(t.shape).c_str(), DTypeName(dtype));
  }
  t.data.assign(static_cast<size_t>(n * element_bytes), '\0');
  return t;
}

int64_t Tensor::num_elements() const { return CheckedElementCount(shape); }

int64_t CheckedElementCount(const std::vector<int64_t>& shape, int64_t limit) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d == 0) {
      n = 0;
      continue;
    }
    if (n > limit / d) {
      // Keep scanning for zeros: a zero dim makes the count 0 whatever else.
      for (int64_t rest : shape) {
        if (rest == 0) return 0;
        if (rest < 0) return -1;
      }
      return -1;
    }
    n *= d;
  }
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return "[" + absl::StrJoin(shape, ", ") + "]";
}

}  // namespace attnserve
