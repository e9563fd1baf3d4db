#!/usr/bin/python3
"""Times AttendLayer over gRPC: one client calling a served model's layer
with x [1, --tokens, hidden] F32 (the L1 prefill when the model is L1-sized),
one call at a time, and prints the median latency, the server's compute and
queue time and the rest (transport, conversion).

    bench/layer_load.py --target=127.0.0.1:50171 --model=l1 [--tokens=512] [--calls=10]

Prints one JSON line: {"model", "tokens", "calls", "p50_ms", "min_ms",
"server_compute_ms", "server_queue_ms", "server_total_ms", "transport_ms"}
(medians): server_total_ms is the server's timing.total_us (its handling
from receiving the request to answering it), transport_ms the call's time
less it (gRPC, serialization, the client).
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client",
                                "python"))
import attnserve_client  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    client = attnserve_client.Client(args.target)
    hidden = client.models()[args.model].hidden_size
    x = np.random.default_rng(0).uniform(-1, 1, (1, args.tokens, hidden)).astype(np.float32)
    client.attend_layer(args.model, args.layer, x)  # warm-up: primitives, pages
    latency, compute, queue, total, transport = [], [], [], [], []
    for _ in range(args.calls):
        start = time.perf_counter()
        result = client.attend_layer(args.model, args.layer, x)
        latency.append((time.perf_counter() - start) * 1e3)
        compute.append(result.timing["compute_us"] / 1e3)
        queue.append(result.timing["queue_us"] / 1e3)
        total.append(result.timing["total_us"] / 1e3)
        transport.append(latency[-1] - total[-1])
    print(json.dumps({
        "model": args.model, "tokens": args.tokens, "calls": args.calls,
        "p50_ms": round(statistics.median(latency), 3), "min_ms": round(min(latency), 3),
        "server_compute_ms": round(statistics.median(compute), 3),
        "server_queue_ms": round(statistics.median(queue), 3),
        "server_total_ms": round(statistics.median(total), 3),
        "transport_ms": round(statistics.median(transport), 3)}))


if __name__ == "__main__":
    main()
