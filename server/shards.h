// ShardCoordinator: KV-cache sessions whose context is split over several
// replicas (CreateSession.shards, context parallelism). The replica that
// receives CreateSession coordinates: it opens one plain session on each of
// `shards` peers (--peers), places the session's tokens on them in
// contiguous ranges (shard 0 fills first, then shard 1, ...; each shard holds
// what its replica's cache could hold for it when the session opened), and
// runs every step as one PartialAttend per peer (batched over a BatchDecode's
// entries): the shard that owns the new positions appends them, every shard
// with tokens attends the queries over its range with key_offset/total_keys
// (so masks and ALiBi count global positions), and the parts are merged by
// their lse in shard order (MergeAttentionStates): bitwise the same run to
// run. With RoPE the coordinator rotates queries and keys at their global
// positions. A shard that fails or does not answer fails the step with its
// code (UNAVAILABLE for a replica that is down), naming the shard; appends
// that other shards made for it are truncated away, so a step is all or
// nothing. Closing or expiring the session closes every shard.
//
// Contiguous ranges rather than stripes: a decode step then appends on one
// replica only, and a shard's range is one key_offset, so each shard's
// part is a plain session step; the cost is that the shard holding the
// newest tokens also does their appends.
//
// Thread-safe.
#ifndef ATTNSERVE_SERVER_SHARDS_H_
#define ATTNSERVE_SERVER_SHARDS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "attention/rope.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "core/dtype.h"
#include "metrics/metrics.h"

namespace attnserve {

struct ShardOptions {
  // --peers: "host:port" entries, or one "dns:NAME:PORT" whose A/AAAA records
  // are the peers (a Kubernetes headless Service). May include this replica.
  std::vector<std::string> peers;
  std::string replica_id;  // --replica_id, for logs and ServerInfo
  std::string peer_token;  // presented to peers as a bearer token; "" none
  std::string peer_tls_ca_pem;  // set: peers are called over TLS with this CA
  absl::Duration idle_timeout = absl::Minutes(10);
  absl::Duration call_timeout = absl::Seconds(10);  // CreateSession / CloseSession on a peer
};

class ShardCoordinator {
 public:
  ShardCoordinator(ShardOptions options, Metrics* metrics);
  ~ShardCoordinator();

  // The peers now ("host:port", sorted, no duplicates): --peers, with a
  // dns: entry resolved. UNAVAILABLE when a name does not resolve.
  absl::StatusOr<std::vector<std::string>> Peers() const;

  struct Created {
    std::string session_id;
    int64_t capacity_tokens = 0;  // the shards' together
  };
  // Opens a session of request.shards() shards for `owner`. FAILED_PRECONDITION
  // naming the peers found when there are fewer; INVALID_ARGUMENT for what a
  // sharded session cannot have (a model, sinks windows, max_tokens);
  // a peer's error naming it.
  absl::StatusOr<Created> Create(const v1::CreateSessionRequest& request, const std::string& owner);

  // Whether `session_id` is a sharded session of this coordinator.
  bool Owns(const std::string& session_id) const;

  // Closes the session and every shard (shards that cannot be reached are
  // left to their own idle timeout). NOT_FOUND for an unknown or foreign id.
  absl::Status Close(const std::string& session_id, const std::string& owner);

  // Closes sessions unused for idle_timeout, and keeps the shards of the
  // others alive on their peers: a shard that holds no tokens yet gets no
  // step, so it is touched (an empty truncation) every idle_timeout / 4.
  void ExpireIdle();
  int64_t active() const;

  struct Entry {
    std::string session_id;
    const v1::Tensor* query = nullptr;
    const v1::Tensor* key = nullptr;
    const v1::Tensor* value = nullptr;
    std::optional<int64_t> expected_context_tokens;
  };
  struct Result {
    absl::Status status;
    v1::Tensor output;  // the query's dtype and rank
    v1::Tensor lse;     // [1, Hq, Lq] when asked
    int64_t context_tokens = 0;
    // The step's fan-out: from its first PartialAttend sent to its last
    // answer (the slowest shard, with the transport); zero when none was sent.
    absl::Duration fanout;
  };
  // The destructor waits (up to call_timeout) for steps whose fan-out is in
  // flight: their callbacks use this object.
  // One layer-step of `entries` (each a sharded session of `owner`): the
  // appends and the fan-out; `done` runs once with a result per entry, on a
  // gRPC thread, or at once when nothing could be sent.
  void Step(const std::string& owner, int32_t layer, const std::vector<Entry>& entries,
            const v1::AttentionOptions& options, const v1::OutputSpec& outputs,
            const std::string& backend, int32_t priority, absl::Time deadline,
            std::function<void(std::vector<Result>)> done);

 private:
  struct Session;
  struct StepCall;
  v1::AttentionService::Stub* StubFor(const std::string& peer);
  void Finish(std::shared_ptr<StepCall> call);
  void CloseShards(const Session& session);
  // The deadline and the peer token of a call to a peer.
  void PreparePeerCall(grpc::ClientContext* context, absl::Time deadline) const;
  // Truncates a shard's layer to `tokens` if it holds `expected`, without
  // waiting for the answer (undoing a step's append, keeping a shard open).
  void SendTruncation(const std::string& peer, const std::string& session_id, int32_t layer,
                      int64_t tokens, int64_t expected);

  const ShardOptions options_;
  Metrics* const metrics_;

  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::unique_ptr<v1::AttentionService::Stub>> stubs_ ABSL_GUARDED_BY(mu_);
  uint64_t next_start_ ABSL_GUARDED_BY(mu_) = 0;  // rotates the first shard over the peers
  int64_t steps_in_flight_ ABSL_GUARDED_BY(mu_) = 0;  // fan-outs not yet finished
};

}  // namespace attnserve

#endif  // ATTNSERVE_SERVER_SHARDS_H_
