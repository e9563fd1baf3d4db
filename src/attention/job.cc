#include "attention/job.h"

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "attention/cost.h"
#include "attention/sparse.h"
#include "core/errors.h"
#include "core/half.h"

namespace attnserve {
namespace {

// Largest element count a tensor may have: keeps every byte count below 2^62
// and every dim representable as int32 in AttentionParams.
constexpr int64_t kMaxElements = int64_t{1} << 60;
constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();

bool IsInputDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

// Checks dtype, rank, dims and byte length of a Q/K/V tensor. On success
// returns the dims as [B, L, H, D] (B = 1 for a 3-D tensor).
absl::StatusOr<std::array<int64_t, 4>> CheckQkv(absl::string_view name, const TensorView& t,
                                                absl::string_view dims_doc) {
  if (!IsInputDType(t.dtype)) {
    return InvalidField(absl::StrCat(name, ".dtype"), "F32, F16 or BF16", DTypeName(t.dtype));
  }
  if (t.rank() != 3 && t.rank() != 4) {
    return InvalidField(absl::StrCat(name, ".shape"),
                        absl::StrCat("rank 4 ", dims_doc, " or rank 3 without the batch dim"),
                        absl::StrCat("rank ", t.rank(), " ", ShapeString(t.shape)));
  }
  for (int64_t d : t.shape) {
    if (d < 1 || d > kMaxDim) {
      return InvalidField(absl::StrCat(name, ".shape"),
                          absl::StrCat("every dim in [1, ", kMaxDim, "] ", dims_doc),
                          ShapeString(t.shape));
    }
  }
  const int64_t n = CheckedElementCount(t.shape, kMaxElements);
  if (n < 0) {
    return InvalidField(absl::StrCat(name, ".shape"), absl::StrCat("at most 2^60 elements"),
                        ShapeString(t.shape));
  }
  const int64_t want = n * static_cast<int64_t>(DTypeSize(t.dtype));
  if (static_cast<int64_t>(t.data.size()) != want) {
    return InvalidField(
        absl::StrCat(name, ".data"),
        absl::StrCat(want, " bytes (", ShapeString(t.shape), " x ", DTypeName(t.dtype), ")"),
        absl::StrCat(t.data.size(), " bytes"));
  }
  std::array<int64_t, 4> dims;
  if (t.rank() == 4) {
    dims = {t.shape[0], t.shape[1], t.shape[2], t.shape[3]};
  } else {
    dims = {1, t.shape[0], t.shape[1], t.shape[2]};
  }
  return dims;
}

// Kernels read elements through typed pointers; copy the rare buffer whose
// address is not a multiple of the element size.
const void* AlignedData(std::string_view data, DType dtype, std::string& copy) {
  if (reinterpret_cast<uintptr_t>(data.data()) % DTypeSize(dtype) == 0) return data.data();
  copy.assign(data.data(), data.size());
  return copy.data();
}

absl::Status CheckBias(const TensorView& bias, DType want_dtype, const std::array<int64_t, 4>& full,
                       AttentionJob& job) {
  AttentionParams& p = job.params;
  if (bias.dtype != want_dtype) {
    return InvalidField("bias.dtype", absl::StrCat(DTypeName(want_dtype), " (the query's dtype)"),
                        DTypeName(bias.dtype));
  }
  const std::string full_doc = absl::StrCat(ShapeString({full[0], full[1], full[2], full[3]}),
                                            " [B, Hq, Lq, Lk]");
  if (bias.rank() > 4) {
    return InvalidField("bias.shape", absl::StrCat("rank <= 4, broadcastable to ", full_doc),
                        absl::StrCat("rank ", bias.rank(), " ", ShapeString(bias.shape)));
  }
  // Right-align with [B, Hq, Lq, Lk] as NumPy does; each dim is 1 or full.
  std::array<int64_t, 4> strides = {0, 0, 0, 0};
  int64_t stride = 1;
  for (int64_t k = bias.rank() - 1, axis = 3; k >= 0; --k, --axis) {
    const int64_t d = bias.shape[k];
    if (d != 1 && d != full[axis]) {
      return InvalidField("bias.shape", absl::StrCat("broadcastable to ", full_doc),
                          absl::StrCat(ShapeString(bias.shape), " (dim ", k, " is ", d, ")"));
    }
    strides[axis] = d == 1 ? 0 : stride;
    stride *= d;
  }
  const int64_t n = stride;  // product of dims, each <= the matching full dim
  const int64_t want = n * static_cast<int64_t>(DTypeSize(bias.dtype));
  if (static_cast<int64_t>(bias.data.size()) != want) {
    return InvalidField(
        "bias.data",
        absl::StrCat(want, " bytes (", ShapeString(bias.shape), " x ", DTypeName(bias.dtype), ")"),
        absl::StrCat(bias.data.size(), " bytes"));
  }
  job.bias_f32.resize(n);
  if (bias.dtype == DType::kF32) {
    std::memcpy(job.bias_f32.data(), bias.data.data(), bias.data.size());
  } else {
    for (int64_t i = 0; i < n; ++i) job.bias_f32[i] = LoadFloat(bias.data.data(), bias.dtype, i);
  }
  for (float x : job.bias_f32) {
    if (std::isnan(x) || x == std::numeric_limits<float>::infinity()) {
      return InvalidField("bias.data", "finite values or -inf (to mask)", absl::StrCat(x));
    }
  }
  p.bias = job.bias_f32.data();
  p.bias_batch_stride = strides[0];
  p.bias_head_stride = strides[1];
  p.bias_row_stride = strides[2];
  p.bias_col_stride = strides[3];
  job.input_bytes += want;
  return absl::OkStatus();
}

// The dims of a request, as the shape checks found them.
struct Dims {
  int64_t B = 0, Lq = 0, Hq = 0, D = 0;  // query
  int64_t Lk = 0, Hkv = 0, Dv = 0;       // key and value
};

// Step 1: dtypes, ranks and dims of Q, K, V (or the session's paged cache),
// and how they relate (batch, head_dim, GQA ratio, value dims).
absl::StatusOr<Dims> CheckShapes(const AttentionRequest& request, const RequestLimits& limits) {
  auto q = CheckQkv("query", request.query, "[B, Lq, Hq, D]");
  if (!q.ok()) return q.status();
  const DType dtype = request.query.dtype;
  const PagedKvView* paged = request.paged_kv.has_value() ? &*request.paged_kv : nullptr;
  if (paged == nullptr && request.key.dtype != dtype) {
    return InvalidField("key.dtype", absl::StrCat(DTypeName(dtype), " (the query's dtype)"),
                        DTypeName(request.key.dtype));
  }
  if (paged == nullptr && request.value.dtype != dtype) {
    return InvalidField("value.dtype", absl::StrCat(DTypeName(dtype), " (the query's dtype)"),
                        DTypeName(request.value.dtype));
  }
  absl::StatusOr<std::array<int64_t, 4>> k, v;
  if (paged != nullptr) {
    if (!request.key.shape.empty() || !request.key.data.empty()) {
      return InvalidField("key", "unset (keys come from the session's cache)",
                          ShapeString(request.key.shape));
    }
    if (!request.value.shape.empty() || !request.value.data.empty()) {
      return InvalidField("value", "unset (values come from the session's cache)",
                          ShapeString(request.value.shape));
    }
    if (dtype != paged->dtype) {
      return InvalidField("query.dtype",
                          absl::StrCat(DTypeName(paged->dtype), " (the cache's dtype)"),
                          DTypeName(dtype));
    }
    if (paged->length < 1 || paged->length > kMaxDim || paged->block_tokens < 1 ||
        paged->blocks == nullptr) {
      return absl::InternalError("paged K/V view without tokens or blocks");
    }
    k = std::array<int64_t, 4>{1, paged->length, paged->num_kv_heads, paged->head_dim};
    v = std::array<int64_t, 4>{1, paged->length, paged->num_kv_heads, paged->value_dim};
  } else {
    k = CheckQkv("key", request.key, "[B, Lk, Hkv, D]");
    if (!k.ok()) return k.status();
    v = CheckQkv("value", request.value, "[B, Lk, Hkv, Dv]");
    if (!v.ok()) return v.status();
  }
  const auto [B, Lq, Hq, D] = *q;
  const auto [Bk, Lk, Hkv, Dk] = *k;
  const auto [Bv, Lv, Hv, Dv] = *v;
  if (paged != nullptr && B != 1) {
    return InvalidField("query.shape", "batch 1 for a session", ShapeString(request.query.shape));
  }
  if (paged == nullptr && request.key.rank() != request.query.rank()) {
    return InvalidField(
        "key.shape", absl::StrCat("rank ", request.query.rank(), " like the query"),
        absl::StrCat("rank ", request.key.rank(), " ", ShapeString(request.key.shape)));
  }
  if (paged == nullptr && request.value.rank() != request.query.rank()) {
    return InvalidField(
        "value.shape", absl::StrCat("rank ", request.query.rank(), " like the query"),
        absl::StrCat("rank ", request.value.rank(), " ", ShapeString(request.value.shape)));
  }
  if (Bk != B) {
    return InvalidField("key.shape", absl::StrCat("batch ", B, " (the query's)"),
                        absl::StrCat(Bk, " in ", ShapeString(request.key.shape)));
  }
  if (paged != nullptr && D != Dk) {
    return InvalidField("query.shape", absl::StrCat("head_dim ", Dk, " (the session's)"),
                        absl::StrCat(D, " in ", ShapeString(request.query.shape)));
  }
  if (paged != nullptr && Hq % Hkv != 0) {
    return InvalidField(
        "query.shape",
        absl::StrCat("a number of heads divisible by the session's ", Hkv, " kv heads"),
        absl::StrCat(Hq, " in ", ShapeString(request.query.shape)));
  }
  if (Dk != D) {
    return InvalidField("key.shape", absl::StrCat("head_dim ", D, " (the query's)"),
                        absl::StrCat(Dk, " in ", ShapeString(request.key.shape)));
  }
  if (Hq % Hkv != 0) {
    return InvalidField("key.shape",
                        absl::StrCat("a number of kv heads dividing the query's ", Hq, " heads"),
                        absl::StrCat(Hkv, " in ", ShapeString(request.key.shape)));
  }
  if (Bv != B || Lv != Lk || Hv != Hkv) {
    return InvalidField(
        "value.shape",
        absl::StrCat("[", B, ", ", Lk, ", ", Hkv, ", Dv] (batch, Lk and heads of key)"),
        ShapeString(request.value.shape));
  }
  if (D > limits.max_head_dim) {
    return InvalidField("query.shape", absl::StrCat("head_dim <= ", limits.max_head_dim),
                        absl::StrCat(D));
  }
  if (Dv > limits.max_head_dim) {
    return InvalidField("value.shape", absl::StrCat("value_dim <= ", limits.max_head_dim),
                        absl::StrCat(Dv));
  }
  return Dims{B, Lq, Hq, D, Lk, Hkv, Dv};
}

// Step 2: the attention options, and what LINEAR rules out.
absl::Status CheckOptions(const AttentionRequest& request, const Dims& dims) {
  const AttentionOptions& opt = request.options;
  if (!std::isfinite(opt.scale)) {
    return InvalidField("options.scale", "a finite number (0 = 1/sqrt(head_dim))",
                        absl::StrCat(opt.scale));
  }
  if (!std::isfinite(opt.softcap) || opt.softcap < 0) {
    return InvalidField("options.softcap", "a finite number >= 0 (0 = off)",
                        absl::StrCat(opt.softcap));
  }
  if (opt.window_left < -1) {
    return InvalidField("options.window_left", ">= 0, or -1 for unbounded",
                        absl::StrCat(opt.window_left));
  }
  if (opt.window_right < -1) {
    return InvalidField("options.window_right", ">= 0, or -1 for unbounded",
                        absl::StrCat(opt.window_right));
  }
  if (opt.causal && opt.window_right > 0) {
    return InvalidField("options.window_right",
                        "unset, -1 or 0 with causal (causal sees no later keys)",
                        absl::StrCat(opt.window_right));
  }
  if (!opt.alibi_slopes.empty() && static_cast<int64_t>(opt.alibi_slopes.size()) != dims.Hq) {
    return InvalidField("options.alibi_slopes",
                        absl::StrCat(dims.Hq, " slopes (one per query head) or none"),
                        absl::StrCat(opt.alibi_slopes.size()));
  }
  for (float s : opt.alibi_slopes) {
    if (!std::isfinite(s))
      return InvalidField("options.alibi_slopes", "finite slopes", absl::StrCat(s));
  }
  if (opt.variant != Variant::kSoftmax && opt.variant != Variant::kLinear) {
    return InvalidField("options.variant", "SOFTMAX or LINEAR",
                        absl::StrCat(static_cast<int>(opt.variant)));
  }
  if (opt.variant == Variant::kLinear) {
    auto reject = [](absl::string_view field, absl::string_view got) {
      return InvalidField(field, "unset with variant LINEAR", got);
    };
    if (opt.scale != 0) return reject("options.scale", absl::StrCat(opt.scale));
    if (opt.window_left != -1) return reject("options.window_left", absl::StrCat(opt.window_left));
    if (opt.window_right != -1) return reject("options.window_right", absl::StrCat(opt.window_right));
    if (opt.softcap != 0) return reject("options.softcap", absl::StrCat(opt.softcap));
    if (!opt.alibi_slopes.empty()) return reject("options.alibi_slopes", "slopes");
    if (request.bias.has_value()) return reject("bias", "a bias tensor");
    if (request.outputs.lse) return reject("outputs.lse", "true");
    if (request.outputs.entropy) return reject("outputs.entropy", "true");
    if (request.outputs.weights) return reject("outputs.weights", "true");
    if (request.outputs.top_k != 0) return reject("outputs.top_k", absl::StrCat(request.outputs.top_k));
  }
  return absl::OkStatus();
}

// Step 3: key_lengths, one per batch row within [0, Lk]; or sharded keys
// within their declared sequence.
absl::Status CheckKeyLengths(const AttentionRequest& request, const Dims& dims) {
  if (request.key_offset < 0 || request.key_offset > (int64_t{1} << 40)) {
    return InvalidField("key_offset", "a position in [0, 2^40]", absl::StrCat(request.key_offset));
  }
  if (request.total_keys != 0 && (request.total_keys < request.key_offset + dims.Lk ||
                                  request.total_keys > (int64_t{1} << 40))) {
    return InvalidField(
        "total_keys",
        absl::StrCat("0 or at least key_offset + Lk = ", request.key_offset + dims.Lk,
                     " (the keys sent lie in the sequence), at most 2^40"),
        absl::StrCat(request.total_keys));
  }
  if ((request.key_offset != 0 || request.total_keys != 0) && !request.key_lengths.empty()) {
    return InvalidField("key_lengths", "none with key_offset or total_keys (sharded keys)",
                        absl::StrCat(request.key_lengths.size(), " lengths"));
  }
  if (request.key_lengths.empty()) return absl::OkStatus();
  if (static_cast<int64_t>(request.key_lengths.size()) != dims.B) {
    return InvalidField("key_lengths", absl::StrCat(dims.B, " lengths (one per batch row) or none"),
                        absl::StrCat(request.key_lengths.size()));
  }
  for (size_t b = 0; b < request.key_lengths.size(); ++b) {
    const int32_t len = request.key_lengths[b];
    if (len < 0 || len > dims.Lk) {
      return InvalidField(absl::StrCat("key_lengths[", b, "]"),
                          absl::StrCat("a length in [0, ", dims.Lk, "]"), absl::StrCat(len));
    }
  }
  return absl::OkStatus();
}

// Step 4: the outputs asked for, against the size limits. Returns the bytes
// AllocateOutputs will allocate for all of them.
absl::StatusOr<int64_t> CheckOutputs(const AttentionRequest& request, const Dims& dims,
                                     const RequestLimits& limits) {
  const OutputSpec& out = request.outputs;
  const auto [B, Lq, Hq, D, Lk, Hkv, Dv] = dims;
  const DType dtype = request.query.dtype;
  if (out.top_k < 0 || out.top_k > Lk) {
    return InvalidField("outputs.top_k", absl::StrCat("0 (off) to Lk = ", Lk),
                        absl::StrCat(out.top_k));
  }
  if (out.top_k > limits.max_top_k) {
    return absl::ResourceExhaustedError(absl::StrCat("outputs.top_k: ", out.top_k,
                                                     " is over the server's limit of ",
                                                     limits.max_top_k));
  }
  const int64_t out_elems = CheckedElementCount({B, Lq, Hq, Dv}, kMaxElements);
  const int64_t out_bytes = out_elems < 0 ? -1 : out_elems * int64_t(DTypeSize(dtype));
  if (out_bytes < 0 || out_bytes > limits.max_output_bytes) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "output: [%d, %d, %d, %d] x %s is over the server's limit of %d bytes", B, Lq, Hq, Dv,
        DTypeName(dtype), limits.max_output_bytes));
  }
  int64_t total = out_bytes;
  if (out.lse) total += B * Hq * Lq * 4;  // <= out_bytes * 4 / Dv: no overflow
  if (out.entropy) total += B * Hq * Lq * 4;
  if (out.weights) {
    const int64_t n = CheckedElementCount({B, Hq, Lq, Lk}, kMaxElements);
    const int64_t weights_bytes = n < 0 ? -1 : n * 4;
    if (weights_bytes < 0 || weights_bytes > limits.max_weights_bytes) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "outputs.weights: [%d, %d, %d, %d] x F32 is over the server's limit of %d bytes", B, Hq,
          Lq, Lk, limits.max_weights_bytes));
    }
    total += weights_bytes;
  }
  if (out.top_k > 0) {
    const int64_t n = CheckedElementCount({B, Hq, Lq, out.top_k}, kMaxElements);
    if (n < 0 || n * 8 > limits.max_output_bytes) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "outputs.top_k: [%d, %d, %d, %d] indices and weights are over the server's limit of %d "
          "bytes",
          B, Hq, Lq, out.top_k, limits.max_output_bytes));
    }
    total += n * 8;
  }
  return total;
}

// Step 5: dims, pointers, strides and scalars of the inputs (outputs come in
// AllocateOutputs).
void FillParams(const AttentionRequest& request, const Dims& dims, AttentionJob& job) {
  AttentionParams& p = job.params;
  const AttentionOptions& opt = request.options;
  const auto [B, Lq, Hq, D, Lk, Hkv, Dv] = dims;
  const DType dtype = request.query.dtype;
  const PagedKvView* paged = request.paged_kv.has_value() ? &*request.paged_kv : nullptr;
  p.dtype = dtype;
  p.variant = opt.variant;
  p.batch = static_cast<int32_t>(B);
  p.seqlen_q = static_cast<int32_t>(Lq);
  p.seqlen_k = static_cast<int32_t>(Lk);
  p.num_heads_q = static_cast<int32_t>(Hq);
  p.num_heads_kv = static_cast<int32_t>(Hkv);
  p.head_dim = static_cast<int32_t>(D);
  p.value_dim = static_cast<int32_t>(Dv);
  p.group_size = static_cast<int32_t>(Hq / Hkv);

  p.q = AlignedData(request.query.data, dtype, job.aligned_copies[0]);
  if (paged != nullptr) {
    p.kv_blocks = paged->blocks;
    p.kv_block_tokens = paged->block_tokens;
    p.v_block_offset = int64_t{paged->block_tokens} * Hkv * D;
  } else {
    p.k = AlignedData(request.key.data, dtype, job.aligned_copies[1]);
    p.v = AlignedData(request.value.data, dtype, job.aligned_copies[2]);
  }
  p.q_head_stride = D;
  p.q_row_stride = Hq * D;
  p.q_batch_stride = Lq * Hq * D;
  p.k_head_stride = D;
  p.k_row_stride = Hkv * D;
  p.k_batch_stride = paged != nullptr ? 0 : Lk * Hkv * D;
  p.v_head_stride = Dv;
  p.v_row_stride = Hkv * Dv;
  p.v_batch_stride = paged != nullptr ? 0 : Lk * Hkv * Dv;
  p.o_head_stride = Dv;
  p.o_row_stride = Hq * Dv;
  p.o_batch_stride = Lq * Hq * Dv;

  p.scale = opt.scale != 0 ? opt.scale : static_cast<float>(1.0 / std::sqrt(double(D)));
  p.scale_log2 = static_cast<float>(double(p.scale) * 1.4426950408889634);
  p.softcap = opt.softcap;
  p.causal = opt.causal;
  p.bottom_right = opt.causal_alignment == CausalAlignment::kBottomRight;
  p.window_left = opt.window_left;
  p.window_right = opt.causal ? 0 : opt.window_right;
  p.top_k = request.outputs.top_k;

  if (!opt.alibi_slopes.empty()) {
    job.alibi_slopes = opt.alibi_slopes;
    p.alibi_slopes = job.alibi_slopes.data();
  }
  if (!request.key_lengths.empty()) {
    job.key_lengths = request.key_lengths;
    p.key_lengths = job.key_lengths.data();
  }
  if (request.key_offset != 0 || request.total_keys != 0) {
    p.key_offset = request.key_offset;
    p.total_keys = request.total_keys != 0 ? request.total_keys : request.key_offset + Lk;
  }
  job.input_bytes = static_cast<int64_t>(request.query.data.size() + request.key.data.size() +
                                         request.value.data.size());
}

}  // namespace

int64_t AttentionJob::converted_input_bytes() const {
  int64_t bytes = static_cast<int64_t>(bias_f32.size() * sizeof(float) +
                                       alibi_slopes.size() * sizeof(float) +
                                       key_lengths.size() * sizeof(int32_t) +
                                       sparse_offsets.size() * sizeof(int32_t) +
                                       sparse_units.size() * sizeof(int32_t) +
                                       global_tokens.size() * sizeof(int32_t) +
                                       sink_logits.size() * sizeof(float));
  for (const std::string& copy : aligned_copies) bytes += static_cast<int64_t>(copy.size());
  return bytes;
}

namespace {
absl::StatusOr<std::unique_ptr<AttentionJob>> PlanAttentionUnguarded(
    const AttentionRequest& request, const RequestLimits& limits);
}  // namespace

AttentionParams AttentionJob::planned_params() const {
  static float placeholder_f32;
  static int32_t placeholder_i32;
  AttentionParams p = params;
  if (p.o == nullptr) p.o = &placeholder_f32;
  if (outputs.lse && p.lse == nullptr) p.lse = &placeholder_f32;
  if (outputs.entropy && p.entropy == nullptr) p.entropy = &placeholder_f32;
  if (outputs.weights && p.weights == nullptr) p.weights = &placeholder_f32;
  if (outputs.top_k > 0 && p.top_k_indices == nullptr) {
    p.top_k_indices = &placeholder_i32;
    p.top_k_weights = &placeholder_f32;
  }
  return p;
}

absl::StatusOr<std::unique_ptr<AttentionJob>> PlanAttention(const AttentionRequest& request,
                                                            const RequestLimits& limits) {
  // The converted inputs (F32 bias, aligned copies) are at most twice the
  // message; if even that cannot be had, refuse the request, not the process.
  try {
    return PlanAttentionUnguarded(request, limits);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory converting the request's inputs");
  }
}

namespace {

absl::StatusOr<std::unique_ptr<AttentionJob>> PlanAttentionUnguarded(
    const AttentionRequest& request, const RequestLimits& limits) {
  absl::StatusOr<Dims> dims = CheckShapes(request, limits);
  if (!dims.ok()) return dims.status();
  if (absl::Status s = CheckOptions(request, *dims); !s.ok()) return s;
  if (absl::Status s = CheckKeyLengths(request, *dims); !s.ok()) return s;
  absl::StatusOr<int64_t> output_bytes = CheckOutputs(request, *dims, limits);
  if (!output_bytes.ok()) return output_bytes.status();

  auto job = std::make_unique<AttentionJob>();
  job->outputs = request.outputs;
  job->output_bytes = *output_bytes;
  job->query_3d = request.query.rank() == 3;
  FillParams(request, *dims, *job);
  if (request.bias.has_value()) {
    absl::Status s = CheckBias(*request.bias, request.query.dtype,
                               {dims->B, dims->Hq, dims->Lq, dims->Lk}, *job);
    if (!s.ok()) return s;
  }
  if (!request.sparsity.empty()) {
    const SparseDims sd{dims->B, dims->Lq, dims->Hq, dims->Lk, dims->Hkv};
    if (absl::Status s = PlanSparsity(request.sparsity, sd, limits, *job); !s.ok()) return s;
    job->params.sparse.score_bound = SparseScoresBound(job->params, AttentionScores(job->params));
  }
  job->flops = AttentionRealFlops(job->params);
  job->cost = AttentionCost(job->params, job->outputs);
  return job;
}

}  // namespace

int64_t AttentionJob::main_output_bytes() const {
  return int64_t{params.batch} * params.seqlen_q * params.num_heads_q * params.value_dim *
         int64_t(DTypeSize(params.dtype));
}

int64_t AttentionJob::allocated_output_bytes() const {
  return output_target != nullptr ? output_bytes - main_output_bytes() : output_bytes;
}

absl::Status AllocateOutputs(AttentionJob& job) {
  AttentionParams& p = job.params;
  const int64_t B = p.batch, Lq = p.seqlen_q, Hq = p.num_heads_q, Lk = p.seqlen_k;
  const OutputSpec& out = job.outputs;
  struct {
    Tensor output, lse, entropy, weights, top_k_indices, top_k_weights;
  } made;
  try {
    std::vector<int64_t> out_shape = {B, Lq, Hq, p.value_dim};
    if (job.query_3d) out_shape.erase(out_shape.begin());
    if (job.output_target != nullptr) {
      made.output.dtype = p.dtype;
      made.output.shape = std::move(out_shape);
    } else {
      made.output = Tensor::Zeros(p.dtype, std::move(out_shape));
    }
    if (out.lse) made.lse = Tensor::Zeros(DType::kF32, {B, Hq, Lq});
    if (out.entropy) made.entropy = Tensor::Zeros(DType::kF32, {B, Hq, Lq});
    if (out.weights) made.weights = Tensor::Zeros(DType::kF32, {B, Hq, Lq, Lk});
    if (out.top_k > 0) {
      made.top_k_indices = Tensor::Zeros(DType::kI32, {B, Hq, Lq, out.top_k});
      made.top_k_weights = Tensor::Zeros(DType::kF32, {B, Hq, Lq, out.top_k});
    }
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "out of memory allocating the outputs (", job.output_bytes, " bytes)"));
  }
  job.output = std::move(made.output);
  job.lse = std::move(made.lse);
  job.entropy = std::move(made.entropy);
  job.weights = std::move(made.weights);
  job.top_k_indices = std::move(made.top_k_indices);
  job.top_k_weights = std::move(made.top_k_weights);
  if (job.output_target != nullptr) {
    // Kernels may leave rows with no visible key untouched: zero, as allocated.
    std::memset(job.output_target, 0, static_cast<size_t>(job.main_output_bytes()));
    p.o = job.output_target;
  } else {
    p.o = job.output.data.data();
  }
  if (out.lse) p.lse = job.lse.mutable_data<float>();
  if (out.entropy) p.entropy = job.entropy.mutable_data<float>();
  if (out.weights) p.weights = job.weights.mutable_data<float>();
  if (out.top_k > 0) {
    p.top_k_indices = job.top_k_indices.mutable_data<int32_t>();
    p.top_k_weights = job.top_k_weights.mutable_data<float>();
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<AttentionJob>> PrepareAttention(const AttentionRequest& request,
                                                               const RequestLimits& limits) {
  absl::StatusOr<std::unique_ptr<AttentionJob>> job = PlanAttention(request, limits);
  if (!job.ok()) return job.status();
  if (absl::Status s = AllocateOutputs(**job); !s.ok()) return s;
  return job;
}

}  // namespace attnserve
