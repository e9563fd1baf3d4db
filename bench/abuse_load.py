#!/usr/bin/env python3
"""Abusive traffic for bench/serving_bench.sh's `abuse` scenario.

Sends, from several threads for --duration seconds, the three amplification
patterns the memory budget, the cost model and cancellation bound:
  output  : 130-byte F16 messages asking for a 128 MiB output
            (Q [1, 1, 65536, 1], K [1, 1, 1, 1], V [1, 1, 1, 1024]);
  scratch : 33 MB decode-shaped calls
            (Q [1, 1, 65536, 1], K [1, 16384, 1, 1], V [1, 16384, 1, 1024]);
  compute : L = 100000, D = 1, F16, top_k = 64, abandoned after --give_up_s.
With --stalled_client N a child process sends N output-amplification calls
and then stops itself (SIGSTOP) without reading the answers, for
--stall_s seconds: the server must hold those responses within its budget.
Prints one JSON line: status codes per pattern. With --probe N it then measures,
N times, how long a small call, sent as soon as the caller of an expensive one
gave up, waits in the queue for the worker ("freed_ms": its queue_us).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client",
                                "python"))
import grpc  # noqa: E402
import attnserve_client  # noqa: E402


def pattern_args(name, rng):
    if name == "output":
        q = rng.standard_normal((1, 1, 65536, 1)).astype(np.float16)
        k = rng.standard_normal((1, 1, 1, 1)).astype(np.float16)
        v = rng.standard_normal((1, 1, 1, 1024)).astype(np.float16)
        return (q, k, v), {}
    if name == "scratch":
        q = rng.standard_normal((1, 1, 65536, 1)).astype(np.float16)
        k = rng.standard_normal((1, 16384, 1, 1)).astype(np.float16)
        v = rng.standard_normal((1, 16384, 1, 1024)).astype(np.float16)
        return (q, k, v), {}
    q = rng.standard_normal((1, 100000, 1, 1)).astype(np.float16)
    return (q, q, q), {"top_k": 64}


def stalled_child(args):
    client = attnserve_client.Client(args.target, max_message_bytes=512 << 20)
    (q, k, v), _ = pattern_args("output", np.random.default_rng(0))
    request = attnserve_client.client.build_request(q, k, v)
    calls = [client._stub.Attend.future(request, timeout=120)  # noqa: F841 (kept in flight)
             for _ in range(args.stalled_client)]
    time.sleep(0.5)  # let them reach the server
    os.kill(os.getpid(), signal.SIGSTOP)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=4, help="threads per pattern")
    ap.add_argument("--give_up_s", type=float, default=3.0)
    ap.add_argument("--probe", type=int, default=0)
    ap.add_argument("--stalled_client", type=int, default=0)
    ap.add_argument("--stall_s", type=float, default=3.0)
    ap.add_argument("--as_stalled_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.as_stalled_child:
        stalled_child(args)
        return

    client = attnserve_client.Client(args.target, max_message_bytes=256 << 20)
    client.wait_until_serving(timeout=20)
    if args.stalled_client:
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--target",
                                  args.target, "--stalled_client", str(args.stalled_client),
                                  "--as_stalled_child"])
        time.sleep(1.0 + args.stall_s)
        child.kill()
        child.wait()
    codes = {}
    lock = threading.Lock()
    stop = time.monotonic() + args.duration

    def run(name, seed):
        rng = np.random.default_rng(seed)
        call_args, options = pattern_args(name, rng)
        timeout = args.give_up_s if name == "compute" else 60.0
        while time.monotonic() < stop:
            try:
                client.attend(*call_args, timeout=timeout, **options)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                codes.setdefault(name, {}).setdefault(code, 0)
                codes[name][code] += 1

    threads = [threading.Thread(target=run, args=(name, i))
               for name in ("output", "scratch", "compute") for i in range(args.threads)
               if args.duration > 0]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = {"codes": codes}

    if args.probe:
        rng = np.random.default_rng(7)
        (cq, ck, cv), options = pattern_args("compute", rng)
        sq = rng.standard_normal((1, 128, 8, 64)).astype(np.float32)
        freed = []
        for _ in range(args.probe):
            try:
                client.attend(cq, ck, cv, timeout=0.3, **options)
            except grpc.RpcError:
                pass
            r = client.attend(sq, sq, sq, timeout=30)
            freed.append(r.timing["queue_us"] / 1e3)  # waiting for the worker
        freed.sort()
        result["freed_ms_p50"] = round(freed[len(freed) // 2], 2)
        result["freed_ms_max"] = round(freed[-1], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
