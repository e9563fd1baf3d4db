// AttendLayer: one attention layer of a model loaded with --model, from
// hidden states. The request is planned as a LayerCall (model/layer.h): its
// attention job goes to the scheduler like an Attend's, with the call as the
// task's stage, so that the projections of every AttendLayer on the same
// layer in one backend call run as one matmul.
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/layer.h"
#include "server/call_context.h"
#include "server/convert.h"
#include "server/service.h"
#include "server/shm_source.h"

namespace attnserve {
namespace {
constexpr char kAttendLayer[] = "AttendLayer";
}  // namespace

absl::StatusOr<const Model*> AttentionServiceImpl::ModelFor(const std::string& name,
                                                            absl::string_view field) const {
  std::vector<std::string> names;
  for (const Model* model : options_.models) {
    if (model->name() == name) return model;
    names.push_back(model->name());
  }
  if (names.empty()) {
    return absl::NotFoundError(absl::StrCat(
        field, ": model \"", name, "\" is not loaded: this server has no models (--model)"));
  }
  return absl::NotFoundError(absl::StrCat(field, ": expected one of the loaded models ",
                                          absl::StrJoin(names, ", "), ", got \"", name, "\""));
}

absl::Status AttentionServiceImpl::SubmitLayer(const v1::AttendLayerRequest& request,
                                               std::shared_ptr<ShmTensorSource> shm,
                                               absl::Time deadline,
                                               std::function<bool()> is_cancelled,
                                               absl::Time received,
                                               v1::AttendLayerResponse* response,
                                               MemoryBudget::Reservation* reservation,
                                               std::function<void(absl::Status)> done) {
  absl::StatusOr<Backend*> chosen = AdmissionBackend(request.backend(), request.priority());
  if (!chosen.ok()) return chosen.status();
  Backend* backend = *chosen;
  absl::StatusOr<const Model*> model = ModelFor(request.model(), "model");
  if (!model.ok()) return model.status();

  LayerInput input;
  input.model = *model;
  input.layer = request.layer();
  absl::StatusOr<TensorView> x = ViewFromProto(request.x(), "x", shm.get());
  if (!x.ok()) return x.status();
  input.x = *std::move(x);
  if (request.has_memory()) {
    absl::StatusOr<TensorView> memory = ViewFromProto(request.memory(), "memory", shm.get());
    if (!memory.ok()) return memory.status();
    input.memory = *std::move(memory);
  }
  input.positions.assign(request.positions().begin(), request.positions().end());
  if (request.has_causal()) input.causal = request.causal();
  absl::StatusOr<AttentionOptions> options = OptionsFromProto(request.options());
  if (!options.ok()) return options.status();
  input.options = *std::move(options);
  input.key_lengths.assign(request.key_lengths().begin(), request.key_lengths().end());
  input.outputs = OutputsFromProto(request.outputs());

  absl::StatusOr<std::unique_ptr<LayerCall>> planned = LayerCall::Plan(input, options_.limits);
  if (!planned.ok()) return CountRejection(planned.status(), "size");
  std::shared_ptr<LayerCall> call = *std::move(planned);
  std::unique_ptr<AttentionJob> job = call->TakeJob();
  if (absl::Status s = CheckRunnable(*job, *backend); !s.ok()) return s;
  // outputs.output_shm: y (x's dtype and shape) is copied there after the
  // output projection, which computes it in F32.
  const v1::SharedMemoryRef* output_shm = nullptr;
  char* y_target = nullptr;
  if (request.outputs().has_output_shm()) {
    output_shm = &request.outputs().output_shm();
    absl::StatusOr<char*> target =
        shm->Output(*output_shm, "outputs.output_shm", static_cast<int64_t>(input.x.data.size()),
                    input.x.dtype);
    if (!target.ok()) return target.status();
    y_target = *target;
  }
  const AttentionJob* reserved_job = job.get();
  absl::StatusOr<MemoryBudget::Reservation> reserved =
      ReserveMemory(absl::MakeConstSpan(&reserved_job, 1), *backend,
                    static_cast<int64_t>(request.ByteSizeLong()), call->held_bytes());
  if (!reserved.ok()) return reserved.status();
  *reservation = *std::move(reserved);

  response->set_request_id(request.request_id());
  Task task;
  task.job = std::move(job);
  task.backend = backend;
  task.stage = call.get();
  task.priority = request.priority();
  task.deadline = deadline;
  task.is_cancelled = std::move(is_cancelled);
  task.done = [call, response, received, backend, shm = std::move(shm), output_shm, y_target,
               done = std::move(done)](absl::Status status, std::unique_ptr<AttentionJob> job,
                                       const TaskTiming& timing) {
    if (status.ok() && output_shm != nullptr) {
      std::memcpy(y_target, call->y().data.data(), call->y().data.size());
    }
    if (status.ok()) status = shm->CheckIntact();
    if (status.ok()) {
      TensorToProto(call->y(), response->mutable_y());
      if (output_shm != nullptr) ShmOutputToProto(*output_shm, response->mutable_y());
      OptionalOutputsToProto(*job, response);
      TimingToProto(timing, received, response->mutable_timing());
      response->set_backend(backend->info().name);
    }
    job.reset();
    done(std::move(status));
  };
  return CountRejection(options_.scheduler->Submit(std::move(task)), "queue");
}

grpc::ServerUnaryReactor* AttentionServiceImpl::AttendLayer(grpc::CallbackServerContext* context,
                                                            const v1::AttendLayerRequest* request,
                                                            v1::AttendLayerResponse* response) {
  return ScheduleUnary(context, kAttendLayer,
                       [&](absl::Time deadline, std::function<bool()> is_cancelled,
                           absl::Time received, MemoryBudget::Reservation* reservation,
                           std::function<void(absl::Status)> done) {
                         return SubmitLayer(*request, ShmSourceFor(CallerOf(context)), deadline,
                                            std::move(is_cancelled), received, response,
                                            reservation, std::move(done));
                       });
}

}  // namespace attnserve
