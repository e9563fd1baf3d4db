#include "client/convert.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace attnserve::client {
namespace {

void ShmRefToProto(const ShmRef& ref, v1::SharedMemoryRef* out) {
  out->set_region(ref.region);
  out->set_offset(ref.offset);
}

}  // namespace

void ToProto(const TensorView& view, const std::optional<ShmRef>& shm, v1::Tensor* out) {
  if (!shm.has_value()) {
    ToProto(view, out);
    return;
  }
  out->set_dtype(ToProto(view.dtype));
  out->mutable_shape()->Assign(view.shape.begin(), view.shape.end());
  out->clear_data();
  ShmRefToProto(*shm, out->mutable_shm());
}

namespace {

// Checks dtype, dims and data length, and fills everything but the bytes.
absl::StatusOr<Tensor> TensorMeta(const v1::Tensor& t, absl::string_view field) {
  absl::StatusOr<DType> dtype = DTypeFromProto(t.dtype(), absl::StrCat(field, ".dtype"));
  if (!dtype.ok()) return dtype.status();
  Tensor out;
  out.dtype = *dtype;
  out.shape.assign(t.shape().begin(), t.shape().end());
  const int64_t n = CheckedElementCount(out.shape, INT64_MAX / 8);
  if (n < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".shape: expected non-negative dims with a product that fits, got ",
        ShapeString(out.shape)));
  }
  const uint64_t want = static_cast<uint64_t>(n) * DTypeSize(out.dtype);
  if (t.has_shm()) {
    // The bytes are in the caller's region: the message carries none.
    if (!t.data().empty()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s.data: expected none beside shm, got %d bytes", field, t.data().size()));
    }
    return out;
  }
  if (t.data().size() != want) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s.data: expected %d bytes for %s %s, got %d", field, want, DTypeName(out.dtype),
        ShapeString(out.shape), t.data().size()));
  }
  return out;
}

// Like FromProto but steals the bytes instead of copying them.
absl::StatusOr<Tensor> MoveFromProto(v1::Tensor* t, absl::string_view field) {
  absl::StatusOr<Tensor> out = TensorMeta(*t, field);
  if (!out.ok()) return out.status();
  out->data.swap(*t->mutable_data());
  return out;
}

// MoveFromProto of a main output, which the server may have written to
// shared memory: then `shm` says where, and the tensor has no data.
absl::StatusOr<Tensor> MoveOutputFromProto(v1::Tensor* t, absl::string_view field,
                                           std::optional<ShmRef>* shm) {
  if (t->has_shm()) *shm = ShmRef{t->shm().region(), t->shm().offset()};
  return MoveFromProto(t, field);
}

absl::StatusOr<std::optional<Tensor>> OptionalFromProto(bool present, v1::Tensor* t,
                                                        absl::string_view field) {
  if (!present) return std::optional<Tensor>();
  absl::StatusOr<Tensor> out = MoveFromProto(t, field);
  if (!out.ok()) return out.status();
  return std::optional<Tensor>(std::move(*out));
}

ServerTiming TimingFromProto(const v1::Timing& timing) {
  return ServerTiming{timing.queue_us(), timing.compute_us(), timing.batch_size(),
                      timing.total_us()};
}

// Moves the optional outputs an AttendResponse and an AttendLayerResponse
// share (same field names) into `out` (an AttendResult or a LayerResult).
template <typename Response, typename Result>
absl::Status MoveOptionalOutputs(Response& response, Result* out) {
  struct Optional {
    bool present;
    v1::Tensor* tensor;
    absl::string_view field;
    std::optional<Tensor>* dest;
  };
  // has_*() is read before mutable_*(), which would create the field.
  const Optional optionals[] = {
      {response.has_lse(), response.mutable_lse(), "lse", &out->lse},
      {response.has_entropy(), response.mutable_entropy(), "entropy", &out->entropy},
      {response.has_weights(), response.mutable_weights(), "weights", &out->weights},
      {response.has_top_k_indices(), response.mutable_top_k_indices(), "top_k_indices",
       &out->top_k_indices},
      {response.has_top_k_weights(), response.mutable_top_k_weights(), "top_k_weights",
       &out->top_k_weights},
  };
  for (const Optional& o : optionals) {
    absl::StatusOr<std::optional<Tensor>> t = OptionalFromProto(o.present, o.tensor, o.field);
    if (!t.ok()) return t.status();
    *o.dest = std::move(*t);
  }
  return absl::OkStatus();
}

// A step's tensors: hidden when set, and query/key/value unless hidden
// replaces them (left as default, empty views).
// `shm` places any of them in shared memory.
template <typename Message>
void StepTensorsToProto(const DecodeStep& step, const ShmTensors& shm, Message* out) {
  const auto unset = [](const TensorView& v) { return v.shape.empty() && v.data.empty(); };
  const bool hidden = step.hidden.has_value();
  if (hidden) ToProto(*step.hidden, shm.hidden, out->mutable_hidden());
  if (!hidden || !unset(step.query)) ToProto(step.query, shm.query, out->mutable_query());
  if (!hidden || !unset(step.key)) ToProto(step.key, shm.key, out->mutable_key());
  if (!hidden || !unset(step.value)) ToProto(step.value, shm.value, out->mutable_value());
}

}  // namespace

absl::StatusOr<Tensor> FromProto(const v1::Tensor& t, absl::string_view field) {
  absl::StatusOr<Tensor> out = TensorMeta(t, field);
  if (!out.ok()) return out.status();
  out->data = t.data();
  return out;
}

v1::AttendRequest ToProto(const AttentionRequest& request, const CallOptions& call) {
  v1::AttendRequest out;
  out.set_request_id(call.request_id);
  const ShmTensors& shm = call.shm;
  ToProto(request.query, shm.query, out.mutable_query());
  ToProto(request.key, shm.key, out.mutable_key());
  ToProto(request.value, shm.value, out.mutable_value());
  if (request.bias.has_value()) ToProto(*request.bias, shm.bias, out.mutable_bias());
  out.mutable_key_lengths()->Assign(request.key_lengths.begin(), request.key_lengths.end());
  out.set_key_offset(request.key_offset);
  out.set_total_keys(request.total_keys);

  ToProto(request.options, out.mutable_options());
  // Unset when dense, so a request without sparsity is byte-for-byte what it was.
  if (!request.sparsity.empty()) ToProto(request.sparsity, out.mutable_sparsity());

  OutputsToProto(request.outputs, out.mutable_outputs());
  if (shm.output.has_value()) {
    ShmRefToProto(*shm.output, out.mutable_outputs()->mutable_output_shm());
  }

  out.set_backend(call.backend);
  out.set_priority(call.priority);
  return out;
}

absl::StatusOr<AttendResult> FromProto(v1::AttendResponse&& response) {
  AttendResult out;
  out.request_id = response.request_id();
  out.backend = response.backend();
  absl::StatusOr<Tensor> output =
      MoveOutputFromProto(response.mutable_output(), "output", &out.output_shm);
  if (!output.ok()) return output.status();
  out.output = std::move(*output);
  if (absl::Status s = MoveOptionalOutputs(response, &out); !s.ok()) return s;
  out.timing = TimingFromProto(response.timing());
  return out;
}

v1::AttendLayerRequest ToProto(const LayerRequest& request, const CallOptions& call) {
  v1::AttendLayerRequest out;
  out.set_request_id(call.request_id);
  out.set_model(request.model);
  out.set_layer(request.layer);
  ToProto(request.x, out.mutable_x());
  if (request.memory.has_value()) ToProto(*request.memory, out.mutable_memory());
  out.mutable_positions()->Assign(request.positions.begin(), request.positions.end());
  if (request.causal.has_value()) out.set_causal(*request.causal);
  ToProto(request.options, out.mutable_options());
  out.mutable_key_lengths()->Assign(request.key_lengths.begin(), request.key_lengths.end());
  OutputsToProto(request.outputs, out.mutable_outputs());
  if (call.shm.output.has_value()) {
    ShmRefToProto(*call.shm.output, out.mutable_outputs()->mutable_output_shm());
  }
  out.set_backend(call.backend);
  out.set_priority(call.priority);
  return out;
}

absl::StatusOr<LayerResult> FromProto(v1::AttendLayerResponse&& response) {
  LayerResult out;
  out.request_id = response.request_id();
  out.backend = response.backend();
  absl::StatusOr<Tensor> y = MoveOutputFromProto(response.mutable_y(), "y", &out.y_shm);
  if (!y.ok()) return y.status();
  out.y = std::move(*y);
  if (absl::Status s = MoveOptionalOutputs(response, &out); !s.ok()) return s;
  out.timing = TimingFromProto(response.timing());
  return out;
}

v1::CreateSessionRequest ToProto(const SessionSpec& spec) {
  v1::CreateSessionRequest out;
  out.set_num_kv_heads(spec.num_kv_heads);
  out.set_head_dim(spec.head_dim);
  out.set_value_dim(spec.value_dim);
  out.set_dtype(ToProto(spec.cache_dtype));
  out.set_max_tokens(spec.max_tokens);
  out.set_num_layers(spec.num_layers);
  if (spec.rotary.has_value()) *out.mutable_rotary() = *spec.rotary;
  out.set_sink_tokens(spec.sink_tokens);
  out.set_window_tokens(spec.window_tokens);
  out.set_model(spec.model);
  return out;
}

CreatedSession FromProto(const v1::CreateSessionResponse& response) {
  return CreatedSession{response.session_id(), response.capacity_tokens(),
                        response.block_tokens(), response.num_layers()};
}

ForkedSession FromProto(const v1::ForkSessionResponse& response) {
  return ForkedSession{response.session_id(), response.context_tokens(),
                       response.shared_tokens()};
}

v1::DecodeRequest ToProto(const std::string& session_id, const DecodeStep& step,
                          const CallOptions& call) {
  v1::DecodeRequest out;
  out.set_session_id(session_id);
  out.set_request_id(call.request_id);
  StepTensorsToProto(step, call.shm, &out);
  ToProto(step.options, out.mutable_options());
  out.mutable_outputs()->set_lse(step.lse);
  out.mutable_outputs()->set_entropy(step.entropy);
  if (call.shm.output.has_value()) {
    ShmRefToProto(*call.shm.output, out.mutable_outputs()->mutable_output_shm());
  }
  out.set_backend(call.backend);
  out.set_priority(call.priority);
  out.set_layer(step.layer);
  if (step.expected_context_tokens.has_value()) {
    out.set_expected_context_tokens(*step.expected_context_tokens);
  }
  if (!step.sparsity.empty()) ToProto(step.sparsity, out.mutable_sparsity());
  return out;
}

absl::StatusOr<v1::BatchDecodeRequest> ToProto(int32_t layer,
                                               const std::vector<SessionStep>& steps,
                                               const CallOptions& call) {
  if (steps.empty()) {
    return absl::InvalidArgumentError("steps: expected at least one, got none");
  }
  if (!call.shm.empty()) {
    return absl::InvalidArgumentError(
        "call.shm: expected none in a BatchDecode (each SessionStep has its own shm), got some");
  }
  v1::BatchDecodeRequest out;
  out.set_request_id(call.request_id);
  out.set_layer(layer);
  out.set_backend(call.backend);
  out.set_priority(call.priority);
  ToProto(steps[0].step.options, out.mutable_options());
  out.mutable_outputs()->set_lse(steps[0].step.lse);
  out.mutable_outputs()->set_entropy(steps[0].step.entropy);
  // The wire has one options message per batch: compare each step's wire form.
  const std::string options = out.options().SerializeAsString();
  v1::AttentionOptions step_options;
  for (size_t i = 0; i < steps.size(); ++i) {
    const DecodeStep& step = steps[i].step;
    if (i > 0) {
      step_options.Clear();
      ToProto(step.options, &step_options);
      if (step_options.SerializeAsString() != options) {
        return absl::InvalidArgumentError(absl::StrCat(
            "steps[", i, "].step.options: expected steps[0]'s (one per batch), got ",
            step_options.ShortDebugString()));
      }
      if (step.lse != steps[0].step.lse) {
        return absl::InvalidArgumentError(absl::StrCat(
            "steps[", i, "].step.lse: expected steps[0]'s (", steps[0].step.lse,
            ", one per batch), got ", step.lse));
      }
      if (step.entropy != steps[0].step.entropy) {
        return absl::InvalidArgumentError(absl::StrCat(
            "steps[", i, "].step.entropy: expected steps[0]'s (", steps[0].step.entropy,
            ", one per batch), got ", step.entropy));
      }
    }
    v1::BatchDecodeEntry* entry = out.add_entries();
    entry->set_session_id(steps[i].session_id);
    StepTensorsToProto(step, steps[i].shm, entry);
    if (steps[i].shm.output.has_value()) {
      ShmRefToProto(*steps[i].shm.output, entry->mutable_output_shm());
    }
    if (step.expected_context_tokens.has_value()) {
      entry->set_expected_context_tokens(*step.expected_context_tokens);
    }
    if (!step.sparsity.empty()) ToProto(step.sparsity, entry->mutable_sparsity());
  }
  return out;
}

absl::StatusOr<std::vector<absl::StatusOr<DecodeResult>>> FromProto(
    v1::BatchDecodeResponse&& response, size_t entries) {
  if (static_cast<size_t>(response.results_size()) != entries) {
    return absl::InternalError(absl::StrCat("results: expected ", entries,
                                            ", one per entry, got ", response.results_size()));
  }
  const ServerTiming server_timing = TimingFromProto(response.timing());
  std::vector<absl::StatusOr<DecodeResult>> out;
  out.reserve(entries);
  for (int i = 0; i < response.results_size(); ++i) {
    v1::BatchDecodeResult* r = response.mutable_results(i);
    if (r->code() != 0) {
      // grpc and absl status codes share their values; an unknown one stays UNKNOWN.
      const absl::StatusCode code = r->code() > 0 && r->code() <= 16
                                        ? static_cast<absl::StatusCode>(r->code())
                                        : absl::StatusCode::kUnknown;
      out.push_back(absl::Status(code, r->message()));
      continue;
    }
    DecodeResult result;
    result.request_id = response.request_id();
    result.backend = response.backend();
    result.timing = server_timing;
    result.context_tokens = r->context_tokens();
    const std::string prefix = absl::StrCat("results[", i, "].");
    absl::StatusOr<Tensor> output =
        MoveOutputFromProto(r->mutable_output(), prefix + "output", &result.output_shm);
    if (!output.ok()) {
      out.push_back(output.status());
      continue;
    }
    result.output = std::move(*output);
    const bool has_lse = r->has_lse();
    absl::StatusOr<std::optional<Tensor>> lse =
        OptionalFromProto(has_lse, r->mutable_lse(), prefix + "lse");
    if (!lse.ok()) {
      out.push_back(lse.status());
      continue;
    }
    result.lse = std::move(*lse);
    const bool has_entropy = r->has_entropy();
    absl::StatusOr<std::optional<Tensor>> entropy =
        OptionalFromProto(has_entropy, r->mutable_entropy(), prefix + "entropy");
    if (!entropy.ok()) {
      out.push_back(entropy.status());
      continue;
    }
    result.entropy = std::move(*entropy);
    out.push_back(std::move(result));
  }
  return out;
}

absl::StatusOr<DecodeResult> FromProto(v1::DecodeResponse&& response) {
  DecodeResult out;
  out.request_id = response.request_id();
  out.backend = response.backend();
  out.context_tokens = response.context_tokens();
  absl::StatusOr<Tensor> output =
      MoveOutputFromProto(response.mutable_output(), "output", &out.output_shm);
  if (!output.ok()) return output.status();
  out.output = std::move(*output);
  // Asked before mutable_lse() and mutable_entropy(), which would create the fields.
  const bool has_lse = response.has_lse();
  absl::StatusOr<std::optional<Tensor>> lse =
      OptionalFromProto(has_lse, response.mutable_lse(), "lse");
  if (!lse.ok()) return lse.status();
  out.lse = std::move(*lse);
  const bool has_entropy = response.has_entropy();
  absl::StatusOr<std::optional<Tensor>> entropy =
      OptionalFromProto(has_entropy, response.mutable_entropy(), "entropy");
  if (!entropy.ok()) return entropy.status();
  out.entropy = std::move(*entropy);
  out.timing = TimingFromProto(response.timing());
  return out;
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  // grpc::StatusCode and absl::StatusCode share their numeric values (0..16).
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

}  // namespace attnserve::client
