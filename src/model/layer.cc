#include "model/layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "attention/rope.h"
#include "core/errors.h"
#include "core/half.h"

namespace attnserve {
namespace {

// The largest x or memory accepted, in elements (the F32 copy is 4× this in
// bytes); gRPC's message limit binds long before.
constexpr int64_t kMaxInputElements = int64_t{1} << 31;

// Normalises each head vector of x [rows, heads, dim] in place:
// x · 1/sqrt(mean(x²) + eps) · weight.
void RmsNormHeads(float* x, int64_t rows, int32_t heads, int32_t dim,
                  const std::vector<float>& weight, double eps) {
  for (int64_t r = 0; r < rows * heads; ++r) {
    float* v = x + r * dim;
    double sum = 0;
    for (int32_t d = 0; d < dim; ++d) sum += static_cast<double>(v[d]) * v[d];
    const float inv = static_cast<float>(1.0 / std::sqrt(sum / dim + eps));
    for (int32_t d = 0; d < dim; ++d) v[d] = v[d] * inv * weight[d];
  }
}

// [rows, hidden] or [B, L, hidden] -> (B, L); false when the shape is not one of these.
bool RowsOf(const std::vector<int64_t>& shape, int32_t hidden, int64_t* batch, int64_t* tokens) {
  if (shape.size() == 2) {
    *batch = 1;
    *tokens = shape[0];
  } else if (shape.size() == 3) {
    *batch = shape[0];
    *tokens = shape[1];
  } else {
    return false;
  }
  return shape.back() == hidden && *batch >= 1 && *tokens >= 1;
}

// `t`'s values in F32 at *data: its own bytes when they are F32 and 4-byte
// aligned, else a converted copy in *copy.
absl::Status AsF32(const TensorView& t, const char* field, std::vector<float>* copy,
                   const float** data) {
  if (t.dtype != DType::kF32 && t.dtype != DType::kF16 && t.dtype != DType::kBF16) {
    return InvalidField(absl::StrCat(field, ".dtype"), "F32, F16 or BF16", DTypeName(t.dtype));
  }
  const int64_t count = CheckedElementCount(t.shape, kMaxInputElements);
  if (count < 0) {
    return InvalidField(absl::StrCat(field, ".shape"),
                        absl::StrCat("at most ", kMaxInputElements, " elements"),
                        ShapeString(t.shape));
  }
  const int64_t bytes = count * static_cast<int64_t>(DTypeSize(t.dtype));
  if (static_cast<int64_t>(t.data.size()) != bytes) {
    return InvalidField(
        absl::StrCat(field, ".data"),
        absl::StrCat(bytes, " bytes (", ShapeString(t.shape), " ", DTypeName(t.dtype), ")"),
        absl::StrCat(t.data.size(), " bytes"));
  }
  if (t.dtype == DType::kF32 && reinterpret_cast<uintptr_t>(t.data.data()) % alignof(float) == 0) {
    *data = reinterpret_cast<const float*>(t.data.data());
    return absl::OkStatus();
  }
  copy->resize(static_cast<size_t>(count));
  ConvertFloats(t.data.data(), t.dtype, copy->data(), DType::kF32, count);
  *data = copy->data();
  return absl::OkStatus();
}

// An uninitialised F32 buffer of `count` values and its view as `shape`.
std::unique_ptr<float[]> Uninitialised(int64_t count) {
  return std::unique_ptr<float[]>(new float[static_cast<size_t>(count)]);
}
TensorView ViewOf(const std::unique_ptr<float[]>& data, std::vector<int64_t> shape) {
  const int64_t count = CheckedElementCount(shape);
  return TensorView{DType::kF32, std::move(shape),
                    std::string_view(reinterpret_cast<const char*>(data.get()),
                                     static_cast<size_t>(count) * sizeof(float))};
}

// Rows of each member laid end to end: `pick` gives a member's pointer and row count.
template <typename Pick>
void Gather(absl::Span<LayerCall* const> calls, int64_t width, float* out, Pick pick) {
  for (LayerCall* c : calls) {
    const auto [data, rows] = pick(c);
    std::memcpy(out, data, static_cast<size_t>(rows * width) * sizeof(float));
    out += rows * width;
  }
}

template <typename Pick>
void Scatter(absl::Span<LayerCall* const> calls, int64_t width, const float* in, Pick pick) {
  for (LayerCall* c : calls) {
    auto [data, rows] = pick(c);
    std::memcpy(data, in, static_cast<size_t>(rows * width) * sizeof(float));
    in += rows * width;
  }
}

}  // namespace

const AttentionWeights& WeightsOf(const Model& model, int32_t layer, bool cross) {
  const LayerWeights& l = model.layer(layer);
  return cross ? *l.cross : l.self;
}

absl::Status ProjectQuery(const Model& model, const AttentionWeights& w, const float* x,
                          int64_t rows, float* q) {
  if (absl::Status s = w.q->Run(x, rows, q); !s.ok()) return s;
  const ModelConfig& c = model.config();
  if (!w.q_norm.empty()) RmsNormHeads(q, rows, c.num_heads, c.head_dim, w.q_norm, c.norm_eps);
  return absl::OkStatus();
}

absl::Status ProjectKeyValue(const Model& model, const AttentionWeights& w, const float* src,
                             int64_t rows, float* k, float* v) {
  if (absl::Status s = w.k->Run(src, rows, k); !s.ok()) return s;
  if (absl::Status s = w.v->Run(src, rows, v); !s.ok()) return s;
  const ModelConfig& c = model.config();
  if (!w.k_norm.empty()) RmsNormHeads(k, rows, c.num_kv_heads, c.head_dim, w.k_norm, c.norm_eps);
  return absl::OkStatus();
}

absl::Status ProjectOutput(const AttentionWeights& w, const float* attn, int64_t rows, float* y) {
  return w.o->Run(attn, rows, y);
}

double ProjectionFlops(const ModelConfig& c, int64_t rows, int64_t source_rows) {
  const double hidden = c.hidden_size;
  return 2.0 * hidden * (2.0 * rows * c.num_heads * c.head_dim +
                         2.0 * source_rows * c.num_kv_heads * c.head_dim);
}

absl::StatusOr<std::unique_ptr<LayerCall>> LayerCall::Plan(const LayerInput& in,
                                                           const RequestLimits& limits) {
  const Model& model = *in.model;
  const ModelConfig& c = model.config();
  if (in.layer < 0 || in.layer >= c.num_layers) {
    return InvalidField("layer",
                        absl::StrCat("a layer in [0, ", c.num_layers, ") of model ", model.name()),
                        absl::StrCat(in.layer));
  }
  const bool cross = in.memory.has_value();
  if (cross && !c.cross_attention) {
    return InvalidField("memory",
                        absl::StrCat("none: model ", model.name(), " (", c.model_type,
                                     ") has no cross-attention weights"),
                        "a memory tensor");
  }
  std::unique_ptr<LayerCall> call(new LayerCall());
  call->model_ = &model;
  call->weights_ = &WeightsOf(model, in.layer, cross);
  call->cross_ = cross;
  const std::string rows_expected =
      absl::StrCat("[B, L, ", c.hidden_size, "] or [L, ", c.hidden_size, "] (the hidden size of ",
                   model.name(), ")");
  if (!RowsOf(in.x.shape, c.hidden_size, &call->batch_, &call->tokens_)) {
    return InvalidField("x.shape", rows_expected, ShapeString(in.x.shape));
  }
  call->source_tokens_ = call->tokens_;
  try {
    if (absl::Status s = AsF32(in.x, "x", &call->x_copy_, &call->x_data_); !s.ok()) return s;
    if (cross) {
      int64_t mb = 0;
      if (!RowsOf(in.memory->shape, c.hidden_size, &mb, &call->source_tokens_) ||
          in.memory->shape.size() != in.x.shape.size() || mb != call->batch_) {
        return InvalidField(
            "memory.shape",
            absl::StrCat(in.x.shape.size() == 3 ? absl::StrCat("[", call->batch_, ", Lm, ")
                                                : std::string("[Lm, "),
                         c.hidden_size, "] (x's batch and rank)"),
            ShapeString(in.memory->shape));
      }
      if (absl::Status s = AsF32(*in.memory, "memory", &call->memory_copy_, &call->memory_data_);
          !s.ok()) {
        return s;
      }
    }
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("x: out of memory for its F32 copy");
  }
  call->x_dtype_ = in.x.dtype;
  call->x_shape_ = in.x.shape;

  const int64_t B = call->batch_, L = call->tokens_, Lk = call->source_tokens_;
  const int64_t n = static_cast<int64_t>(in.positions.size());
  if (n != 0 && !c.rope.has_value()) {
    return InvalidField("positions",
                        absl::StrCat("none: model ", model.name(), " (", ModelFamilyName(c.family),
                                     " family) has no RoPE"),
                        absl::StrCat(n, " positions"));
  }
  if (c.rope.has_value()) {
    if (n != 0 && n != L && n != B * L) {
      return InvalidField("positions",
                          absl::StrCat("0, ", L, " (one per token) or ", B * L, " (B × L) values"),
                          absl::StrCat(n));
    }
    call->positions_.resize(static_cast<size_t>(B * L));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < L; ++i) {
        const int64_t at = n == 0 ? i : n == L ? i : b * L + i;
        const int64_t p = n == 0 ? i : in.positions[at];
        if (p < 0 || p > std::numeric_limits<int32_t>::max()) {
          return InvalidField(absl::StrCat("positions[", at, "]"), "a position in [0, 2^31)",
                              absl::StrCat(p));
        }
        call->positions_[b * L + i] = p;
      }
    }
  }

  const int64_t Hq = c.num_heads, Hkv = c.num_kv_heads, D = c.head_dim;
  try {
    call->q_ = Uninitialised(B * L * Hq * D);
    call->k_ = Uninitialised(B * Lk * Hkv * D);
    call->v_ = Uninitialised(B * Lk * Hkv * D);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory for the projected q, k and v");
  }
  AttentionRequest request;
  request.query = ViewOf(call->q_, {B, L, Hq, D});
  request.key = ViewOf(call->k_, {B, Lk, Hkv, D});
  request.value = ViewOf(call->v_, {B, Lk, Hkv, D});
  request.options = in.options;
  request.options.causal = in.causal.has_value() ? *in.causal : (in.options.causal || c.causal);
  if (request.options.causal && !cross && c.sliding_window > 0 &&
      request.options.window_left < 0) {
    request.options.window_left = c.sliding_window - 1;
  }
  request.key_lengths = in.key_lengths;
  request.outputs = in.outputs;
  absl::StatusOr<std::unique_ptr<AttentionJob>> job = PlanAttention(request, limits);
  if (!job.ok()) return job.status();
  call->projection_flops_ = ProjectionFlops(c, B * L, B * Lk);
  (*job)->flops += call->projection_flops_;
  (*job)->cost += call->projection_flops_;
  call->job_ = *std::move(job);
  call->planned_ = call->job_.get();
  return call;
}

int64_t LayerCall::held_bytes() const {
  const ModelConfig& c = model_->config();
  const int64_t rows = batch_ * tokens_, src = batch_ * source_tokens_;
  const int64_t qkv = (rows * c.num_heads + 2 * src * c.num_kv_heads) * int64_t{c.head_dim} * 4;
  const int64_t y = rows * c.hidden_size * static_cast<int64_t>(DTypeSize(x_dtype_));
  const int64_t inputs = static_cast<int64_t>((x_copy_.size() + memory_copy_.size()) * sizeof(float));
  // The stages' gathered copies (inputs and q/k/v before the attention,
  // its output and y after) and the BF16 copy of the rows a matmul reads.
  const int64_t gathered = inputs + qkv +
                           rows * (int64_t{c.num_heads} * c.head_dim + c.hidden_size) * 4 +
                           weights_->q->ScratchBytes(std::max(rows, src));
  return inputs + qkv + y + gathered;
}

absl::Status LayerCall::Prepare(absl::Span<TaskStage* const> members) {
  std::vector<LayerCall*> calls;
  for (TaskStage* m : members) calls.push_back(static_cast<LayerCall*>(m));
  const Model& model = *model_;
  const ModelConfig& c = model.config();
  const AttentionWeights& w = *weights_;
  const int64_t hidden = c.hidden_size, q_width = int64_t{c.num_heads} * c.head_dim,
                kv_width = int64_t{c.num_kv_heads} * c.head_dim;
  int64_t rows = 0, src_rows = 0;
  for (LayerCall* call : calls) {
    rows += call->batch_ * call->tokens_;
    src_rows += call->batch_ * call->source_tokens_;
  }
  auto x_of = [](LayerCall* call) {
    return std::pair<const float*, int64_t>(call->x_data_, call->batch_ * call->tokens_);
  };
  auto src_of = [](LayerCall* call) {
    return std::pair<const float*, int64_t>(call->cross_ ? call->memory_data_ : call->x_data_,
                                            call->batch_ * call->source_tokens_);
  };
  auto q_of = [](LayerCall* call) {
    return std::pair<float*, int64_t>(call->q_.get(), call->batch_ * call->tokens_);
  };
  auto k_of = [](LayerCall* call) {
    return std::pair<float*, int64_t>(call->k_.get(), call->batch_ * call->source_tokens_);
  };
  auto v_of = [](LayerCall* call) {
    return std::pair<float*, int64_t>(call->v_.get(), call->batch_ * call->source_tokens_);
  };
  if (calls.size() == 1) {
    LayerCall& call = *calls[0];
    if (absl::Status s = ProjectQuery(model, w, call.x_data_, rows, q_of(&call).first); !s.ok()) {
      return s;
    }
    if (absl::Status s = ProjectKeyValue(model, w, src_of(&call).first, src_rows,
                                         k_of(&call).first, v_of(&call).first);
        !s.ok()) {
      return s;
    }
  } else {
    // One matmul per projection over every call's rows.
    std::vector<float> x(static_cast<size_t>(rows * hidden));
    std::vector<float> q(static_cast<size_t>(rows * q_width));
    Gather(calls, hidden, x.data(), x_of);
    if (absl::Status s = ProjectQuery(model, w, x.data(), rows, q.data()); !s.ok()) return s;
    Scatter(calls, q_width, q.data(), q_of);
    if (cross_) {
      x.resize(static_cast<size_t>(src_rows * hidden));
      Gather(calls, hidden, x.data(), src_of);
    }
    std::vector<float> k(static_cast<size_t>(src_rows * kv_width));
    std::vector<float> v(static_cast<size_t>(src_rows * kv_width));
    if (absl::Status s = ProjectKeyValue(model, w, x.data(), src_rows, k.data(), v.data());
        !s.ok()) {
      return s;
    }
    Scatter(calls, kv_width, k.data(), k_of);
    Scatter(calls, kv_width, v.data(), v_of);
  }
  if (c.rope.has_value()) {
    for (LayerCall* call : calls) {
      const int64_t last = *std::max_element(call->positions_.begin(), call->positions_.end());
      RotateRope(*c.rope, call->positions_, c.num_heads, c.head_dim, call->q_.get(), last);
      if (!call->cross_) {
        RotateRope(*c.rope, call->positions_, c.num_kv_heads, c.head_dim, call->k_.get(), last);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status LayerCall::Finish(absl::Span<TaskStage* const> members) {
  std::vector<LayerCall*> calls;
  for (TaskStage* m : members) calls.push_back(static_cast<LayerCall*>(m));
  const ModelConfig& c = model_->config();
  const int64_t hidden = c.hidden_size, width = int64_t{c.num_heads} * c.head_dim;
  int64_t rows = 0;
  for (LayerCall* call : calls) rows += call->batch_ * call->tokens_;
  auto out_of = [](LayerCall* call) {
    return std::pair<float*, int64_t>(call->planned_->output.mutable_data<float>(),
                                      call->batch_ * call->tokens_);
  };
  std::vector<float> attn;
  const float* in = nullptr;
  if (calls.size() == 1) {
    in = out_of(calls[0]).first;
  } else {
    attn.resize(static_cast<size_t>(rows * width));
    Gather(calls, width, attn.data(), out_of);
    in = attn.data();
  }
  if (calls.size() == 1 && x_dtype_ == DType::kF32) {
    // The response's tensor, written by the matmul itself.
    y_ = Tensor::Zeros(DType::kF32, x_shape_);
    return ProjectOutput(*weights_, in, rows, y_.mutable_data<float>());
  }
  std::vector<float> y(static_cast<size_t>(rows * hidden));
  if (absl::Status s = ProjectOutput(*weights_, in, rows, y.data()); !s.ok()) return s;
  const float* from = y.data();
  for (LayerCall* call : calls) {
    const int64_t n = call->batch_ * call->tokens_ * hidden;
    call->y_ = Tensor::Zeros(call->x_dtype_, call->x_shape_);
    ConvertFloats(from, DType::kF32, call->y_.data.data(), call->x_dtype_, n);
    from += n;
  }
  return absl::OkStatus();
}

}  // namespace attnserve
