#!/usr/bin/python3
"""Routing test of deploy/nginx/attnserve.conf with a real nginx.

Three stand-in gRPC replicas on loopback answer any attnserve.v1 call with their
own name; nginx, configured by deploy/nginx/render, sits in front. Checks that
calls without x-attnserve-session spread round-robin over all replicas, that
every call carrying a session key reaches the same replica as that key's first
call, and that different keys land on different replicas. The full-stack e2e
test with attnserve replicas builds on the same rendering.

Usage: nginx_routing_test.py REPO_ROOT WORK_DIR
"""
import collections
import os
import socket
import subprocess
import sys
import time
from concurrent import futures

import grpc

SERVICE = "attnserve.v1.AttentionService"


def start_replica(name):
    def answer(request, context):
        return name.encode()

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        method: grpc.unary_unary_rpc_method_handler(answer)
        for method in ("Attend", "GetServerInfo", "CreateSession", "Decode", "CloseSession")
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    root, work = sys.argv[1], sys.argv[2]
    replicas = {}
    servers = []
    for name in ("replica-a", "replica-b", "replica-c"):
        server, port = start_replica(name)
        servers.append(server)
        replicas[f"127.0.0.1:{port}"] = name
    listen = f"127.0.0.1:{free_port()}"
    args = [os.path.join(root, "deploy/nginx/render"), "--listen", listen, "--dir", work]
    for address in replicas:
        args += ["--replica", address]
    conf = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
    nginx = subprocess.Popen(["nginx", "-c", conf, "-p", work])
    failures = []
    try:
        channel = grpc.insecure_channel(listen)
        grpc.channel_ready_future(channel).result(timeout=10)

        def call(method, session=None):
            metadata = (("x-attnserve-session", session),) if session else None
            stub = channel.unary_unary(f"/{SERVICE}/{method}")
            for attempt in range(50):  # nginx may still be starting its worker
                try:
                    return stub(b"", metadata=metadata, timeout=5).decode()
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == 49:
                        raise
                    time.sleep(0.1)

        # Stateless: 30 calls on one connection, round-robin gives 10 each.
        spread = collections.Counter(call("Attend") for _ in range(30))
        print(f"stateless calls per replica: {dict(spread)}")
        if set(spread) != set(replicas.values()) or max(spread.values()) - min(spread.values()) > 1:
            failures.append(f"stateless calls not spread round-robin: {dict(spread)}")

        # Sessions: each key sticks to one replica across all its calls.
        owners = {}
        for i in range(24):
            key = f"session-{i}"
            seen = {call("CreateSession", key)}
            seen |= {call("Decode", key) for _ in range(5)}
            seen.add(call("CloseSession", key))
            if len(seen) != 1:
                failures.append(f"{key} reached several replicas: {sorted(seen)}")
            owners[key] = seen.pop()
        by_replica = collections.Counter(owners.values())
        print(f"sessions per replica: {dict(by_replica)}")
        if len(by_replica) < 2:
            failures.append(f"24 session keys all hashed to one replica: {dict(by_replica)}")

        # The access log names the replica of every call.
        with open(os.path.join(work, "access.log")) as log:
            lines = [l for l in log if f"/{SERVICE}/" in l]
        if len(lines) < 30 + 24 * 7:
            failures.append(f"access log has {len(lines)} call lines, expected {30 + 24 * 7}")
        channel.close()
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
        for server in servers:
            server.stop(grace=None)
    if failures:
        for f in failures:
            print(f"FAIL: {f}", file=sys.stderr)
        return 1
    print("nginx routing: stateless round-robin and session pinning hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
