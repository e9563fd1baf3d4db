#include "client/client.h"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <tuple>
#include <utility>
#include <vector>

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>
#include <grpcpp/support/client_interceptor.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/blocking_counter.h"
#include "absl/time/clock.h"
#include "attention/merge.h"
#include "core/errors.h"

namespace attnserve::client {
namespace {

using HealthResponse = grpc::health::v1::HealthCheckResponse;

std::chrono::system_clock::time_point DeadlineFromNow(absl::Duration d) {
  return absl::ToChronoTime(absl::Now() + d);
}

absl::StatusOr<std::string> ReadFile(absl::string_view option, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  if (in) text << in.rdbuf();
  if (!in || in.bad()) {
    return absl::InvalidArgumentError(
        absl::StrCat(option, ": expected a readable PEM file, got '", path, "'"));
  }
  return text.str();
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(
    const ClientOptions& o) {
  if (o.tls_cert_file.empty() != o.tls_key_file.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tls_cert_file, tls_key_file: expected both or neither, got ",
        o.tls_cert_file.empty() ? "only tls_key_file" : "only tls_cert_file"));
  }
  if (!o.tls && o.tls_ca_file.empty() && o.tls_cert_file.empty()) {
    return grpc::InsecureChannelCredentials();
  }
  grpc::SslCredentialsOptions ssl;
  for (auto [option, path, dest] :
       {std::tuple{"tls_ca_file", &o.tls_ca_file, &ssl.pem_root_certs},
        std::tuple{"tls_cert_file", &o.tls_cert_file, &ssl.pem_cert_chain},
        std::tuple{"tls_key_file", &o.tls_key_file, &ssl.pem_private_key}}) {
    if (path->empty()) continue;
    absl::StatusOr<std::string> text = ReadFile(option, *path);
    if (!text.ok()) return text.status();
    *dest = *std::move(text);
  }
  return grpc::SslCredentials(ssl);
}

// Adds "authorization: Bearer <token>" to every call of the channel. An
// interceptor rather than call credentials, which gRPC sends over TLS only:
// a server behind a TLS-terminating sidecar is reached in plaintext.
class BearerTokenInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit BearerTokenInterceptor(const std::string* value) : value_(value) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({"authorization", *value_});
    }
    methods->Proceed();
  }

 private:
  const std::string* value_;  // owned by the factory, which the channel keeps
};

class BearerTokenInterceptorFactory
    : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerTokenInterceptorFactory(const std::string& token)
      : value_(absl::StrCat("Bearer ", token)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* /*info*/) override {
    return new BearerTokenInterceptor(&value_);
  }

 private:
  const std::string value_;
};

}  // namespace

std::string_view ServingStatusName(ServingStatus status) {
  switch (status) {
    case ServingStatus::kUnknown:
      return "UNKNOWN";
    case ServingStatus::kServing:
      return "SERVING";
    case ServingStatus::kNotServing:
      return "NOT_SERVING";
    case ServingStatus::kServiceUnknown:
      return "SERVICE_UNKNOWN";
  }
  return "UNKNOWN";
}

absl::StatusOr<std::unique_ptr<AttnClient>> AttnClient::Create(std::string target,
                                                               ClientOptions options) {
  if (target.empty()) {
    return absl::InvalidArgumentError("target: expected HOST:PORT, got an empty string");
  }
  if (options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_message_bytes: expected > 0, got ", options.max_message_bytes));
  }
  if (options.default_deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "default_deadline: expected > 0, got ", absl::FormatDuration(options.default_deadline)));
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  if (options.dedicated_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  if (!options.load_balancing_policy.empty()) {
    args.SetLoadBalancingPolicyName(options.load_balancing_policy);
  }
  if (!options.tls_server_name.empty()) {
    args.SetSslTargetNameOverride(options.tls_server_name);
  }
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      ChannelCredentials(options);
  if (!credentials.ok()) return credentials.status();
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> interceptors;
  if (!options.bearer_token.empty()) {
    interceptors.push_back(std::make_unique<BearerTokenInterceptorFactory>(options.bearer_token));
  }
  std::shared_ptr<grpc::Channel> channel = grpc::experimental::CreateCustomChannelWithInterceptors(
      target, *credentials, args, std::move(interceptors));
  return std::unique_ptr<AttnClient>(
      new AttnClient(std::move(target), std::move(options), std::move(channel)));
}

AttnClient::AttnClient(std::string target, ClientOptions options,
                       std::shared_ptr<grpc::Channel> channel)
    : target_(std::move(target)),
      options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::AttentionService::NewStub(channel_)),
      health_stub_(grpc::health::v1::Health::NewStub(channel_)) {}

AttnClient::~AttnClient() { in_flight_->WaitForZero(); }

absl::Duration AttnClient::DeadlineOr(absl::Duration d) const {
  return d > absl::ZeroDuration() ? d : options_.default_deadline;
}

absl::StatusOr<AttendResult> AttnClient::Attend(const AttentionRequest& request,
                                                const CallOptions& call) {
  absl::StatusOr<v1::AttendResponse> response = Attend(ToProto(request, call), call.deadline);
  if (!response.ok()) return response.status();
  return FromProto(std::move(*response));
}

absl::StatusOr<v1::AttendResponse> AttnClient::Attend(const v1::AttendRequest& request,
                                                      absl::Duration deadline) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineFromNow(DeadlineOr(deadline)));
  v1::AttendResponse response;
  absl::Status status = FromGrpcStatus(stub_->Attend(&context, request, &response));
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<LayerResult> AttnClient::AttendLayer(const LayerRequest& request,
                                                     const CallOptions& call) {
  absl::StatusOr<v1::AttendLayerResponse> response =
      AttendLayer(ToProto(request, call), call.deadline);
  if (!response.ok()) return response.status();
  return FromProto(std::move(*response));
}

absl::StatusOr<v1::AttendLayerResponse> AttnClient::AttendLayer(
    const v1::AttendLayerRequest& request, absl::Duration deadline) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineFromNow(DeadlineOr(deadline)));
  v1::AttendLayerResponse response;
  absl::Status status = FromGrpcStatus(stub_->AttendLayer(&context, request, &response));
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::ServerInfo> AttnClient::GetServerInfo() {
  grpc::ClientContext context;
  context.set_deadline(DeadlineFromNow(options_.default_deadline));
  v1::ServerInfo info;
  absl::Status status =
      FromGrpcStatus(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info));
  if (!status.ok()) return status;
  return info;
}

absl::Status AttnClient::RegisterSharedMemory(const std::string& name, const std::string& key,
                                              int64_t offset, int64_t byte_size,
                                              absl::Duration deadline) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineFromNow(DeadlineOr(deadline)));
  v1::RegisterSharedMemoryRequest request;
  request.set_name(name);
  request.set_key(key);
  request.set_offset(offset);
  request.set_byte_size(byte_size);
  v1::RegisterSharedMemoryResponse response;
  return FromGrpcStatus(stub_->RegisterSharedMemory(&context, request, &response));
}

absl::Status AttnClient::RegisterSharedMemory(const std::string& name,
                                              const SharedMemoryRegion& region,
                                              absl::Duration deadline) {
  return RegisterSharedMemory(name, region.key(), 0, region.byte_size(), deadline);
}

absl::Status AttnClient::UnregisterSharedMemory(const std::string& name,
                                                absl::Duration deadline) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineFromNow(DeadlineOr(deadline)));
  v1::UnregisterSharedMemoryRequest request;
  request.set_name(name);
  v1::UnregisterSharedMemoryResponse response;
  return FromGrpcStatus(stub_->UnregisterSharedMemory(&context, request, &response));
}

absl::StatusOr<ServingStatus> AttnClient::CheckHealth(const std::string& service) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineFromNow(options_.default_deadline));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  HealthResponse response;
  absl::Status status = FromGrpcStatus(health_stub_->Check(&context, request, &response));
  // The health protocol answers NOT_FOUND for a service it does not know.
  if (absl::IsNotFound(status)) return ServingStatus::kServiceUnknown;
  if (!status.ok()) return status;
  switch (response.status()) {
    case HealthResponse::SERVING:
      return ServingStatus::kServing;
    case HealthResponse::NOT_SERVING:
      return ServingStatus::kNotServing;
    case HealthResponse::SERVICE_UNKNOWN:
      return ServingStatus::kServiceUnknown;
    default:
      return ServingStatus::kUnknown;
  }
}

absl::Status AttnClient::WaitForServing(absl::Duration timeout) {
  const absl::Time give_up = absl::Now() + timeout;
  absl::Status last = absl::UnavailableError("not checked yet");
  while (absl::Now() < give_up) {
    grpc::ClientContext context;
    // Each probe waits for the connection (wait_for_ready) but not past give_up.
    context.set_wait_for_ready(true);
    context.set_deadline(absl::ToChronoTime(std::min(give_up, absl::Now() + absl::Seconds(1))));
    grpc::health::v1::HealthCheckRequest request;
    HealthResponse response;
    last = FromGrpcStatus(health_stub_->Check(&context, request, &response));
    if (last.ok()) {
      if (response.status() == HealthResponse::SERVING) return absl::OkStatus();
      last = absl::UnavailableError(absl::StrCat(
          "health: ", HealthResponse::ServingStatus_Name(response.status())));
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  return absl::DeadlineExceededError(absl::StrCat(target_, " not SERVING after ",
                                                  absl::FormatDuration(timeout),
                                                  "; last: ", last.ToString()));
}

namespace {

// State of one AttendAsync call, alive from the start of the call to its
// callback.
struct AsyncAttendCall {
  InFlightCounter::Guard guard;  // first: released after the context is gone
  grpc::ClientContext context;
  v1::AttendResponse response;
  AttnClient::AttendCallback done;
};

}  // namespace

void AttnClient::AttendAsync(const v1::AttendRequest& request, AttendCallback done,
                             absl::Duration deadline) {
  auto* call = new AsyncAttendCall;
  call->guard = InFlightCounter::Guard(in_flight_);
  call->done = std::move(done);
  call->context.set_deadline(DeadlineFromNow(DeadlineOr(deadline)));
  stub_->async()->Attend(&call->context, &request, &call->response,
                         [call](grpc::Status grpc_status) {
                           std::unique_ptr<AsyncAttendCall> owned(call);
                           absl::Status status = FromGrpcStatus(grpc_status);
                           if (status.ok()) {
                             std::move(owned->done)(std::move(owned->response));
                           } else {
                             std::move(owned->done)(std::move(status));
                           }
                         });
}

namespace {

// ShardedAttend's cut of a request: `parts` contiguous ranges of its Lk keys.
struct KeySplit {
  int64_t keys = 0;         // Lk
  int64_t total_keys = 0;   // of the sequence the parts lie in
  bool slice_bias = false;  // the bias's last dim is Lk (else 1: sent whole)
  int parts = 0;
  int64_t begin(int part) const { return Cut(part); }
  int64_t end(int part) const { return Cut(part + 1); }

 private:
  // The first keys % parts ranges are one key longer.
  int64_t Cut(int part) const {
    const int64_t base = keys / parts, longer = keys % parts;
    return part * base + std::min<int64_t>(part, longer);
  }
};

// Whether `t`'s bytes are exactly what its shape says.
absl::Status CheckBytes(const TensorView& t, absl::string_view field) {
  const int64_t n = CheckedElementCount(t.shape, INT64_MAX / 8);
  const int64_t want = n * static_cast<int64_t>(DTypeSize(t.dtype));
  if (n < 0 || static_cast<int64_t>(t.data.size()) != want) {
    return InvalidField(
        absl::StrCat(field, ".data"),
        absl::StrCat("the bytes of ", DTypeName(t.dtype), " ", ShapeString(t.shape)),
        absl::StrCat(t.data.size(), " bytes"));
  }
  return absl::OkStatus();
}

// What ShardedAttend needs of its arguments before it can cut the request;
// the servers check the rest (and name the field).
absl::StatusOr<KeySplit> PlanKeySplit(absl::Span<AttnClient* const> targets,
                                      const AttentionRequest& request, const CallOptions& call) {
  if (targets.empty()) return InvalidField("targets", "at least one AttnClient", "none");
  for (size_t i = 0; i < targets.size(); ++i) {
    if (targets[i] == nullptr)
      return InvalidField(absl::StrCat("targets[", i, "]"), "a client", "null");
  }
  if (!call.shm.empty()) {
    return InvalidField("call.shm", "none with ShardedAttend (the parts' keys are cut from the "
                        "request's bytes)", "shared-memory tensors");
  }
  // "<field>: expected <expected> with ShardedAttend (<why>), got <got>".
  const auto refuse = [](absl::string_view field, absl::string_view expected, absl::string_view why,
                         absl::string_view got) {
    return InvalidField(field, absl::StrCat(expected, " with ShardedAttend (", why, ")"), got);
  };
  if (!request.key_lengths.empty()) {
    return refuse("key_lengths", "none", "they do not combine with key_offset",
                  absl::StrCat(request.key_lengths.size(), " lengths"));
  }
  if (request.paged_kv.has_value()) {
    return refuse("paged_kv", "none", "the keys are sent", "a paged view");
  }
  constexpr absl::string_view kMerged = "the parts merge their output and lse only";
  if (request.outputs.weights) return refuse("outputs.weights", "false", kMerged, "true");
  if (request.outputs.entropy) return refuse("outputs.entropy", "false", kMerged, "true");
  if (request.outputs.top_k != 0) {
    return refuse("outputs.top_k", "0", kMerged, absl::StrCat(request.outputs.top_k));
  }
  if (request.options.variant != Variant::kSoftmax) {
    return refuse("options.variant", "SOFTMAX", "the parts merge by lse", "LINEAR");
  }
  if (!request.sparsity.empty()) {
    return refuse("sparsity", "none", "sparse attention does not combine with sharded keys",
                  "a sparse pattern or sinks");
  }

  const TensorView& key = request.key;
  const TensorView& value = request.value;
  const int64_t rank = key.rank();
  if (rank != 3 && rank != 4) {
    return InvalidField("key.shape", "[B, Lk, Hkv, D] or [Lk, Hkv, D]", ShapeString(key.shape));
  }
  KeySplit split;
  split.keys = key.shape[rank - 3];
  if (value.rank() != rank || value.shape[rank - 3] != split.keys ||
      (rank == 4 && value.shape[0] != key.shape[0])) {
    return InvalidField("value.shape",
                        absl::StrCat("[B, Lk, Hkv, Dv] with the key's B and Lk = ", split.keys),
                        ShapeString(value.shape));
  }
  if (absl::Status s = CheckBytes(key, "key"); !s.ok()) return s;
  if (absl::Status s = CheckBytes(value, "value"); !s.ok()) return s;
  if (request.bias.has_value() && request.bias->rank() > 0) {
    const int64_t last = request.bias->shape.back();
    if (last != split.keys && last != 1) {
      return InvalidField("bias.shape", absl::StrCat("a last dim of Lk = ", split.keys, " or 1"),
                          ShapeString(request.bias->shape));
    }
    split.slice_bias = last == split.keys && split.keys > 1;
    if (split.slice_bias) {
      if (absl::Status s = CheckBytes(*request.bias, "bias"); !s.ok()) return s;
    }
  }
  split.total_keys = request.total_keys != 0 ? request.total_keys : request.key_offset + split.keys;
  split.parts = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(targets.size()), split.keys)));
  return split;
}

// Appends `t`'s slice [begin, end) along `axis` to `out` (row-major).
void AppendSlice(const TensorView& t, int64_t axis, int64_t begin, int64_t end, std::string* out) {
  int64_t outer = 1, inner_bytes = static_cast<int64_t>(DTypeSize(t.dtype));
  for (int64_t a = 0; a < axis; ++a) outer *= t.shape[a];
  for (int64_t a = axis + 1; a < t.rank(); ++a) inner_bytes *= t.shape[a];
  const int64_t len = t.shape[axis];
  out->reserve(out->size() + outer * (end - begin) * inner_bytes);
  for (int64_t o = 0; o < outer; ++o) {
    out->append(t.data.substr((o * len + begin) * inner_bytes, (end - begin) * inner_bytes));
  }
}

// `t`'s metadata with `axis` cut to [begin, end), and its bytes written
// straight into the wire tensor (ToProto would copy them once more).
void SliceToProto(const TensorView& t, int64_t axis, int64_t begin, int64_t end, v1::Tensor* out) {
  std::vector<int64_t> shape = t.shape;
  shape[axis] = end - begin;
  ToProto(TensorView{t.dtype, std::move(shape), {}}, out);
  AppendSlice(t, axis, begin, end, out->mutable_data());
}

// The wire request of part `part`: its keys, values (and bias columns), the
// whole query, placed in the sequence by key_offset / total_keys, asking for
// the lse only.
v1::AttendRequest PartRequest(const AttentionRequest& request, const CallOptions& call,
                              const KeySplit& split, int part) {
  AttentionRequest shell = request;
  shell.key = TensorView{};
  shell.value = TensorView{};
  if (split.slice_bias) shell.bias.reset();
  shell.outputs = OutputSpec{};
  shell.outputs.lse = true;
  v1::AttendRequest wire = ToProto(shell, call);
  const int64_t begin = split.begin(part), end = split.end(part);
  const int64_t key_axis = request.key.rank() - 3;
  SliceToProto(request.key, key_axis, begin, end, wire.mutable_key());
  SliceToProto(request.value, key_axis, begin, end, wire.mutable_value());
  if (split.slice_bias) {
    SliceToProto(*request.bias, request.bias->rank() - 1, begin, end, wire.mutable_bias());
  }
  wire.set_key_offset(request.key_offset + begin);
  wire.set_total_keys(split.total_keys);
  return wire;
}

// The parts' answers merged into the caller's result.
absl::StatusOr<AttendResult> MergeParts(std::vector<AttendResult>& parts,
                                        const AttentionRequest& request, const CallOptions& call) {
  std::vector<AttentionStateView> states;
  std::vector<std::string> backends;
  AttendResult out;
  out.request_id = call.request_id;
  for (size_t i = 0; i < parts.size(); ++i) {
    const AttendResult& part = parts[i];
    if (!part.lse.has_value()) {
      return absl::InternalError(
          absl::StrCat("ShardedAttend: part ", i, " answered without the lse it was asked for"));
    }
    states.push_back({part.output.view(), part.lse->view()});
    if (std::find(backends.begin(), backends.end(), part.backend) == backends.end()) {
      backends.push_back(part.backend);
    }
    out.timing.queue_us = std::max(out.timing.queue_us, part.timing.queue_us);
    out.timing.compute_us = std::max(out.timing.compute_us, part.timing.compute_us);
    out.timing.batch_size = std::max(out.timing.batch_size, part.timing.batch_size);
    out.timing.total_us = std::max(out.timing.total_us, part.timing.total_us);
  }
  absl::StatusOr<MergedAttention> merged = MergeAttentionStates(states, request.query.dtype);
  if (!merged.ok()) {
    return absl::InternalError(absl::StrCat("ShardedAttend: the parts' answers do not merge: ",
                                            merged.status().message()));
  }
  out.output = std::move(merged->output);
  if (request.outputs.lse) out.lse = std::move(merged->lse);
  out.backend = absl::StrJoin(backends, ",");
  return out;
}

}  // namespace

absl::StatusOr<AttendResult> AttnClient::ShardedAttend(absl::Span<AttnClient* const> targets,
                                                       const AttentionRequest& request,
                                                       const CallOptions& call) {
  absl::StatusOr<KeySplit> split = PlanKeySplit(targets, request, call);
  if (!split.ok()) return split.status();
  const int n = split->parts;
  std::vector<v1::AttendRequest> wire(n);
  for (int i = 0; i < n; ++i) wire[i] = PartRequest(request, call, *split, i);

  // Each callback writes its own slot; Wait() orders those writes before
  // the reads below.
  std::vector<absl::StatusOr<v1::AttendResponse>> answers(n, absl::UnknownError("no answer"));
  absl::BlockingCounter pending(n);
  for (int i = 0; i < n; ++i) {
    targets[i]->AttendAsync(
        wire[i],
        [&answers, &pending, i](absl::StatusOr<v1::AttendResponse> answer) {
          answers[i] = std::move(answer);
          pending.DecrementCount();
        },
        call.deadline);
  }
  pending.Wait();

  std::vector<AttendResult> parts;
  parts.reserve(n);
  for (int i = 0; i < n; ++i) {
    absl::StatusOr<AttendResult> part =
        answers[i].ok() ? FromProto(*std::move(answers[i])) : answers[i].status();
    if (!part.ok()) {
      return absl::Status(part.status().code(),
                          absl::StrCat("part ", i, " of ", n, " (targets[", i, "] ",
                                       targets[i]->target(), ", keys [", split->begin(i), ", ",
                                       split->end(i), ")): ", part.status().message()));
    }
    parts.push_back(*std::move(part));
  }
  return MergeParts(parts, request, call);
}

absl::StatusOr<CreatedSession> AttnClient::CreateSession(const SessionSpec& spec,
                                                         absl::Duration deadline) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineFromNow(DeadlineOr(deadline)));
  v1::CreateSessionResponse response;
  absl::Status status = FromGrpcStatus(stub_->CreateSession(&context, ToProto(spec), &response));
  if (!status.ok()) return status;
  return FromProto(response);
}

absl::StatusOr<DecodeResult> AttnClient::Decode(const std::string& session_id,
                                                const DecodeStep& step, const CallOptions& call) {
  absl::StatusOr<v1::DecodeResponse> response =
      Decode(ToProto(session_id, step, call), call.deadline);
  if (!response.ok()) return response.status();
  return FromProto(std::move(*response));
}

absl::StatusOr<v1::DecodeResponse> AttnClient::Decode(const v1::DecodeRequest& request,
                                                      absl::Duration deadline) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineFromNow(DeadlineOr(deadline)));
  v1::DecodeResponse response;
  absl::Status status = FromGrpcStatus(stub_->Decode(&context, request, &response));
  if (!status.ok()) return status;
  return response;
}

namespace {

// State of one DecodeAsync call, alive from the start of the call to its
// callback.
struct AsyncDecodeCall {
  InFlightCounter::Guard guard;  // first: released after the context is gone
  grpc::ClientContext context;
  v1::DecodeResponse response;
  AttnClient::DecodeCallback done;
};

}  // namespace

void AttnClient::DecodeAsync(const v1::DecodeRequest& request, DecodeCallback done,
                             absl::Duration deadline) {
  auto* call = new AsyncDecodeCall;
  call->guard = InFlightCounter::Guard(in_flight_);
  call->done = std::move(done);
  call->context.set_deadline(DeadlineFromNow(DeadlineOr(deadline)));
  stub_->async()->Decode(&call->context, &request, &call->response,
                         [call](grpc::Status grpc_status) {
                           std::unique_ptr<AsyncDecodeCall> owned(call);
                           absl::Status status = FromGrpcStatus(grpc_status);
                           if (status.ok()) {
                             std::move(owned->done)(std::move(owned->response));
                           } else {
                             std::move(owned->done)(std::move(status));
                           }
                         });
}

absl::Status AttnClient::CloseSession(const std::string& session_id, absl::Duration deadline) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineFromNow(DeadlineOr(deadline)));
  v1::CloseSessionRequest request;
  request.set_session_id(session_id);
  v1::CloseSessionResponse response;
  return FromGrpcStatus(stub_->CloseSession(&context, request, &response));
}

absl::StatusOr<ForkedSession> AttnClient::ForkSession(const std::string& session_id,
                                                      int64_t tokens, absl::Duration deadline) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineFromNow(DeadlineOr(deadline)));
  v1::ForkSessionRequest request;
  request.set_session_id(session_id);
  request.set_tokens(tokens);
  v1::ForkSessionResponse response;
  absl::Status status = FromGrpcStatus(stub_->ForkSession(&context, request, &response));
  if (!status.ok()) return status;
  return FromProto(response);
}

absl::StatusOr<v1::BatchDecodeResponse> AttnClient::BatchDecode(
    const v1::BatchDecodeRequest& request, absl::Duration deadline) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineFromNow(DeadlineOr(deadline)));
  v1::BatchDecodeResponse response;
  absl::Status status = FromGrpcStatus(stub_->BatchDecode(&context, request, &response));
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<std::vector<absl::StatusOr<DecodeResult>>> AttnClient::BatchDecode(
    int32_t layer, const std::vector<SessionStep>& steps, const CallOptions& call) {
  absl::StatusOr<v1::BatchDecodeRequest> request = ToProto(layer, steps, call);
  if (!request.ok()) return request.status();
  absl::StatusOr<v1::BatchDecodeResponse> response = BatchDecode(*request, call.deadline);
  if (!response.ok()) return response.status();
  return FromProto(std::move(*response), steps.size());
}

namespace {

// State of one BatchDecodeAsync call, alive from the start of the call to
// its callback.
struct AsyncBatchDecodeCall {
  InFlightCounter::Guard guard;  // first: released after the context is gone
  grpc::ClientContext context;
  v1::BatchDecodeResponse response;
  AttnClient::BatchDecodeCallback done;
};

}  // namespace

void AttnClient::BatchDecodeAsync(const v1::BatchDecodeRequest& request,
                                  BatchDecodeCallback done, absl::Duration deadline) {
  auto* call = new AsyncBatchDecodeCall;
  call->guard = InFlightCounter::Guard(in_flight_);
  call->done = std::move(done);
  call->context.set_deadline(DeadlineFromNow(DeadlineOr(deadline)));
  stub_->async()->BatchDecode(&call->context, &request, &call->response,
                              [call](grpc::Status grpc_status) {
                                std::unique_ptr<AsyncBatchDecodeCall> owned(call);
                                absl::Status status = FromGrpcStatus(grpc_status);
                                if (status.ok()) {
                                  std::move(owned->done)(std::move(owned->response));
                                } else {
                                  std::move(owned->done)(std::move(status));
                                }
                              });
}

std::unique_ptr<AttendStream> AttnClient::OpenStream(absl::Duration deadline) {
  return std::make_unique<AttendStream>(stub_.get(), deadline, InFlightCounter::Guard(in_flight_));
}

}  // namespace attnserve::client
