// SessionLoad: drives decode steps across KV-cache sessions, the engine of
// `attnctl bench --sessions`.
//
// A run opens `sessions` sessions and prefills each with `context_tokens`
// tokens of random K/V (in chunks that keep each message under half the
// server's max_request_bytes), then measures decode: each step appends
// `decode_tokens` new random tokens to one session and attends their queries
// over its cache. Steps of one session are sequential (at most one in
// flight, as in a real generation loop); `concurrency` sessions step at once,
// closed loop, taking turns round-robin when there are more sessions than
// that. Steps use DecodeAsync, never a thread per call. At the end, or when
// `interrupted` is set, the steps in flight finish and every session is
// closed.
//
// The prefill sends only each chunk's last query (Lq = 1): the run measures
// decode, and a full causal prefill of 16 x 4096 tokens would take minutes on
// a CPU server.
//
// Model-shaped runs (`layers` > 1 or `batched`; attnctl bench --layers):
// sessions are opened with `layers` layers and each prefill chunk is sent to
// every layer in order 0..L-1 (the server requires layers to step in order).
// Then every generated token steps each layer in order over all sessions,
// in lockstep: a layer-step is either one BatchDecode over all sessions
// (`batched`) or one Decode per session, `concurrency` at a time via
// DecodeAsync, and all of a layer's calls finish before the next layer
// starts. Each layer-step is timed from its first send to its last answer.
// Steps carry expected_context_tokens. A session whose step fails is
// dropped from the rest of the run (its later layers could not step in
// order); the run ends early when none is left.
//
// RunSessionLoad blocks its caller for the prefill, the duration and the
// drain. Not thread-safe: one run at a time.
#ifndef ATTNSERVE_CLIENT_SESSION_LOAD_H_
#define ATTNSERVE_CLIENT_SESSION_LOAD_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/latency_stats.h"
#include "client/load_generator.h"
#include "core/dtype.h"

namespace attnserve::client {

struct SessionLoadOptions {
  int sessions = 1;
  int64_t context_tokens = 4096;  // prefilled per session before measuring
  int decode_tokens = 1;          // new tokens per step
  int concurrency = 1;            // sessions with a step in flight, <= sessions
  // Dims of every session (P4's by default): Hq, Hkv, D (= Dv).
  int32_t heads_q = 32;
  int32_t heads_kv = 8;
  int32_t head_dim = 128;
  DType dtype = DType::kF32;        // q/k/v on the wire
  DType cache_dtype = DType::kF32;  // the sessions' storage
  std::string backend;              // empty: the server's default
  absl::Duration duration = absl::Seconds(10);
  absl::Duration call_deadline = absl::Seconds(30);
  // The server's gRPC message limit (ServerInfo.limits.max_request_bytes).
  int64_t max_request_bytes = int64_t{64} << 20;
  uint64_t seed = 1;  // random q/k/v
  // Model-shaped run (see above) when layers > 1 or batched.
  int32_t layers = 1;    // layers of every session
  bool batched = false;  // a layer-step is one BatchDecode instead of N Decodes
  bool model_shaped() const { return layers > 1 || batched; }
  // Progress of the decode phase: called about every progress_interval from
  // the caller's thread with what happened since the previous call; zero
  // disables it.
  absl::Duration progress_interval = absl::ZeroDuration();
  // Polled (every 50 ms at most); once true, the run stops sending, drains
  // and closes its sessions. Not owned; may be null.
  const std::atomic<bool>* interrupted = nullptr;
};

struct SessionLoadReport {
  double prefill_s = 0;        // opening and prefilling every session
  int64_t prefill_tokens = 0;  // over all sessions (a token counts once, whatever the layers)
  int64_t prefill_calls = 0;   // Decode calls of the prefill
  double elapsed_s = 0;        // decode: from its start to the last completion
  // Decode steps sent; model-shaped: session layer-steps (Decode calls, or
  // BatchDecode entries).
  int64_t sent = 0;
  double steps_per_s = 0;      // successful steps (as `sent` counts them) per second
  // Decode tokens per second over all sessions; model-shaped: whole-model
  // tokens, one token through every layer of one session counting 1.
  double tokens_per_s = 0;
  int64_t context_tokens_max = 0;  // longest session at the end
  int64_t close_errors = 0;    // CloseSession calls that failed
  bool interrupted = false;    // stopped early by `interrupted`
  LatencySummary latency;      // per step (model-shaped: per session layer-step)
  // Model-shaped runs only:
  int64_t tokens = 0;           // whole-model tokens generated over all sessions
  int64_t layer_steps = 0;      // layer-steps timed
  double layer_p50_ms = 0;      // a layer-step: its first send to its last answer
  double layer_p99_ms = 0;
  int64_t sessions_dropped = 0;  // sessions dropped after a failed step
};

// INVALID_ARGUMENT naming the option when it is out of range.
absl::Status ValidateSessionLoadOptions(const SessionLoadOptions& options);

// Runs the load over `clients` (borrowed; sessions are spread round-robin).
// Returns the validation error; the first error of opening or prefilling a
// session (after closing those opened), or CANCELLED when interrupted during
// the prefill; else the report, decode failures counted in it by code.
absl::StatusOr<SessionLoadReport> RunSessionLoad(
    const std::vector<AttnClient*>& clients, const SessionLoadOptions& options,
    const std::function<void(const LoadProgress&)>& progress = {});

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_SESSION_LOAD_H_
