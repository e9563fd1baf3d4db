#!/usr/bin/env bash
# Serving benchmarks against a local attnserve on loopback (the numbers in the
# notes of the scheduler and KV-cache work come from here). Each scenario starts
# its own server on a free-ish port (shards: three), drives it with attnctl bench
# (or a bench/*.py load) and prints one summary line; every server must exit 0
# on SIGTERM.
#
#   bench/serving_bench.sh [s1|open|overload|sessions|abuse|tier|stats|layer|shards|transport|shm|all]
#                                                                              (default: all)
#
# BUILD=build (default) picks the binaries. Runs take a few minutes; the
# machine should be otherwise idle.
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD:-$root/build}"
S="$build/server/attnserve"
C="$build/client/attnctl"
port=50171
metrics_port=9571
target="127.0.0.1:$port"
spid=""

start_server() {
  "$S" --listen="$target" --metrics_listen="127.0.0.1:$metrics_port" "$@" 2>/tmp/serving_bench.server.log &
  spid=$!
  for _ in $(seq 100); do "$C" --target="$target" health >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "server did not start: $(cat /tmp/serving_bench.server.log)" >&2
  exit 1
}
stop_server() {
  kill -TERM "$spid"
  wait "$spid"
  echo "  server exit code $?"
}
server_cpu_seconds() { awk '{print ($14 + $15) / 100}' "/proc/$spid/stat"; }
# Seconds of backend calls so far (attnserve_compute_duration_seconds_sum over
# backends): a batch's call counted once, however many requests it computed.
server_requests() {
  curl -s "http://127.0.0.1:$metrics_port/metrics" |
    awk '/^attnserve_requests_total\{code="OK"/ {s += $2} END {print s + 0}'
}
server_compute_seconds() {
  curl -s "http://127.0.0.1:$metrics_port/metrics" |
    awk '/^attnserve_compute_duration_seconds_sum/ {s += $2} END {printf "%.6f\n", s}'
}
summary() {
  /usr/bin/python3 -c '
import json, sys
d = json.loads(sys.stdin.read())
keys = ["qps", "tokens_per_s", "ok", "errors", "p50_ms", "p90_ms", "p99_ms", "p999_ms",
        "error_p50_ms", "error_p99_ms", "server_batch_size", "server_compute_us"]
print("  " + " ".join("%s=%s" % (k, round(d[k], 3) if isinstance(d[k], float) else d[k])
                      for k in keys if k in d))'
}

s1() {
  echo "== S1 closed loop, concurrency 64: batching (defaults) vs --max_batch_size=1"
  for flags in "" "--max_batch_size=1"; do
    echo "-- server --threads=2 $flags"
    # shellcheck disable=SC2086
    start_server --threads=2 $flags
    cpu0=$(server_cpu_seconds)
    /usr/bin/time -f "  attnctl cpu: %U user + %S sys seconds" \
      "$C" --target="$target" bench --shape=S1 --concurrency=64 --duration=10s --json | summary
    echo "  server cpu: $(/usr/bin/python3 -c "print(round($(server_cpu_seconds) - $cpu0, 2))") seconds"
    stop_server
  done
  echo "-- in process, the same requests batched 32 at a time:"
  "$build/bench/attn_bench" --shape=custom --b=32 --hq=8 --hkv=8 --lq=128 --lk=128 --d=64 \
    --threads=2 --json | /usr/bin/python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("  %.3f ms per 32 requests = %.0f requests/s" % (d["ms"], 32e3 / d["ms"]))'
}

open_loop() {
  echo "== S1 open loop at 450 requests/s (about half the closed-loop maximum here)"
  start_server --threads=2
  "$C" --target="$target" bench --shape=S1 --rate=450 --duration=15s --json | summary
  stop_server
}

overload() {
  echo "== overload: reference backend, --queue_capacity=64, open loop at 2x its maximum for 30 s"
  start_server --threads=2 --backend=reference --queue_capacity=64
  max=$("$C" --target="$target" bench --shape=S1 --concurrency=16 --duration=5s --json |
        /usr/bin/python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["qps"])')
  echo "  closed-loop maximum: $max requests/s"
  rss_log=$(mktemp)
  (while kill -0 "$spid" 2>/dev/null; do awk '/VmRSS/ {print $2}' "/proc/$spid/status"; sleep 1; done) >"$rss_log" &
  "$C" --target="$target" bench --shape=S1 --rate="$(/usr/bin/python3 -c "print(int(2 * $max))")" \
    --duration=30s --json | summary
  echo "  RSS during overload: $(sort -n "$rss_log" | head -1)-$(sort -n "$rss_log" | tail -1) kB"
  echo "  afterwards:"
  "$C" --target="$target" bench --shape=S1 --concurrency=4 --duration=3s --json | summary
  stop_server
  rm -f "$rss_log"
}

sessions() {
  local kv=$((1024 * 1024 * 1024))
  for cache in f32 bf16; do
    echo "== sessions: 16 x 4096 tokens, concurrency 16, cache $cache, --kv_cache_bytes=$kv"
    start_server --threads=2 --kv_cache_bytes=$kv
    "$C" --target="$target" bench --sessions=16 --context=4096 --concurrency=16 --duration=10s \
      --cache_dtype=$cache --json | summary
    echo "  server VmHWM $(awk '/VmHWM/ {print $2}' "/proc/$spid/status") kB (bound: cache + 256 MiB = $(( (kv >> 10) + 262144 )) kB)"
    stop_server
    "$build/bench/attn_bench" --shape=P4 --paged --dtype=$cache --threads=2 --json |
      /usr/bin/python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("  kernel alone: %.2f ms per 16-session step = %.0f tokens/s, bw_fraction %.3f" % (d["ms"], 16e3 / d["ms"], d["bw_fraction"]))'
  done
  echo "== sessions: the cache full (--kv_cache_bytes=540 MiB, 512 MiB of F32 prefill) under decode load"
  kv=$((540 * 1024 * 1024))
  start_server --threads=2 --kv_cache_bytes=$kv
  "$C" --target="$target" bench --sessions=16 --context=4096 --concurrency=16 --duration=10s --json | summary
  echo "  server VmHWM $(awk '/VmHWM/ {print $2}' "/proc/$spid/status") kB (bound: cache + 256 MiB = $(( (kv >> 10) + 262144 )) kB)"
  stop_server
}

abuse() {
  local budget=$((1024 * 1024 * 1024)) kv=$((256 * 1024 * 1024))
  echo "== abuse: S1 closed loop (concurrency 8) alone, then beside bench/abuse_load.py;"
  echo "   --memory_limit_bytes=$budget --kv_cache_bytes=$kv, default cost limit"
  start_server --threads=2 --memory_limit_bytes=$budget --kv_cache_bytes=$kv
  echo "-- S1 alone:"
  "$C" --target="$target" bench --shape=S1 --concurrency=8 --duration=10s --json | summary
  echo "-- S1 beside the abuse:"
  /usr/bin/python3 "$root/bench/abuse_load.py" --target="$target" --duration=12 \
    >/tmp/serving_bench.abuse.json &
  local apid=$!
  sleep 1
  "$C" --target="$target" bench --shape=S1 --concurrency=8 --duration=10s --json | summary
  wait "$apid"
  echo "  abuse: $(cat /tmp/serving_bench.abuse.json)"
  echo "  server VmHWM $(awk '/VmHWM/ {print $2}' "/proc/$spid/status") kB" \
    "(bound: budget + cache + 256 MiB = $(( (budget >> 10) + (kv >> 10) + 262144 )) kB)"
  stop_server
  echo "-- --max_request_flops=0 (no cost limit): expensive calls are admitted, their callers"
  echo "   give up, and the next small call waits for the worker (queue_us):"
  start_server --threads=2 --memory_limit_bytes=$budget --kv_cache_bytes=$kv --max_request_flops=0
  echo "  $(/usr/bin/python3 "$root/bench/abuse_load.py" --target="$target" --duration=0 --probe=20)"
  stop_server
  echo "-- a client that sends 7 output-amplification calls and stops reading (SIGSTOP) for 3 s:"
  start_server --threads=2 --memory_limit_bytes=$budget --kv_cache_bytes=$kv
  /usr/bin/python3 "$root/bench/abuse_load.py" --target="$target" --duration=0 --stalled_client=7 \
    >/dev/null
  echo "  server VmHWM $(awk '/VmHWM/ {print $2}' "/proc/$spid/status") kB" \
    "(bound: $(( (budget >> 10) + (kv >> 10) + 262144 )) kB)"
  stop_server
}

tier() {
  echo "== T1 tier decode: 8 layers x 16 sessions x 1024 context, Hq 32, Hkv 8, D 128, BF16 cache"
  start_server --kv_cache_bytes=8589934592
  for batched in --batched ""; do
    echo "-- attnctl bench --layers=8 ${batched:-(one Decode per session)}"
    # shellcheck disable=SC2086
    "$C" --target="$target" bench --sessions=16 --context=1024 --layers=8 $batched --hq=32 \
      --hkv=8 --d=128 --cache_dtype=bf16 --dtype=bf16 --duration=10s --json |
      /usr/bin/python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("  tokens_per_s=%.1f layer_p50_ms=%.3f layer_p99_ms=%.3f server_compute_us=%.0f server_queue_us=%.0f context_tokens_max=%d" % (d["tokens_per_s"], d["layer_p50_ms"], d["layer_p99_ms"], d["server_compute_us"], d["server_queue_us"], d["context_tokens_max"]))'
  done
  echo "-- in process, the same batch (attn_bench --paged --layers=8) at 1024 and 1126 (the runs' mean) tokens"
  for ctx in 1024 1126; do
    "$build/bench/attn_bench" --shape=P4 --paged --layers=8 --sessions=16 --context=$ctx \
      --dtype=bf16 --threads=2 --json |
      /usr/bin/python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("  context=%d layer_step_ms=%.3f tokens_per_s=%.1f isa=%s" % (d["Lk"], d["layer_step_ms"], d["tokens_per_s"], d["peak_isa"]))'
  done
  echo "-- the server's time per BatchDecode layer call beyond queue and kernel; forks; sinks"
  /usr/bin/python3 "$root/bench/tier_load.py" --target="$target" --pid="$spid" --overhead --forks \
    --sinks=100000
  stop_server
}

layer() {
  echo "== L1 served: AttendLayer of an L1-sized model (hidden 4096, 32/8 heads), 512 tokens, vs attn_bench --layer=DIR"
  local dtypes="F32"
  grep -q avx512_bf16 /proc/cpuinfo && dtypes="F32 BF16"
  for dtype in $dtypes; do
    local dir="/tmp/serving_bench.l1.$dtype"
    [ -f "$dir/model.safetensors" ] ||
      /usr/bin/python3 "$root/client/python/examples/make_tiny_model.py" "$dir" --hidden_size=4096 \
        --heads=32 --kv_heads=8 --layers=1 --dtype="$dtype" >/dev/null
    echo "-- $dtype weights"
    start_server --model=l1="$dir"
    /usr/bin/python3 "$root/bench/layer_load.py" --target="$target" --model=l1 --tokens=512 \
      --calls=10 | sed 's/^/  served: /'
    stop_server
    local lower; lower=$(echo "$dtype" | tr 'A-Z' 'a-z')
    "$build/bench/attn_bench" --layer="$dir" --lq=512 --dtype="$lower" --json |
      /usr/bin/python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("  in process: ms=%.3f proj_ms=%.3f attn_ms=%.3f gflops=%.1f isa=%s" % (d["ms"], d["proj_ms"], d["attn_ms"], d["gflops"], d["peak_isa"]))'
  done
}

stats() {
  echo "== S1 closed loop, concurrency 16: --attention_stats_sample=0 vs =100, alternating, 3 rounds"
  for round in 1 2 3; do
    for n in 0 100; do
      start_server --attention_stats_sample=$n
      echo "-- round $round --attention_stats_sample=$n"
      "$C" --target="$target" bench --shape=S1 --concurrency=16 --duration=8s --json | summary
      stop_server
    done
  done
  echo "-- the kernel's share: attn_bench --shape=S1 --entropy (with and without, alternating)"
  "$build/bench/attn_bench" --shape=S1 --entropy --threads=2 --json |
    /usr/bin/python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("  %.3f ms with entropy, %.3f without: %+.1f%%" % (d["ms"], d["ms_without_entropy"], 100 * d["entropy_overhead"]))'
}

transport() {
  # The server's CPU per request beyond the attention itself: the server on
  # core 0 (one backend thread), attnctl on core 1, so neither's CPU blurs
  # into the other's. CPU is the server's user + system time over the run
  # (/proc/PID/stat), split two ways: by the backend calls' wall time
  # (attnserve_compute_duration_seconds_sum, which counts a batch once, so
  # compute per request = sum over responses of compute_us / batch_size; a
  # busy core stretches it, so the rest comes out low), and, where perf is
  # installed, by the share of the server's CPU samples in the cpu kernels
  # (not stretched by other processes).
  # TRANSPORT_MODES: the servers compared, interleaved, ROUNDS times; one
  # word each, its items joined by commas: --flags, a server binary (a path
  # starting with /; default $BUILD's) and VAR=value settings of its
  # environment, e.g. "/tmp/old/attnserve --zero_copy=true,--threads=1".
  local rounds="${ROUNDS:-3}" modes="${TRANSPORT_MODES:---zero_copy=false --zero_copy=true}"
  echo "== transport: S1 closed loop, concurrency 16, server pinned to core 0 (--threads=1),"
  echo "   attnctl to core 1; $rounds rounds of: $modes"
  local round mode
  for round in $(seq "$rounds"); do
    for mode in $modes; do
      local binary="$S" flags=() envs=() item
      for item in ${mode//,/ }; do
        case "$item" in
          --*) flags+=("$item") ;;
          /*) binary="$item" ;;
          *) envs+=("$item") ;;
        esac
      done
      env "${envs[@]}" "$binary" --listen="$target" --metrics_listen="127.0.0.1:$metrics_port" \
        --threads=1 "${flags[@]}" 2>/tmp/serving_bench.server.log &
      spid=$!
      taskset -p -c 0 "$spid" >/dev/null
      for _ in $(seq 100); do "$C" --target="$target" health >/dev/null 2>&1 && break; sleep 0.1; done
      local cpu0 compute0 out_file
      out_file=$(mktemp)
      cpu0=$(server_cpu_seconds)
      compute0=$(server_compute_seconds)
      taskset -c 1 "$C" --target="$target" bench --shape=S1 --concurrency=16 --duration=10s \
        --json >"$out_file" &
      local cpid=$! profile=""
      if command -v perf >/dev/null; then
        # 5 s in the middle of the run, sampled on the server's CPU time only
        # (so other processes' load cannot blur it): leaf symbols of the cpu
        # kernels (attnserve::cpu::) are compute, everything else the rest.
        sleep 3
        local n0 n1
        n0=$(server_requests)
        perf record -q -e cpu-clock -F 1000 -p "$spid" -o /tmp/serving_bench.perf.data -- sleep 5 \
          2>/dev/null
        n1=$(server_requests)
        profile=$(perf script -i /tmp/serving_bench.perf.data -F ip,sym 2>/dev/null |
          /usr/bin/python3 -c '
import sys
samples = compute = 0
for line in sys.stdin:
    samples += 1
    compute += " attnserve::cpu::" in line
print("%.4f" % (compute / samples if samples else 0))')
      fi
      wait "$cpid"
      local out cpu1 compute1
      out=$(cat "$out_file")
      rm -f "$out_file"
      cpu1=$(server_cpu_seconds)
      compute1=$(server_compute_seconds)
      echo "-- round $round $mode"
      echo "$out" | CPU="$cpu1 - $cpu0" COMPUTE="$compute1 - $compute0" SHARE="$profile" \
        /usr/bin/python3 -c '
import json, os, sys
d = json.loads(sys.stdin.read())
cpu, compute = eval(os.environ["CPU"]), eval(os.environ["COMPUTE"])
n = d["ok"]
print("  qps=%.1f ok=%d errors=%s p50_ms=%.3f batch=%.2f server_cpu_ms_per_req=%.3f" %
      (d["qps"], n, d["errors"], d["p50_ms"], d["server_batch_size"], 1e3 * cpu / n))
print("  by backend wall time: compute_ms=%.3f rest_ms=%.3f" %
      (1e3 * compute / n, 1e3 * (cpu - compute) / n))
if os.environ["SHARE"]:
    share = float(os.environ["SHARE"])
    print("  by profile (kernel symbols %.1f%% of the samples): compute_ms=%.3f rest_ms=%.3f" %
          (100 * share, 1e3 * cpu * share / n, 1e3 * cpu * (1 - share) / n))'
      stop_server
    done
  done
}

shards() {
  # Three replicas naming each other in --peers; bench/shard_fanout.py opens
  # its sessions on the first (the coordinator) with shards=3 and without.
  local kv=$((512 * 1024 * 1024)) peers="" pids="" i
  for i in 0 1 2; do peers="$peers${peers:+,}127.0.0.1:$((50181 + i))"; done
  echo "== shards: P4-sized BatchDecode steps (16 sessions x 4096 tokens, Hq 32, Hkv 8, D 128, BF16"
  echo "   cache) split over 3 replicas (shards=3) vs on one; --kv_cache_bytes=$kv each"
  for i in 0 1 2; do
    "$S" --listen="127.0.0.1:$((50181 + i))" --metrics_listen="127.0.0.1:$((9581 + i))" \
      --peers="$peers" --replica_id="bench-$i" --kv_cache_bytes=$kv \
      2>"/tmp/serving_bench.shard$i.log" &
    pids="$pids $!"
  done
  for i in 0 1 2; do
    local up=""
    for _ in $(seq 100); do
      "$C" --target="127.0.0.1:$((50181 + i))" health >/dev/null 2>&1 && { up=1; break; }
      sleep 0.1
    done
    [ -n "$up" ] || { echo "replica $i did not start: $(cat "/tmp/serving_bench.shard$i.log")" >&2; exit 1; }
  done
  echo "-- packed: caches that hold whole sessions, so each lives on one replica"
  echo "  $(/usr/bin/python3 "$root/bench/shard_fanout.py" --targets="$peers")"
  echo "-- split: every session a third on each replica (--split)"
  echo "  $(/usr/bin/python3 "$root/bench/shard_fanout.py" --targets="$peers" --split)"
  for pid in $pids; do
    kill -TERM "$pid"
    wait "$pid"
    echo "  server exit code $?"
  done
}

shm() {
  # Co-located callers over shared memory (--shm: inputs written once into a
  # registered region, outputs written there by the kernel) against the same
  # shape in process (attn_bench, whose ms is one request's wall time on the
  # server's threads) and over the wire, interleaved ROUNDS times on one
  # server. S1 at concurrency 16 on --channels=1 and 2 (one connection's
  # gRPC threads are the limit), P1 at concurrency 2.
  local rounds="${ROUNDS:-3}" round
  echo "== shm: S1 and P1 served over shared memory and inline vs attn_bench in process"
  start_server --allow_shared_memory
  rate() { /usr/bin/python3 -c 'import json, sys; d = json.loads(sys.stdin.read()); print(round(d["qps"], 1) if "qps" in d else round(1e3 / d["ms"], 1))'; }
  for round in $(seq "$rounds"); do
    echo "-- round $round (requests/s)"
    echo "  S1 attn_bench $("$build/bench/attn_bench" --shape=S1 --json | rate)" \
      "shm $("$C" --target="$target" bench --shape=S1 --concurrency=16 --duration=8s --shm --json | rate)" \
      "shm,channels=2 $("$C" --target="$target" bench --shape=S1 --concurrency=16 --channels=2 --duration=8s --shm --json | rate)" \
      "inline $("$C" --target="$target" bench --shape=S1 --concurrency=16 --duration=8s --json | rate)"
    echo "  P1 attn_bench $("$build/bench/attn_bench" --shape=P1 --json | rate)" \
      "shm $("$C" --target="$target" bench --shape=P1 --concurrency=2 --duration=10s --shm --json | rate)" \
      "inline $("$C" --target="$target" bench --shape=P1 --concurrency=2 --duration=10s --json | rate)"
  done
  stop_server
}

case "${1:-all}" in
  s1) s1 ;;
  tier) tier ;;
  stats) stats ;;
  layer) layer ;;
  open) open_loop ;;
  overload) overload ;;
  sessions) sessions ;;
  abuse) abuse ;;
  shards) shards ;;
  transport) transport ;;
  shm) shm ;;
  all) s1; open_loop; overload; sessions; abuse; tier; stats; layer; shards; transport; shm ;;
  *)
    echo "usage: $0 [s1|open|overload|sessions|abuse|tier|stats|layer|shards|transport|shm|all]" >&2
    exit 2
    ;;
esac
