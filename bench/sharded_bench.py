#!/usr/bin/env python3
"""sharded_attend over local replicas against one Attend, for a long-context
decode-like request (default Lq 1, Lk 32768, Hq 32, Hkv 8, D 128, F16, causal).

Starts --replicas attnserve processes on loopback (--server; each with
--threads backend threads and a request size limit that admits the whole
context), or uses running ones (--targets). Alternates one Attend of the
whole context on the first replica with sharded_attend over all of them,
--rounds times after --warmup, and prints one JSON line of medians:

  single: client_us (the call's round trip), compute_us and total_us (the
          server's backend call and its receipt-to-response)
  sharded: client_us (the whole sharded_attend), per part its target, keys,
           the server's compute_us and total_us, start_us (after the call's
           start) and client_us (request built, sent, answered), slowest_part_us (the largest part
           client_us of a round), overhead_us (client_us minus the slowest
           part: fan-out before the last part is sent plus the merge),
           merge_us
  max_abs_diff: sharded against single output, and the tolerance it meets

The replicas share this machine's cores, so with more replicas than cores
the parts contend for them; on separate machines each part would have its
own.

Usage: sharded_bench.py --server=build/server/attnserve [--replicas=3] [--threads=1]
       sharded_bench.py --targets=HOST:PORT,HOST:PORT,...
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client",
                                "python"))
import attnserve_client  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_replicas(args, log_dir):
    procs, targets = [], []
    for i in range(args.replicas):
        port = free_port()
        target = f"127.0.0.1:{port}"
        log = open(os.path.join(log_dir, f"replica-{i}.log"), "wb")
        procs.append(subprocess.Popen(
            [args.server, f"--listen={target}", f"--metrics_listen=127.0.0.1:{free_port()}",
             f"--threads={args.threads}", "--backends=cpu",
             f"--max_request_bytes={1 << 30}"], stdout=log, stderr=subprocess.STDOUT))
        log.close()
        targets.append(target)
    return procs, targets


def median(xs):
    return int(statistics.median(xs))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="attnserve binary: start --replicas of it")
    parser.add_argument("--targets", help="comma-separated running replicas instead")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="backend threads per replica")
    parser.add_argument("--lq", type=int, default=1)
    parser.add_argument("--lk", type=int, default=32768)
    parser.add_argument("--hq", type=int, default=32)
    parser.add_argument("--hkv", type=int, default=8)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--dtype", default="f16", choices=("f32", "f16", "bf16"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if bool(args.server) == bool(args.targets):
        parser.error("expected one of --server and --targets")

    procs = []
    log_dir = tempfile.mkdtemp(prefix="sharded_bench.")
    try:
        if args.server:
            procs, targets = start_replicas(args, log_dir)
        else:
            targets = args.targets.split(",")
        clients = [attnserve_client.Client(t, timeout=120, max_message_bytes=1 << 30)
                   for t in targets]
        for c in clients:
            c.wait_until_serving(timeout=30)

        rng = np.random.default_rng(0)
        host = np.float16 if args.dtype == "f16" else np.float32
        q = rng.standard_normal((1, args.lq, args.hq, args.d), dtype=np.float32).astype(host)
        k = rng.standard_normal((1, args.lk, args.hkv, args.d), dtype=np.float32).astype(host)
        v = rng.standard_normal((1, args.lk, args.hkv, args.d), dtype=np.float32).astype(host)
        options = dict(causal=True, lse=True, dtype=args.dtype)

        single, sharded = [], []
        for i in range(args.warmup + args.rounds):
            t0 = time.monotonic()
            one = clients[0].attend(q, k, v, **options)
            one_us = (time.monotonic() - t0) * 1e6
            split = attnserve_client.sharded_attend(clients, q, k, v, **options)
            if i >= args.warmup:
                single.append((one_us, one.timing))
                sharded.append(split.timing)
        diff = float(np.max(np.abs(split.output.astype(np.float64) -
                                   one.output.astype(np.float64))))

        parts = []
        for p in range(len(sharded[0]["parts"])):
            rows = [t["parts"][p] for t in sharded]
            parts.append({"target": rows[0]["target"], "keys": list(rows[0]["keys"]),
                          "compute_us": median([r["compute_us"] for r in rows]),
                          "server_total_us": median([r["total_us"] for r in rows]),
                          "start_us": median([r["start_us"] for r in rows]),
                          "client_us": median([r["client_us"] for r in rows])})
        slowest = [max(p["client_us"] for p in t["parts"]) for t in sharded]
        report = {
            "shape": {"B": 1, "Lq": args.lq, "Lk": args.lk, "Hq": args.hq, "Hkv": args.hkv,
                      "D": args.d, "dtype": args.dtype, "causal": True},
            "replicas": len(clients), "threads_per_replica": args.threads,
            "cores": os.cpu_count(), "rounds": args.rounds,
            "single": {"client_us": median([s[0] for s in single]),
                       "compute_us": median([s[1]["compute_us"] for s in single]),
                       "server_total_us": median([s[1]["total_us"] for s in single])},
            "sharded": {"client_us": median([t["client_us"] for t in sharded]),
                        "parts": parts,
                        "slowest_part_us": median(slowest),
                        "overhead_us": median([t["client_us"] - s
                                               for t, s in zip(sharded, slowest)]),
                        "merge_us": median([t["merge_us"] for t in sharded])},
            "max_abs_diff": diff,
        }
        print(json.dumps(report))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
