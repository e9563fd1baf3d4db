// DType: the element types attnserve accepts on the wire and in kernels.
// Plain value type; thread-compatible.
#ifndef ATTNSERVE_CORE_DTYPE_H_
#define ATTNSERVE_CORE_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace attnserve {

// kI32 appears only in outputs (top-k indices); requests carry F32/F16/BF16.
enum class DType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2, kI32 = 3 };

constexpr size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
  }
  return 0;
}

constexpr const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kI32:
      return "I32";
  }
  return "?";
}

}  // namespace attnserve

#endif  // ATTNSERVE_CORE_DTYPE_H_
