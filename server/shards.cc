#include "server/shards.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <set>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "attention/merge.h"
#include "core/errors.h"
#include "core/half.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "server/convert.h"
#include "server/status.h"

namespace attnserve {
namespace {

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

// "shard 2 (10.0.0.7:50051): <message>", keeping the code.
absl::Status ShardError(size_t shard, const std::string& peer, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat("shard ", shard, " (", peer, "): ", s.message()));
}

std::string RandomId() {
  absl::BitGen gen;
  return absl::StrFormat("%016x%016x", absl::Uniform<uint64_t>(gen),
                         absl::Uniform<uint64_t>(gen));
}

// [n, heads, dim] (or [1, n, heads, dim]) with the given heads and dim; n.
absl::StatusOr<int64_t> RowsOf(const TensorView& t, const char* field, int64_t heads, int64_t dim,
                               bool heads_multiple) {
  std::vector<int64_t> s = t.shape;
  if (s.size() == 4 && s[0] == 1) s.erase(s.begin());
  const bool heads_ok = heads_multiple ? (s.size() == 3 && s[1] >= heads && s[1] % heads == 0)
                                       : (s.size() == 3 && s[1] == heads);
  if (s.size() != 3 || s[0] < 1 || !heads_ok || s[2] != dim ||
      CheckedElementCount(s) * int64_t(DTypeSize(t.dtype)) != int64_t(t.data.size())) {
    return InvalidField(absl::StrCat(field, ".shape"),
                        absl::StrCat("[n, ", heads_multiple ? "a multiple of " : "", heads, ", ",
                                     dim, "] (or with a leading 1) matching its bytes"),
                        ShapeString(t.shape));
  }
  return s[0];
}

v1::Tensor F32Proto(const std::vector<int64_t>& shape, const char* data, size_t bytes) {
  v1::Tensor t;
  t.set_dtype(v1::F32);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(data, bytes);
  return t;
}

}  // namespace

struct ShardCoordinator::Session {
  std::string id;
  std::string owner;
  int32_t num_layers = 1;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t value_dim = 0;
  std::optional<RopeConfig> rope;
  struct Shard {
    std::string peer;
    std::string session_id;  // the shard's session on that peer
    int64_t capacity = 0;    // tokens per layer
    absl::Time touched;      // the last call that reached it (guarded by mu_)
  };
  std::vector<Shard> shards;
  // Guarded by the coordinator's mu_:
  std::vector<std::vector<int64_t>> length;  // [layer][shard]
  bool busy = false;
  absl::Time last_used;
};

// One Step in flight: what each entry sends where, and what came back.
struct ShardCoordinator::StepCall {
  struct Part {
    size_t entry = 0;
    size_t shard = 0;
    int64_t added = 0;  // new tokens this shard appends
    int64_t before = 0;  // its tokens before the step
    size_t call = 0;    // index in calls
    int result = 0;     // index in calls[call].response.results
  };
  struct PeerCall {
    std::string peer;
    grpc::ClientContext context;
    v1::BatchDecodeRequest request;
    v1::BatchDecodeResponse response;
    grpc::Status status;
  };
  struct EntryState {
    std::shared_ptr<Session> session;
    DType query_dtype = DType::kF32;
    bool query_4d = false;
    int64_t total = 0;  // tokens after the step
    bool ok = false;    // sent
  };
  int32_t layer = 0;
  bool want_lse = false;
  std::vector<EntryState> entries;
  std::vector<Part> parts;
  std::vector<std::unique_ptr<PeerCall>> calls;
  std::vector<Result> results;
  std::atomic<int> pending{0};
  absl::Time sent;
  std::function<void(std::vector<Result>)> done;
};

ShardCoordinator::ShardCoordinator(ShardOptions options, Metrics* metrics)
    : options_(std::move(options)), metrics_(metrics) {}

ShardCoordinator::~ShardCoordinator() {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return steps_in_flight_ == 0; };
  mu_.AwaitWithTimeout(absl::Condition(&idle), options_.call_timeout);
}

absl::StatusOr<std::vector<std::string>> ShardCoordinator::Peers() const {
  std::set<std::string> peers;
  for (const std::string& entry : options_.peers) {
    if (entry.rfind("dns:", 0) != 0) {
      peers.insert(entry);
      continue;
    }
    // dns:NAME:PORT, every A/AAAA record of NAME.
    const std::string rest = entry.substr(4);
    const size_t colon = rest.rfind(':');
    int port = 0;
    if (colon == std::string::npos || !absl::SimpleAtoi(rest.substr(colon + 1), &port)) {
      return InvalidField("--peers", "host:port or dns:NAME:PORT", entry);
    }
    const std::string name = rest.substr(0, colon);
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    if (int rc = getaddrinfo(name.c_str(), nullptr, &hints, &found); rc != 0) {
      return absl::UnavailableError(
          absl::StrCat("--peers: ", name, " does not resolve: ", gai_strerror(rc)));
    }
    for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
      char ip[INET6_ADDRSTRLEN] = {};
      if (a->ai_family == AF_INET) {
        inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, ip, sizeof(ip));
        peers.insert(absl::StrCat(ip, ":", port));
      } else if (a->ai_family == AF_INET6) {
        inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr, ip,
                  sizeof(ip));
        peers.insert(absl::StrCat("[", ip, "]:", port));
      }
    }
    freeaddrinfo(found);
  }
  return std::vector<std::string>(peers.begin(), peers.end());
}

v1::AttentionService::Stub* ShardCoordinator::StubFor(const std::string& peer) {
  absl::MutexLock lock(&mu_);
  std::unique_ptr<v1::AttentionService::Stub>& stub = stubs_[peer];
  if (stub == nullptr) {
    std::shared_ptr<grpc::ChannelCredentials> credentials =
        options_.peer_tls_ca_pem.empty()
            ? grpc::InsecureChannelCredentials()
            : grpc::SslCredentials(grpc::SslCredentialsOptions{options_.peer_tls_ca_pem, "", ""});
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    stub = v1::AttentionService::NewStub(grpc::CreateCustomChannel(peer, credentials, args));
  }
  return stub.get();
}

absl::StatusOr<ShardCoordinator::Created> ShardCoordinator::Create(
    const v1::CreateSessionRequest& request, const std::string& owner) {
  if (!request.model().empty()) {
    return InvalidField("model", "unset for a session split over replicas (shards)",
                        request.model());
  }
  if (request.sink_tokens() != 0 || request.window_tokens() != 0) {
    return InvalidField("window_tokens", "0 for a session split over replicas (shards)",
                        absl::StrCat(request.window_tokens()));
  }
  if (request.max_tokens() != 0) {
    return InvalidField("max_tokens",
                        "0 for a session split over replicas (its shards' caches bound it)",
                        absl::StrCat(request.max_tokens()));
  }
  auto session = std::make_shared<Session>();
  session->owner = owner;
  session->num_layers = std::max(1, request.num_layers());
  session->num_kv_heads = request.num_kv_heads();
  session->head_dim = request.head_dim();
  session->value_dim = request.value_dim() > 0 ? request.value_dim() : request.head_dim();
  if (request.has_rotary()) {
    absl::StatusOr<RopeConfig> rope = RopeFromProto(request.rotary());
    if (!rope.ok()) return rope.status();
    if (absl::Status s = ValidateRope(*rope, session->head_dim, "rotary"); !s.ok()) return s;
    session->rope = *rope;
  }
  absl::StatusOr<std::vector<std::string>> peers = Peers();
  if (!peers.ok()) return peers.status();
  const int shards = request.shards();
  if (shards > static_cast<int>(peers->size())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "shards: expected at most the ", peers->size(), " peers found (",
        peers->empty() ? "none: --peers is empty" : absl::StrJoin(*peers, ", "), "), got ",
        shards));
  }
  uint64_t start = 0;
  {
    absl::MutexLock lock(&mu_);
    start = next_start_++;
  }
  // Each shard is a plain session on its peer, without RoPE: the
  // coordinator rotates at global positions.
  v1::CreateSessionRequest shard_request = request;
  shard_request.set_shards(0);
  shard_request.clear_rotary();
  for (int s = 0; s < shards; ++s) {
    const std::string& peer = (*peers)[(start + s) % peers->size()];
    grpc::ClientContext context;
    PreparePeerCall(&context, absl::Now() + options_.call_timeout);
    v1::CreateSessionResponse response;
    const grpc::Status status = StubFor(peer)->CreateSession(&context, shard_request, &response);
    if (!status.ok()) {
      CloseShards(*session);
      return ShardError(s, peer, FromGrpc(status));
    }
    session->shards.push_back(
        {peer, response.session_id(), response.capacity_tokens(), absl::Now()});
  }
  session->length.assign(session->num_layers, std::vector<int64_t>(shards, 0));
  session->id = RandomId();
  session->last_used = absl::Now();
  Created created;
  created.session_id = session->id;
  for (const Session::Shard& shard : session->shards) created.capacity_tokens += shard.capacity;
  absl::MutexLock lock(&mu_);
  sessions_[session->id] = std::move(session);
  return created;
}

bool ShardCoordinator::Owns(const std::string& session_id) const {
  absl::MutexLock lock(&mu_);
  return sessions_.count(session_id) > 0;
}

int64_t ShardCoordinator::active() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(sessions_.size());
}

void ShardCoordinator::CloseShards(const Session& session) {
  for (size_t s = 0; s < session.shards.size(); ++s) {
    const Session::Shard& shard = session.shards[s];
    grpc::ClientContext context;
    PreparePeerCall(&context, absl::Now() + options_.call_timeout);
    v1::CloseSessionRequest request;
    request.set_session_id(shard.session_id);
    v1::CloseSessionResponse response;
    // A shard that cannot be reached is left to its own idle timeout.
    (void)StubFor(shard.peer)->CloseSession(&context, request, &response);
  }
}

absl::Status ShardCoordinator::Close(const std::string& session_id, const std::string& owner) {
  std::shared_ptr<Session> session;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(session_id);
    if (it == sessions_.end() || it->second->owner != owner) {
      return absl::NotFoundError(absl::StrCat("session_id: no session \"", session_id, "\""));
    }
    session = it->second;
    sessions_.erase(it);
  }
  CloseShards(*session);
  return absl::OkStatus();
}

void ShardCoordinator::ExpireIdle() {
  std::vector<std::shared_ptr<Session>> expired;
  std::vector<std::pair<std::string, std::string>> touch;  // peer, shard session
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      Session& session = *it->second;
      if (!session.busy && now - session.last_used >= options_.idle_timeout) {
        expired.push_back(it->second);
        it = sessions_.erase(it);
        continue;
      }
      for (size_t s = 0; s < session.shards.size(); ++s) {
        Session::Shard& shard = session.shards[s];
        const bool empty = std::all_of(session.length.begin(), session.length.end(),
                                       [s](const std::vector<int64_t>& l) { return l[s] == 0; });
        if (empty && !session.busy && now - shard.touched >= options_.idle_timeout / 4) {
          touch.emplace_back(shard.peer, shard.session_id);
          shard.touched = now;
        }
      }
      ++it;
    }
  }
  for (const auto& session : expired) CloseShards(*session);
  for (const auto& [peer, session_id] : touch) {
    // An empty truncation of a shard that holds no tokens: it only marks the
    // shard's session used. A shard with tokens is reached by every step, so
    // it stays alive as long as the session does.
    // Still empty, or left alone: a step may have filled it meanwhile.
    SendTruncation(peer, session_id, /*layer=*/0, /*tokens=*/0, /*expected=*/0);
  }
}

void ShardCoordinator::SendTruncation(const std::string& peer, const std::string& session_id,
                                      int32_t layer, int64_t tokens, int64_t expected) {
  struct Call {
    grpc::ClientContext context;
    v1::BatchDecodeRequest request;
    v1::BatchDecodeResponse response;
  };
  auto* call = new Call;
  PreparePeerCall(&call->context, absl::Now() + options_.call_timeout);
  call->request.set_layer(layer);
  v1::BatchDecodeEntry* e = call->request.add_entries();
  e->set_session_id(session_id);
  e->set_truncate_to(tokens);
  e->set_expected_context_tokens(expected);
  StubFor(peer)->async()->PartialAttend(&call->context, &call->request, &call->response,
                                         [call](grpc::Status) { delete call; });
}

void ShardCoordinator::PreparePeerCall(grpc::ClientContext* context, absl::Time deadline) const {
  context->set_deadline(absl::ToChronoTime(deadline));
  if (!options_.peer_token.empty()) {
    context->AddMetadata("authorization", "Bearer " + options_.peer_token);
  }
}

void ShardCoordinator::Step(const std::string& owner, int32_t layer,
                            const std::vector<Entry>& entries,
                            const v1::AttentionOptions& options, const v1::OutputSpec& outputs,
                            const std::string& backend, int32_t priority, absl::Time deadline,
                            std::function<void(std::vector<Result>)> done) {
  auto call = std::make_shared<StepCall>();
  call->layer = layer;
  call->want_lse = outputs.lse();
  call->entries.resize(entries.size());
  call->results.resize(entries.size());
  call->done = std::move(done);
  if (outputs.entropy() || outputs.weights() || outputs.top_k() != 0) {
    for (Result& r : call->results) {
      r.status = InvalidField("outputs", "lse only for a session split over replicas",
                              "entropy, weights or top_k");
    }
    call->done(std::move(call->results));
    return;
  }
  // Pin the sessions (one step at a time each).
  {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < entries.size(); ++i) {
      auto it = sessions_.find(entries[i].session_id);
      if (it == sessions_.end() || it->second->owner != owner) {
        call->results[i].status = absl::NotFoundError(
            absl::StrCat("session_id: no session \"", entries[i].session_id, "\""));
      } else if (it->second->busy) {
        call->results[i].status =
            absl::AbortedError("session_id: another step of this session is running");
      } else {
        it->second->busy = true;
        call->entries[i].session = it->second;
      }
    }
  }
  // Per peer, one PartialAttend for all its shards' parts.
  std::map<std::string, size_t> call_of;
  auto call_for = [&](const std::string& peer) -> StepCall::PeerCall& {
    auto [it, inserted] = call_of.try_emplace(peer, call->calls.size());
    if (inserted) {
      auto pc = std::make_unique<StepCall::PeerCall>();
      pc->peer = peer;
      pc->request.set_layer(layer);
      *pc->request.mutable_options() = options;
      pc->request.mutable_outputs()->set_lse(true);
      pc->request.set_backend(backend);
      pc->request.set_priority(priority);
      call->calls.push_back(std::move(pc));
    }
    return *call->calls[it->second];
  };
  for (size_t i = 0; i < entries.size(); ++i) {
    StepCall::EntryState& state = call->entries[i];
    if (state.session == nullptr) continue;
    Session& session = *state.session;
    absl::Status status = [&]() -> absl::Status {
      if (layer < 0 || layer >= session.num_layers) {
        return InvalidField("layer", absl::StrCat("a value in [0, ", session.num_layers, ")"),
                            absl::StrCat(layer));
      }
      absl::StatusOr<TensorView> q = ViewFromProto(*entries[i].query, "query");
      if (!q.ok()) return q.status();
      absl::StatusOr<int64_t> lq = RowsOf(*q, "query", session.num_kv_heads, session.head_dim, true);
      if (!lq.ok()) return lq.status();
      const int64_t hq = q->shape[q->shape.size() - 2];
      int64_t n = 0;
      std::optional<TensorView> k, v;
      if (entries[i].key->ByteSizeLong() != 0 || entries[i].value->ByteSizeLong() != 0) {
        absl::StatusOr<TensorView> kv = ViewFromProto(*entries[i].key, "key");
        if (!kv.ok()) return kv.status();
        absl::StatusOr<TensorView> vv = ViewFromProto(*entries[i].value, "value");
        if (!vv.ok()) return vv.status();
        absl::StatusOr<int64_t> nk = RowsOf(*kv, "key", session.num_kv_heads, session.head_dim, false);
        if (!nk.ok()) return nk.status();
        absl::StatusOr<int64_t> nv =
            RowsOf(*vv, "value", session.num_kv_heads, session.value_dim, false);
        if (!nv.ok()) return nv.status();
        if (*nk != *nv)
          return InvalidField("value.shape", absl::StrCat(*nk, " tokens like key"),
                              ShapeString(vv->shape));
        n = *nk;
        k = *kv;
        v = *vv;
      }
      std::vector<int64_t> lengths;
      {
        absl::MutexLock lock(&mu_);
        lengths = session.length[layer];
      }
      int64_t before = 0;
      for (int64_t len : lengths) before += len;
      if (entries[i].expected_context_tokens.has_value() &&
          *entries[i].expected_context_tokens != before) {
        return absl::FailedPreconditionError(absl::StrCat(
            "expected_context_tokens: layer ", layer, " of the session holds ", before,
            " tokens, the request expected ", *entries[i].expected_context_tokens));
      }
      if (n == 0 && before == 0) {
        return InvalidField("key", "new tokens: the session holds none to attend over", "none");
      }
      // Contiguous placement: the new tokens go to the first shards with room.
      std::vector<int64_t> added(lengths.size(), 0);
      int64_t rest = n;
      for (size_t s = 0; s < lengths.size() && rest > 0; ++s) {
        // A shard after one with tokens but room left would break the order.
        const bool later_used = std::any_of(lengths.begin() + s + 1, lengths.end(),
                                            [](int64_t len) { return len > 0; });
        if (later_used) continue;
        const int64_t room = std::max<int64_t>(0, session.shards[s].capacity - lengths[s]);
        added[s] = std::min(room, rest);
        rest -= added[s];
      }
      if (rest > 0) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "the session's ", lengths.size(), " shards hold at most ",
            [&] {
              int64_t cap = 0;
              for (const Session::Shard& sh : session.shards) cap += sh.capacity;
              return cap;
            }(),
            " tokens per layer (what their replicas' caches held when it opened); ", before,
            " are used, ", n, " more asked"));
      }
      const int64_t total = before + n;
      // The queries and keys in F32, rotated at their global positions.
      Tensor qf = ConvertedCopy(*q, DType::kF32);
      qf.shape = {*lq, hq, session.head_dim};
      Tensor kf, vf;
      if (n > 0) {
        kf = ConvertedCopy(*k, DType::kF32);
        kf.shape = {n, session.num_kv_heads, session.head_dim};
        vf = ConvertedCopy(*v, DType::kF32);
        vf.shape = {n, session.num_kv_heads, session.value_dim};
      }
      if (session.rope.has_value()) {
        std::vector<int64_t> qpos(*lq), kpos(n);
        for (int64_t t = 0; t < *lq; ++t) qpos[t] = std::max<int64_t>(0, total - *lq + t);
        for (int64_t t = 0; t < n; ++t) kpos[t] = before + t;
        RotateRope(*session.rope, qpos, static_cast<int32_t>(hq), session.head_dim,
                   qf.mutable_data<float>(), total - 1);
        if (n > 0) {
          RotateRope(*session.rope, kpos, session.num_kv_heads, session.head_dim,
                     kf.mutable_data<float>(), total - 1);
        }
      }
      int64_t offset = 0, new_at = 0;
      const int64_t k_row = int64_t{session.num_kv_heads} * session.head_dim * 4;
      const int64_t v_row = int64_t{session.num_kv_heads} * session.value_dim * 4;
      for (size_t s = 0; s < lengths.size(); ++s) {
        const int64_t tokens = lengths[s] + added[s];
        if (tokens == 0) continue;
        StepCall::PeerCall& pc = call_for(session.shards[s].peer);
        v1::BatchDecodeEntry* e = pc.request.add_entries();
        e->set_session_id(session.shards[s].session_id);
        *e->mutable_query() = F32Proto(qf.shape, qf.data.data(), qf.data.size());
        if (added[s] > 0) {
          *e->mutable_key() = F32Proto({added[s], session.num_kv_heads, session.head_dim},
                                       kf.data.data() + new_at * k_row, added[s] * k_row);
          *e->mutable_value() = F32Proto({added[s], session.num_kv_heads, session.value_dim},
                                         vf.data.data() + new_at * v_row, added[s] * v_row);
          new_at += added[s];
        }
        e->set_expected_context_tokens(lengths[s]);
        e->set_key_offset(offset);
        e->set_total_keys(total);
        call->parts.push_back({i, s, added[s], lengths[s], call_of[session.shards[s].peer],
                               pc.request.entries_size() - 1});
        offset += tokens;
      }
      state.query_dtype = q->dtype;
      state.query_4d = q->shape.size() == 4;
      state.total = total;
      state.ok = true;
      return absl::OkStatus();
    }();
    call->results[i].status = status;
  }
  if (call->calls.empty()) {
    Finish(call);
    return;
  }
  call->pending.store(static_cast<int>(call->calls.size()));
  call->sent = absl::Now();
  {
    absl::MutexLock lock(&mu_);
    ++steps_in_flight_;
  }
  for (auto& pc : call->calls) {
    PreparePeerCall(&pc->context, deadline);
    StepCall::PeerCall* raw = pc.get();
    StubFor(raw->peer)->async()->PartialAttend(
        &raw->context, &raw->request, &raw->response, [this, call, raw](grpc::Status status) {
          raw->status = std::move(status);
          metrics_->RecordPartialAttend(raw->peer, FromGrpc(raw->status).code());
          if (call->pending.fetch_sub(1) == 1) {
            metrics_->RecordFanout(absl::Now() - call->sent);
            Finish(call);
            absl::MutexLock lock(&mu_);
            --steps_in_flight_;
          }
        });
  }
}

void ShardCoordinator::Finish(std::shared_ptr<StepCall> call) {
  // Each entry's parts, in shard order; the first failure fails the entry.
  const absl::Duration fanout =
      call->calls.empty() ? absl::ZeroDuration() : absl::Now() - call->sent;
  for (Result& r : call->results) r.fanout = fanout;
  std::vector<std::vector<const StepCall::Part*>> parts(call->entries.size());
  for (const StepCall::Part& part : call->parts) parts[part.entry].push_back(&part);
  std::vector<const StepCall::Part*> undo;
  for (size_t i = 0; i < call->entries.size(); ++i) {
    StepCall::EntryState& state = call->entries[i];
    Result& result = call->results[i];
    if (!state.ok) continue;
    Session& session = *state.session;
    absl::Status status;
    std::vector<AttentionStateView> views;
    for (const StepCall::Part* part : parts[i]) {
      const StepCall::PeerCall& pc = *call->calls[part->call];
      const std::string& peer = session.shards[part->shard].peer;
      absl::Status s = FromGrpc(pc.status);
      if (s.ok() && part->result >= pc.response.results_size()) {
        s = absl::InternalError("the peer answered fewer results than entries");
      }
      if (s.ok()) {
        const v1::BatchDecodeResult& r = pc.response.results(part->result);
        if (r.code() != 0) {
          s = absl::Status(static_cast<absl::StatusCode>(r.code()), r.message());
        } else {
          absl::StatusOr<TensorView> o = ViewFromProto(r.output(), "output");
          absl::StatusOr<TensorView> l = ViewFromProto(r.lse(), "lse");
          if (o.ok() && l.ok()) {
            views.push_back({*o, *l});
          } else {
            s = o.ok() ? l.status() : o.status();
          }
        }
      }
      if (!s.ok() && status.ok()) status = ShardError(part->shard, peer, s);
    }
    absl::StatusOr<MergedAttention> merged =
        status.ok() ? MergeAttentionStates(views, state.query_dtype)
                    : absl::StatusOr<MergedAttention>(status);
    if (!merged.ok()) {
      result.status = merged.status();
      // All or nothing: appends other shards made for this entry go away.
      for (const StepCall::Part* part : parts[i]) {
        const StepCall::PeerCall& pc = *call->calls[part->call];
        if (part->added > 0 && pc.status.ok() && part->result < pc.response.results_size() &&
            pc.response.results(part->result).code() == 0) {
          undo.push_back(part);
        }
      }
      continue;
    }
    if (state.query_4d) merged->output.shape.insert(merged->output.shape.begin(), 1);
    TensorToProto(merged->output, &result.output);
    if (call->want_lse) {
      merged->lse.shape = {1, merged->lse.shape[merged->lse.shape.size() - 2],
                           merged->lse.shape.back()};
      TensorToProto(merged->lse, &result.lse);
    }
    result.context_tokens = state.total;
    absl::MutexLock lock(&mu_);
    for (const StepCall::Part* part : parts[i]) {
      session.length[call->layer][part->shard] += part->added;
    }
  }
  for (const StepCall::Part* part : undo) {
    // Sent and not waited for (this runs on a gRPC thread); a truncation
    // that fails leaves the shard as the next step's expected_context_tokens
    // will find it: that step then fails FAILED_PRECONDITION.
    // Only the step's own append: a shard that moved on is left alone.
    const Session::Shard& shard = call->entries[part->entry].session->shards[part->shard];
    SendTruncation(shard.peer, shard.session_id, call->layer, part->before,
                   part->before + part->added);
  }
  {
    absl::MutexLock lock(&mu_);
    for (StepCall::EntryState& state : call->entries) {
      if (state.session == nullptr) continue;
      state.session->busy = false;
      state.session->last_used = absl::Now();
    }
  }
  call->done(std::move(call->results));
}

}  // namespace attnserve
