// AttnClient: the C++ client library for attnserve, what other services link.
// One AttnClient owns one gRPC channel; it is thread-safe and meant to be
// shared and kept for the life of the process (channels are expensive).
//
//   auto client = attnserve::client::AttnClient::Create("localhost:50051");
//   absl::StatusOr<AttendResult> r = (*client)->Attend(request);
//
// Synchronous calls block the caller until the response or the deadline.
// AttendAsync and OpenStream never block; their callbacks run on gRPC threads
// and must not block either. Destroying the client waits for its async calls
// and streams to be gone, so it must not be destroyed from their callbacks.
#ifndef ATTNSERVE_CLIENT_CLIENT_H_
#define ATTNSERVE_CLIENT_CLIENT_H_

#include <memory>
#include <string>
#include <vector>

#include <grpcpp/channel.h>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "attention/request.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "client/attend_stream.h"
#include "client/convert.h"
#include "client/in_flight_counter.h"
#include "client/shared_memory.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace attnserve::client {

struct ClientOptions {
  // Applied to every unary call whose CallOptions/argument gives none.
  absl::Duration default_deadline = absl::Seconds(30);
  // Largest message sent or received. Outputs can be as large as inputs.
  int max_message_bytes = 256 << 20;
  // Use a TCP connection of this client's own instead of one shared with other
  // channels to the same target (load generators open several).
  bool dedicated_connection = false;
  // gRPC load-balancing policy ("round_robin" across a headless service's
  // addresses); empty keeps gRPC's default (pick_first).
  std::string load_balancing_policy;
  // Transport security. `tls` (implied by any tls_* file) connects with TLS,
  // verifying the server against tls_ca_file (PEM; empty: the system roots).
  bool tls = false;
  std::string tls_ca_file;
  // PEM client certificate chain and key, for servers that require mutual
  // TLS (--tls_client_ca); both or neither.
  std::string tls_cert_file;
  std::string tls_key_file;
  // Checks the server certificate against this name instead of the target's
  // host (e.g. when connecting by IP address).
  std::string tls_server_name;
  // Sent as "authorization: Bearer <token>" on every call, for servers with
  // --auth_tokens_file. Empty: none.
  std::string bearer_token;
};

enum class ServingStatus { kUnknown, kServing, kNotServing, kServiceUnknown };
std::string_view ServingStatusName(ServingStatus status);

class AttnClient {
 public:
  // Creates the channel (connection is lazy). INVALID_ARGUMENT for an empty
  // target, non-positive limits, an unreadable TLS file or only one of
  // tls_cert_file and tls_key_file.
  static absl::StatusOr<std::unique_ptr<AttnClient>> Create(std::string target,
                                                            ClientOptions options = {});
  // Blocks until every AttendAsync callback has run and every stream is
  // destroyed.
  ~AttnClient();
  AttnClient(const AttnClient&) = delete;
  AttnClient& operator=(const AttnClient&) = delete;

  // One attention computation, request.sparsity included. Errors are the
  // server's codes (see the proto; UNIMPLEMENTED for sparsity on a backend
  // other than cpu and reference), or UNAVAILABLE / DEADLINE_EXCEEDED from
  // the transport.
  absl::StatusOr<AttendResult> Attend(const AttentionRequest& request,
                                      const CallOptions& call = {});
  // Same with a ready wire request; `deadline` zero means the default.
  absl::StatusOr<v1::AttendResponse> Attend(const v1::AttendRequest& request,
                                            absl::Duration deadline = absl::ZeroDuration());

  // One attention layer of a model the server loaded (--model=NAME=DIR), on
  // hidden states (see LayerRequest in convert.h). NOT_FOUND for a model the
  // server has not loaded; INVALID_ARGUMENT naming the field ("x.shape",
  // "layer", "memory", "positions"...); otherwise Attend's errors.
  absl::StatusOr<LayerResult> AttendLayer(const LayerRequest& request,
                                          const CallOptions& call = {});
  // Same with a ready wire request; `deadline` zero means the default.
  absl::StatusOr<v1::AttendLayerResponse> AttendLayer(
      const v1::AttendLayerRequest& request, absl::Duration deadline = absl::ZeroDuration());

  // Version, backends, limits, sessions, the loaded models (`models`) and
  // the caller's shared-memory regions (`shm_regions`).
  absl::StatusOr<v1::ServerInfo> GetServerInfo();

  // Shared memory, for a server on the same host (see shared_memory.h and
  // CallOptions::shm). Blocks until the answer or the deadline (zero: the
  // default).
  //
  // Lets the server map [offset, offset + byte_size) of the POSIX object
  // `key` ("/attn_in") as this caller's region `name` (1-128 of
  // [A-Za-z0-9_.-]); tensors then name places in it (ShmRef offsets count
  // from `offset`). The caller creates the object, keeps it while the region
  // is registered, and unregisters before unlinking it. FAILED_PRECONDITION
  // when the server runs without --allow_shared_memory, or cannot open or
  // map the object, or it is smaller than offset + byte_size;
  // INVALID_ARGUMENT for a bad name, key, offset or size; ALREADY_EXISTS for
  // a name this caller already registered; RESOURCE_EXHAUSTED past the
  // server's --max_shm_regions.
  absl::Status RegisterSharedMemory(const std::string& name, const std::string& key,
                                    int64_t offset, int64_t byte_size,
                                    absl::Duration deadline = absl::ZeroDuration());
  // The whole of `region` as `name`.
  absl::Status RegisterSharedMemory(const std::string& name, const SharedMemoryRegion& region,
                                    absl::Duration deadline = absl::ZeroDuration());
  // Forgets this caller's region `name` (the server unmaps it once no call
  // in flight uses it); "" forgets all of this caller's. NOT_FOUND for a name
  // it has not registered.
  absl::Status UnregisterSharedMemory(const std::string& name,
                                      absl::Duration deadline = absl::ZeroDuration());

  // grpc.health.v1 Check; `service` empty asks about the whole server.
  absl::StatusOr<ServingStatus> CheckHealth(const std::string& service = "");
  // Polls CheckHealth until SERVING. DEADLINE_EXCEEDED after `timeout`.
  absl::Status WaitForServing(absl::Duration timeout);

  using AttendCallback = absl::AnyInvocable<void(absl::StatusOr<v1::AttendResponse>) &&>;
  // Starts one Attend and returns at once. `request` is borrowed: it must stay
  // valid until `done` has run. `done` runs exactly once, on a gRPC thread.
  // `deadline` zero means the default.
  void AttendAsync(const v1::AttendRequest& request, AttendCallback done,
                   absl::Duration deadline = absl::ZeroDuration());

  // Attention over keys split across servers (replicas), merged by lse: the
  // keys and values of `request` are cut along Lk into N = min(targets.size(),
  // Lk) contiguous ranges, as even as possible and in order (the first Lk % N
  // one key longer); targets[i] computes range i against the whole query as
  // sharded keys (key_offset, total_keys: causal alignment, windows and ALiBi
  // count positions in the whole sequence) with its lse, all the parts at
  // once (AttendAsync), and the answers are merged in target order
  // (MergeAttentionStates, attention/merge.h). Blocks until every part has
  // answered, so it must not run on a gRPC callback thread. Targets past the
  // N-th get nothing. `targets` are borrowed; several may be one client.
  //
  // The result is Attend's on one server within rounding: output in the
  // query's dtype (an F16/BF16 part's output arrives rounded, so the merge
  // differs from one Attend by up to a 16-bit rounding), lse when
  // request.outputs.lse; request_id is call.request_id; timing holds each
  // field's largest over the parts (they ran concurrently); backend names
  // the parts' backends, comma-separated where they differ. `call` applies
  // to every part, call.deadline to each part's call.
  //
  // A bias whose last dim is Lk is cut with the keys; one whose last dim is 1
  // (or a scalar) goes whole to every part. A request that is itself a shard
  // (key_offset / total_keys set) stays one: its parts lie at key_offset +
  // their start in its total_keys.
  //
  // Errors: INVALID_ARGUMENT, before any call, naming the field, for no
  // targets or a null one, call.shm (the parts' keys are cut from the
  // request's bytes), key_lengths (they do not combine with
  // key_offset), outputs.weights, outputs.entropy or outputs.top_k (the
  // merge combines the output and lse only), variant LINEAR (it has no lse),
  // sparsity (the server refuses it with sharded keys), paged_kv, a key
  // or value not [B, Lk, H, D] / [Lk, H, D] of matching Lk and bytes, or a
  // bias whose last dim is neither Lk nor 1. A part that
  // fails fails the call with that part's code and its message prefixed by
  // the part, target index and address ("part 1 of 3 (targets[1]
  // 10.0.0.7:50051, keys [11, 22)): ..."), the first failure in target
  // order. INTERNAL when the answers do not merge (a part without lse or of
  // another shape). Every target must know key_offset / total_keys (its
  // backends list the "key_offset" feature): a server that predates them
  // ignores the fields and computes each part as a whole sequence, which is
  // wrong with causal, windows or ALiBi.
  static absl::StatusOr<AttendResult> ShardedAttend(absl::Span<AttnClient* const> targets,
                                                    const AttentionRequest& request,
                                                    const CallOptions& call = {});

  // KV-cache sessions (see DecodeStep in convert.h). Synchronous calls block
  // until the answer or the deadline; `deadline` zero means the default.
  //
  // Opens a session. RESOURCE_EXHAUSTED when the server's cache cannot hold
  // one more block or it holds its maximum of sessions; INVALID_ARGUMENT for
  // bad dims or dtype, or a spec.model of another family than llama or
  // whose config disagrees with the dims set; NOT_FOUND for an unknown
  // spec.model.
  absl::StatusOr<CreatedSession> CreateSession(const SessionSpec& spec,
                                               absl::Duration deadline = absl::ZeroDuration());
  // One step: appends step.key/value to the session and attends step.query
  // over its whole cache (of step.layer). NOT_FOUND for an unknown, closed,
  // expired, evicted or foreign session; ABORTED while another step of the
  // session runs; RESOURCE_EXHAUSTED when the cache is full;
  // FAILED_PRECONDITION for a layer out of order or a stale
  // expected_context_tokens; INVALID_ARGUMENT naming hidden for a model
  // session's step without step.hidden or another's with it. A failed step
  // leaves the session's cache as it was, so it may be retried.
  absl::StatusOr<DecodeResult> Decode(const std::string& session_id, const DecodeStep& step,
                                      const CallOptions& call = {});
  // Same with a ready wire request.
  absl::StatusOr<v1::DecodeResponse> Decode(const v1::DecodeRequest& request,
                                            absl::Duration deadline = absl::ZeroDuration());
  using DecodeCallback = absl::AnyInvocable<void(absl::StatusOr<v1::DecodeResponse>) &&>;
  // Starts one Decode and returns at once; as AttendAsync (`request` borrowed
  // until `done` has run, which runs exactly once on a gRPC thread).
  void DecodeAsync(const v1::DecodeRequest& request, DecodeCallback done,
                   absl::Duration deadline = absl::ZeroDuration());
  // Frees the session's cache. NOT_FOUND as for Decode.
  absl::Status CloseSession(const std::string& session_id,
                            absl::Duration deadline = absl::ZeroDuration());
  // Opens a new session sharing the first `tokens` tokens of every layer of
  // `session_id` (full blocks shared, the partial one copied); it has the
  // parent's settings and continues at position `tokens`. NOT_FOUND as for
  // Decode; FAILED_PRECONDITION when tokens > the parent's length or the
  // parent has window_tokens (sinks sessions are not forked);
  // RESOURCE_EXHAUSTED when the cache is full.
  absl::StatusOr<ForkedSession> ForkSession(const std::string& session_id, int64_t tokens,
                                            absl::Duration deadline = absl::ZeroDuration());

  // One layer-step for many sessions in one call and one backend call. The
  // call's status covers the whole batch (deadline, cancellation, queue,
  // memory budget; then no cache changed); each entry succeeds or fails on
  // its own (unknown session, bad shape, out-of-order layer...), a failed
  // entry leaving its cache as it was. Entries must differ in session and
  // match in Hq, Hkv, D, Dv and query dtype.
  absl::StatusOr<v1::BatchDecodeResponse> BatchDecode(
      const v1::BatchDecodeRequest& request, absl::Duration deadline = absl::ZeroDuration());
  // Same from SessionSteps (see convert.h: the batch's options and lse are
  // the first step's): one result per step, in order, each the entry's
  // DecodeResult or its own error. The outer status is the call's, or
  // INVALID_ARGUMENT for steps that cannot share one request.
  absl::StatusOr<std::vector<absl::StatusOr<DecodeResult>>> BatchDecode(
      int32_t layer, const std::vector<SessionStep>& steps, const CallOptions& call = {});
  using BatchDecodeCallback =
      absl::AnyInvocable<void(absl::StatusOr<v1::BatchDecodeResponse>) &&>;
  // Starts one BatchDecode and returns at once; as DecodeAsync (`request`
  // borrowed until `done` has run, which runs exactly once on a gRPC thread).
  void BatchDecodeAsync(const v1::BatchDecodeRequest& request, BatchDecodeCallback done,
                        absl::Duration deadline = absl::ZeroDuration());

  // Opens an AttendStream (bidirectional; see attend_stream.h). Never blocks.
  // `deadline` bounds the whole stream; zero means none.
  std::unique_ptr<AttendStream> OpenStream(absl::Duration deadline = absl::ZeroDuration());

  const std::string& target() const { return target_; }

 private:
  AttnClient(std::string target, ClientOptions options, std::shared_ptr<grpc::Channel> channel);
  absl::Duration DeadlineOr(absl::Duration d) const;

  // Constant after construction.
  const std::string target_;
  const ClientOptions options_;
  const std::shared_ptr<grpc::Channel> channel_;
  const std::unique_ptr<v1::AttentionService::Stub> stub_;
  const std::unique_ptr<grpc::health::v1::Health::Stub> health_stub_;
  const std::shared_ptr<InFlightCounter> in_flight_ = std::make_shared<InFlightCounter>();
};

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_CLIENT_H_
