#include "backends/reference_backend.h"

#include "attention/reference.h"

namespace attnserve {
namespace {

class ReferenceBackend final : public Backend {
 public:
  ReferenceBackend() {
    info_.name = "reference";
    info_.description = "exact reference kernel (double accumulation, one thread); slow";
    info_.dtypes = {DType::kF32, DType::kF16, DType::kBF16};
    info_.features = {"causal", "window",      "softcap", "alibi",   "bias", "key_lengths", "key_offset",
                      "gqa",    "linear",      "lse",     "entropy",     "weights", "top_k",
                      "block_mask", "key_indices", "global_tokens", "sink_logits"};
    info_.max_head_dim = 1024;
  }

  const BackendInfo& info() const override { return info_; }
  absl::Status Supports(const AttentionParams&) const override { return absl::OkStatus(); }
  absl::Status Run(absl::Span<const AttentionParams> batch) override {
    for (const AttentionParams& p : batch) RunReferenceAttention(p);
    return absl::OkStatus();
  }
  // One row of double scores and flags over the keys, and top-k candidates.
  int64_t ScratchBytes(const AttentionParams& p) const override {
    return int64_t{p.seqlen_k} * 24 + 4096;
  }

 private:
  BackendInfo info_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateReferenceBackend(const BackendOptions&) {
  return std::make_unique<ReferenceBackend>();
}

}  // namespace attnserve
