// TensorView (borrowed, read-only) and Tensor (owned) in the wire layout:
// row-major, little-endian, dims outermost first. Value types; thread-compatible.
#ifndef ATTNSERVE_CORE_TENSOR_H_
#define ATTNSERVE_CORE_TENSOR_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"

namespace attnserve {

// A read-only view of caller-owned bytes, e.g. a request's `bytes` field.
// The bytes are not necessarily aligned beyond 1.
struct TensorView {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::string_view data;

  int64_t rank() const { return static_cast<int64_t>(shape.size()); }
};

// An owned tensor. Storage is a std::string so a response can take it with
// std::move and without a copy.
struct Tensor {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::string data;

  // Allocates zero-filled storage for `shape`. Every caller passes a shape it
  // has validated (PrepareAttention's size limits, or an existing tensor's
  // shape), so a negative dim or an element or byte count past int64 is a
  // programmer error: it aborts the process rather than return a tensor whose
  // data is smaller than its shape says.
  static Tensor Zeros(DType dtype, std::vector<int64_t> shape);

  int64_t num_elements() const;
  TensorView view() const { return TensorView{dtype, shape, data}; }
  template <typename T>
  T* mutable_data() { return reinterpret_cast<T*>(data.data()); }
  template <typename T>
  const T* data_as() const { return reinterpret_cast<const T*>(data.data()); }
};

// Product of dims, or -1 if a dim is negative or the product exceeds
// `limit` (so callers never overflow int64).
int64_t CheckedElementCount(const std::vector<int64_t>& shape, int64_t limit = INT64_MAX);

// "[2, 3, 4]"
std::string ShapeString(const std::vector<int64_t>& shape);

}  // namespace attnserve

#endif  // ATTNSERVE_CORE_TENSOR_H_
