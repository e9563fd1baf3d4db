// The KV-cache session RPCs of AttentionServiceImpl: CreateSession,
// ForkSession, Decode, BatchDecode (its stream form is in service.cc) and
// CloseSession. A step pins its session (SessionLease), appends the new K/V
// to one layer, and goes through the same scheduler as Attend: Decode steps
// of many sessions are batched into one backend call, and a BatchDecode's
// entries always run in one. A step that fails for any reason leaves the
// session's cache as it was (SessionLease::Rollback), so a client may simply
// retry.
#include <algorithm>
#include <cstring>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/errors.h"
#include "core/half.h"
#include "model/layer.h"
#include "server/call_context.h"
#include "server/convert.h"
#include "server/service.h"
#include "server/shards.h"
#include "server/shm_source.h"

namespace attnserve {
namespace {

constexpr char kCreateSession[] = "CreateSession";
constexpr char kForkSession[] = "ForkSession";
constexpr char kDecode[] = "Decode";
constexpr char kBatchDecode[] = "BatchDecode";
constexpr char kPartialAttend[] = "PartialAttend";
constexpr char kCloseSession[] = "CloseSession";

// Entries of one BatchDecode; past it, INVALID_ARGUMENT (the memory budget
// and the cost limit bound a call further).
constexpr int kMaxBatchEntries = 4096;
// Query heads of a rotated session step.
constexpr int64_t kMaxHeads = 1 << 16;

absl::Status SessionsDisabled() {
  return absl::UnimplementedError("sessions are disabled on this server");
}

// `status` with its message prefixed by `prefix` (an entry's name).
absl::Status Prefixed(absl::string_view prefix, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

// A sparse pattern on a step of a session split over replicas: each shard
// holds only a range of the keys, so a pattern over the whole cache cannot be
// applied there; it is refused rather than ignored. OK for an empty one.
absl::Status SplitSessionSparsity(absl::string_view field, const v1::Sparsity& sparsity) {
  std::vector<std::string> parts;
  if (sparsity.has_block_mask()) parts.push_back("block_mask");
  if (sparsity.has_key_indices()) parts.push_back("key_indices");
  if (sparsity.global_tokens_size() > 0) parts.push_back("global_tokens");
  if (sparsity.sink_logits_size() > 0) parts.push_back("sink_logits");
  if (parts.empty()) return absl::OkStatus();
  return InvalidField(field, "unset for a session split over replicas (shards)",
                      absl::StrJoin(parts, ", "));
}

// Shared memory on a step of a session split over replicas: its tensors go
// to the peers as they are, and a peer cannot read the caller's regions.
absl::Status SplitSessionShm(absl::string_view prefix, const v1::Tensor& query,
                             const v1::Tensor& key, const v1::Tensor& value, bool output_shm) {
  for (auto [t, name] : {std::pair{&query, "query"}, std::pair{&key, "key"},
                         std::pair{&value, "value"}}) {
    if (t->has_shm()) {
      return InvalidField(absl::StrCat(prefix, name, ".shm"),
                          "inline data for a session split over replicas (shards)",
                          absl::StrCat("shared-memory region '", t->shm().region(), "'"));
    }
  }
  if (output_shm) {
    return InvalidField(absl::StrCat(prefix, "output_shm"),
                        "unset for a session split over replicas (shards)", "a region");
  }
  return absl::OkStatus();
}

// Calls fn(model, layer, group) for each group of `steps` that are model
// sessions' steps of one model and layer (in the steps' order), until one
// returns an error.
template <typename Step, typename Fn>
absl::Status ForEachModelLayer(absl::Span<Step* const> steps, Fn fn) {
  std::vector<bool> done(steps.size(), false);
  for (size_t i = 0; i < steps.size(); ++i) {
    if (done[i] || steps[i]->model == nullptr) continue;
    std::vector<Step*> group;
    for (size_t j = i; j < steps.size(); ++j) {
      if (!done[j] && steps[j]->model == steps[i]->model && steps[j]->layer == steps[i]->layer) {
        group.push_back(steps[j]);
        done[j] = true;
      }
    }
    if (absl::Status s = fn(*steps[i]->model, steps[i]->layer, group); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// The options of a session step (Decode or BatchDecode): softmax, causal
// with bottom-right alignment, lse and entropy the only optional outputs.
absl::StatusOr<AttentionOptions> StepOptions(const v1::AttentionOptions& proto,
                                             const v1::OutputSpec& outputs) {
  absl::StatusOr<AttentionOptions> options = OptionsFromProto(proto);
  if (!options.ok()) return options.status();
  if (options->variant != Variant::kSoftmax) {
    return InvalidField("options.variant", "SOFTMAX for a session step", "LINEAR");
  }
  if (options->causal_alignment != CausalAlignment::kBottomRight) {
    return InvalidField("options.causal_alignment",
                        "BOTTOM_RIGHT for a session step (new tokens follow the cache)",
                        "TOP_LEFT");
  }
  if (options->window_right > 0) {
    return InvalidField("options.window_right", "unset, -1 or 0 for a session step (it is causal)",
                        absl::StrCat(options->window_right));
  }
  if (outputs.weights()) return InvalidField("outputs.weights", "false for a session step", "true");
  if (outputs.top_k() != 0) {
    return InvalidField("outputs.top_k", "0 for a session step", absl::StrCat(outputs.top_k()));
  }
  options->causal = true;
  return options;
}

}  // namespace

// A model session's config from its model; the fields the request sets must
// agree with it.
static absl::Status ModelSessionConfig(const Model& model, const v1::CreateSessionRequest& request,
                                SessionConfig* config) {
  const ModelConfig& c = model.config();
  if (c.family != ModelFamily::kLlama) {
    return InvalidField(
        "model",
        "a decoder (llama family) model for a session: its steps append to a causal "
        "cache",
        absl::StrCat(model.name(), " (", ModelFamilyName(c.family), " family)"));
  }
  auto agree = [&](const char* field, int64_t given, int64_t want) -> absl::Status {
    if (given == 0 || given == want) return absl::OkStatus();
    return InvalidField(field, absl::StrCat("unset or ", want, " (model ", model.name(), ")"),
                        absl::StrCat(given));
  };
  for (const absl::Status& s :
       {agree("num_kv_heads", request.num_kv_heads(), c.num_kv_heads),
        agree("head_dim", request.head_dim(), c.head_dim),
        agree("value_dim", request.value_dim(), c.head_dim),
        agree("num_layers", request.num_layers(), c.num_layers)}) {
    if (!s.ok()) return s;
  }
  if (request.has_rotary()) {
    return InvalidField("rotary",
                        absl::StrCat("unset: model ", model.name(), "'s config sets RoPE"),
                        "rotary settings");
  }
  config->model = model.name();
  config->num_kv_heads = c.num_kv_heads;
  config->head_dim = c.head_dim;
  config->value_dim = c.head_dim;
  config->num_layers = c.num_layers;
  config->rope = c.rope;
  return absl::OkStatus();
}

// One session step, from its checks to its answer: the pinned session, the
// query as the kernel reads it, and the job.
struct AttentionServiceImpl::SessionStep {
  // The step's shared memory: where its tensors' shm references point, and
  // where its output goes when output_shm is set. Declared first: the job
  // may read the regions until it is dropped.
  std::shared_ptr<ShmTensorSource> shm;
  const v1::SharedMemoryRef* output_shm = nullptr;  // borrowed from the request
  const char* output_shm_field = "outputs.output_shm";  // for errors
  // output_shm resolved (PlanStep). The kernel writes there itself when the
  // job's output is the answer (job->output_target); a model session's y and
  // an output converted to the query's dtype are copied there.
  char* output_target = nullptr;
  std::optional<SessionLease> lease;
  int32_t layer = 0;
  TensorView query;
  TensorView key;
  TensorView value;
  // A model session's step (CreateSession.model): the hidden states in F32,
  // their projections (the views above point at them), and after the
  // attention the layer's output y in the hidden states' dtype and rank.
  // false: the step only attends (no key/value given).
  bool append = true;
  // The cache as a shard of a longer sequence (BatchDecodeEntry).
  int64_t key_offset = 0;
  int64_t total_keys = 0;
  const Model* model = nullptr;
  DType hidden_dtype = DType::kF32;
  std::vector<int64_t> hidden_shape;
  std::vector<float> hidden;  // [T, hidden]
  Tensor projected[3];        // q [T, Hq, D], k and v [T, Hkv, D], F32
  Tensor y;
  DType query_dtype = DType::kF32;
  std::string query_storage;  // the query converted to the cache dtype and/or rotated
  AttentionRequest core;
  // Planned over the cache as it will be (PlanStep), then over the cache
  // after the append (AppendStep).
  std::unique_ptr<AttentionJob> job;
  int64_t extra_bytes = 0;  // held besides the job: query copy, rotated keys, output conversion
  bool appended = false;
  // --attention_stats_sample: the step's entropy goes to
  // attnserve_attention_entropy_nats{layer}; the answer carries it only when
  // the caller asked for it.
  bool record_entropy = false;
  bool return_entropy = false;
  // The job as asked, while a sampled one (with entropy) stands in for it
  // until its memory is reserved (see Unsample).
  std::unique_ptr<AttentionJob> unsampled;

  // Puts back the job as asked when sampling stood in one with entropy (no
  // room for the entropy too); false when it had not.
  bool Unsample() {
    if (unsampled == nullptr) return false;
    job = std::move(unsampled);
    core.outputs.entropy = false;
    record_entropy = false;
    return true;
  }

  SessionStep() = default;
  SessionStep(SessionStep&&) = default;
  // A step dropped without being kept (appended = false after its answer)
  // is undone: nothing half-appended survives.
  ~SessionStep() { Abandon(); }

  // Undoes the append (if any) and unpins the session.
  void Abandon() {
    if (lease.has_value() && appended) lease->Rollback();
    job.reset();  // it points into the session's blocks: drop it before the lease
    lease.reset();
    appended = false;
  }
};

// One Decode call: its step, released before the call finishes so the
// client's next step on the session is not refused.
class AttentionServiceImpl::DecodeReactor final : public CancellableUnaryReactor {
 public:
  explicit DecodeReactor(Metrics* metrics) : CancellableUnaryReactor(metrics, kDecode) {}
  SessionStep step;
};

// One BatchDecode message: a step per entry, and each entry's status.
struct AttentionServiceImpl::BatchDecodeCall {
  std::vector<SessionStep> steps;
  std::vector<absl::Status> status;
};

std::string AttentionServiceImpl::CallerOf(const grpc::CallbackServerContext* context) const {
  return options_.caller_identity ? options_.caller_identity(*context) : std::string();
}

void AttentionServiceImpl::ReportSessions() {
  if (options_.session_metrics != nullptr && options_.sessions != nullptr) {
    options_.session_metrics->Update(options_.sessions->stats());
  }
}

grpc::ServerUnaryReactor* AttentionServiceImpl::CreateSession(
    grpc::CallbackServerContext* context, const v1::CreateSessionRequest* request,
    v1::CreateSessionResponse* response) {
  return AnswerSessionCall(context, kCreateSession, [&]() -> absl::Status {
    if (draining()) return Draining();
    SessionConfig config;
    config.num_kv_heads = request->num_kv_heads();
    config.head_dim = request->head_dim();
    config.value_dim = request->value_dim();
    config.max_tokens = request->max_tokens();
    config.num_layers = request->num_layers();
    config.sink_tokens = request->sink_tokens();
    config.window_tokens = request->window_tokens();
    if (request->dtype() != v1::DTYPE_UNSPECIFIED) {
      absl::StatusOr<DType> dtype = RequestDTypeFromProto(request->dtype(), "dtype");
      if (!dtype.ok()) return dtype.status();
      config.dtype = *dtype;
    }
    if (request->has_rotary()) {
      absl::StatusOr<RopeConfig> rope = RopeFromProto(request->rotary());
      if (!rope.ok()) return rope.status();
      config.rope = *rope;
    }
    if (request->shards() != 0) {
      if (request->shards() < 0) {
        return InvalidField("shards", "0 (one replica) or more", absl::StrCat(request->shards()));
      }
      if (options_.shards == nullptr) {
        return absl::FailedPreconditionError("shards: this server splits no sessions (no --peers)");
      }
      if (!request->model().empty()) {
        return InvalidField("model", "unset for a session split over replicas (shards)",
                            request->model());
      }
    }
    if (!request->model().empty()) {
      absl::StatusOr<const Model*> model = ModelFor(request->model(), "model");
      if (!model.ok()) return model.status();
      if (absl::Status s = ModelSessionConfig(**model, *request, &config); !s.ok()) return s;
    }
    std::string session_id;
    int64_t capacity = 0;
    if (request->shards() != 0) {
      absl::StatusOr<ShardCoordinator::Created> created =
          options_.shards->Create(*request, CallerOf(context));
      if (!created.ok()) return created.status();
      session_id = created->session_id;
      capacity = created->capacity_tokens;
    } else {
      absl::StatusOr<SessionStore::Created> created =
          options_.sessions->CreateSession(config, CallerOf(context));
      if (!created.ok()) return created.status();
      session_id = created->session_id;
      capacity = created->capacity_tokens;
    }
    response->set_session_id(session_id);
    response->set_capacity_tokens(capacity);
    response->set_block_tokens(options_.sessions->options().block_tokens);
    response->set_num_layers(config.num_layers == 0 ? 1 : config.num_layers);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* AttentionServiceImpl::ForkSession(
    grpc::CallbackServerContext* context, const v1::ForkSessionRequest* request,
    v1::ForkSessionResponse* response) {
  return AnswerSessionCall(context, kForkSession, [&]() -> absl::Status {
    if (draining()) return Draining();
    if (options_.shards != nullptr && options_.shards->Owns(request->session_id())) {
      return InvalidField("session_id", "a session held by this replica alone",
                          "a session split over replicas (shards)");
    }
    absl::StatusOr<SessionStore::Forked> forked =
        options_.sessions->Fork(request->session_id(), request->tokens(), CallerOf(context));
    if (!forked.ok()) return forked.status();
    response->set_session_id(forked->session_id);
    response->set_context_tokens(request->tokens());
    response->set_shared_tokens(forked->shared_tokens);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* AttentionServiceImpl::CloseSession(
    grpc::CallbackServerContext* context, const v1::CloseSessionRequest* request,
    v1::CloseSessionResponse* /*response*/) {
  // Closing stays allowed while draining: it only frees memory.
  return AnswerSessionCall(context, kCloseSession, [&] {
    if (options_.shards != nullptr && options_.shards->Owns(request->session_id())) {
      return options_.shards->Close(request->session_id(), CallerOf(context));
    }
    return options_.sessions->Close(request->session_id(), CallerOf(context));
  });
}

grpc::ServerUnaryReactor* AttentionServiceImpl::AnswerSessionCall(
    grpc::CallbackServerContext* context, const char* method,
    const std::function<absl::Status()>& body) {
  const absl::Time received = absl::Now();
  options_.metrics->RequestStarted();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Status status =
      options_.sessions == nullptr ? SessionsDisabled() : AdmitNoThrow(body);
  ReportSessions();
  FinishUnary(reactor, method, received, status);
  return reactor;
}

absl::StatusOr<Backend*> AttentionServiceImpl::StepBackend(const std::string& name,
                                                          int32_t priority) const {
  if (draining()) return Draining();
  if (options_.sessions == nullptr) return SessionsDisabled();
  return AdmissionBackend(name, priority);
}

absl::Status AttentionServiceImpl::BeginStep(const std::string& caller,
                                             const std::string& session_id, int32_t layer,
                                             const v1::Tensor& query_proto,
                                             const v1::Tensor& key_proto,
                                             const v1::Tensor& value_proto,
                                             const v1::Tensor* hidden_proto, SessionStep* step) {
  // Wire checks that need no session first.
  if (hidden_proto != nullptr) {
    for (auto [t, field] : {std::pair{&query_proto, "query"}, std::pair{&key_proto, "key"},
                            std::pair{&value_proto, "value"}}) {
      if (t->ByteSizeLong() != 0) {
        return InvalidField(field, "unset with hidden (the server projects it)", "a tensor");
      }
    }
  }
  // Reported after the session is known: a model session's step is told it
  // needs hidden states rather than which of q/k/v is malformed.
  absl::Status views;
  if (hidden_proto == nullptr) {
    step->append = key_proto.ByteSizeLong() != 0 || value_proto.ByteSizeLong() != 0;
    for (auto [t, field, view] : {std::tuple{&query_proto, "query", &step->query},
                                  std::tuple{&key_proto, "key", &step->key},
                                  std::tuple{&value_proto, "value", &step->value}}) {
      if (!step->append && view != &step->query) continue;
      absl::StatusOr<TensorView> v = ViewFromProto(*t, field, step->shm.get());
      if (!v.ok()) {
        views = v.status();
        break;
      }
      *view = *std::move(v);
    }
  }

  absl::StatusOr<SessionLease> lease = options_.sessions->Acquire(session_id, caller);
  if (!lease.ok()) return lease.status();
  step->lease.emplace(*std::move(lease));
  const SessionConfig& config = step->lease->config();
  if (layer < 0 || layer >= config.num_layers) {
    return InvalidField("layer",
                        absl::StrCat("a value in [0, ", config.num_layers, ") (num_layers)"),
                        absl::StrCat(layer));
  }
  step->layer = layer;
  if (config.model.empty()) {
    if (hidden_proto != nullptr) {
      return InvalidField("hidden", "unset: the session has no model (CreateSession.model)",
                          "hidden states");
    }
    return views;
  }
  if (hidden_proto == nullptr) {
    return InvalidField("hidden",
                        absl::StrCat("the hidden states [T, hidden] of a step of model ",
                                     config.model, " (not query/key/value)"),
                        "none");
  }
  absl::StatusOr<const Model*> model = ModelFor(config.model, "model");
  if (!model.ok()) return model.status();
  step->model = *model;
  absl::StatusOr<TensorView> hidden = ViewFromProto(*hidden_proto, "hidden", step->shm.get());
  if (!hidden.ok()) return hidden.status();
  const int32_t width = (*model)->config().hidden_size;
  std::vector<int64_t> s = hidden->shape;
  if (s.size() == 3 && s[0] == 1) s.erase(s.begin());
  if (s.size() != 2 || s[0] < 1 || s[1] != width) {
    return InvalidField("hidden.shape",
                        absl::StrCat("[T >= 1, ", width, "] (or [1, T, ", width,
                                     "]: the hidden size of model ", config.model, ")"),
                        ShapeString(hidden->shape));
  }
  const int64_t bytes = s[0] * width * int64_t(DTypeSize(hidden->dtype));
  if (static_cast<int64_t>(hidden->data.size()) != bytes) {
    return InvalidField("hidden.data",
                        absl::StrCat(bytes, " bytes for shape ", ShapeString(hidden->shape)),
                        absl::StrCat(hidden->data.size(), " bytes"));
  }
  step->hidden_dtype = hidden->dtype;
  step->hidden_shape = hidden->shape;
  step->hidden.resize(static_cast<size_t>(s[0] * width));
  ConvertFloats(hidden->data.data(), hidden->dtype, step->hidden.data(), DType::kF32,
                s[0] * width);
  return absl::OkStatus();
}

absl::Status AttentionServiceImpl::ProjectSteps(absl::Span<SessionStep* const> steps) {
  // One matmul per projection for the steps of one model layer.
  return ForEachModelLayer(steps, [](const Model& model, int32_t layer,
                                     const std::vector<SessionStep*>& group) -> absl::Status {
    const ModelConfig& c = model.config();
    const int64_t hidden = c.hidden_size, q_width = int64_t{c.num_heads} * c.head_dim,
                  kv_width = int64_t{c.num_kv_heads} * c.head_dim;
    int64_t rows = 0;
    for (SessionStep* step : group) rows += static_cast<int64_t>(step->hidden.size()) / hidden;
    std::vector<float> x;
    const float* in = group[0]->hidden.data();
    if (group.size() > 1) {
      x.reserve(static_cast<size_t>(rows * hidden));
      for (SessionStep* step : group) x.insert(x.end(), step->hidden.begin(), step->hidden.end());
      in = x.data();
    }
    std::vector<float> q(static_cast<size_t>(rows * q_width));
    std::vector<float> k(static_cast<size_t>(rows * kv_width));
    std::vector<float> v(static_cast<size_t>(rows * kv_width));
    const AttentionWeights& w = WeightsOf(model, layer, /*cross=*/false);
    if (absl::Status s = ProjectQuery(model, w, in, rows, q.data()); !s.ok()) return s;
    if (absl::Status s = ProjectKeyValue(model, w, in, rows, k.data(), v.data()); !s.ok()) {
      return s;
    }
    int64_t at = 0;
    for (SessionStep* step : group) {
      const int64_t t = static_cast<int64_t>(step->hidden.size()) / hidden;
      const int64_t heads[3] = {c.num_heads, c.num_kv_heads, c.num_kv_heads};
      const float* from[3] = {q.data() + at * q_width, k.data() + at * kv_width,
                              v.data() + at * kv_width};
      TensorView* views[3] = {&step->query, &step->key, &step->value};
      for (int n = 0; n < 3; ++n) {
        step->projected[n] = Tensor::Zeros(DType::kF32, {t, heads[n], c.head_dim});
        std::memcpy(step->projected[n].data.data(), from[n], step->projected[n].data.size());
        *views[n] = step->projected[n].view();
      }
      at += t;
    }
    return absl::OkStatus();
  });
}

absl::Status AttentionServiceImpl::FinishModelSteps(absl::Span<SessionStep* const> steps) {
  return ForEachModelLayer(steps, [](const Model& model, int32_t layer,
                                     const std::vector<SessionStep*>& group) -> absl::Status {
    const ModelConfig& c = model.config();
    const int64_t hidden = c.hidden_size, width = int64_t{c.num_heads} * c.head_dim;
    std::vector<float> attn;
    int64_t rows = 0;
    for (SessionStep* step : group) {
      const Tensor& out = step->job->output;  // in the cache's dtype
      const int64_t n = out.num_elements();
      attn.resize(attn.size() + static_cast<size_t>(n));
      ConvertFloats(out.data.data(), out.dtype, attn.data() + attn.size() - n, DType::kF32, n);
      rows += n / width;
    }
    std::vector<float> y(static_cast<size_t>(rows * hidden));
    if (absl::Status s = ProjectOutput(WeightsOf(model, layer, false), attn.data(), rows, y.data());
        !s.ok()) {
      return s;
    }
    const float* from = y.data();
    for (SessionStep* step : group) {
      step->y = Tensor::Zeros(step->hidden_dtype, step->hidden_shape);
      const int64_t n = step->y.num_elements();
      ConvertFloats(from, DType::kF32, step->y.data.data(), step->hidden_dtype, n);
      from += n;
    }
    return absl::OkStatus();
  });
}

absl::Status AttentionServiceImpl::PlanStep(std::optional<int64_t> expected_context_tokens,
                                            const AttentionOptions& options,
                                            const v1::OutputSpec& outputs,
                                            const v1::Sparsity* sparsity,
                                            const Backend& backend, SessionStep* step) {
  const TensorView* query = &step->query;
  const int64_t q_count = CheckedElementCount(query->shape, int64_t{1} << 40);
  if (q_count < 0 ||
      static_cast<int64_t>(query->data.size()) != q_count * int64_t(DTypeSize(query->dtype))) {
    return InvalidField("query.data",
                        absl::StrCat(q_count < 0 ? 0 : q_count * int64_t(DTypeSize(query->dtype)),
                                     " bytes for shape ", ShapeString(query->shape)),
                        absl::StrCat(query->data.size(), " bytes"));
  }
  SessionLease& session = *step->lease;
  const SessionConfig& config = session.config();
  const int32_t layer = step->layer;
  const TensorView* key = &step->key;
  const TensorView* value = &step->value;
  step->query_dtype = query->dtype;
  if (step->model != nullptr) {
    // The hidden states, their projections and the layer's output.
    const ModelConfig& c = step->model->config();
    const int64_t t = static_cast<int64_t>(step->hidden.size()) / c.hidden_size;
    step->extra_bytes +=
        static_cast<int64_t>(step->hidden.size() * sizeof(float)) +
        t * (int64_t{c.num_heads} + 2 * c.num_kv_heads) * c.head_dim * 4 +
        t * c.hidden_size * (4 + int64_t(DTypeSize(step->hidden_dtype)));
  }
  if (expected_context_tokens.has_value() && *expected_context_tokens != session.length(layer)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "expected_context_tokens: layer ", layer, " of the session holds ", session.length(layer),
        " tokens, the request expected ", *expected_context_tokens));
  }
  // Everything is checked before the cache changes: the layer, the new
  // tokens' shapes, the step's options against the grown cache and the
  // backend. Only then does Append touch the cache (and, under lru_idle,
  // other sessions).
  absl::StatusOr<int64_t> new_tokens =
      step->append ? session.CheckAppend(layer, *key, *value) : absl::StatusOr<int64_t>(0);
  if (!new_tokens.ok()) return new_tokens.status();
  if (*new_tokens == 0 && session.length(layer) == 0) {
    return InvalidField(
        "key",
        absl::StrCat("new tokens: layer ", layer, " of the session holds none to attend over"),
        "none");
  }

  const DType cache_dtype = config.dtype;
  step->core.query = *query;
  if (config.rope.has_value()) {
    // Query token i sits at the position of new token i + n - Lq (the
    // queries end with the new tokens, as the causal alignment has it).
    // The shape is checked here, before the rotation reads it (PlanAttention
    // checks the rest): Lq >= 1, a multiple of Hkv heads, head_dim.
    std::vector<int64_t> s = query->shape;
    if (s.size() == 4 && s[0] == 1) s.erase(s.begin());
    if (s.size() != 3 || s[0] < 1 || s[1] < 1 || s[1] % config.num_kv_heads != 0 ||
        s[1] > kMaxHeads || s[2] != config.head_dim) {
      return InvalidField(
          "query.shape",
          absl::StrCat("[Lq >= 1, Hq (a multiple of ", config.num_kv_heads, ", <= ", kMaxHeads,
                       "), ", config.head_dim, "] (or with a leading batch of 1)"),
          ShapeString(query->shape));
    }
    const int64_t lq = s[0];  // <= the query's bytes: its data size matched its shape
    const int64_t last = session.position(layer) + *new_tokens - 1;
    std::vector<int64_t> positions(lq);
    for (int64_t i = 0; i < lq; ++i) positions[i] = std::max<int64_t>(0, last - (lq - 1 - i));
    if (absl::Status st = RotatedCopy(*config.rope, *query, static_cast<int32_t>(s[1]),
                                      config.head_dim, positions, last, cache_dtype,
                                      &step->query_storage);
        !st.ok()) {
      return st;
    }
    step->extra_bytes += *new_tokens * config.num_kv_heads * config.head_dim * int64_t{4};
  } else if (query->dtype != cache_dtype) {
    try {
      step->query_storage.assign(q_count * DTypeSize(cache_dtype), '\0');
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError("out of memory converting the query to the cache dtype");
    }
    ConvertFloats(query->data.data(), query->dtype, step->query_storage.data(), cache_dtype,
                  q_count);
  }
  if (!step->query_storage.empty()) {
    step->core.query.dtype = cache_dtype;
    step->core.query.data = step->query_storage;
  }
  step->core.options = options;
  if (step->model != nullptr && step->model->config().sliding_window > 0 &&
      options.window_left < 0) {
    // Mistral's sliding window, as AttendLayer applies it.
    step->core.options.window_left = step->model->config().sliding_window - 1;
  }
  step->core.outputs.lse = outputs.lse();
  step->core.outputs.entropy = outputs.entropy();
  step->core.key_offset = step->key_offset;
  step->core.total_keys = step->total_keys;
  if (sparsity != nullptr) {
    // Over the cache after the append: Lk is its tokens, key positions
    // count from its first token. A sinks window that moves on the append
    // has the pattern checked again over the cache as kept (AppendStep).
    absl::StatusOr<SparsitySpec> spec = SparsityFromProto(*sparsity, step->shm.get());
    if (!spec.ok()) return spec.status();
    step->core.sparsity = *std::move(spec);
  }
  // The step as it will run, over the cache grown by the new tokens; the
  // blocks are not read here, so the current ones stand in for them.
  static const void* const kNoBlocks[1] = {nullptr};
  PagedKvView grown = session.View(layer);
  grown.length += *new_tokens;
  if (grown.blocks == nullptr) grown.blocks = kNoBlocks;
  step->core.paged_kv = grown;
  absl::StatusOr<std::unique_ptr<AttentionJob>> planned =
      PlanAttention(step->core, options_.limits);
  if (!planned.ok()) return CountRejection(planned.status(), "size");
  step->job = *std::move(planned);
  if (absl::Status s = backend.Supports(step->job->planned_params()); !s.ok()) return s;
  // Sampled for --attention_stats_sample: computed with its entropy, as in
  // Submit (a backend that cannot compute it runs the step unsampled).
  step->return_entropy = outputs.entropy();
  if (SampleStats()) {
    if (outputs.entropy()) {
      step->record_entropy = true;
    } else if (std::unique_ptr<AttentionJob> sampled = PlanSampled(step->core, backend)) {
      step->unsampled = std::exchange(step->job, std::move(sampled));
      step->record_entropy = true;
    }
  }
  // Held besides the job: the converted query, and the output converted
  // back to the query's dtype.
  step->extra_bytes += static_cast<int64_t>(step->query_storage.size());
  if (query->dtype != cache_dtype) {
    const AttentionParams& p = step->job->params;
    step->extra_bytes +=
        p.seqlen_q * int64_t{p.num_heads_q} * p.value_dim * int64_t(DTypeSize(query->dtype));
  }
  return PlanStepOutput(step);
}

absl::Status AttentionServiceImpl::PlanStepOutput(SessionStep* step) {
  if (step->output_shm == nullptr) return absl::OkStatus();
  // The answer: a model session's y (the hidden states' dtype and shape), or
  // the attention output in the query's dtype.
  const bool model = step->model != nullptr;
  const DType dtype = model ? step->hidden_dtype : step->query_dtype;
  const int64_t bytes =
      model ? static_cast<int64_t>(step->hidden.size()) * int64_t(DTypeSize(dtype))
            : step->job->main_output_bytes() / int64_t(DTypeSize(step->job->params.dtype)) *
                  int64_t(DTypeSize(dtype));
  absl::StatusOr<char*> target = step->shm->Output(*step->output_shm, step->output_shm_field, bytes, dtype);
  if (!target.ok()) return target.status();
  step->output_target = *target;
  if (!model && dtype == step->job->params.dtype) {
    // The job's output is the answer: the kernel writes it in place.
    step->job->output_target = step->output_target;
    if (step->unsampled != nullptr) step->unsampled->output_target = step->output_target;
  }
  return absl::OkStatus();
}

absl::Status AttentionServiceImpl::AppendStep(SessionStep* step) {
  SessionLease& session = *step->lease;
  if (!step->append) {
    const PagedKvView view = session.View(step->layer);
    step->core.paged_kv = view;
    step->job->params.kv_blocks = view.blocks;
    return absl::OkStatus();
  }
  if (absl::Status s = session.Append(step->layer, step->key, step->value); !s.ok()) return s;
  step->appended = true;
  const PagedKvView view = session.View(step->layer);
  if (view.length == step->core.paged_kv->length) {
    // The cache is what the job was planned over: only the blocks are real now.
    step->core.paged_kv = view;
    step->job->params.kv_blocks = view.blocks;
    return absl::OkStatus();
  }
  // A window moved: plan over the cache as it is.
  char* const output_target = step->job->output_target;
  step->job.reset();
  step->core.paged_kv = view;
  absl::StatusOr<std::unique_ptr<AttentionJob>> job = PlanAttention(step->core, options_.limits);
  if (!job.ok()) return job.status();
  step->job = *std::move(job);
  step->job->output_target = output_target;
  return absl::OkStatus();
}

// A computed step sampled for --attention_stats_sample: its entropy into the
// histogram under its layer, then dropped unless the caller asked for it.
void AttentionServiceImpl::RecordStepEntropy(const SessionStep& step, AttentionJob& job) {
  if (!step.record_entropy || job.params.entropy == nullptr) return;
  options_.metrics->RecordAttentionEntropy(step.layer, EntropyValues(job.entropy));
  if (!step.return_entropy) DropEntropy(job);
}

// The step's output in the query's dtype. RESOURCE_EXHAUSTED when memory
// for the conversion runs out.
static absl::StatusOr<Tensor> StepOutput(AttentionJob& job, DType query_dtype) {
  if (job.output.dtype == query_dtype) return std::move(job.output);
  try {
    return ConvertedCopy(job.output.view(), query_dtype);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory converting the output");
  }
}

// A computed step's answer (`output`: StepOutput's or a model session's y)
// into `out`: inline, or when the step names `output_shm`, at `target` in its
// region (copied there unless the kernel wrote it in place) with `out`
// carrying shm, dtype and shape. FAILED_PRECONDITION when a region the step
// used was truncated while it computed.
static absl::Status StepAnswerToProto(const ShmTensorSource& shm,
                                      const v1::SharedMemoryRef* output_shm, char* target,
                                      Tensor& output, v1::Tensor* out) {
  if (output_shm != nullptr && !output.data.empty()) {
    std::memcpy(target, output.data.data(), output.data.size());
  }
  if (absl::Status s = shm.CheckIntact(); !s.ok()) return s;
  TensorToProto(output, out);
  if (output_shm != nullptr) ShmOutputToProto(*output_shm, out);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Decode(grpc::CallbackServerContext* context,
                                                       const v1::DecodeRequest* request,
                                                       v1::DecodeResponse* response) {
  const absl::Time received = absl::Now();
  options_.metrics->RequestStarted();
  auto* reactor = new DecodeReactor(options_.metrics);
  absl::Status submitted =
      AdmitNoThrow([&] { return SubmitDecode(context, *request, response, reactor, received); });
  if (!submitted.ok()) {
    reactor->step.Abandon();
    FinishUnary(reactor, kDecode, received, submitted);
  }
  return reactor;
}

absl::Status AttentionServiceImpl::SubmitDecode(grpc::CallbackServerContext* context,
                                                const v1::DecodeRequest& request,
                                                v1::DecodeResponse* response,
                                                DecodeReactor* reactor, absl::Time received) {
  absl::StatusOr<Backend*> chosen = StepBackend(request.backend(), request.priority());
  if (!chosen.ok()) return chosen.status();
  Backend* backend = *chosen;
  absl::StatusOr<AttentionOptions> options = StepOptions(request.options(), request.outputs());
  if (!options.ok()) return options.status();
  if (options_.shards != nullptr && options_.shards->Owns(request.session_id())) {
    if (request.has_hidden()) {
      return InvalidField("hidden", "unset for a session split over replicas", "hidden states");
    }
    if (absl::Status s = SplitSessionSparsity("sparsity", request.sparsity()); !s.ok()) return s;
    if (absl::Status s = SplitSessionShm("", request.query(), request.key(), request.value(),
                                         request.outputs().has_output_shm());
        !s.ok()) {
      return s;
    }
    ShardCoordinator::Entry entry{request.session_id(), &request.query(), &request.key(),
                                  &request.value(), std::nullopt};
    if (request.has_expected_context_tokens()) {
      entry.expected_context_tokens = request.expected_context_tokens();
    }
    response->set_request_id(request.request_id());
    options_.shards->Step(
        CallerOf(context), request.layer(), {entry}, request.options(), request.outputs(),
        request.backend(), request.priority(), DeadlineOf(context),
        [this, reactor, response, received](std::vector<ShardCoordinator::Result> results) {
          ShardCoordinator::Result& r = results[0];
          if (r.status.ok()) {
            *response->mutable_output() = std::move(r.output);
            if (r.lse.ByteSizeLong() != 0) *response->mutable_lse() = std::move(r.lse);
            response->set_context_tokens(r.context_tokens);
            // compute_us: the fan-out to the shards; the rest of total_us is
            // this replica's own work (placement, RoPE, the merge).
            response->mutable_timing()->set_compute_us(absl::ToInt64Microseconds(r.fanout));
            response->mutable_timing()->set_total_us(
                absl::ToInt64Microseconds(absl::Now() - received));
          }
          FinishUnary(reactor, kDecode, received, r.status);
        });
    return absl::OkStatus();
  }
  SessionStep& step = reactor->step;
  step.shm = ShmSourceFor(CallerOf(context));
  if (request.outputs().has_output_shm()) step.output_shm = &request.outputs().output_shm();
  std::optional<int64_t> expected;
  if (request.has_expected_context_tokens()) expected = request.expected_context_tokens();
  if (absl::Status s = BeginStep(CallerOf(context), request.session_id(), request.layer(),
                                 request.query(), request.key(), request.value(),
                                 request.has_hidden() ? &request.hidden() : nullptr, &step);
      !s.ok()) {
    return s;
  }
  SessionStep* const steps[1] = {&step};
  if (absl::Status s = ProjectSteps(steps); !s.ok()) return s;
  if (absl::Status s = PlanStep(expected, *options, request.outputs(),
                                request.has_sparsity() ? &request.sparsity() : nullptr, *backend,
                                &step);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckRunnable(*step.job, *backend); !s.ok()) return s;
  const AttentionJob* planned = step.job.get();
  absl::StatusOr<MemoryBudget::Reservation> reserved =
      ReserveMemory(absl::MakeConstSpan(&planned, 1), *backend,
                    static_cast<int64_t>(request.ByteSizeLong()), step.extra_bytes,
                    /*count_rejection=*/step.unsampled == nullptr);
  if (!reserved.ok() && step.Unsample()) {
    planned = step.job.get();
    reserved = ReserveMemory(absl::MakeConstSpan(&planned, 1), *backend,
                             static_cast<int64_t>(request.ByteSizeLong()), step.extra_bytes);
  }
  step.unsampled.reset();
  if (!reserved.ok()) return reserved.status();
  reactor->reservation = *std::move(reserved);
  if (absl::Status s = AppendStep(&step); !s.ok()) return s;
  // From here on a failure rolls the cache back (SessionStep::Abandon).

  response->set_request_id(request.request_id());
  response->set_context_tokens(step.lease->length(step.layer));
  Task task;
  task.job = std::move(step.job);
  task.backend = backend;
  task.priority = request.priority();
  task.deadline = DeadlineOf(context);
  task.is_cancelled = [reactor] { return reactor->cancelled(); };
  task.done = [this, reactor, response, received, backend](
                  absl::Status status, std::unique_ptr<AttentionJob> job,
                  const TaskTiming& timing) {
    SessionStep& step = reactor->step;
    // The caller gave up while the step computed: its answer will not arrive,
    // so do not keep what it appended (a retry would add it twice).
    if (status.ok() && reactor->cancelled()) status = absl::CancelledError("the call was cancelled");
    if (status.ok()) {
      // The step holds its computed job, as a BatchDecode's steps do, for
      // FinishModelSteps; Abandon drops it before the lease.
      step.job = std::move(job);
      AttentionJob& computed = *step.job;
      SessionStep* const steps[1] = {&step};
      absl::Status projected = AdmitNoThrow([&] { return FinishModelSteps(steps); });
      absl::StatusOr<Tensor> output = !projected.ok()       ? absl::StatusOr<Tensor>(projected)
                                      : step.model != nullptr ? std::move(step.y)
                                                              : StepOutput(computed, step.query_dtype);
      if (output.ok()) {
        if (absl::Status s = StepAnswerToProto(*step.shm, step.output_shm, step.output_target,
                                               *output, response->mutable_output());
            !s.ok()) {
          output = s;
        }
      }
      if (output.ok()) {
        RecordStepEntropy(step, computed);
        if (computed.params.lse != nullptr) TensorToProto(computed.lse, response->mutable_lse());
        if (computed.params.entropy != nullptr) {
          TensorToProto(computed.entropy, response->mutable_entropy());
        }
        TimingToProto(timing, received, response->mutable_timing());
        response->set_backend(backend->info().name);
      }
      status = output.status();
    }
    job.reset();  // it points into the session's blocks: drop it before the lease
    if (status.ok()) step.appended = false;  // keep the append
    step.Abandon();
    ReportSessions();
    FinishUnary(reactor, kDecode, received, status);
  };
  absl::Status submitted = CountRejection(options_.scheduler->Submit(std::move(task)), "queue");
  return submitted;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::BatchDecode(
    grpc::CallbackServerContext* context, const v1::BatchDecodeRequest* request,
    v1::BatchDecodeResponse* response) {
  return ScheduleUnary(context, kBatchDecode,
                       [&](absl::Time deadline, std::function<bool()> is_cancelled,
                           absl::Time received, MemoryBudget::Reservation* reservation,
                           std::function<void(absl::Status)> done) {
                         return SubmitBatchDecode(CallerOf(context), *request, deadline,
                                                  std::move(is_cancelled), received, response,
                                                  reservation, std::move(done));
                       });
}

grpc::ServerUnaryReactor* AttentionServiceImpl::PartialAttend(
    grpc::CallbackServerContext* context, const v1::BatchDecodeRequest* request,
    v1::BatchDecodeResponse* response) {
  return ScheduleUnary(context, kPartialAttend,
                       [&](absl::Time deadline, std::function<bool()> is_cancelled,
                           absl::Time received, MemoryBudget::Reservation* reservation,
                           std::function<void(absl::Status)> done) -> absl::Status {
                         const std::string caller = CallerOf(context);
                         if (options_.auth_enabled &&
                             std::find(options_.peer_callers.begin(),
                                       options_.peer_callers.end(),
                                       caller) == options_.peer_callers.end()) {
                           return absl::PermissionDeniedError(absl::StrCat(
                               "PartialAttend is for replicas of this service (--peer_callers: ",
                               absl::StrJoin(options_.peer_callers, ", "), "), not \"", caller,
                               "\""));
                         }
                         return SubmitBatchDecode(caller, *request, deadline,
                                                  std::move(is_cancelled), received, response,
                                                  reservation, std::move(done), /*partial=*/true);
                       });
}

absl::Status AttentionServiceImpl::TruncateLayer(const std::string& caller,
                                                 const std::string& session_id, int32_t layer,
                                                 int64_t tokens, std::optional<int64_t> expected,
                                                 v1::BatchDecodeResult* result) {
  absl::StatusOr<SessionLease> lease = options_.sessions->Acquire(session_id, caller);
  if (!lease.ok()) return lease.status();
  if (layer < 0 || layer >= lease->config().num_layers) {
    return InvalidField(
        "layer", absl::StrCat("a value in [0, ", lease->config().num_layers, ") (num_layers)"),
        absl::StrCat(layer));
  }
  if (expected.has_value() && *expected != lease->length(layer)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "expected_context_tokens: layer ", layer, " of the session holds ", lease->length(layer),
        " tokens, the truncation expected ", *expected));
  }
  if (tokens < 0 || tokens > lease->length(layer)) {
    return InvalidField(
        "truncate_to",
        absl::StrCat("a count in [0, ", lease->length(layer), "] (the layer's tokens)"),
        absl::StrCat(tokens));
  }
  if (lease->config().window_tokens > 0) {
    return InvalidField("truncate_to", "a session without a sinks window", "a windowed session");
  }
  lease->Truncate(layer, tokens);
  result->set_context_tokens(lease->length(layer));
  return absl::OkStatus();
}

absl::Status AttentionServiceImpl::SubmitBatchDecode(
    const std::string& caller, const v1::BatchDecodeRequest& request, absl::Time deadline,
    std::function<bool()> is_cancelled, absl::Time received, v1::BatchDecodeResponse* response,
    MemoryBudget::Reservation* reservation, std::function<void(absl::Status)> done,
    bool partial) {
  absl::StatusOr<Backend*> chosen = StepBackend(request.backend(), request.priority());
  if (!chosen.ok()) return chosen.status();
  Backend* backend = *chosen;
  // A shard's part (PartialAttend) always returns its lse, for the merge.
  v1::OutputSpec outputs = request.outputs();
  if (partial) outputs.set_lse(true);
  absl::StatusOr<AttentionOptions> options = StepOptions(request.options(), outputs);
  if (!options.ok()) return options.status();
  if (outputs.has_output_shm()) {
    return InvalidField("outputs.output_shm",
                        "unset for a BatchDecode (each entry names its own: entries[i].output_shm)",
                        absl::StrCat("region '", outputs.output_shm().region(), "'"));
  }
  const int entries = request.entries_size();
  if (entries < 1 || entries > kMaxBatchEntries) {
    return InvalidField("entries", absl::StrCat("1 to ", kMaxBatchEntries, " entries"),
                        absl::StrCat(entries));
  }
  options_.metrics->RecordBatchDecodeEntries(entries);
  if (options_.shards != nullptr && options_.shards->Owns(request.entries(0).session_id())) {
    // Sessions split over replicas: every entry one, the steps fanned out.
    std::vector<ShardCoordinator::Entry> sharded;
    for (int i = 0; i < entries; ++i) {
      const v1::BatchDecodeEntry& e = request.entries(i);
      if (!options_.shards->Owns(e.session_id()) || e.has_hidden() || e.has_truncate_to()) {
        return InvalidField(absl::StrCat("entries[", i, "]"),
                            "a q/k/v step of a session split over replicas, like entries[0]",
                            "another kind of entry");
      }
      if (absl::Status s =
              SplitSessionSparsity(absl::StrCat("entries[", i, "].sparsity"), e.sparsity());
          !s.ok()) {
        return s;
      }
      if (absl::Status s = SplitSessionShm(absl::StrCat("entries[", i, "]."), e.query(), e.key(),
                                           e.value(), e.has_output_shm());
          !s.ok()) {
        return s;
      }
      ShardCoordinator::Entry entry{e.session_id(), &e.query(), &e.key(), &e.value(),
                                    std::nullopt};
      if (e.has_expected_context_tokens()) entry.expected_context_tokens = e.expected_context_tokens();
      sharded.push_back(entry);
    }
    response->set_request_id(request.request_id());
    options_.shards->Step(
        caller, request.layer(), sharded, request.options(), outputs, request.backend(),
        request.priority(), deadline,
        [response, received, done](std::vector<ShardCoordinator::Result> results) {
          for (size_t i = 0; i < results.size(); ++i) {
            ShardCoordinator::Result& r = results[i];
            v1::BatchDecodeResult* result = response->add_results();
            result->set_code(static_cast<int>(r.status.code()));
            result->set_message(r.status.ok() ? std::string()
                                              : absl::StrCat("entries[", i, "].",
                                                             r.status.message()));
            if (!r.status.ok()) continue;
            *result->mutable_output() = std::move(r.output);
            if (r.lse.ByteSizeLong() != 0) *result->mutable_lse() = std::move(r.lse);
            result->set_context_tokens(r.context_tokens);
          }
          if (!results.empty()) {
            response->mutable_timing()->set_compute_us(
                absl::ToInt64Microseconds(results[0].fanout));
          }
          response->mutable_timing()->set_total_us(
              absl::ToInt64Microseconds(absl::Now() - received));
          done(absl::OkStatus());
        });
    return absl::OkStatus();
  }
  if (request.entries(0).has_truncate_to()) {
    // A coordinator undoing appends: every entry truncates, nothing computes.
    for (int i = 0; i < entries; ++i) {
      const v1::BatchDecodeEntry& e = request.entries(i);
      v1::BatchDecodeResult* result = response->add_results();
      absl::Status s =
          e.has_truncate_to()
              ? TruncateLayer(caller, e.session_id(), request.layer(), e.truncate_to(),
                              e.has_expected_context_tokens()
                                  ? std::optional<int64_t>(e.expected_context_tokens())
                                  : std::nullopt,
                              result)
              : InvalidField("truncate_to", "set in every entry when in entries[0]", "unset");
      if (!s.ok()) s = Prefixed(absl::StrCat("entries[", i, "]."), s);
      result->set_code(static_cast<int>(s.code()));
      result->set_message(std::string(s.message()));
    }
    response->set_request_id(request.request_id());
    ReportSessions();
    done(absl::OkStatus());
    return absl::OkStatus();
  }

  // Every entry is checked and planned before any cache changes; a bad entry
  // fails alone.
  auto call = std::make_shared<BatchDecodeCall>();
  call->steps.resize(entries);
  call->status.resize(entries);
  absl::flat_hash_map<absl::string_view, int> seen;  // session id -> its first entry
  seen.reserve(entries);
  int first_ok = -1;
  for (int i = 0; i < entries; ++i) {
    const v1::BatchDecodeEntry& e = request.entries(i);
    SessionStep& step = call->steps[i];
    absl::Status& status = call->status[i];
    if (auto [it, inserted] = seen.try_emplace(e.session_id(), i); !inserted) {
      status =
          InvalidField(absl::StrCat("entries[", i, "].session_id"), "each session once per call",
                       absl::StrCat("the session of entries[", it->second, "] again"));
      continue;
    }
    if (e.has_truncate_to()) {
      status = InvalidField(absl::StrCat("entries[", i, "].truncate_to"),
                            "unset unless entries[0] truncates too", absl::StrCat(e.truncate_to()));
      continue;
    }
    step.key_offset = e.key_offset();
    step.total_keys = e.total_keys();
    // Each entry has its own source, so a region truncated under one entry
    // fails that entry alone.
    step.shm = partial ? ShmTensorSource::Refusing(
                             "PartialAttend: a replica cannot read the caller's shared memory")
                       : ShmSourceFor(caller);
    if (e.has_output_shm()) {
      step.output_shm = &e.output_shm();
      step.output_shm_field = "output_shm";
      if (partial) {
        status = InvalidField(absl::StrCat("entries[", i, "].output_shm"),
                              "unset for PartialAttend (its parts are merged by the caller)",
                              "a region");
        continue;
      }
    }
    status = BeginStep(caller, e.session_id(), request.layer(), e.query(), e.key(), e.value(),
                       e.has_hidden() ? &e.hidden() : nullptr, &step);
    if (!status.ok()) {
      status = Prefixed(absl::StrCat("entries[", i, "]."), status);
      step.Abandon();
    }
  }
  // Model sessions' hidden states: one matmul per projection for each model.
  std::vector<SessionStep*> begun;
  for (int i = 0; i < entries; ++i) {
    if (call->status[i].ok()) begun.push_back(&call->steps[i]);
  }
  const absl::Status projected = ProjectSteps(begun);
  for (int i = 0; i < entries; ++i) {
    const v1::BatchDecodeEntry& e = request.entries(i);
    SessionStep& step = call->steps[i];
    absl::Status& status = call->status[i];
    if (!status.ok()) continue;
    if (step.model != nullptr) status = projected;
    if (status.ok()) {
      std::optional<int64_t> expected;
      if (e.has_expected_context_tokens()) expected = e.expected_context_tokens();
      status = PlanStep(expected, *options, outputs, e.has_sparsity() ? &e.sparsity() : nullptr,
                        *backend, &step);
    }
    if (status.ok() && first_ok >= 0) {
      // The entries share one call: the same heads, dims and dtypes.
      const AttentionParams& p = step.job->params;
      const AttentionParams& f = call->steps[first_ok].job->params;
      if (p.num_heads_q != f.num_heads_q || p.num_heads_kv != f.num_heads_kv ||
          p.head_dim != f.head_dim || p.value_dim != f.value_dim || p.dtype != f.dtype ||
          step.query_dtype != call->steps[first_ok].query_dtype) {
        status = InvalidField(
            "query",
            absl::StrFormat("Hq %d, Hkv %d, D %d, Dv %d and dtype %s like entries[%d]",
                            f.num_heads_q, f.num_heads_kv, f.head_dim, f.value_dim,
                            DTypeName(call->steps[first_ok].query_dtype), first_ok),
            absl::StrFormat("Hq %d, Hkv %d, D %d, Dv %d and dtype %s", p.num_heads_q,
                            p.num_heads_kv, p.head_dim, p.value_dim, DTypeName(step.query_dtype)));
      }
    }
    if (!status.ok()) {
      status = Prefixed(absl::StrCat("entries[", i, "]."), status);
      step.Abandon();
      continue;
    }
    if (first_ok < 0) first_ok = i;
  }

  // The call's cost and memory, over the entries that will run.
  std::vector<const AttentionJob*> planned;
  int64_t extra_bytes = 0;
  for (int i = 0; i < entries; ++i) {
    if (!call->status[i].ok()) continue;
    planned.push_back(call->steps[i].job.get());
    extra_bytes += call->steps[i].extra_bytes;
  }
  auto abandon_all = [call] {
    for (SessionStep& step : call->steps) step.Abandon();
  };
  if (!planned.empty()) {
    double cost = 0;
    for (const AttentionJob* j : planned) cost += j->cost;
    if (options_.max_request_flops > 0 && cost > options_.max_request_flops) {
      abandon_all();
      return CountRejection(
          absl::ResourceExhaustedError(absl::StrFormat(
              "this BatchDecode costs %.4g FLOP-equivalents over its %d entries, over the "
              "per-request limit of %.4g (--max_request_flops); send fewer entries per call",
              cost, planned.size(), options_.max_request_flops)),
          "cost");
    }
    bool sampled = false;
    for (const SessionStep& step : call->steps) sampled |= step.unsampled != nullptr;
    absl::StatusOr<MemoryBudget::Reservation> reserved =
        ReserveMemory(planned, *backend, static_cast<int64_t>(request.ByteSizeLong()),
                      extra_bytes, /*count_rejection=*/!sampled);
    if (!reserved.ok() && sampled) {
      // Sampling never refuses a call: the entries run as asked.
      planned.clear();
      for (int i = 0; i < entries; ++i) {
        if (!call->status[i].ok()) continue;
        call->steps[i].Unsample();
        planned.push_back(call->steps[i].job.get());
      }
      reserved = ReserveMemory(planned, *backend, static_cast<int64_t>(request.ByteSizeLong()),
                               extra_bytes);
    }
    for (SessionStep& step : call->steps) step.unsampled.reset();
    if (!reserved.ok()) {
      abandon_all();
      return reserved.status();
    }
    *reservation = *std::move(reserved);
  }

  Task task;
  for (int i = 0; i < entries; ++i) {
    if (!call->status[i].ok()) continue;
    SessionStep& step = call->steps[i];
    if (absl::Status s = AppendStep(&step); !s.ok()) {
      call->status[i] = Prefixed(absl::StrCat("entries[", i, "]: "), s);
      step.Abandon();
      continue;
    }
    task.gang.push_back(step.job.get());
  }

  response->set_request_id(request.request_id());
  // Fills the results; the steps that ran keep their appends when `status`
  // is OK and roll back otherwise.
  auto answer = [this, call, response, received, backend](absl::Status status,
                                                         const TaskTiming& timing) {
    // Model sessions' output projections: one matmul for each model.
    absl::Status projected;
    if (status.ok()) {
      std::vector<SessionStep*> computed;
      for (size_t i = 0; i < call->steps.size(); ++i) {
        if (call->status[i].ok()) computed.push_back(&call->steps[i]);
      }
      projected = AdmitNoThrow([&] { return FinishModelSteps(computed); });
    }
    for (size_t i = 0; i < call->steps.size(); ++i) {
      SessionStep& step = call->steps[i];
      v1::BatchDecodeResult* result = response->add_results();
      absl::Status entry = call->status[i];
      if (entry.ok() && status.ok()) {
        absl::StatusOr<Tensor> output = step.model == nullptr ? StepOutput(*step.job, step.query_dtype)
                                        : projected.ok()      ? absl::StatusOr<Tensor>(std::move(step.y))
                                                              : absl::StatusOr<Tensor>(projected);
        if (output.ok()) {
          if (absl::Status s = StepAnswerToProto(*step.shm, step.output_shm, step.output_target,
                                                 *output, result->mutable_output());
              !s.ok()) {
            output = Prefixed(absl::StrCat("entries[", i, "]: "), s);
          }
        }
        if (output.ok()) {
          RecordStepEntropy(step, *step.job);
          if (step.job->params.lse != nullptr) TensorToProto(step.job->lse, result->mutable_lse());
          if (step.job->params.entropy != nullptr) {
            TensorToProto(step.job->entropy, result->mutable_entropy());
          }
          result->set_context_tokens(step.lease->length(step.layer));
          step.appended = false;  // keep the append
        }
        entry = output.status();
      } else if (entry.ok()) {
        entry = status;
      }
      result->set_code(static_cast<int>(entry.code()));
      result->set_message(std::string(entry.message()));
      step.Abandon();
    }
    if (status.ok()) {
      TimingToProto(timing, received, response->mutable_timing());
      response->set_backend(backend->info().name);
    }
    ReportSessions();
  };
  if (task.gang.empty()) {
    // Nothing to compute: every entry failed its checks.
    answer(absl::OkStatus(), TaskTiming{});
    done(absl::OkStatus());
    return absl::OkStatus();
  }
  task.backend = backend;
  task.priority = request.priority();
  task.deadline = deadline;
  task.is_cancelled = is_cancelled;
  task.done = [call, answer, is_cancelled, done](absl::Status status,
                                                 std::unique_ptr<AttentionJob> /*job*/,
                                                 const TaskTiming& timing) {
    // The caller gave up while the steps computed: do not keep their appends.
    if (status.ok() && is_cancelled && is_cancelled()) {
      status = absl::CancelledError("the call was cancelled");
    }
    answer(status, timing);
    done(status);
  };
  absl::Status submitted = CountRejection(options_.scheduler->Submit(std::move(task)), "queue");
  if (!submitted.ok()) abandon_all();
  return submitted;
}

}  // namespace attnserve
