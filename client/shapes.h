// AttentionShape: the dims of one attention request, parsed from a benchmark
// id of docs/ARCHITECTURE.md (P1..P4, S1) or from explicit dims "B,Lq,Hq,Lk,Hkv,D", and
// random inputs of that shape for attnctl's `attend` and `bench`.
// Value types and pure functions; thread-compatible.
#ifndef ATTNSERVE_CLIENT_SHAPES_H_
#define ATTNSERVE_CLIENT_SHAPES_H_

#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace attnserve::client {

struct AttentionShape {
  std::string name;  // "P1", or the dims as given
  int64_t batch = 1;
  int64_t seqlen_q = 1;
  int64_t heads_q = 1;
  int64_t seqlen_k = 1;
  int64_t heads_kv = 1;
  int64_t head_dim = 1;
  bool causal = false;  // the benchmark table's setting; explicit dims: false

  std::vector<int64_t> query_shape() const { return {batch, seqlen_q, heads_q, head_dim}; }
  std::vector<int64_t> key_shape() const { return {batch, seqlen_k, heads_kv, head_dim}; }
  // FLOPs as docs/ARCHITECTURE.md counts them: 4·B·Hq·Lq·Lk·D, halved for causal Lq == Lk.
  double flops(bool causal_mask) const;
};

// INVALID_ARGUMENT naming the spec when it is neither a known id nor six
// positive integers, or when Hq % Hkv != 0.
absl::StatusOr<AttentionShape> ParseAttentionShape(absl::string_view spec);

// Uniform values in [-1, 1) rounded to `dtype` (F32, F16 or BF16),
// deterministic for a given seed.
Tensor RandomTensor(DType dtype, std::vector<int64_t> shape, uint64_t seed);

// Converts a floating tensor (F32/F16/BF16) to `dtype`, rounding to nearest even.
// INVALID_ARGUMENT for I32 on either side.
absl::StatusOr<Tensor> ConvertTensor(const Tensor& t, DType dtype);

// "f32" | "f16" | "bf16" (any case). INVALID_ARGUMENT otherwise.
absl::StatusOr<DType> ParseDType(absl::string_view name);

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_SHAPES_H_
