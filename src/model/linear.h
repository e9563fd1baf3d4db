// Linear: one projection y[M, out] = x[M, in] · Wᵀ (+ b) of a model's
// attention layer, on a oneDNN matmul. The weight is converted once, when the
// Linear is made, to its compute dtype: F32, or BF16 (then x is rounded to
// BF16 on the way in and the products accumulate in F32, on CPUs with
// AVX-512 BF16). x and y are F32 row-major.
//
// Thread safety: Run may be called concurrently from several threads.
#ifndef ATTNSERVE_MODEL_LINEAR_H_
#define ATTNSERVE_MODEL_LINEAR_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/dtype.h"

namespace attnserve {

// Whether this CPU runs BF16 matmuls natively (AVX-512 BF16), so BF16
// weights may be kept as BF16.
bool CpuHasBf16Matmul();

class Linear {
 public:
  // `weight` is [out_features, in_features] row-major in `source` (F32, F16
  // or BF16, e.g. the bytes of a safetensors file); `bias` is null or
  // [out_features] in `source`. `compute` is F32 or BF16. The bytes are
  // copied. INVALID_ARGUMENT for a dtype or size out of range;
  // RESOURCE_EXHAUSTED when the memory for the copy cannot be had.
  static absl::StatusOr<std::unique_ptr<Linear>> Create(DType source, const void* weight,
                                                        const void* bias, int64_t out_features,
                                                        int64_t in_features, DType compute);
  ~Linear();

  // y[rows, out] = x[rows, in] · Wᵀ + b. x and y must not overlap. INTERNAL
  // when oneDNN fails; may throw std::bad_alloc.
  absl::Status Run(const float* x, int64_t rows, float* y) const;

  int64_t out_features() const { return out_; }
  int64_t in_features() const { return in_; }
  DType dtype() const { return dtype_; }
  bool has_bias() const { return !bias_.empty(); }
  // Bytes of the weight and bias as held.
  int64_t bytes() const;
  // Floating-point work of Run over `rows` rows: 2·rows·in·out.
  double Flops(int64_t rows) const { return 2.0 * static_cast<double>(rows) * in_ * out_; }
  // Host scratch Run allocates for `rows` rows (the BF16 copy of x).
  int64_t ScratchBytes(int64_t rows) const;

 private:
  struct Impl;
  Linear(int64_t out, int64_t in, DType dtype);

  int64_t out_ = 0;
  int64_t in_ = 0;
  DType dtype_ = DType::kF32;
  std::string weight_;        // [out, in] in dtype_
  std::vector<float> bias_;   // empty or [out]
  std::unique_ptr<Impl> impl_;
};

}  // namespace attnserve

#endif  // ATTNSERVE_MODEL_LINEAR_H_
