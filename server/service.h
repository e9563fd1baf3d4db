// AttentionServiceImpl: the gRPC adapter for attnserve.v1.AttentionService,
// on gRPC's callback API. It converts each request (convert.h), validates it
// (PrepareAttention), checks the server's limits and the backend's Supports,
// and submits it to the Scheduler; the scheduler's `done` callback writes the
// response and finishes the call. No attention logic lives here.
//
// AttendStream: many requests in flight on one stream (at most
// max_stream_inflight; past that the stream stops reading until a response is
// written), responses tagged with request_id in completion order. The first
// request that fails ends the stream: responses already computed are written,
// then the stream finishes with that request's status, its message starting
// with "request_id '<id>': ".
//
// Thread safety: RPC methods are called by gRPC on its threads; StartDrain()
// may be called from any thread. The service must outlive the grpc::Server
// it is registered with (shut that down first).
#ifndef ATTNSERVE_SERVER_SERVICE_H_
#define ATTNSERVE_SERVER_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "attention/job.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "backends/backend.h"
#include "core/memory_budget.h"
#include "kvcache/session_store.h"
#include "metrics/metrics.h"
#include "metrics/session_metrics.h"
#include "model/model.h"
#include "scheduler/scheduler.h"

namespace attnserve {

class ShardCoordinator;
class ShmTensorSource;
class SharedMemoryRegistry;
class TensorSource;

// Fills a response's timing; total_us runs from `received` to now.
void TimingToProto(const TaskTiming& timing, absl::Time received, v1::Timing* out);

// The values of a computed job's entropy tensor (F32); empty when it has none.
absl::Span<const float> EntropyValues(const Tensor& entropy);
// Forgets a computed job's entropy (a request sampled for
// --attention_stats_sample that did not ask for it): the response gets none.
void DropEntropy(AttentionJob& job);

// Attend takes gRPC's raw bytes (wire_request.h, wire_response.h); the other
// methods take parsed messages.
class AttentionServiceImpl final
    : public v1::AttentionService::WithRawCallbackMethod_Attend<
          v1::AttentionService::CallbackService> {
 public:
  struct Options {
    std::vector<Backend*> backends;  // not owned; backends[0] is the default
    Scheduler* scheduler = nullptr;  // not owned
    Metrics* metrics = nullptr;      // not owned
    RequestLimits limits;
    int64_t max_request_bytes = int64_t{64} << 20;  // reported in ServerInfo (gRPC enforces it)
    double max_request_flops = 0;                   // 0: no limit
    int32_t max_stream_inflight = 64;               // requests in flight per AttendStream
    // Not owned; every request reserves its bytes here before it is queued.
    // Null: no budget (tests).
    MemoryBudget* memory_budget = nullptr;
    SessionStore* sessions = nullptr;               // not owned; KV-cache sessions
    SessionMetrics* session_metrics = nullptr;      // not owned; null: not reported
    // The authenticated caller, to bind sessions to their creator; "" when
    // auth is off. Null: every caller is "".
    std::function<std::string(const grpc::ServerContextBase&)> caller_identity;
    // --attention_stats_sample: 1 in this many requests (Attend, AttendStream
    // items, Decode steps, BatchDecode entries, one count for all) computes
    // its attention entropy, asked for or not, into
    // attnserve_attention_entropy_nats. 0: off.
    int64_t attention_stats_sample = 0;
    // Models loaded with --model (not owned), for AttendLayer and model
    // sessions, by name.
    std::vector<const Model*> models;
    // PartialAttend's callers when authentication is on (auth_enabled): the
    // identities named here (--peer_callers); any caller when it is off.
    bool auth_enabled = false;
    std::vector<std::string> peer_callers;
    // Sessions split over replicas (CreateSession.shards); not owned. Null:
    // none.
    ShardCoordinator* shards = nullptr;
    std::string replica_id;  // for ServerInfo
    // Attend parses the tensors' bytes in place in gRPC's received slices and
    // hands the outputs' bytes to gRPC without a serialized copy
    // (wire_request.h, wire_response.h). false: protobuf parses and
    // serializes the whole messages, with copies (--zero_copy, a benchmark
    // knob).
    bool zero_copy = true;
    // Callers' shared-memory regions (RegisterSharedMemory, Tensor.shm);
    // not owned. Null: shared memory is off (--allow_shared_memory).
    SharedMemoryRegistry* shared_memory = nullptr;
  };

  // `options.backends` must not be empty; scheduler and metrics must be set.
  explicit AttentionServiceImpl(Options options);
  ~AttentionServiceImpl() override;

  // `request` is an AttendRequest's bytes; `response` receives an
  // AttendResponse's.
  grpc::ServerUnaryReactor* Attend(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;
  grpc::ServerBidiReactor<v1::AttendRequest, v1::AttendResponse>* AttendStream(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest* request,
                                          v1::ServerInfo* response) override;
  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* context,
                                          const v1::CreateSessionRequest* request,
                                          v1::CreateSessionResponse* response) override;
  grpc::ServerUnaryReactor* Decode(grpc::CallbackServerContext* context,
                                   const v1::DecodeRequest* request,
                                   v1::DecodeResponse* response) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* context,
                                         const v1::CloseSessionRequest* request,
                                         v1::CloseSessionResponse* response) override;
  grpc::ServerUnaryReactor* ForkSession(grpc::CallbackServerContext* context,
                                        const v1::ForkSessionRequest* request,
                                        v1::ForkSessionResponse* response) override;
  grpc::ServerUnaryReactor* BatchDecode(grpc::CallbackServerContext* context,
                                        const v1::BatchDecodeRequest* request,
                                        v1::BatchDecodeResponse* response) override;
  grpc::ServerBidiReactor<v1::BatchDecodeRequest, v1::BatchDecodeResponse>* BatchDecodeStream(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* PartialAttend(grpc::CallbackServerContext* context,
                                          const v1::BatchDecodeRequest* request,
                                          v1::BatchDecodeResponse* response) override;
  grpc::ServerUnaryReactor* AttendLayer(grpc::CallbackServerContext* context,
                                        const v1::AttendLayerRequest* request,
                                        v1::AttendLayerResponse* response) override;
  // Shared memory (shm_rpcs.cc): the caller's regions, in SharedMemoryRegistry.
  grpc::ServerUnaryReactor* RegisterSharedMemory(
      grpc::CallbackServerContext* context, const v1::RegisterSharedMemoryRequest* request,
      v1::RegisterSharedMemoryResponse* response) override;
  grpc::ServerUnaryReactor* UnregisterSharedMemory(
      grpc::CallbackServerContext* context, const v1::UnregisterSharedMemoryRequest* request,
      v1::UnregisterSharedMemoryResponse* response) override;

  // From now on new requests are answered UNAVAILABLE, and open streams finish
  // (UNAVAILABLE) once their in-flight requests are answered. Admitted work is
  // not touched: the scheduler's Drain finishes it. Idempotent; never blocks.
  void StartDrain();
  bool draining() const { return draining_.load(std::memory_order_acquire); }

 private:
  class StreamBase;
  template <typename Request, typename Response>
  class StreamReactor;
  class DecodeReactor;
  struct SessionStep;
  struct BatchDecodeCall;
  struct RotatedInputs;
  class ReceivedAttend;
  using AttendStreamReactor = StreamReactor<v1::AttendRequest, v1::AttendResponse>;
  using BatchDecodeStreamReactor = StreamReactor<v1::BatchDecodeRequest, v1::BatchDecodeResponse>;

  // RESOURCE_EXHAUSTED over --max_request_flops, else the backend's Supports().
  absl::Status CheckRunnable(const AttentionJob& job, const Backend& backend) const;

  // Reserves from the memory budget what the job will hold while queued,
  // computed and answered: `message_bytes` (the request as received, plus
  // `extra_bytes` of conversions the handler keeps), the outputs twice (the
  // response and gRPC's serialized copy of it), converted inputs and the
  // backend's scratch. RESOURCE_EXHAUSTED naming the budget.
  // A BatchDecode reserves for all its jobs at once.
  // `count_rejection` false: a refusal is not counted in
  // attnserve_rejected_requests_total (the caller retries with less).
  // `output_copies` 1: the outputs reach gRPC without a serialized copy
  // (wire_response.h).
  absl::StatusOr<MemoryBudget::Reservation> ReserveMemory(
      absl::Span<const AttentionJob* const> jobs, const Backend& backend, int64_t message_bytes,
      int64_t extra_bytes, bool count_rejection = true, int output_copies = 2);

  // Counts a refused request in attnserve_rejected_requests_total{reason}
  // when `status` is RESOURCE_EXHAUSTED; returns it.
  absl::Status CountRejection(absl::Status status, absl::string_view reason) const;

  // The backend `name` names; the default for "". NOT_FOUND lists the known ones.
  absl::StatusOr<Backend*> BackendFor(const std::string& name) const;
  // The checks every call to the scheduler starts with: UNAVAILABLE while
  // draining, the priority (0 or 1), then the backend `name` names.
  absl::StatusOr<Backend*> AdmissionBackend(const std::string& name, int32_t priority) const;
  // The model loaded as `name`; NOT_FOUND naming `field` and the loaded ones.
  absl::StatusOr<const Model*> ModelFor(const std::string& name, absl::string_view field) const;

  // Validates an AttendLayer and admits it to the scheduler with its
  // projections as the task's stage; as Submit otherwise (`shm` resolves
  // x, memory and outputs.output_shm). (layer_rpcs.cc)
  absl::Status SubmitLayer(const v1::AttendLayerRequest& request,
                           std::shared_ptr<ShmTensorSource> shm, absl::Time deadline,
                           std::function<bool()> is_cancelled, absl::Time received,
                           v1::AttendLayerResponse* response,
                           MemoryBudget::Reservation* reservation,
                           std::function<void(absl::Status)> done);

  // Validates a Decode, appends its K/V to the session and admits it to the
  // scheduler; the reactor is finished by the scheduler's done callback. On
  // error nothing was admitted and the session is as it was. (session_rpcs.cc)
  absl::Status SubmitDecode(grpc::CallbackServerContext* context, const v1::DecodeRequest& request,
                            v1::DecodeResponse* response, DecodeReactor* reactor,
                            absl::Time received);
  // The checks every session step call starts with: draining, sessions on,
  // the priority; then the backend it names. (session_rpcs.cc)
  absl::StatusOr<Backend*> StepBackend(const std::string& name, int32_t priority) const;
  // A session step's first checks: the wire tensors (query/key/value, or a
  // model session's hidden states, converted to F32), the session (pinned
  // into step->lease) and the layer. Errors name the field. (session_rpcs.cc)
  absl::Status BeginStep(const std::string& caller, const std::string& session_id, int32_t layer,
                         const v1::Tensor& query, const v1::Tensor& key, const v1::Tensor& value,
                         const v1::Tensor* hidden, SessionStep* step);
  // Model sessions' steps: their hidden states projected to q, k and v
  // (with the q/k norms), one matmul per projection for the steps of one
  // model layer; steps of plain sessions are left alone. (session_rpcs.cc)
  absl::Status ProjectSteps(absl::Span<SessionStep* const> steps);
  // After the attention: the output projections of model sessions' steps
  // (into step->y, in the hidden states' dtype), grouped as ProjectSteps.
  absl::Status FinishModelSteps(absl::Span<SessionStep* const> steps);
  // The rest of a step's checks, with nothing changed yet: the new K/V and
  // expected_context_tokens, the query converted (and with RoPE rotated),
  // and the job planned over the grown cache, with `sparsity` (null: dense;
  // borrowed until the step is answered); the backend's Supports.
  // Errors name the field. (session_rpcs.cc)
  absl::Status PlanStep(std::optional<int64_t> expected_context_tokens,
                        const AttentionOptions& options, const v1::OutputSpec& outputs,
                        const v1::Sparsity* sparsity, const Backend& backend, SessionStep* step);
  // Drops `layer`'s tokens past `tokens` (BatchDecodeEntry.truncate_to);
  // context_tokens into `result`. Errors name the field. (session_rpcs.cc)
  // Refused (FAILED_PRECONDITION) unless the layer holds `expected` tokens,
  // when given.
  absl::Status TruncateLayer(const std::string& caller, const std::string& session_id,
                             int32_t layer, int64_t tokens, std::optional<int64_t> expected,
                             v1::BatchDecodeResult* result);
  // The step's output_shm resolved for its answer's bytes (and the job
  // pointed at it when the kernel can write the answer in place).
  // INVALID_ARGUMENT naming the field. (session_rpcs.cc)
  absl::Status PlanStepOutput(SessionStep* step);
  // Appends the planned step's K/V and plans its job over the cache.
  absl::Status AppendStep(SessionStep* step);
  // A computed step's entropy into attnserve_attention_entropy_nats{layer}
  // when it was sampled, then dropped unless asked for. (session_rpcs.cc)
  void RecordStepEntropy(const SessionStep& step, AttentionJob& job);
  // Validates a BatchDecode, plans and appends its good entries and admits
  // them to the scheduler as one gang; as Submit otherwise (`done` runs once,
  // after `response` was filled, when this returns OK). (session_rpcs.cc)
  absl::Status SubmitBatchDecode(const std::string& caller, const v1::BatchDecodeRequest& request,
                                 absl::Time deadline, std::function<bool()> is_cancelled,
                                 absl::Time received, v1::BatchDecodeResponse* response,
                                 MemoryBudget::Reservation* reservation,
                                 std::function<void(absl::Status)> done, bool partial = false);
  void ReportSessions();
  // A session call answered at once (CreateSession, ForkSession,
  // CloseSession): counts it, runs `body` unless sessions are disabled (an
  // exception becomes a status), reports the cache and finishes the call.
  // (session_rpcs.cc)
  grpc::ServerUnaryReactor* AnswerSessionCall(grpc::CallbackServerContext* context,
                                              const char* method,
                                              const std::function<absl::Status()>& body);
  std::string CallerOf(const grpc::CallbackServerContext* context) const;
  // A call's shared-memory source for `caller` (Tensor.shm, output_shm);
  // one that refuses every reference when shared memory is off. (shm_rpcs.cc)
  std::shared_ptr<ShmTensorSource> ShmSourceFor(const std::string& caller) const;

  // Validates `request` and admits it to the scheduler. OK: `done` will be
  // called exactly once, on a scheduler thread, after `response` was filled
  // (only when the status is OK). Errors (done is not called): UNAVAILABLE
  // (draining), NOT_FOUND (backend), INVALID_ARGUMENT, RESOURCE_EXHAUSTED
  // (limits, full queue), UNIMPLEMENTED (the backend cannot run it).
  // `request` must stay alive until `done` runs; `is_cancelled` may be polled
  // until then. `*reservation` receives the request's bytes from the memory
  // budget (before it is queued); keep it until the response is sent.
  // `source` finds tensor bytes outside their `data` (null: `shm` does);
  // `shm` is the call's shared memory: where outputs.output_shm is, and
  // checked after the computation (a region truncated meanwhile fails the
  // call, FAILED_PRECONDITION); held until `done` runs. Null: as with
  // shared memory off.
  // `held` says how the call holds its request and will send its response.
  struct HeldBytes {
    // The request's bytes as the call holds them (received slices and the
    // copies made of them); -1: request.ByteSizeLong(), a message parsed by
    // gRPC.
    int64_t request = -1;
    // The response's tensors go to gRPC without a serialized copy
    // (SerializeAttendResponse), so the outputs count once.
    bool outputs_once = false;
  };
  absl::Status Submit(const v1::AttendRequest& request, const TensorSource* source,
                      std::shared_ptr<ShmTensorSource> shm, HeldBytes held, absl::Time deadline,
                      std::function<bool()> is_cancelled, absl::Time received,
                      v1::AttendResponse* response, MemoryBudget::Reservation* reservation,
                      std::function<void(absl::Status)> done);

  // RoPE on a stateless Attend: rotated copies of the query and key (at the
  // request's positions, see the proto) that `core` is pointed at. `job` is
  // the request planned unrotated (its dims). INVALID_ARGUMENT naming the field.
  absl::StatusOr<std::shared_ptr<RotatedInputs>> RotateInputs(const v1::AttendRequest& request,
                                                              const AttentionJob& job,
                                                              AttentionRequest* core);

  // Whether the next request is one of the 1 in attention_stats_sample whose
  // entropy is recorded (counts it; false when sampling is off).
  bool SampleStats();
  // `core` planned with outputs.entropy for a sampled request that did not
  // ask for it; null (and `core` as it was) when that plan does not run:
  // over a limit, a variant without entropy, or a backend that cannot
  // compute it (cuda). The request is then served unsampled, never refused.
  std::unique_ptr<AttentionJob> PlanSampled(AttentionRequest& core, const Backend& backend) const;

  // A unary call that goes through the scheduler (Attend, AttendLayer):
  // `submit` admits it (as Submit, with the call's deadline, cancellation,
  // receive time and reservation) and its `done` finishes the call; an
  // admission error finishes it at once.
  using AdmitFn = std::function<absl::Status(
      absl::Time deadline, std::function<bool()> is_cancelled, absl::Time received,
      MemoryBudget::Reservation* reservation, std::function<void(absl::Status)> done)>;
  grpc::ServerUnaryReactor* ScheduleUnary(grpc::CallbackServerContext* context,
                                          const char* method, const AdmitFn& submit);

  // Records the call in the metrics and finishes it.
  void FinishUnary(grpc::ServerUnaryReactor* reactor, const char* method, absl::Time received,
                   const absl::Status& status);

  void AddStream(StreamBase* stream);
  void RemoveStream(StreamBase* stream);

  // Constant after construction.
  const Options options_;
  absl::flat_hash_map<std::string, Backend*> backends_by_name_;

  std::atomic<bool> draining_{false};
  std::atomic<uint64_t> stats_requests_{0};  // requests counted by SampleStats

  absl::Mutex streams_mu_;
  absl::flat_hash_set<StreamBase*> streams_ ABSL_GUARDED_BY(streams_mu_);
};

}  // namespace attnserve

#endif  // ATTNSERVE_SERVER_SERVICE_H_
