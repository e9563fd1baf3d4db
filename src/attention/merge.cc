#include "attention/merge.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/errors.h"
#include "core/half.h"

namespace attnserve {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Merges one (batch, head, query row): lse at `lse_index` of every part,
// output rows at `out_offset`. `weight` and `acc` are scratch of at least
// parts.size() and dims.value_dim elements.
void MergeRow(absl::Span<const AttentionState> parts, int64_t lse_index, int64_t out_offset,
              int32_t value_dim, double* weight, double* acc, float* out_output, float* out_lse) {
  float* out = out_output + out_offset;
  double max_lse = kNegInf;
  bool nan = false;
  for (size_t p = 0; p < parts.size(); ++p) {
    const double l = parts[p].lse[lse_index];
    if (std::isnan(l)) nan = true;
    if (l > max_lse) max_lse = l;
  }
  if (nan || max_lse == kNegInf) {
    // No part saw a key of this row (or one's lse is NaN): no output row to
    // weigh, and −inf − −inf must not be computed.
    const float fill = nan ? std::numeric_limits<float>::quiet_NaN() : 0.f;
    for (int32_t d = 0; d < value_dim; ++d) out[d] = fill;
    out_lse[lse_index] = nan ? fill : -std::numeric_limits<float>::infinity();
    return;
  }
  double sum = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    const double l = parts[p].lse[lse_index];
    // A part with lse −inf weighs exactly 0; skipping it keeps its output
    // (which may be anything) out of the sum.
    weight[p] = l == kNegInf ? 0.0 : std::exp(l - max_lse);
    sum += weight[p];
  }
  for (size_t p = 0; p < parts.size(); ++p) weight[p] /= sum;
  for (int32_t d = 0; d < value_dim; ++d) acc[d] = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    if (weight[p] == 0) continue;
    const float* o = parts[p].output + out_offset;
    for (int32_t d = 0; d < value_dim; ++d) acc[d] += weight[p] * o[d];
  }
  // Every part's row has been read: the output may be one of them.
  for (int32_t d = 0; d < value_dim; ++d) out[d] = static_cast<float>(acc[d]);
  out_lse[lse_index] = static_cast<float>(max_lse + std::log(sum));
}

bool IsFloatDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

// Checks that `t` holds exactly its shape's bytes. `field` names it.
absl::Status CheckBytes(const TensorView& t, absl::string_view field) {
  const int64_t n = CheckedElementCount(t.shape, INT64_MAX / 8);
  if (n < 0) {
    return InvalidField(absl::StrCat(field, ".shape"), "non-negative dims whose product fits",
                        ShapeString(t.shape));
  }
  const int64_t want = n * static_cast<int64_t>(DTypeSize(t.dtype));
  if (static_cast<int64_t>(t.data.size()) != want) {
    return InvalidField(
        absl::StrCat(field, ".data"),
        absl::StrCat(want, " bytes (", ShapeString(t.shape), " x ", DTypeName(t.dtype), ")"),
        absl::StrCat(t.data.size(), " bytes"));
  }
  return absl::OkStatus();
}

// The part's bytes as aligned F32: in place when they already are, else
// widened (or copied) into `storage`.
const float* AsF32(const TensorView& t, std::vector<float>& storage) {
  const bool aligned = reinterpret_cast<uintptr_t>(t.data.data()) % alignof(float) == 0;
  if (t.dtype == DType::kF32 && aligned) return reinterpret_cast<const float*>(t.data.data());
  const int64_t n = static_cast<int64_t>(t.data.size() / DTypeSize(t.dtype));
  storage.resize(n);
  if (t.dtype == DType::kF32) {
    std::memcpy(storage.data(), t.data.data(), t.data.size());
  } else {
    for (int64_t i = 0; i < n; ++i) storage[i] = LoadFloat(t.data.data(), t.dtype, i);
  }
  return storage.data();
}

// Validates the parts against parts[0] and returns their dims.
absl::StatusOr<StateDims> CheckParts(absl::Span<const AttentionStateView> parts) {
  if (parts.empty()) return InvalidField("parts", "at least one", "none");
  const TensorView& first = parts[0].output;
  if (!IsFloatDType(first.dtype)) {
    return InvalidField("parts[0].output.dtype", "F32, F16 or BF16", DTypeName(first.dtype));
  }
  const int64_t rank = first.rank();
  if (rank != 3 && rank != 4) {
    return InvalidField("parts[0].output.shape", "[B, Lq, Hq, Dv] or [Lq, Hq, Dv]",
                        ShapeString(first.shape));
  }
  StateDims dims;
  dims.batch = rank == 4 ? first.shape[0] : 1;
  dims.seqlen_q = first.shape[rank - 3];
  const int64_t heads = first.shape[rank - 2];
  const int64_t value_dim = first.shape[rank - 1];
  if (heads > std::numeric_limits<int32_t>::max() ||
      value_dim > std::numeric_limits<int32_t>::max()) {
    return InvalidField("parts[0].output.shape", "Hq and Dv below 2^31", ShapeString(first.shape));
  }
  dims.heads = static_cast<int32_t>(heads);
  dims.value_dim = static_cast<int32_t>(value_dim);
  const std::vector<int64_t> lse_shape = {dims.batch, heads, dims.seqlen_q};
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::string part = absl::StrCat("parts[", i, "]");
    const TensorView& output = parts[i].output;
    const TensorView& lse = parts[i].lse;
    if (output.dtype != first.dtype) {
      return InvalidField(absl::StrCat(part, ".output.dtype"),
                          absl::StrCat(DTypeName(first.dtype), " (parts[0]'s)"),
                          DTypeName(output.dtype));
    }
    if (output.shape != first.shape) {
      return InvalidField(absl::StrCat(part, ".output.shape"),
                          absl::StrCat(ShapeString(first.shape), " (parts[0]'s)"),
                          ShapeString(output.shape));
    }
    if (absl::Status s = CheckBytes(output, absl::StrCat(part, ".output")); !s.ok()) return s;
    if (lse.dtype != DType::kF32) {
      return InvalidField(absl::StrCat(part, ".lse.dtype"), "F32", DTypeName(lse.dtype));
    }
    if (lse.shape != lse_shape) {
      return InvalidField(absl::StrCat(part, ".lse.shape"),
                          absl::StrCat(ShapeString(lse_shape), " ([B, Hq, Lq] of the output)"),
                          ShapeString(lse.shape));
    }
    if (absl::Status s = CheckBytes(lse, absl::StrCat(part, ".lse")); !s.ok()) return s;
  }
  return dims;
}

}  // namespace

void MergeAttentionStates(absl::Span<const AttentionState> parts, const StateDims& dims,
                          float* out_output, float* out_lse) {
  std::vector<double> weight(parts.size());
  std::vector<double> acc(dims.value_dim);
  for (int64_t b = 0; b < dims.batch; ++b) {
    for (int64_t i = 0; i < dims.seqlen_q; ++i) {
      for (int64_t h = 0; h < dims.heads; ++h) {
        const int64_t lse_index = (b * dims.heads + h) * dims.seqlen_q + i;
        const int64_t out_offset = ((b * dims.seqlen_q + i) * dims.heads + h) * dims.value_dim;
        MergeRow(parts, lse_index, out_offset, dims.value_dim, weight.data(), acc.data(),
                 out_output, out_lse);
      }
    }
  }
}

void MergeAttentionStateInto(const AttentionState& part, const StateDims& dims, float* acc_output,
                             float* acc_lse) {
  const AttentionState parts[] = {{acc_output, acc_lse}, part};
  MergeAttentionStates(parts, dims, acc_output, acc_lse);
}

absl::StatusOr<MergedAttention> MergeAttentionStates(absl::Span<const AttentionStateView> parts,
                                                     DType output_dtype) {
  if (!IsFloatDType(output_dtype)) {
    return InvalidField("output_dtype", "F32, F16 or BF16", DTypeName(output_dtype));
  }
  absl::StatusOr<StateDims> dims = CheckParts(parts);
  if (!dims.ok()) return dims.status();

  std::vector<std::vector<float>> storage(2 * parts.size());
  std::vector<AttentionState> states(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    states[i].output = AsF32(parts[i].output, storage[2 * i]);
    states[i].lse = AsF32(parts[i].lse, storage[2 * i + 1]);
  }
  MergedAttention merged;
  merged.lse = Tensor::Zeros(DType::kF32, {dims->batch, dims->heads, dims->seqlen_q});
  merged.output = Tensor::Zeros(output_dtype, parts[0].output.shape);
  if (output_dtype == DType::kF32) {
    MergeAttentionStates(states, *dims, merged.output.mutable_data<float>(),
                         merged.lse.mutable_data<float>());
    return merged;
  }
  std::vector<float> output(merged.output.num_elements());
  MergeAttentionStates(states, *dims, output.data(), merged.lse.mutable_data<float>());
  for (size_t i = 0; i < output.size(); ++i) {
    StoreFloat(merged.output.data.data(), output_dtype, static_cast<int64_t>(i), output[i]);
  }
  return merged;
}

}  // namespace attnserve
