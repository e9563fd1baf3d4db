// A model's attention layer around the attention kernels:
//   y = o_proj(attention(rope(norm(q_proj(x))), rope(norm(k_proj(m))), v_proj(m)))
// with m = x (self-attention) or an encoder's output (cross-attention), the
// q/k RMSNorm and RoPE as the model's family prescribes, and the attention
// itself computed by a backend.
//
// LayerCall carries one AttendLayer request from its planning to its answer.
// It is the scheduler task's stage (scheduler.h): the input projections of
// every call to the same layer in one backend call run as one matmul before
// the attention, and their output projections as one after it.
//
// Thread-compatible: a call is planned by one thread, then run by the
// scheduler's worker.
#ifndef ATTNSERVE_MODEL_LAYER_H_
#define ATTNSERVE_MODEL_LAYER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "attention/job.h"
#include "attention/request.h"
#include "core/tensor.h"
#include "model/model.h"
#include "scheduler/scheduler.h"

namespace attnserve {

// The weights a call uses: the layer's self- or cross-attention.
const AttentionWeights& WeightsOf(const Model& model, int32_t layer, bool cross);

// q [rows, Hq·D] = x [rows, hidden] · Wqᵀ + b, then each head's RMSNorm when
// the model has one. F32; RoPE is not applied here.
absl::Status ProjectQuery(const Model& model, const AttentionWeights& w, const float* x,
                          int64_t rows, float* q);
// k and v [rows, Hkv·D] from src [rows, hidden]; k normed as q is.
absl::Status ProjectKeyValue(const Model& model, const AttentionWeights& w, const float* src,
                             int64_t rows, float* k, float* v);
// y [rows, hidden] = attn [rows, Hq·D] · Woᵀ + b.
absl::Status ProjectOutput(const AttentionWeights& w, const float* attn, int64_t rows, float* y);

// The projections' floating-point work for `rows` query rows and
// `source_rows` key/value rows: 2·rows·hidden·(Hq·D) twice (q, o) plus
// 2·source_rows·hidden·(Hkv·D) twice (k, v).
double ProjectionFlops(const ModelConfig& config, int64_t rows, int64_t source_rows);

// The bytes of x and memory must outlive the LayerCall planned from them
// (F32 inputs are read in place, by Prepare).
struct LayerInput {
  const Model* model = nullptr;
  int32_t layer = 0;
  TensorView x;                     // [B, L, hidden] or [L, hidden]; F32, F16 or BF16
  std::optional<TensorView> memory;  // cross-attention: [B, Lm, hidden] (or [Lm, hidden])
  // RoPE positions of x's tokens: empty (0..L-1), L (shared by the rows) or
  // B·L. Only for a model with RoPE; cross-attention keys are not rotated.
  std::vector<int64_t> positions;
  std::optional<bool> causal;        // unset: the model's default (llama causal, bert not)
  AttentionOptions options;          // options.causal also asks for causal
  std::vector<int32_t> key_lengths;  // empty or one per row: keys past it are padding
  OutputSpec outputs;
};

class LayerCall final : public TaskStage {
 public:
  // Validates `input` and plans the call: the attention job over buffers for
  // the projected q, k and v (allocated here), and the output y. Errors:
  // INVALID_ARGUMENT naming the field ("x.shape", "layer", "positions[3]",
  // "memory"); RESOURCE_EXHAUSTED over `limits` or out of memory.
  static absl::StatusOr<std::unique_ptr<LayerCall>> Plan(const LayerInput& input,
                                                         const RequestLimits& limits);

  // The planned attention job, for the scheduler task (move it out once).
  std::unique_ptr<AttentionJob> TakeJob() { return std::move(job_); }

  const void* group() const override { return weights_; }
  absl::Status Prepare(absl::Span<TaskStage* const> members) override;
  absl::Status Finish(absl::Span<TaskStage* const> members) override;

  // After Finish: y [B, L, hidden] (rank as x) in x's dtype.
  Tensor& y() { return y_; }
  // Bytes this call holds besides the job's outputs: the F32 inputs, the
  // projected q/k/v, y, and its share of the stages' scratch.
  int64_t held_bytes() const;
  double projection_flops() const { return projection_flops_; }

 private:
  LayerCall() = default;

  const Model* model_ = nullptr;
  const AttentionWeights* weights_ = nullptr;
  int64_t batch_ = 0, tokens_ = 0, source_tokens_ = 0;
  bool cross_ = false;
  DType x_dtype_ = DType::kF32;
  std::vector<int64_t> x_shape_;
  // x [B·L, hidden] and memory [B·Lm, hidden] in F32: the input's bytes
  // when they are F32 (and 4-byte aligned), else the F32 copies below.
  const float* x_data_ = nullptr;
  const float* memory_data_ = nullptr;
  std::vector<float> x_copy_, memory_copy_;
  std::vector<int64_t> positions_;  // [B·L] when the model has RoPE
  // The projections, F32 [B, L, Hq, D] and [B, Lk, Hkv, D]; written whole
  // by Prepare, so not zeroed.
  std::unique_ptr<float[]> q_, k_, v_;
  Tensor y_;
  AttentionJob* planned_ = nullptr;  // the job, also after TakeJob (the task owns it)
  std::unique_ptr<AttentionJob> job_;
  double projection_flops_ = 0;
};

}  // namespace attnserve

#endif  // ATTNSERVE_MODEL_LAYER_H_
