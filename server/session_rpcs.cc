// The KV-cache session RPCs of AttentionServiceImpl: CreateSession, Decode,
// CloseSession. A Decode pins its session (SessionLease), appends the new K/V,
// and goes through the same scheduler as Attend, so decode steps of many
// sessions are batched into one backend call. A Decode that fails for any
// reason leaves the session's cache as it was, so a client may simply retry.
#include <new>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/half.h"
#include "server/call_context.h"
#include "server/convert.h"
#include "server/service.h"

namespace attnserve {
namespace {

constexpr char kCreateSession[] = "CreateSession";
constexpr char kDecode[] = "Decode";
constexpr char kCloseSession[] = "CloseSession";

absl::Status Invalid(absl::string_view field, absl::string_view expected, absl::string_view got) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": expected ", expected, ", got ", got));
}

absl::Status SessionsDisabled() {
  return absl::UnimplementedError("sessions are disabled on this server");
}

// Converts `t` to `dtype` (a copy), keeping its shape.
Tensor ConvertTensor(const Tensor& t, DType dtype) {
  Tensor out = Tensor::Zeros(dtype, t.shape);
  const int64_t n = t.num_elements();
  for (int64_t i = 0; i < n; ++i) StoreFloat(out.data.data(), dtype, i, LoadFloat(t.data.data(), t.dtype, i));
  return out;
}

}  // namespace

// One Decode call: holds the session lease (released before the call
// finishes, so the client's next step on the session is not refused) and the
// query converted to the cache dtype when needed.
class AttentionServiceImpl::DecodeReactor final : public CancellableUnaryReactor {
 public:
  explicit DecodeReactor(Metrics* metrics) : CancellableUnaryReactor(metrics, kDecode) {}

  std::optional<SessionLease> lease;
  int64_t length_before = 0;  // cache length before this step's append
  std::string query_storage;  // the query in the cache dtype, when converted
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
  const absl::Time received = absl::Now();
  options_.metrics->RequestStarted();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Status status = [&]() -> absl::Status {
    if (draining()) return Draining();
    if (options_.sessions == nullptr) return SessionsDisabled();
    SessionConfig config;
    config.num_kv_heads = request->num_kv_heads();
    config.head_dim = request->head_dim();
    config.value_dim = request->value_dim();
    config.max_tokens = request->max_tokens();
    if (request->dtype() != v1::DTYPE_UNSPECIFIED) {
      absl::StatusOr<DType> dtype = RequestDTypeFromProto(request->dtype(), "dtype");
      if (!dtype.ok()) return dtype.status();
      config.dtype = *dtype;
    }
    absl::StatusOr<SessionStore::Created> created =
        options_.sessions->CreateSession(config, CallerOf(context));
    if (!created.ok()) return created.status();
    response->set_session_id(created->session_id);
    response->set_capacity_tokens(created->capacity_tokens);
    response->set_block_tokens(options_.sessions->options().block_tokens);
    return absl::OkStatus();
  }();
  ReportSessions();
  FinishUnary(reactor, kCreateSession, received, status);
  return reactor;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::CloseSession(
    grpc::CallbackServerContext* context, const v1::CloseSessionRequest* request,
    v1::CloseSessionResponse* /*response*/) {
  const absl::Time received = absl::Now();
  options_.metrics->RequestStarted();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // Closing stays allowed while draining: it only frees memory.
  absl::Status status = options_.sessions == nullptr
                            ? SessionsDisabled()
                            : options_.sessions->Close(request->session_id(), CallerOf(context));
  ReportSessions();
  FinishUnary(reactor, kCloseSession, received, status);
  return reactor;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Decode(grpc::CallbackServerContext* context,
                                                       const v1::DecodeRequest* request,
                                                       v1::DecodeResponse* response) {
  const absl::Time received = absl::Now();
  options_.metrics->RequestStarted();
  auto* reactor = new DecodeReactor(options_.metrics);
  absl::Status submitted = SubmitDecode(context, *request, response, reactor, received);
  if (!submitted.ok()) {
    if (reactor->lease.has_value()) reactor->lease->Truncate(reactor->length_before);
    reactor->lease.reset();
    FinishUnary(reactor, kDecode, received, submitted);
  }
  return reactor;
}

absl::Status AttentionServiceImpl::SubmitDecode(grpc::CallbackServerContext* context,
                                                const v1::DecodeRequest& request,
                                                v1::DecodeResponse* response,
                                                DecodeReactor* reactor, absl::Time received) {
  if (draining()) return Draining();
  if (options_.sessions == nullptr) return SessionsDisabled();
  absl::StatusOr<Backend*> chosen = BackendFor(request.backend());
  if (!chosen.ok()) return chosen.status();
  Backend* backend = *chosen;
  if (request.priority() != 0 && request.priority() != 1) {
    return Invalid("priority", "0 (normal) or 1 (high)", absl::StrCat(request.priority()));
  }

  // Wire checks that need no session first.
  absl::StatusOr<TensorView> query = ViewFromProto(request.query(), "query");
  if (!query.ok()) return query.status();
  absl::StatusOr<TensorView> key = ViewFromProto(request.key(), "key");
  if (!key.ok()) return key.status();
  absl::StatusOr<TensorView> value = ViewFromProto(request.value(), "value");
  if (!value.ok()) return value.status();
  absl::StatusOr<AttentionOptions> options = OptionsFromProto(request.options());
  if (!options.ok()) return options.status();
  if (options->variant != Variant::kSoftmax) {
    return Invalid("options.variant", "SOFTMAX for Decode", "LINEAR");
  }
  if (options->causal_alignment != CausalAlignment::kBottomRight) {
    return Invalid("options.causal_alignment",
                   "BOTTOM_RIGHT for Decode (new tokens follow the cache)", "TOP_LEFT");
  }
  if (options->window_right > 0) {
    return Invalid("options.window_right", "unset, -1 or 0 for Decode (it is causal)",
                   absl::StrCat(options->window_right));
  }
  if (request.outputs().weights()) return Invalid("outputs.weights", "false for Decode", "true");
  if (request.outputs().top_k() != 0) {
    return Invalid("outputs.top_k", "0 for Decode", absl::StrCat(request.outputs().top_k()));
  }
  options->causal = true;
  const int64_t q_count = CheckedElementCount(query->shape, int64_t{1} << 40);
  if (q_count < 0 ||
      static_cast<int64_t>(query->data.size()) != q_count * int64_t(DTypeSize(query->dtype))) {
    return Invalid("query.data",
                   absl::StrCat(q_count < 0 ? 0 : q_count * int64_t(DTypeSize(query->dtype)),
                                " bytes for shape ", ShapeString(query->shape)),
                   absl::StrCat(query->data.size(), " bytes"));
  }

  absl::StatusOr<SessionLease> lease =
      options_.sessions->Acquire(request.session_id(), CallerOf(context));
  if (!lease.ok()) return lease.status();
  reactor->lease.emplace(*std::move(lease));
  SessionLease& session = *reactor->lease;
  reactor->length_before = session.length();
  if (request.has_expected_context_tokens() &&
      request.expected_context_tokens() != session.length()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "expected_context_tokens: the session holds ", session.length(), " tokens, the request expected ",
        request.expected_context_tokens()));
  }
  // Everything is checked before the cache changes: the new tokens' shapes,
  // the step's options against the grown cache, the backend, the cost and the
  // memory budget. Only then does Append touch the cache (and, under
  // lru_idle, other sessions).
  absl::StatusOr<int64_t> new_tokens = session.CheckAppend(*key, *value);
  if (!new_tokens.ok()) return new_tokens.status();

  const DType cache_dtype = session.config().dtype;
  const DType query_dtype = query->dtype;
  AttentionRequest core;
  core.query = *query;
  if (query_dtype != cache_dtype) {
    try {
      reactor->query_storage.assign(q_count * DTypeSize(cache_dtype), '\0');
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError("out of memory converting the query to the cache dtype");
    }
    for (int64_t i = 0; i < q_count; ++i) {
      StoreFloat(reactor->query_storage.data(), cache_dtype, i,
                 LoadFloat(query->data.data(), query_dtype, i));
    }
    core.query.dtype = cache_dtype;
    core.query.data = reactor->query_storage;
  }
  core.options = *std::move(options);
  core.outputs.lse = request.outputs().lse();
  {
    // The step as it will run, over the cache grown by the new tokens; the
    // blocks are not read here, so the current ones stand in for them.
    static const void* const kNoBlocks[1] = {nullptr};
    PagedKvView grown = session.View();
    grown.length += *new_tokens;
    if (grown.blocks == nullptr) grown.blocks = kNoBlocks;
    core.paged_kv = grown;
    absl::StatusOr<std::unique_ptr<AttentionJob>> planned = PlanAttention(core, options_.limits);
    if (!planned.ok()) return CountRejection(planned.status(), "size");
    if (absl::Status s = CheckRunnable(**planned, *backend); !s.ok()) return s;
    // Held besides the job: the converted query, and the output converted
    // back to the query's dtype.
    const int64_t converted =
        static_cast<int64_t>(reactor->query_storage.size()) +
        (query_dtype != cache_dtype
             ? (*planned)->params.seqlen_q * int64_t{(*planned)->params.num_heads_q} *
                   (*planned)->params.value_dim * int64_t(DTypeSize(query_dtype))
             : 0);
    absl::StatusOr<MemoryBudget::Reservation> reserved = ReserveMemory(
        **planned, *backend, static_cast<int64_t>(request.ByteSizeLong()), converted);
    if (!reserved.ok()) return reserved.status();
    reactor->reservation = *std::move(reserved);
  }

  if (absl::Status s = session.Append(*key, *value); !s.ok()) return s;
  // From here on a failure truncates the cache back to length_before.
  core.paged_kv = session.View();
  absl::StatusOr<std::unique_ptr<AttentionJob>> job = PlanAttention(core, options_.limits);
  if (!job.ok()) return job.status();

  response->set_request_id(request.request_id());
  response->set_context_tokens(session.length());
  Task task;
  task.job = *std::move(job);
  task.backend = backend;
  task.priority = request.priority();
  task.deadline = DeadlineOf(context);
  task.is_cancelled = [reactor] { return reactor->cancelled(); };
  task.done = [this, reactor, response, received, backend, query_dtype](
                  absl::Status status, std::unique_ptr<AttentionJob> job,
                  const TaskTiming& timing) {
    // The caller gave up while the step computed: its answer will not arrive,
    // so do not keep what it appended (a retry would add it twice).
    if (status.ok() && reactor->cancelled()) status = absl::CancelledError("the call was cancelled");
    Tensor output;
    if (status.ok()) {
      try {
        output = job->output.dtype == query_dtype ? std::move(job->output)
                                                  : ConvertTensor(job->output, query_dtype);
      } catch (const std::bad_alloc&) {
        status = absl::ResourceExhaustedError("out of memory converting the output");
      }
    }
    if (status.ok()) {
      TensorToProto(output, response->mutable_output());
      if (job->params.lse != nullptr) TensorToProto(job->lse, response->mutable_lse());
      TimingToProto(timing, received, response->mutable_timing());
      response->set_backend(backend->info().name);
    } else {
      reactor->lease->Truncate(reactor->length_before);
    }
    job.reset();  // it points into the session's blocks: drop it before the lease
    reactor->lease.reset();
    ReportSessions();
    FinishUnary(reactor, kDecode, received, status);
  };
  return CountRejection(options_.scheduler->Submit(std::move(task)), "queue");
}

}  // namespace attnserve
