// Scalar conversions between float and the 16-bit formats (IEEE binary16 and
// bfloat16), round-to-nearest-even, NaN preserved. Pure functions; thread-safe.
#ifndef ATTNSERVE_CORE_HALF_H_
#define ATTNSERVE_CORE_HALF_H_

#include <bit>
#include <cstdint>
#include <cstring>

#include "core/dtype.h"
#include "core/tensor.h"

namespace attnserve {

inline float Bf16ToFloat(uint16_t h) { return std::bit_cast<float>(uint32_t{h} << 16); }

inline uint16_t FloatToBf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (uint32_t(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

inline uint16_t FloatToHalf(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (abs < 0x38800000u) {  // result is subnormal or zero
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // below half of min subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // value / 2^-24 == mant >> shift, shift in [14, 24]
    uint32_t half_mant = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_mant & 1u))) ++half_mant;
    return static_cast<uint16_t>(sign | half_mant);
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15 (in place, still << 13)
  r += 0xfffu + ((r >> 13) & 1u);  // round to nearest even
  return static_cast<uint16_t>(sign | (r >> 13));
}

// Reads element `i` of a buffer of `dtype` as float (F32/F16/BF16/I32). The
// buffer may be unaligned (wire bytes): elements are read with memcpy, which
// compiles to a plain load.
inline float LoadFloat(const void* base, DType dtype, int64_t i) {
  const char* p = static_cast<const char*>(base) + i * static_cast<int64_t>(DTypeSize(dtype));
  switch (dtype) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case DType::kF16:
    case DType::kBF16: {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return dtype == DType::kF16 ? HalfToFloat(h) : Bf16ToFloat(h);
    }
    case DType::kI32: {
      int32_t v;
      std::memcpy(&v, p, 4);
      return static_cast<float>(v);
    }
  }
  return 0.f;
}

// Writes `v` to element `i` of a buffer of `dtype`, rounding to nearest even.
// The buffer may be unaligned.
inline void StoreFloat(void* base, DType dtype, int64_t i, float v) {
  char* p = static_cast<char*>(base) + i * static_cast<int64_t>(DTypeSize(dtype));
  switch (dtype) {
    case DType::kF32:
      std::memcpy(p, &v, 4);
      return;
    case DType::kF16:
    case DType::kBF16: {
      const uint16_t h = dtype == DType::kF16 ? FloatToHalf(v) : FloatToBf16(v);
      std::memcpy(p, &h, 2);
      return;
    }
    case DType::kI32: {
      const int32_t x = static_cast<int32_t>(v);
      std::memcpy(p, &x, 4);
      return;
    }
  }
}

// Copies `count` elements from `src` (in `from`) to `dst` (in `to`),
// converting through float when the dtypes differ; a plain copy otherwise.
inline void ConvertFloats(const void* src, DType from, void* dst, DType to, int64_t count) {
  if (from == to) {
    std::memcpy(dst, src, static_cast<size_t>(count) * DTypeSize(to));
    return;
  }
  for (int64_t i = 0; i < count; ++i) StoreFloat(dst, to, i, LoadFloat(src, from, i));
}

// A copy of `t` in `dtype`, shape kept (ConvertFloats over its elements).
inline Tensor ConvertedCopy(const TensorView& t, DType dtype) {
  Tensor out = Tensor::Zeros(dtype, t.shape);
  ConvertFloats(t.data.data(), t.dtype, out.data.data(), dtype, out.num_elements());
  return out;
}

}  // namespace attnserve

#endif  // ATTNSERVE_CORE_HALF_H_
