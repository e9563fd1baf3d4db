// Conversions between the wire API (attnserve.v1 protos) and the core types,
// as the client sees them: core request in, wire request out; wire response
// in, owned core tensors out. The server has its own adapter; this one is the
// client's, built on the conversions both share (wire/convert.h), which the
// small ToProto/FromProto overloads below name in the client's overload set.
// Also the one place a grpc::Status becomes an absl::Status.
// Pure functions; thread-safe.
#ifndef ATTNSERVE_CLIENT_CONVERT_H_
#define ATTNSERVE_CLIENT_CONVERT_H_

#include <optional>
#include <string>
#include <vector>

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "attention/request.h"
#include "attnserve/v1/attention.pb.h"
#include "client/shared_memory.h"
#include "core/tensor.h"
#include "wire/convert.h"

namespace attnserve::client {

// The tensors of one call that lie in shared memory the caller registered
// (AttnClient::RegisterSharedMemory) instead of travelling in the message.
// An input named here is sent as its view's dtype and shape with a
// SharedMemoryRef and no data: the view's bytes are not read (leave them
// empty, or let the view point at the region's bytes, as
// SharedMemoryRegion::Write returns it). `output` asks the server to write
// the main output there (OutputSpec.output_shm): the result's tensor then has
// dtype and shape but no data, and the result says where (output_shm).
//
//   Attend:       query, key, value, bias; output
//   Decode:       query, key, value, hidden; output
//   AttendLayer:  output (y) only
//   BatchDecode:  per entry, in SessionStep::shm (CallOptions::shm must be empty)
//   ShardedAttend: none (it cuts the keys' bytes itself)
struct ShmTensors {
  std::optional<ShmRef> query, key, value, bias, hidden;
  std::optional<ShmRef> output;

  bool empty() const { return !query && !key && !value && !bias && !hidden && !output; }
};

// Per-call settings that are not part of the attention itself.
struct CallOptions {
  std::string request_id;  // echoed back; streaming callers match on it
  std::string backend;     // empty: the server's default
  int32_t priority = 0;    // 0 normal, 1 high
  absl::Duration deadline = absl::ZeroDuration();  // zero: the client's default
  ShmTensors shm;          // tensors in registered shared memory; empty: none
};

// Where the server spent the time (AttendResponse.timing).
struct ServerTiming {
  int64_t queue_us = 0;
  int64_t compute_us = 0;
  int32_t batch_size = 0;
  int64_t total_us = 0;
};

// An Attend result with owned tensors; optional outputs are present only when
// requested.
struct AttendResult {
  std::string request_id;
  // With output_shm set, dtype and shape only: the bytes are in the region,
  // at output_shm (SharedMemoryRegion::View or Read with that offset and
  // output.dtype / output.shape).
  Tensor output;
  std::optional<ShmRef> output_shm;
  std::optional<Tensor> lse;
  std::optional<Tensor> entropy;  // [B, Hq, Lq] F32: −Σ p·ln p in nats per query and head
  std::optional<Tensor> weights;
  std::optional<Tensor> top_k_indices;
  std::optional<Tensor> top_k_weights;
  ServerTiming timing;
  std::string backend;
};

// One AttendLayer call: layer `layer` of the model the server loaded as
// `model` (--model=NAME=DIR) on hidden states x,
//   y = o_proj(attention(q_proj(x), k_proj(m), v_proj(m))), m = x or memory.
// Borrowed views.
struct LayerRequest {
  std::string model;
  int32_t layer = 0;  // in [0, num_layers)
  TensorView x;       // [B, L, hidden] or [L, hidden]; F32, F16 or BF16
  // Cross-attention (models with cross_attention): the encoder's output
  // [B, Lm, hidden] (rank as x) the keys and values are projected from.
  std::optional<TensorView> memory;
  // RoPE positions of x's tokens: empty (0..L-1), L (shared by the rows) or
  // B·L (row-major).
  std::vector<int64_t> positions;
  // Unset: the model's default mask (llama causal, with Mistral's sliding
  // window; bert bidirectional). options.causal also asks for causal.
  std::optional<bool> causal;
  AttentionOptions options;          // scale, window, softcap, ALiBi as in Attend
  std::vector<int32_t> key_lengths;  // empty or one per row: keys past it are padding
  OutputSpec outputs;                // lse, entropy, weights, top_k of the attention
};

// An AttendLayer result with owned tensors; optional outputs are present
// only when requested.
struct LayerResult {
  std::string request_id;
  Tensor y;  // [B, L, hidden] (rank as x), in x's dtype; no data with y_shm
  std::optional<ShmRef> y_shm;  // where the server wrote y (CallOptions::shm.output)
  std::optional<Tensor> lse;      // [B, Hq, L] F32
  std::optional<Tensor> entropy;  // [B, Hq, L] F32 nats
  std::optional<Tensor> weights;  // [B, Hq, L, Lk] F32
  std::optional<Tensor> top_k_indices;
  std::optional<Tensor> top_k_weights;
  ServerTiming timing;  // compute_us includes the projections
  std::string backend;
};

// A KV-cache session to open (CreateSessionRequest).
struct SessionSpec {
  int32_t num_kv_heads = 0;  // Hkv
  int32_t head_dim = 0;      // D
  int32_t value_dim = 0;     // Dv; 0 = head_dim
  DType cache_dtype = DType::kF32;  // storage of the cache: F32, F16 or BF16
  int64_t max_tokens = 0;    // per layer; 0 = as many as the server's cache holds
  // Layers of the model, one paged cache each; steps name the layer and go
  // in layer order (see the proto). 0 = 1, or the model's.
  int32_t num_layers = 0;
  // If set, the server rotates new queries and keys (RoPE) at the session's
  // positions, so steps send unrotated ones. The wire message itself: theta,
  // rotary_dim, style (NEOX | GPTJ), scaling and its factors; zeros are the
  // server's defaults.
  std::optional<v1::RotaryEmbedding> rotary;
  // Attention sinks: with window_tokens > 0 the session keeps its first
  // sink_tokens and its last window_tokens tokens (rounded up to blocks) and
  // frees the blocks between. 0 = keep everything.
  int64_t sink_tokens = 0;
  int64_t window_tokens = 0;
  // A model the server loaded (--model; llama family): the session is that
  // model's attention module. num_kv_heads, head_dim, num_layers and rotary
  // come from the model (any set must agree; value_dim and rotary unset),
  // and steps send DecodeStep::hidden instead of query/key/value.
  std::string model;
};

// What CreateSession answered.
struct CreatedSession {
  std::string session_id;
  int64_t capacity_tokens = 0;  // max_tokens, or what the free cache held then
  int32_t block_tokens = 0;
  int32_t num_layers = 0;
};

// What ForkSession answered: a new session sharing a prefix of another's.
struct ForkedSession {
  std::string session_id;
  int64_t context_tokens = 0;  // tokens the fork starts with (= the tokens asked for)
  int64_t shared_tokens = 0;   // of them, in blocks shared with the parent (the rest copied)
};

// One decode step: key/value [Lnew, Hkv, D|Dv] are appended to the session's
// cache of `layer`, then query [Lq, Hq, D] attends over that whole cache
// (causal, bottom-right: the new queries are the last positions). Borrowed
// views. Of the options, scale, softcap, alibi_slopes and window_left apply.
struct DecodeStep {
  TensorView query;
  TensorView key;
  TensorView value;
  AttentionOptions options;
  bool lse = false;
  bool entropy = false;  // −Σ p·ln p per query and head, F32 [1, Hq, Lq]
  int32_t layer = 0;  // in [0, num_layers)
  // If set: the tokens the caller believes the layer's cache holds before
  // this step; a mismatch is FAILED_PRECONDITION, so a retried step that
  // already landed is refused instead of appended twice.
  std::optional<int64_t> expected_context_tokens;
  // A model session's step, instead of query/key/value: hidden states [T,
  // hidden] (or [1, T, hidden]), F32, F16 or BF16; the output is then the
  // layer's y [T, hidden] in hidden's dtype. With hidden set, query/key/value
  // left empty (default views) are not sent. (Last, so that aggregate
  // initialisers of the fields above keep their meaning.)
  std::optional<TensorView> hidden;
  // Sparse attention over the session's cache after the append (Lk is the
  // cache's tokens, positions count from its first): DecodeRequest.sparsity,
  // or the step's BatchDecodeEntry.sparsity. Empty: dense. Index tensors
  // are borrowed I32 views.
  SparsitySpec sparsity;
};

// One session's part of a BatchDecode: its step's query, key, value (or
// hidden), expected_context_tokens and sparsity become the entry. The wire has one layer, options
// and output spec per batch: the layer is BatchDecode's argument (step.layer
// is not read), options, lse and entropy are the first step's and must be the
// same in every step.
struct SessionStep {
  std::string session_id;
  DecodeStep step;
  // The entry's tensors in registered shared memory (query, key, value,
  // hidden) and where its output goes (BatchDecodeEntry.output_shm); bias
  // has no meaning here.
  ShmTensors shm;
};

struct DecodeResult {
  std::string request_id;
  // [Lq, Hq, Dv] (rank as the query), the query's dtype; for a step of
  // hidden states, the layer's y [T, hidden] (rank and dtype as hidden).
  // With output_shm set, dtype and shape only, as AttendResult's.
  Tensor output;
  std::optional<ShmRef> output_shm;
  std::optional<Tensor> lse;  // [1, Hq, Lq] F32, when asked
  std::optional<Tensor> entropy;  // [1, Hq, Lq] F32 in nats, when asked
  int64_t context_tokens = 0;  // tokens in the cache after this step's append
  ServerTiming timing;
  std::string backend;
};

inline v1::DType ToProto(DType dtype) { return DTypeToProto(dtype); }
// Any dtype, I32 included. INVALID_ARGUMENT for DTYPE_UNSPECIFIED or an
// unknown value.
inline absl::StatusOr<DType> FromProto(v1::DType dtype) { return DTypeFromProto(dtype, "dtype"); }

// Copies the view's bytes into `out`.
inline void ToProto(const TensorView& view, v1::Tensor* out) { ViewToProto(view, out); }
// The view's dtype and shape, and `shm` instead of its bytes when set.
void ToProto(const TensorView& view, const std::optional<ShmRef>& shm, v1::Tensor* out);
// INVALID_ARGUMENT when the dtype is unknown, a dim is negative or the data
// length does not match shape and dtype. `field` names the tensor in messages.
absl::StatusOr<Tensor> FromProto(const v1::Tensor& t, absl::string_view field);

// Builds the wire request. Does not validate: the server does, and answers
// INVALID_ARGUMENT naming the field.
v1::AttendRequest ToProto(const AttentionRequest& request, const CallOptions& call);

// Moves the tensors out of `response` (which is left empty-ish).
absl::StatusOr<AttendResult> FromProto(v1::AttendResponse&& response);

// Builds the wire request; not validated (the server does, naming the field).
v1::AttendLayerRequest ToProto(const LayerRequest& request, const CallOptions& call);

// Moves the tensors out of `response`.
absl::StatusOr<LayerResult> FromProto(v1::AttendLayerResponse&& response);

// The wire form of the options (-1 windows become unset fields).
inline void ToProto(const AttentionOptions& options, v1::AttentionOptions* out) {
  OptionsToProto(options, out);
}
// The wire form of a sparse attention: index tensors copied, an unset
// block_mask / key_indices left unset. Not validated (the server does,
// naming sparsity.block_mask.indptr[...] and the like).
inline void ToProto(const SparsitySpec& sparsity, v1::Sparsity* out) {
  SparsityToProto(sparsity, out);
}

v1::CreateSessionRequest ToProto(const SessionSpec& spec);
CreatedSession FromProto(const v1::CreateSessionResponse& response);

// Builds the wire request of one step; not validated (the server does).
v1::DecodeRequest ToProto(const std::string& session_id, const DecodeStep& step,
                          const CallOptions& call);

// Moves the tensors out of `response`.
absl::StatusOr<DecodeResult> FromProto(v1::DecodeResponse&& response);

ForkedSession FromProto(const v1::ForkSessionResponse& response);

// Builds the BatchDecodeRequest of one layer-step of `layer` over `steps`,
// entries in their order. The batch's options, lse and entropy are
// steps[0]'s; a step whose options, lse or entropy differ is INVALID_ARGUMENT
// naming it, as is an empty `steps` or a non-empty call.shm (the entries'
// shared memory is each SessionStep's). Tensors are not validated (the server does, per entry).
absl::StatusOr<v1::BatchDecodeRequest> ToProto(int32_t layer,
                                               const std::vector<SessionStep>& steps,
                                               const CallOptions& call);

// The results of a BatchDecode, one per entry in order: the entry's output,
// lse, entropy and context_tokens with the batch's request_id, timing and backend, or
// the entry's own error (its code and message, which names the entry).
// Moves the tensors out of `response`. INTERNAL when the response does not
// hold one result per entry (`entries` were sent).
absl::StatusOr<std::vector<absl::StatusOr<DecodeResult>>> FromProto(
    v1::BatchDecodeResponse&& response, size_t entries);

// The one place a gRPC status becomes an absl::Status (codes share values).
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_CONVERT_H_
