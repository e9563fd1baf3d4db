#!/usr/bin/env python3
"""Attention-tier measurements for bench/serving_bench.sh's `tier` scenario,
against a running attnserve (the server's pid for RSS):

  --overhead   the server's time per BatchDecode layer call outside its queue
               and its backend call (Timing: total_us - queue_us - compute_us),
               16 sessions x 8 layers at T1's heads (Hq 32, Hkv 8, D 128, BF16).
  --forks      100 forks of a 4096-token session (8 layers): the cache bytes
               they add (GetServerInfo), at once and after each fork took one
               decode step, against the parent's own bytes.
  --sinks N    a sinks session (sink_tokens 4, window_tokens 1024, T1 heads,
               RoPE) decoding N tokens, 64 per call: the server's RSS
               (VmRSS) and the cache's used bytes every 10% of the way.

Prints one JSON line per measurement.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client",
                                "python"))
import attnserve_client  # noqa: E402
from attnserve_client import client as C  # noqa: E402

HQ, HKV, D = 32, 8, 128


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def used_bytes(c):
    info = c.server_info()
    return info.sessions.kv_cache_used_bytes, info.sessions.kv_cache_shared_bytes


def overhead(c, rng):
    layers, sessions = 8, 16
    ss = [c.create_session(HKV, D, dtype="bf16", num_layers=layers) for _ in range(sessions)]
    handler, compute = [], []
    for t in range(40):
        for layer in range(layers):
            q = rng.standard_normal((1, HQ, D), dtype=np.float32)
            k = rng.standard_normal((1, HKV, D), dtype=np.float32)
            req = C.build_batch_decode_request(layer, [(s, q, k, k) for s in ss], dtype="bf16")
            tm = c._stub.BatchDecode(req).timing
            if t >= 5:  # warm
                handler.append(tm.total_us - tm.queue_us - tm.compute_us)
                compute.append(tm.compute_us)
    for s in ss:
        c.close_session(s)
    print(json.dumps({"measure": "overhead", "entries": sessions, "layer_calls": len(handler),
                      "handler_p50_us": float(np.median(handler)),
                      "handler_mean_us": float(np.mean(handler)),
                      "handler_p99_us": float(np.percentile(handler, 99)),
                      "compute_p50_us": float(np.median(compute))}))


def forks(c, rng):
    layers, tokens = 8, 4096
    base, _ = used_bytes(c)
    parent = c.create_session(HKV, D, dtype="bf16", num_layers=layers)
    k = rng.standard_normal((tokens, HKV, D), dtype=np.float32)
    q = rng.standard_normal((1, HQ, D), dtype=np.float32)
    for layer in range(layers):
        c.decode(parent, q, k, k, layer=layer, dtype="bf16")
    parent_bytes = used_bytes(c)[0] - base
    children = [c.fork_session(parent, tokens) for _ in range(100)]
    after_fork, shared = used_bytes(c)
    one = rng.standard_normal((1, HKV, D), dtype=np.float32)
    for layer in range(layers):
        results = c.batch_decode(layer, [(ch, q, one, one) for ch in children], dtype="bf16")
        C.raise_first_error(results)
    after_step = used_bytes(c)[0]
    for ch in children:
        c.close_session(ch)
    c.close_session(parent)
    print(json.dumps({"measure": "forks", "forks": 100, "tokens": tokens, "layers": layers,
                      "parent_bytes": parent_bytes, "shared_bytes": shared,
                      "extra_bytes_at_fork": after_fork - base - parent_bytes,
                      "extra_fraction_at_fork": (after_fork - base - parent_bytes) / parent_bytes,
                      "extra_bytes_after_one_step": after_step - base - parent_bytes,
                      "extra_fraction_after_one_step":
                          (after_step - base - parent_bytes) / parent_bytes,
                      "unshared_copies_bytes": 100 * parent_bytes}))


def sinks(c, rng, pid, total):
    s = c.create_session(HKV, D, dtype="bf16", sink_tokens=4, window_tokens=1024,
                         rotary={"theta": 500000.0})
    chunk = 64
    k = rng.standard_normal((chunk, HKV, D), dtype=np.float32)
    q = rng.standard_normal((1, HQ, D), dtype=np.float32)
    points = []
    done = 0
    start = time.time()
    while done < total:
        r = c.decode(s, q, k, k, dtype="bf16")
        done += chunk
        if done % (total // 10 // chunk * chunk) == 0 or done >= total:
            points.append({"tokens": done, "context_tokens": r.context_tokens,
                           "rss_kb": rss_kb(pid), "cache_used_bytes": used_bytes(c)[0]})
    c.close_session(s)
    rss = [p["rss_kb"] for p in points]
    print(json.dumps({"measure": "sinks", "tokens": done, "seconds": round(time.time() - start, 1),
                      "rss_kb_first": rss[0], "rss_kb_last": rss[-1], "rss_kb_max": max(rss),
                      "points": points}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--pid", type=int, default=0, help="the server's pid, for --sinks' RSS")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--forks", action="store_true")
    ap.add_argument("--sinks", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    with attnserve_client.Client(a.target, timeout=120) as c:
        c.wait_until_serving(timeout=30)
        if a.overhead:
            overhead(c, rng)
        if a.forks:
            forks(c, rng)
        if a.sinks:
            sinks(c, rng, a.pid, a.sinks)


if __name__ == "__main__":
    main()
