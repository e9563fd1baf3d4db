#include "server/service.h"

#include <chrono>
#include <algorithm>
#include <deque>
#include <limits>
#include <string>
#include <vector>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "server/call_context.h"
#include "server/convert.h"
#include "server/shards.h"
#include "server/shm_source.h"
#include "server/status.h"
#include "server/wire_request.h"
#include "server/wire_response.h"

namespace attnserve {
namespace {

constexpr char kAttend[] = "Attend";
constexpr char kAttendStream[] = "AttendStream";
constexpr char kBatchDecodeStream[] = "BatchDecodeStream";

// Positions for `tokens` tokens of each of `batch` rows from `given` (empty:
// first[b] + i, at least 0; one per token, shared by the rows; or one per row
// and token).
absl::StatusOr<std::vector<int64_t>> ExpandPositions(
    const google::protobuf::RepeatedField<int64_t>& given, absl::string_view field, int64_t batch,
    int64_t tokens, const std::vector<int64_t>& first) {
  const int64_t n = given.size();
  if (n != 0 && n != tokens && n != batch * tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": expected 0, ", tokens, " (one per token) or ", batch * tokens,
        " (batch × tokens) values, got ", n));
  }
  std::vector<int64_t> out(batch * tokens);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < tokens; ++i) {
      const int64_t p = n == 0 ? std::max<int64_t>(0, first[b] + i)
                               : given[n == tokens ? i : b * tokens + i];
      if (p < 0 || p > std::numeric_limits<int32_t>::max()) {
        return absl::InvalidArgumentError(absl::StrCat(
            field, "[", n == tokens ? i : b * tokens + i, "]: expected a position in [0, 2^31), got ",
            p));
      }
      out[b * tokens + i] = p;
    }
  }
  return out;
}

}  // namespace

// The rotated copies of an Attend's query and key (RoPE on a stateless call).
struct AttentionServiceImpl::RotatedInputs {
  std::string query;
  std::string key;
  int64_t bytes() const { return static_cast<int64_t>(query.size() + key.size()); }
};

absl::StatusOr<std::shared_ptr<AttentionServiceImpl::RotatedInputs>>
AttentionServiceImpl::RotateInputs(const v1::AttendRequest& request, const AttentionJob& job,
                                   AttentionRequest* core) {
  if (!request.has_rotary()) {
    return absl::InvalidArgumentError(
        "rotary: expected rotary settings with query_positions or key_positions, got none");
  }
  absl::StatusOr<RopeConfig> rope = RopeFromProto(request.rotary());
  if (!rope.ok()) return rope.status();
  const AttentionParams& p = job.params;
  if (absl::Status s = ValidateRope(*rope, p.head_dim, "rotary"); !s.ok()) return s;
  // By default a row's queries end where its keys do (key_lengths[b] with
  // padding), as the causal diagonal has it.
  // Sharded keys sit at key_offset.. of a sequence of total_keys, and the
  // queries end where that sequence does.
  const bool sharded = core->key_offset != 0 || core->total_keys != 0;
  const int64_t total = core->total_keys != 0 ? core->total_keys : core->key_offset + p.seqlen_k;
  std::vector<int64_t> q_first(p.batch, (sharded ? total : p.seqlen_k) - p.seqlen_q);
  for (int64_t b = 0; b < p.batch && !core->key_lengths.empty(); ++b) {
    q_first[b] = core->key_lengths[b] - p.seqlen_q;
  }
  absl::StatusOr<std::vector<int64_t>> q_pos = ExpandPositions(
      request.query_positions(), "query_positions", p.batch, p.seqlen_q, q_first);
  if (!q_pos.ok()) return q_pos.status();
  absl::StatusOr<std::vector<int64_t>> k_pos = ExpandPositions(
      request.key_positions(), "key_positions", p.batch, p.seqlen_k,
      std::vector<int64_t>(p.batch, core->key_offset));
  if (!k_pos.ok()) return k_pos.status();
  // DYNAMIC scales by the call's last position, queries and keys alike.
  const int64_t last = std::max(*std::max_element(q_pos->begin(), q_pos->end()),
                                *std::max_element(k_pos->begin(), k_pos->end()));
  auto rotated = std::make_shared<RotatedInputs>();
  if (absl::Status s = RotatedCopy(*rope, core->query, p.num_heads_q, p.head_dim, *q_pos, last,
                                   core->query.dtype, &rotated->query);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = RotatedCopy(*rope, core->key, p.num_heads_kv, p.head_dim, *k_pos, last,
                                   core->key.dtype, &rotated->key);
      !s.ok()) {
    return s;
  }
  core->query.data = rotated->query;
  core->key.data = rotated->key;
  return rotated;
}

// What StartDrain needs of an open stream.
class AttentionServiceImpl::StreamBase {
 public:
  virtual ~StreamBase() = default;
  virtual void BeginDrain() = 0;
};

// One AttendStream or BatchDecodeStream call (a Request/Response pair and a
// `submit` that admits one request like Submit). Reads requests while fewer than max_stream_inflight
// are held (submitted, or computed and waiting to be written), writes
// responses one at a time in completion order, and finishes once nothing is
// held and either the client half-closed or the stream is stopping (an error,
// a cancellation or a drain). Every gRPC operation is started with mu_ held, so
// the decision and the operation cannot be reordered; gRPC never runs a
// reaction inline from StartRead/StartWrite/Finish, so that cannot deadlock.
template <typename Request, typename Response>
class AttentionServiceImpl::StreamReactor final
    : public grpc::ServerBidiReactor<Request, Response>,
      public AttentionServiceImpl::StreamBase {
 public:
  // Admits one request; as AttentionServiceImpl::Submit.
  using SubmitFn = std::function<absl::Status(
      const Request& request, absl::Time deadline, std::function<bool()> is_cancelled,
      absl::Time received, Response* response, MemoryBudget::Reservation* reservation,
      std::function<void(absl::Status)> done)>;

  StreamReactor(AttentionServiceImpl* service, grpc::CallbackServerContext* context,
                const char* method, SubmitFn submit)
      : service_(service), context_(context), method_(method), submit_(std::move(submit)) {
    service_->AddStream(this);
    absl::MutexLock lock(&mu_);
    draining_ = service_->draining();
    Advance();
  }

  void BeginDrain() override {
    absl::MutexLock lock(&mu_);
    draining_ = true;
    Advance();
  }

  void OnReadDone(bool ok) override {
    std::unique_ptr<Item> item;
    {
      absl::MutexLock lock(&mu_);
      reading_ = false;
      item = std::move(read_item_);
      if (!ok) {
        reads_done_ = true;
        Advance();
        return;
      }
      if (finished_ || !error_.ok()) {
        Advance();
        return;
      }
      // Held until the submission below is settled, so the stream cannot
      // finish (and be deleted) while this reaction still runs.
      ++inflight_;
      submitting_ = true;
    }
    item->received = absl::Now();
    service_->options_.metrics->RequestStarted();
    Item* raw = item.release();
    absl::Status submitted = AdmitNoThrow([&] {
      return submit_(
          raw->request, DeadlineOf(context_), [this] { return cancelled_.load(); },
          raw->received, &raw->response, &raw->reservation, [this, raw](absl::Status status) {
            OnTaskDone(std::unique_ptr<Item>(raw), std::move(status));
          });
    });
    std::unique_ptr<Item> rejected;
    if (!submitted.ok()) {
      rejected.reset(raw);
      Record(*rejected, submitted);
    }
    absl::MutexLock lock(&mu_);
    submitting_ = false;
    if (rejected != nullptr) {
      --inflight_;
      SetError(*rejected, submitted);
    }
    Advance();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_.reset();
    if (!ok) {
      write_failed_ = true;
      if (error_.ok()) error_ = absl::CancelledError("the stream was closed before a response");
    }
    Advance();
  }

  void OnCancel() override {
    cancelled_.store(true);
    service_->options_.metrics->RecordCancellation(method_);
    absl::MutexLock lock(&mu_);
    if (error_.ok()) error_ = absl::CancelledError("the stream was cancelled");
    Advance();
  }

  void OnDone() override {
    service_->RemoveStream(this);
    // Wait for the thread that called Finish to release the mutex.
    { absl::MutexLock lock(&mu_); }
    delete this;
  }

 private:
  struct Item {
    Request request;
    Response response;
    absl::Time received;
    MemoryBudget::Reservation reservation;  // released when the item is written or dropped
  };

  void OnTaskDone(std::unique_ptr<Item> item, absl::Status status) {
    Record(*item, status);
    absl::MutexLock lock(&mu_);
    --inflight_;
    if (status.ok()) {
      to_write_.push_back(std::move(item));
    } else {
      SetError(*item, status);
    }
    Advance();
  }

  void Record(const Item& item, const absl::Status& status) {
    Metrics* metrics = service_->options_.metrics;
    metrics->RecordRequest(method_, status.code(), absl::Now() - item.received);
    metrics->RequestFinished();
  }

  void SetError(const Item& item, const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!error_.ok()) return;
    error_ = absl::Status(status.code(), absl::StrCat("request_id '", item.request.request_id(),
                                                      "': ", status.message()));
  }

  // Starts whatever the state allows: the next write, the next read, or Finish.
  void Advance() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    if (write_failed_) to_write_.clear();
    if (writing_ == nullptr && !to_write_.empty()) {
      writing_ = std::move(to_write_.front());
      to_write_.pop_front();
      this->StartWrite(&writing_->response);
    }
    const bool stopping = !error_.ok() || draining_;
    const int64_t held =
        inflight_ + static_cast<int64_t>(to_write_.size()) + (writing_ != nullptr ? 1 : 0);
    if (!reading_ && !reads_done_ && !stopping &&
        held < service_->options_.max_stream_inflight) {
      reading_ = true;
      read_item_ = std::make_unique<Item>();
      this->StartRead(&read_item_->request);
    }
    if (held == 0 && !submitting_ && (reads_done_ || stopping)) {
      finished_ = true;
      // A read still pending completes (not ok) after Finish.
      absl::Status status = error_;
      if (status.ok() && !reads_done_) status = Draining();
      this->Finish(ToGrpcStatus(status));
    }
  }

  AttentionServiceImpl* const service_;
  grpc::CallbackServerContext* const context_;
  const char* const method_;
  const SubmitFn submit_;
  std::atomic<bool> cancelled_{false};  // set by OnCancel; polled by queued tasks

  absl::Mutex mu_;
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  std::unique_ptr<Item> read_item_ ABSL_GUARDED_BY(mu_);  // the pending read's buffer
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;          // client half-closed
  bool submitting_ ABSL_GUARDED_BY(mu_) = false;
  int64_t inflight_ ABSL_GUARDED_BY(mu_) = 0;  // submitted, not yet done
  std::deque<std::unique_ptr<Item>> to_write_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<Item> writing_ ABSL_GUARDED_BY(mu_);
  bool write_failed_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status error_ ABSL_GUARDED_BY(mu_);  // the first failure; ends the stream
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

AttentionServiceImpl::AttentionServiceImpl(Options options) : options_(std::move(options)) {
  for (Backend* backend : options_.backends) backends_by_name_[backend->info().name] = backend;
}

AttentionServiceImpl::~AttentionServiceImpl() = default;

absl::StatusOr<Backend*> AttentionServiceImpl::AdmissionBackend(const std::string& name,
                                                                int32_t priority) const {
  if (draining()) return Draining();
  if (priority != 0 && priority != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("priority: expected 0 (normal) or 1 (high), got ", priority));
  }
  return BackendFor(name);
}

absl::StatusOr<Backend*> AttentionServiceImpl::BackendFor(const std::string& name) const {
  if (name.empty()) return options_.backends.front();
  auto it = backends_by_name_.find(name);
  if (it != backends_by_name_.end()) return it->second;
  std::vector<std::string> names;
  for (const Backend* b : options_.backends) names.push_back(b->info().name);
  return absl::NotFoundError(absl::StrCat("backend: expected one of ", absl::StrJoin(names, ", "),
                                          ", got \"", name, "\""));
}

absl::Status AttentionServiceImpl::CheckRunnable(const AttentionJob& job,
                                                 const Backend& backend) const {
  if (options_.max_request_flops > 0 && job.cost > options_.max_request_flops) {
    return CountRejection(
        absl::ResourceExhaustedError(absl::StrFormat(
            "request costs %.4g FLOP-equivalents (%.4g FLOPs of products plus the per-score and "
            "output-path work, see the README's cost model), over the per-request limit of %.4g "
            "(--max_request_flops)",
            job.cost, job.flops, options_.max_request_flops)),
        "cost");
  }
  return backend.Supports(job.planned_params());
}

absl::StatusOr<MemoryBudget::Reservation> AttentionServiceImpl::ReserveMemory(
    absl::Span<const AttentionJob* const> jobs, const Backend& backend, int64_t message_bytes,
    int64_t extra_bytes, bool count_rejection, int output_copies) {
  if (options_.memory_budget == nullptr) return MemoryBudget::Reservation();
  int64_t scratch = 0;
  int64_t held = 0;
  for (const AttentionJob* job : jobs) {
    scratch += backend.ScratchBytes(job->planned_params());
    // The outputs count twice unless sent in place: the response message
    // holds them while gRPC writes its serialized copy.
    held += output_copies * job->allocated_output_bytes() + job->converted_input_bytes();
  }
  const int64_t total = message_bytes + extra_bytes + held + scratch;
  absl::StatusOr<MemoryBudget::Reservation> reservation = options_.memory_budget->Reserve(
      total,
      absl::StrCat("this request (message ", message_bytes + extra_bytes,
                   output_copies == 2 ? " + outputs and their serialized copy " : " + outputs ",
                   held, " + ", backend.info().name, " scratch ", scratch, " bytes)"));
  if (!reservation.ok() && count_rejection) return CountRejection(reservation.status(), "memory");
  return reservation;
}

absl::Status AttentionServiceImpl::CountRejection(absl::Status status,
                                                  absl::string_view reason) const {
  if (absl::IsResourceExhausted(status)) options_.metrics->RecordRejection(reason);
  return status;
}

void TimingToProto(const TaskTiming& timing, absl::Time received, v1::Timing* out) {
  out->set_queue_us(absl::ToInt64Microseconds(timing.queue));
  out->set_compute_us(absl::ToInt64Microseconds(timing.compute));
  out->set_batch_size(timing.batch_size);
  out->set_total_us(absl::ToInt64Microseconds(absl::Now() - received));
}

absl::Status AttentionServiceImpl::Submit(const v1::AttendRequest& request,
                                          const TensorSource* source,
                                          std::shared_ptr<ShmTensorSource> shm, HeldBytes held,
                                          absl::Time deadline, std::function<bool()> is_cancelled,
                                          absl::Time received, v1::AttendResponse* response,
                                          MemoryBudget::Reservation* reservation,
                                          std::function<void(absl::Status)> done) {
  absl::StatusOr<Backend*> chosen = AdmissionBackend(request.backend(), request.priority());
  if (!chosen.ok()) return chosen.status();
  Backend* backend = *chosen;

  if (shm == nullptr) shm = std::make_shared<ShmTensorSource>(nullptr, std::string());
  absl::StatusOr<AttentionRequest> core =
      RequestFromProto(request, source != nullptr ? source : shm.get());
  if (!core.ok()) return core.status();
  absl::StatusOr<std::unique_ptr<AttentionJob>> job = PlanAttention(*core, options_.limits);
  if (!job.ok()) return CountRejection(job.status(), "size");
  if (absl::Status s = CheckRunnable(**job, *backend); !s.ok()) return s;
  // outputs.output_shm: the kernel writes the output there (no copy, and
  // nothing reserved for it).
  char* output_target = nullptr;
  if (request.outputs().has_output_shm()) {
    absl::StatusOr<char*> target = shm->Output(request.outputs().output_shm(),
                                               "outputs.output_shm",
                                               (*job)->main_output_bytes(), (*job)->params.dtype);
    if (!target.ok()) return target.status();
    output_target = *target;
    (*job)->output_target = output_target;
  }
  // A request sampled for --attention_stats_sample computes its entropy (and
  // reserves memory for it) whether it asked or not; the response carries it
  // only when asked.
  const bool asked_entropy = core->outputs.entropy;
  bool record_entropy = false;
  std::unique_ptr<AttentionJob> unsampled;  // the job as asked, when sampling added entropy
  if (SampleStats()) {
    if (asked_entropy) {
      record_entropy = true;
    } else if (std::unique_ptr<AttentionJob> sampled = PlanSampled(*core, *backend)) {
      sampled->output_target = output_target;
      unsampled = std::exchange(*job, std::move(sampled));
      record_entropy = true;
    }
  }
  // With rotary settings the job runs on rotated copies of Q and K (in their
  // dtype), which live as long as the task; they are reserved with the rest.
  const bool rope = request.has_rotary() || request.query_positions_size() > 0 ||
                    request.key_positions_size() > 0;
  const int64_t rotated_bytes =
      rope ? static_cast<int64_t>(core->query.data.size() + core->key.data.size()) : 0;
  const AttentionJob* planned = job->get();
  const int64_t request_bytes =
      held.request >= 0 ? held.request : static_cast<int64_t>(request.ByteSizeLong());
  const int output_copies = held.outputs_once ? 1 : 2;
  absl::StatusOr<MemoryBudget::Reservation> reserved =
      ReserveMemory(absl::MakeConstSpan(&planned, 1), *backend, request_bytes, rotated_bytes,
                    /*count_rejection=*/unsampled == nullptr, output_copies);
  if (!reserved.ok() && unsampled != nullptr) {
    // Sampling never refuses a request: without room for the entropy too,
    // it runs as asked, unsampled.
    *job = std::move(unsampled);
    core->outputs.entropy = false;
    record_entropy = false;
    planned = job->get();
    reserved = ReserveMemory(absl::MakeConstSpan(&planned, 1), *backend, request_bytes,
                             rotated_bytes, /*count_rejection=*/true, output_copies);
  }
  unsampled.reset();
  if (!reserved.ok()) return reserved.status();
  *reservation = *std::move(reserved);
  std::shared_ptr<RotatedInputs> rotated;
  if (rope) {
    absl::StatusOr<std::shared_ptr<RotatedInputs>> made = RotateInputs(request, **job, &*core);
    if (!made.ok()) return made.status();
    rotated = *std::move(made);
    job = PlanAttention(*core, options_.limits);  // the same dims: only the bytes moved
    if (!job.ok()) return CountRejection(job.status(), "size");
    (*job)->output_target = output_target;
  }

  response->set_request_id(request.request_id());
  Task task;
  task.job = *std::move(job);
  task.backend = backend;
  task.priority = request.priority();
  task.deadline = deadline;
  task.is_cancelled = std::move(is_cancelled);
  task.done = [response, received, backend, rotated, shm = std::move(shm),
               output_shm = request.outputs().has_output_shm() ? &request.outputs().output_shm()
                                                               : nullptr,
               metrics = options_.metrics, record_entropy, asked_entropy,
               done = std::move(done)](absl::Status status, std::unique_ptr<AttentionJob> job,
                                       const TaskTiming& timing) {
    // A region truncated while the job read or wrote it: what it computed is lost.
    if (status.ok()) status = shm->CheckIntact();
    if (status.ok()) {
      if (record_entropy) {
        metrics->RecordAttentionEntropy(-1, EntropyValues(job->entropy));
        if (!asked_entropy) DropEntropy(*job);
      }
      JobToProto(*job, response);
      if (output_shm != nullptr) ShmOutputToProto(*output_shm, response->mutable_output());
      TimingToProto(timing, received, response->mutable_timing());
      response->set_backend(backend->info().name);
    }
    job.reset();
    done(std::move(status));
  };
  return CountRejection(options_.scheduler->Submit(std::move(task)), "queue");
}

bool AttentionServiceImpl::SampleStats() {
  const int64_t n = options_.attention_stats_sample;
  if (n <= 0) return false;
  return stats_requests_.fetch_add(1, std::memory_order_relaxed) % static_cast<uint64_t>(n) == 0;
}

std::unique_ptr<AttentionJob> AttentionServiceImpl::PlanSampled(AttentionRequest& core,
                                                                const Backend& backend) const {
  if (core.options.variant != Variant::kSoftmax) return nullptr;  // LINEAR has no entropy
  core.outputs.entropy = true;
  absl::StatusOr<std::unique_ptr<AttentionJob>> job = PlanAttention(core, options_.limits);
  if (job.ok() &&
      (options_.max_request_flops <= 0 || (*job)->cost <= options_.max_request_flops) &&
      backend.Supports((*job)->planned_params()).ok()) {
    return *std::move(job);
  }
  core.outputs.entropy = false;
  return nullptr;
}

absl::Span<const float> EntropyValues(const Tensor& entropy) {
  return absl::MakeConstSpan(entropy.data_as<float>(),
                             static_cast<size_t>(entropy.data.size() / sizeof(float)));
}

void DropEntropy(AttentionJob& job) {
  job.params.entropy = nullptr;
  job.outputs.entropy = false;
  job.entropy = Tensor();
}

void AttentionServiceImpl::FinishUnary(grpc::ServerUnaryReactor* reactor, const char* method,
                                       absl::Time received, const absl::Status& status) {
  options_.metrics->RecordRequest(method, status.code(), absl::Now() - received);
  options_.metrics->RequestFinished();
  reactor->Finish(ToGrpcStatus(status));
}

grpc::ServerUnaryReactor* AttentionServiceImpl::ScheduleUnary(
    grpc::CallbackServerContext* context, const char* method, const AdmitFn& submit) {
  const absl::Time received = absl::Now();
  options_.metrics->RequestStarted();
  auto* reactor = new CancellableUnaryReactor(options_.metrics, method);
  absl::Status submitted = AdmitNoThrow([&] {
    return submit(
        DeadlineOf(context), [reactor] { return reactor->cancelled(); }, received,
        &reactor->reservation, [this, reactor, method, received](absl::Status s) {
          FinishUnary(reactor, method, received, s);
        });
  });
  if (!submitted.ok()) FinishUnary(reactor, method, received, submitted);
  return reactor;
}

// One Attend call's messages, held until it is answered: the request (its
// received slices and what WireAttendRequest made of them, or, with
// --zero_copy=false, protobuf's parse of it) and the response.
class AttentionServiceImpl::ReceivedAttend {
 public:
  explicit ReceivedAttend(bool zero_copy) : zero_copy_(zero_copy) {}

  // Parses `message` (cleared: what this keeps holds its own references);
  // `shm` resolves Tensor.shm. INVALID_ARGUMENT for bytes that are not an
  // AttendRequest.
  absl::Status Parse(grpc::ByteBuffer& message, const TensorSource* shm) {
    if (!zero_copy_) {
      bool parsed = false;
      {
        // As gRPC parses a message for a method that takes one.
        grpc::ProtoBufferReader reader(&message);
        parsed = parsed_.ParseFromZeroCopyStream(&reader);
      }
      message.Clear();
      source_ = shm;
      if (parsed) return absl::OkStatus();
      return absl::InvalidArgumentError(
          "request: not a valid attnserve.v1.AttendRequest (protobuf's parser refused it)");
    }
    if (!message.Dump(&slices_).ok()) {
      return absl::InvalidArgumentError("request: the message could not be read");
    }
    message.Clear();
    for (const grpc::Slice& slice : slices_) {
      chunks_.emplace_back(reinterpret_cast<const char*>(slice.begin()), slice.size());
    }
    wire_ = std::make_unique<WireAttendRequest>(shm);
    if (absl::Status s = wire_->Parse(chunks_); !s.ok()) return s;
    source_ = wire_.get();
    if (!wire_->refers_to_chunks()) {
      // Every tensor was gathered (each straddled slices): gRPC's buffers
      // can go now.
      chunks_.clear();
      slices_.clear();
    }
    return absl::OkStatus();
  }

  const v1::AttendRequest& request() const { return wire_ ? wire_->request() : parsed_; }
  const TensorSource* source() const { return source_; }
  v1::AttendResponse* response() { return &response_; }

  HeldBytes held() const {
    if (!zero_copy_) return HeldBytes{};
    return {.request = wire_->copied_bytes() + (slices_.empty() ? 0 : wire_->wire_bytes()),
            .outputs_once = true};
  }

  // The response's bytes into `out` (SerializeAttendResponse, or protobuf's
  // serialization with --zero_copy=false).
  absl::Status Serialize(grpc::ByteBuffer* out) {
    if (zero_copy_) {
      SerializeAttendResponse(&response_, out);
      return absl::OkStatus();
    }
    bool own_buffer = false;
    grpc::Status s = grpc::GenericSerialize<grpc::ProtoBufferWriter, v1::AttendResponse>(
        response_, out, &own_buffer);
    if (s.ok()) return absl::OkStatus();
    return absl::InternalError(absl::StrCat("response: ", s.error_message()));
  }

 private:
  const bool zero_copy_;
  std::vector<grpc::Slice> slices_;
  std::vector<absl::string_view> chunks_;  // the slices' bytes
  std::unique_ptr<WireAttendRequest> wire_;
  v1::AttendRequest parsed_;
  const TensorSource* source_ = nullptr;
  v1::AttendResponse response_;
};

grpc::ServerUnaryReactor* AttentionServiceImpl::Attend(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request,
                                                       grpc::ByteBuffer* response) {
  return ScheduleUnary(
      context, kAttend,
      [&](absl::Time deadline, std::function<bool()> is_cancelled, absl::Time received,
          MemoryBudget::Reservation* reservation,
          std::function<void(absl::Status)> done) -> absl::Status {
        std::shared_ptr<ShmTensorSource> shm = ShmSourceFor(CallerOf(context));
        auto call = std::make_shared<ReceivedAttend>(options_.zero_copy);
        // The request's bytes are gRPC's to free, but only ours to read.
        if (absl::Status s = call->Parse(*const_cast<grpc::ByteBuffer*>(request), shm.get());
            !s.ok()) {
          return s;
        }
        return Submit(call->request(), call->source(), shm, call->held(), deadline,
                      std::move(is_cancelled), received, call->response(), reservation,
                      [call, response, done = std::move(done)](absl::Status s) {
                        if (s.ok()) s = call->Serialize(response);
                        done(std::move(s));
                      });
      });
}

grpc::ServerBidiReactor<v1::AttendRequest, v1::AttendResponse>*
AttentionServiceImpl::AttendStream(grpc::CallbackServerContext* context) {
  return new AttendStreamReactor(
      this, context, kAttendStream,
      [this, caller = CallerOf(context)](
          const v1::AttendRequest& request, absl::Time deadline,
          std::function<bool()> is_cancelled, absl::Time received, v1::AttendResponse* response,
          MemoryBudget::Reservation* reservation, std::function<void(absl::Status)> done) {
        std::shared_ptr<ShmTensorSource> shm = ShmSourceFor(caller);
        return Submit(request, shm.get(), shm, HeldBytes{}, deadline, std::move(is_cancelled),
                      received, response, reservation, std::move(done));
      });
}

grpc::ServerBidiReactor<v1::BatchDecodeRequest, v1::BatchDecodeResponse>*
AttentionServiceImpl::BatchDecodeStream(grpc::CallbackServerContext* context) {
  return new BatchDecodeStreamReactor(
      this, context, kBatchDecodeStream,
      [this, caller = CallerOf(context)](
          const v1::BatchDecodeRequest& request, absl::Time deadline,
          std::function<bool()> is_cancelled, absl::Time received,
          v1::BatchDecodeResponse* response, MemoryBudget::Reservation* reservation,
          std::function<void(absl::Status)> done) {
        return SubmitBatchDecode(caller, request, deadline, std::move(is_cancelled), received,
                                 response, reservation, std::move(done));
      });
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetServerInfo(
    grpc::CallbackServerContext* context, const v1::GetServerInfoRequest* /*request*/,
    v1::ServerInfo* response) {
  const absl::Time received = absl::Now();
  options_.metrics->RequestStarted();
  response->set_version(ATTNSERVE_VERSION);
  std::vector<bool> seen_dtype(4, false);
  for (const Backend* backend : options_.backends) {
    BackendInfoToProto(backend->info(), response->add_backends());
    for (DType d : backend->info().dtypes) {
      if (d == DType::kI32 || seen_dtype[static_cast<size_t>(d)]) continue;
      seen_dtype[static_cast<size_t>(d)] = true;
    }
  }
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16}) {
    if (seen_dtype[static_cast<size_t>(d)]) response->add_dtypes(DTypeToProto(d));
  }
  response->set_default_backend(options_.backends.front()->info().name);
  v1::ServerLimits* limits = response->mutable_limits();
  limits->set_max_request_bytes(options_.max_request_bytes);
  limits->set_max_output_bytes(options_.limits.max_output_bytes);
  limits->set_max_weights_bytes(options_.limits.max_weights_bytes);
  limits->set_max_top_k(options_.limits.max_top_k);
  limits->set_max_head_dim(options_.limits.max_head_dim);
  limits->set_max_request_flops(options_.max_request_flops);
  limits->set_max_sparse_bytes(options_.limits.max_sparse_bytes);
  if (options_.shared_memory != nullptr) {
    limits->set_allow_shared_memory(true);
    limits->set_max_shm_regions(options_.shared_memory->options().max_regions_per_caller);
    for (const SharedMemoryRegionSpec& spec : options_.shared_memory->List(CallerOf(context))) {
      v1::SharedMemoryRegion* region = response->add_shm_regions();
      region->set_name(spec.name);
      region->set_key(spec.key);
      region->set_offset(spec.offset);
      region->set_byte_size(spec.byte_size);
    }
  }
  if (options_.memory_budget != nullptr) {
    limits->set_memory_limit_bytes(options_.memory_budget->limit_bytes());
    limits->set_memory_reserved_bytes(options_.memory_budget->reserved_bytes());
  }
  if (options_.sessions != nullptr) {
    const SessionStats stats = options_.sessions->stats();
    const SessionStoreOptions& so = options_.sessions->options();
    v1::SessionsInfo* sessions = response->mutable_sessions();
    sessions->set_active(stats.sessions_active);
    sessions->set_kv_cache_used_bytes(stats.used_bytes);
    sessions->set_kv_cache_capacity_bytes(stats.capacity_bytes);
    sessions->set_block_tokens(so.block_tokens);
    sessions->set_eviction(so.eviction == EvictionPolicy::kLruIdle ? "lru_idle" : "reject");
    sessions->set_kv_cache_shared_bytes(stats.shared_bytes);
    sessions->set_kv_blocks_shared(stats.shared_blocks);
    if (options_.shards != nullptr) sessions->set_split_sessions(options_.shards->active());
  }
  for (const Model* model : options_.models) ModelToProto(*model, response->add_models());
  response->set_replica_id(options_.replica_id);
  if (options_.shards != nullptr) {
    absl::StatusOr<std::vector<std::string>> peers = options_.shards->Peers();
    if (peers.ok()) {
      for (const std::string& peer : *peers) response->add_peers(peer);
    }
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  FinishUnary(reactor, "GetServerInfo", received, absl::OkStatus());
  return reactor;
}

void AttentionServiceImpl::StartDrain() {
  draining_.store(true, std::memory_order_release);
  absl::MutexLock lock(&streams_mu_);
  for (StreamBase* stream : streams_) stream->BeginDrain();
}

void AttentionServiceImpl::AddStream(StreamBase* stream) {
  absl::MutexLock lock(&streams_mu_);
  streams_.insert(stream);
}

void AttentionServiceImpl::RemoveStream(StreamBase* stream) {
  absl::MutexLock lock(&streams_mu_);
  streams_.erase(stream);
}

}  // namespace attnserve
