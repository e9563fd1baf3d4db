// ModelSession: the KV caches of N sequences of an L-layer model on one
// AttnClient, one server session (with L layers) per sequence, stepped one
// layer at a time for every sequence in ONE BatchDecode call.
//
//   SessionSpec spec{.num_kv_heads = 8, .head_dim = 128,
//                    .cache_dtype = DType::kBF16, .num_layers = 32};
//   auto model = ModelSession::Create(client, /*n_sequences=*/4, spec);
//   for (int32_t layer = 0; layer < 32; ++layer) {
//     std::vector<SequenceStep> steps = ...;  // q/k/v of each sequence at this layer
//     absl::StatusOr<std::vector<Tensor>> out = (*model)->StepLayer(layer, steps);
//   }
//
// The server requires layers to step in order (layer l appends step t only
// after layer l-1 did; layer 0 after the last layer did step t-1); StepLayer
// does not reorder, it reports the server's FAILED_PRECONDITION. It keeps
// each sequence's token count per layer and sends it as the entries'
// expected_context_tokens, so a step retried after a lost response is
// refused rather than appended twice.
//
// Not thread-safe: one caller at a time. The AttnClient is borrowed and must
// outlive the ModelSession.
#ifndef ATTNSERVE_CLIENT_MODEL_SESSION_H_
#define ATTNSERVE_CLIENT_MODEL_SESSION_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/convert.h"
#include "core/tensor.h"

namespace attnserve::client {

// One sequence's inputs for one layer-step (borrowed views; Tensor::view()):
// query [Lq, Hq, D], key/value [Lnew, Hkv, D|Dv] to append; or, for the
// sessions of a model the server loaded (SessionSpec::model), hidden states
// [T, hidden] instead, the output then being the layer's y [T, hidden].
struct SequenceStep {
  TensorView query;
  TensorView key;
  TensorView value;
  std::optional<TensorView> hidden;
};

class ModelSession {
 public:
  // Opens `n_sequences` sessions of `spec` (spec.num_layers layers, or the
  // model's for spec.model). On a failure closes those already opened and
  // returns the error, naming the sequence. INVALID_ARGUMENT for
  // n_sequences < 1.
  static absl::StatusOr<std::unique_ptr<ModelSession>> Create(
      AttnClient* client, int n_sequences, const SessionSpec& spec,
      absl::Duration deadline = absl::ZeroDuration());
  // Closes every sequence's session still open (errors are dropped; call
  // Close() to see them).
  ~ModelSession();
  ModelSession(const ModelSession&) = delete;
  ModelSession& operator=(const ModelSession&) = delete;

  // Closes every session; returns the first failure (the rest are still
  // tried). Afterwards the ModelSession holds no sequences.
  absl::Status Close();

  // Adds a sequence sharing the first `tokens` tokens of every layer of
  // `sequence` (ForkSession); returns its index (the new last one).
  // INVALID_ARGUMENT for an unknown sequence; else the server's errors.
  absl::StatusOr<int> Fork(int sequence, int64_t tokens);

  // One layer-step of every sequence: steps[i] is sequence i's (so
  // steps.size() == num_sequences()), all in one BatchDecode. Returns each
  // sequence's output [Lq, Hq, Dv] (with hidden states: y [T, hidden]) in
  // order. The call's own error is
  // returned as is; otherwise the first failed entry's error, its message
  // prefixed "sequence i (session ID): ". Entries that succeeded have
  // advanced even then (their counts too); a failed one's cache is as it was.
  absl::StatusOr<std::vector<Tensor>> StepLayer(int32_t layer,
                                                const std::vector<SequenceStep>& steps,
                                                const AttentionOptions& options = {},
                                                const CallOptions& call = {});

  int num_sequences() const { return static_cast<int>(sequences_.size()); }
  int32_t num_layers() const { return num_layers_; }
  const std::string& session_id(int sequence) const { return sequences_[sequence].session_id; }
  // Tokens in `sequence`'s cache of `layer`, as the server last reported.
  int64_t tokens(int sequence, int32_t layer = 0) const {
    return sequences_[sequence].tokens[layer];
  }

 private:
  struct Sequence {
    std::string session_id;
    std::vector<int64_t> tokens;  // per layer
  };
  ModelSession(AttnClient* client, int32_t num_layers, absl::Duration deadline)
      : client_(client), num_layers_(num_layers), deadline_(deadline) {}

  AttnClient* const client_;
  const int32_t num_layers_;
  const absl::Duration deadline_;  // of Create, Fork and Close
  std::vector<Sequence> sequences_;
};

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_MODEL_SESSION_H_
