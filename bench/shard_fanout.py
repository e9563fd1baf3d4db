#!/usr/bin/env python3
"""The coordinator's cost of sessions split over replicas (CreateSession.shards),
for P4-sized decode steps: --sessions sessions (default 16) of Hq 32, Hkv 8,
D 128, a BF16 cache and --context tokens each (default 4096), one BatchDecode
of all of them per step.

Starts nothing: --targets names running replicas, each started with --peers
listing all of them (bench/serving_bench.sh shards starts three). The first
target coordinates. Opens the sessions once with shards=N (N = the number of
targets) on the coordinator and once unsharded on the same replica, prefills
both sets, then runs --steps decode steps of each, alternating, after --warmup
steps of each, and prints one JSON line:

  sharded: per step the client's latency (client_ms_p50), the coordinator's
           timing.total_us (receipt to response) and timing.compute_us (the
           fan-out: first PartialAttend sent to last answer, so the slowest
           shard with its transport), and overhead_us = total_us - compute_us
           (the coordinator's own work: placement, conversion, the merge),
           p50 and p99
  unsharded: client_ms_p50, total_us_p50, compute_us_p50 of the same step on
             one replica
  placement_mib: each target's kv_cache_used_bytes (MiB) with the sharded
                 sessions open

A session's tokens fill its shard 0 first (contiguous placement; each
shard's capacity is what its replica's cache held when the session opened),
so with caches that hold a whole session each session lives on one replica
(shard 0 rotates over the peers) and a step fans out to every replica holding
one, one part per session (packed, the default). --split makes every session
span all the replicas, a third of its context on each: before the sessions
open, plain filler sessions take each replica's free cache, and one filler
per replica is closed just before each sharded session opens (what the
previous session's shards left for its steps is held by another filler
meanwhile), so each of its shards gets room for a third of the context and
the steps; the other fillers close once all are open, before the unsharded
sessions. Then each step sends every session's query to every replica and
merges three parts per session.

Usage: shard_fanout.py --targets=HOST:PORT,HOST:PORT,HOST:PORT [--split] [--steps=100]
"""

import argparse
import json
import os
import sys
import time

import grpc
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client",
                                "python"))
import attnserve_client  # noqa: E402

HQ, HKV, D = 32, 8, 128  # P4
PREFILL_CHUNK = 1024


def percentile(xs, p):
    return float(np.percentile(np.asarray(xs, dtype=np.float64), p))


def prefill(client, session, tokens, rng):
    """Appends `tokens` random tokens to a BF16-cache session, one query per
    chunk (the K/V matter, not the prefill's attention)."""
    done = 0
    while done < tokens:
        n = min(PREFILL_CHUNK, tokens - done)
        q = rng.standard_normal((1, HQ, D), dtype=np.float32)
        k = rng.standard_normal((n, HKV, D), dtype=np.float32)
        v = rng.standard_normal((n, HKV, D), dtype=np.float32)
        client.decode(session, q, k, v, dtype="bf16")
        done += n


def open_sessions(client, count, context, shards, rng, before_each=None):
    """`count` BF16-cache sessions prefilled with `context` tokens;
    before_each() runs before each opens."""
    sessions = []
    for _ in range(count):
        if before_each is not None:
            before_each()
        s = client.create_session(HKV, D, dtype="bf16", shards=shards)
        sessions.append(s)
        prefill(client, s, context, rng)
    return sessions


def free_tokens(client):
    """What a new BF16-cache session of this shape could hold now."""
    try:
        s = client.create_session(HKV, D, dtype="bf16")
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return 0
        raise
    client.close_session(s)
    return s.capacity_tokens


def fill(clients, share, count, rng):
    """Takes every replica's free cache with plain sessions: one of what is
    left beyond count x share tokens, then `count` of `share` tokens (closed
    one per replica before each sharded session opens). Returns per client
    (the rest, [the share fillers])."""
    fillers = []
    for c in clients:
        rest = free_tokens(c) - count * share
        if rest < 0:
            raise SystemExit(f"{c.target}: its cache holds {rest + count * share} more tokens, "
                             f"--split needs {count} x {share}")
        sizes = ([rest] if rest > 0 else []) + [share] * count
        made = []
        for n in sizes:
            s = c.create_session(HKV, D, dtype="bf16")
            prefill(c, s, n, rng)
            made.append(s)
        fillers.append((made[0] if rest > 0 else None, made[-count:]))
    return fillers


def step(client, sessions, rng):
    """One BatchDecode of every session (one new token each): (client
    seconds, the response's timing)."""
    entries = [(s, rng.standard_normal((1, HQ, D), dtype=np.float32),
                rng.standard_normal((1, HKV, D), dtype=np.float32),
                rng.standard_normal((1, HKV, D), dtype=np.float32)) for s in sessions]
    request = attnserve_client.build_batch_decode_request(0, entries, dtype="bf16")
    t0 = time.monotonic()
    results = client.batch_decode_proto(request)
    elapsed = time.monotonic() - t0
    attnserve_client.raise_first_error(results)
    return elapsed, results[0].timing


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", required=True,
                        help="comma-separated replicas, each with --peers listing them all")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--split", action="store_true",
                        help="every session over all the replicas (see above)")
    args = parser.parse_args()
    targets = args.targets.split(",")
    clients = [attnserve_client.Client(t, timeout=120) for t in targets]
    try:
        for c in clients:
            c.wait_until_serving(timeout=30)
        coordinator = clients[0]
        rng = np.random.default_rng(0)
        shards = len(targets)
        if args.split:
            # Room for a third of the context and the steps on each shard.
            block = coordinator.server_info().sessions.block_tokens
            share = -(-(args.context + args.warmup + args.steps) // shards)
            share = -(-share // block) * block
            fillers = fill(clients, share, args.sessions, rng)

            held = [[rest] if rest is not None else [] for rest, _ in fillers]

            def make_room():
                # What the last session's shards left (room for its steps)
                # is held too, so the next session's shards get a share each.
                for c, (_, shares), h in zip(clients, fillers, held):
                    left = free_tokens(c)
                    if left > 0:
                        h.append(c.create_session(HKV, D, dtype="bf16"))
                        prefill(c, h[-1], left, rng)
                    c.close_session(shares.pop())

            sharded = open_sessions(coordinator, args.sessions, args.context, shards, rng,
                                    make_room)
            for c, h in zip(clients, held):
                for f in h:
                    c.close_session(f)
        else:
            sharded = open_sessions(coordinator, args.sessions, args.context, shards, rng)
        placement = {t: round(c.server_info().sessions.kv_cache_used_bytes / 2**20, 1)
                     for t, c in zip(targets, clients)}
        single = open_sessions(coordinator, args.sessions, args.context, 0, rng)
        runs = {"sharded": [], "unsharded": []}
        for i in range(args.warmup + args.steps):
            for name, sessions in (("sharded", sharded), ("unsharded", single)):
                elapsed, timing = step(coordinator, sessions, rng)
                if i >= args.warmup:
                    runs[name].append((elapsed, timing))
        for s in sharded + single:
            coordinator.close_session(s)

        def p50(name, key):
            return percentile([t[key] for _, t in runs[name]], 50)

        overhead = [t["total_us"] - t["compute_us"] for _, t in runs["sharded"]]
        report = {
            "shape": {"Hq": HQ, "Hkv": HKV, "D": D, "cache": "bf16", "sessions": args.sessions,
                      "context": args.context, "wire": "bf16"},
            "replicas": len(targets), "shards": shards, "split": args.split,
            "steps": args.steps,
            "cores": os.cpu_count(),
            "sharded": {
                "client_ms_p50": round(percentile([e for e, _ in runs["sharded"]], 50) * 1e3, 3),
                "total_us_p50": p50("sharded", "total_us"),
                "fanout_us_p50": p50("sharded", "compute_us"),
                "overhead_us_p50": percentile(overhead, 50),
                "overhead_us_p99": percentile(overhead, 99),
            },
            "unsharded": {
                "client_ms_p50": round(percentile([e for e, _ in runs["unsharded"]], 50) * 1e3,
                                       3),
                "total_us_p50": p50("unsharded", "total_us"),
                "compute_us_p50": p50("unsharded", "compute_us"),
            },
            "placement_mib": placement,
        }
        print(json.dumps(report))
    finally:
        for c in clients:
            c.close()


if __name__ == "__main__":
    main()
