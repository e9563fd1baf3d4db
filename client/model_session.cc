#include "client/model_session.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace attnserve::client {

absl::StatusOr<std::unique_ptr<ModelSession>> ModelSession::Create(AttnClient* client,
                                                                   int n_sequences,
                                                                   const SessionSpec& spec,
                                                                   absl::Duration deadline) {
  if (n_sequences < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("n_sequences: expected >= 1, got ", n_sequences));
  }
  // num_layers 0 means 1 on the wire; a model session has its model's,
  // which only the server's answer tells.
  std::optional<int32_t> layers;
  if (spec.model.empty()) layers = std::max(spec.num_layers, 1);
  std::unique_ptr<ModelSession> model;
  for (int i = 0; i < n_sequences; ++i) {
    absl::StatusOr<CreatedSession> created = client->CreateSession(spec, deadline);
    if (!created.ok()) {
      // The destructor closes the sequences opened so far.
      return absl::Status(created.status().code(),
                          absl::StrCat("sequence ", i, ": ", created.status().message()));
    }
    if (!layers.has_value()) {
      if (created->num_layers < 1) {
        (void)client->CloseSession(created->session_id, deadline);
        return absl::InternalError(absl::StrCat("sequence ", i, ": num_layers: expected >= 1 (",
                                                "model ", spec.model, "), got ",
                                                created->num_layers));
      }
      layers = created->num_layers;
    }
    if (created->num_layers != 0 && created->num_layers != *layers) {
      (void)client->CloseSession(created->session_id, deadline);
      return absl::InternalError(absl::StrCat("sequence ", i, ": num_layers: expected ", *layers,
                                              ", got ", created->num_layers));
    }
    if (model == nullptr) model.reset(new ModelSession(client, *layers, deadline));
    model->sequences_.push_back(
        Sequence{created->session_id, std::vector<int64_t>(static_cast<size_t>(*layers), 0)});
  }
  return model;
}

ModelSession::~ModelSession() { (void)Close(); }

absl::Status ModelSession::Close() {
  absl::Status first;
  for (const Sequence& s : sequences_) {
    absl::Status closed = client_->CloseSession(s.session_id, deadline_);
    if (!closed.ok() && first.ok()) {
      first = absl::Status(closed.code(),
                           absl::StrCat("session ", s.session_id, ": ", closed.message()));
    }
  }
  sequences_.clear();
  return first;
}

absl::StatusOr<int> ModelSession::Fork(int sequence, int64_t tokens) {
  if (sequence < 0 || sequence >= num_sequences()) {
    return absl::InvalidArgumentError(absl::StrCat("sequence: expected in [0, ", num_sequences(),
                                                   "), got ", sequence));
  }
  absl::StatusOr<ForkedSession> forked =
      client_->ForkSession(sequences_[sequence].session_id, tokens, deadline_);
  if (!forked.ok()) {
    return absl::Status(forked.status().code(),
                        absl::StrCat("sequence ", sequence, ": ", forked.status().message()));
  }
  // Every layer of the fork starts with the tokens it shares.
  sequences_.push_back(Sequence{forked->session_id,
                                std::vector<int64_t>(static_cast<size_t>(num_layers_),
                                                     forked->context_tokens)});
  return num_sequences() - 1;
}

absl::StatusOr<std::vector<Tensor>> ModelSession::StepLayer(int32_t layer,
                                                            const std::vector<SequenceStep>& steps,
                                                            const AttentionOptions& options,
                                                            const CallOptions& call) {
  if (layer < 0 || layer >= num_layers_) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer: expected in [0, ", num_layers_, "), got ", layer));
  }
  if (static_cast<int>(steps.size()) != num_sequences()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "steps: expected one per sequence (", num_sequences(), "), got ", steps.size()));
  }
  std::vector<SessionStep> entries;
  entries.reserve(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    DecodeStep step;
    step.query = steps[i].query;
    step.key = steps[i].key;
    step.value = steps[i].value;
    step.hidden = steps[i].hidden;
    step.options = options;
    step.layer = layer;
    step.expected_context_tokens = sequences_[i].tokens[layer];
    entries.push_back(SessionStep{sequences_[i].session_id, std::move(step), {}});
  }
  absl::StatusOr<std::vector<absl::StatusOr<DecodeResult>>> results =
      client_->BatchDecode(layer, entries, call);
  if (!results.ok()) return results.status();

  absl::Status first_error;
  std::vector<Tensor> outputs(steps.size());
  for (size_t i = 0; i < results->size(); ++i) {
    absl::StatusOr<DecodeResult>& r = (*results)[i];
    if (!r.ok()) {
      if (first_error.ok()) {
        first_error = absl::Status(r.status().code(),
                                   absl::StrCat("sequence ", i, " (session ",
                                                sequences_[i].session_id,
                                                "): ", r.status().message()));
      }
      continue;
    }
    sequences_[i].tokens[layer] = r->context_tokens;
    outputs[i] = std::move(r->output);
  }
  if (!first_error.ok()) return first_error;
  return outputs;
}

}  // namespace attnserve::client
