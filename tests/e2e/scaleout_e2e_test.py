"""e2e: three attnserve replicas behind Debian's nginx, configured by
deploy/nginx/render from deploy/nginx/attnserve.conf, all on loopback.

- Stateless calls (Attend without x-attnserve-session) sent through nginx
  spread over every replica: each replica's attnserve_requests_total grows,
  evenly enough for round-robin, and the outputs are right.
- Session calls carrying x-attnserve-session are pinned: for each key,
  CreateSession and every Decode (from fresh connections too) reach one
  replica, seen in the replicas' Decode counters; the session's cache grows
  call by call (a Decode on another replica would answer NOT_FOUND), and the
  last Decode equals attention over every appended token. Different keys
  land on more than one replica.

Usage: scaleout_e2e_test.py --server=PATH --python_path=DIR --work_dir=DIR [--nginx=nginx]
"""

import collections
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time
import unittest
import urllib.request

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
import numpy_attention  # noqa: E402

ARGS = None
attnserve_client = None
grpc = None

REPLICAS = 3
SESSION_KEY = "x-attnserve-session"
HQ, HKV, D = 4, 2, 16
_SAMPLE = re.compile(r'^attnserve_requests_total\{([^}]*)\} (\S+)$')


def wait_listening(port, proc, log, timeout=20.0):
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"port {port} not listening after {timeout} s:\n{log()}")


def requests_by_method(metrics_port):
    """{method: OK count} from one replica's /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    counts = collections.Counter()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("code") == "OK":
            counts[labels["method"]] += float(m.group(2))
    return counts


class ScaleOutE2ETest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = harness.fresh_dir(ARGS.work_dir)
        cls.replicas = []
        cls.nginx = None
        try:
            for i in range(REPLICAS):
                # One backend thread each: three replicas share this machine.
                r = harness.ServerProcess(ARGS.server, cls.work / f"replica-{i}.log",
                                          ["--threads=1", "--backends=cpu"])
                cls.replicas.append(r)
            for r in cls.replicas:
                wait_listening(r.port, r.proc, r.log)
                with attnserve_client.Client(r.target) as c:
                    r.wait_serving(c)
            cls.start_nginx()
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def start_nginx(cls):
        cls.nginx_port = harness.free_port()
        cls.target = f"127.0.0.1:{cls.nginx_port}"
        args = [str(REPO / "deploy/nginx/render"), "--listen", cls.target,
                "--dir", str(cls.work / "nginx")]
        for r in cls.replicas:
            args += ["--replica", r.target]
        conf = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
        cls.nginx_log = cls.work / "nginx.out"
        log = open(cls.nginx_log, "wb")
        cls.nginx = subprocess.Popen([ARGS.nginx, "-c", conf, "-p", str(cls.work / "nginx")],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_listening(cls.nginx_port, cls.nginx, lambda: cls.nginx_log.read_text())

    @classmethod
    def tearDownClass(cls):
        if cls.nginx is not None:
            cls.nginx.terminate()
            try:
                cls.nginx.wait(timeout=10)
            except subprocess.TimeoutExpired:
                cls.nginx.kill()
                cls.nginx.wait()
        for r in cls.replicas:
            r.stop()

    def counts(self, method):
        return [requests_by_method(r.metrics_port)[method] for r in self.replicas]

    def test_stateless_calls_spread_over_replicas(self):
        calls = 60
        rng = np.random.default_rng(1)
        q, k, v = (rng.standard_normal((1, 8, HQ, D)).astype(np.float32) for _ in range(3))
        want, _ = numpy_attention.attention(q, k, v)
        before = self.counts("Attend")
        with attnserve_client.Client(self.target, timeout=30) as c:
            for _ in range(calls):
                np.testing.assert_allclose(c.attend(q, k, v).output, want, rtol=1e-5, atol=1e-6)
        served = [a - b for a, b in zip(self.counts("Attend"), before)]
        self.assertEqual(sum(served), calls, served)
        # Round-robin per call: each replica gets a third, give or take the
        # turns taken by the other test's calls.
        for n in served:
            self.assertGreaterEqual(n, calls // REPLICAS // 2, served)

    def session_stub(self):
        channel = grpc.insecure_channel(self.target)
        return channel, attnserve_client.attention_pb2_grpc.AttentionServiceStub(channel)

    def test_session_calls_pinned_by_key(self):
        pb = attnserve_client.attention_pb2
        tensors = attnserve_client.tensors
        decodes = 4
        replicas_used = set()
        for n in range(9):
            key = f"conversation-{n}"
            md = [(SESSION_KEY, key)]
            rng = np.random.default_rng(100 + n)
            ks, vs = [], []
            before = self.counts("Decode")
            channel, stub = self.session_stub()
            created = stub.CreateSession(pb.CreateSessionRequest(num_kv_heads=HKV, head_dim=D),
                                         metadata=md, timeout=30)
            for step in range(decodes):
                if step == decodes // 2:  # a new connection must reach the same replica
                    channel.close()
                    channel, stub = self.session_stub()
                q = rng.standard_normal((1, HQ, D)).astype(np.float32)
                ks.append(rng.standard_normal((1, HKV, D)).astype(np.float32))
                vs.append(rng.standard_normal((1, HKV, D)).astype(np.float32))
                req = pb.DecodeRequest(session_id=created.session_id, request_id=f"{key}/{step}")
                tensors.to_proto(q, tensors.F32, req.query)
                tensors.to_proto(ks[-1], tensors.F32, req.key)
                tensors.to_proto(vs[-1], tensors.F32, req.value)
                reply = stub.Decode(req, metadata=md, timeout=30)
                self.assertEqual(reply.context_tokens, step + 1, key)
            got = tensors.from_proto(reply.output)
            want, _ = numpy_attention.attention(q[None], np.concatenate(ks)[None],
                                                np.concatenate(vs)[None])
            np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)
            stub.CloseSession(pb.CloseSessionRequest(session_id=created.session_id),
                              metadata=md, timeout=30)
            channel.close()
            served = [a - b for a, b in zip(self.counts("Decode"), before)]
            hit = [i for i, s in enumerate(served) if s]
            self.assertEqual(len(hit), 1, f"{key}: Decode calls per replica {served}")
            self.assertEqual(served[hit[0]], decodes, served)
            replicas_used.add(hit[0])
        # Nine keys over three replicas: all on one would mean no hashing.
        self.assertGreater(len(replicas_used), 1)

    def test_session_on_another_replica_is_not_found(self):
        # Without the key, a session's calls are round-robined and meet
        # replicas that never saw it: why pinning is needed.
        pb = attnserve_client.attention_pb2
        channel, stub = self.session_stub()
        md = [(SESSION_KEY, "lonely")]
        created = stub.CreateSession(pb.CreateSessionRequest(num_kv_heads=HKV, head_dim=D),
                                     metadata=md, timeout=30)
        codes = collections.Counter()
        for _ in range(REPLICAS * 2):
            try:
                stub.CloseSession(pb.CloseSessionRequest(session_id=created.session_id),
                                  timeout=30)
                codes["OK"] += 1
            except grpc.RpcError as e:
                codes[e.code().name] += 1
        channel.close()
        self.assertEqual(codes["OK"], 1, codes)  # the owning replica, once
        self.assertEqual(codes["NOT_FOUND"], REPLICAS * 2 - 1, codes)


def main():
    harness.run_e2e(globals(),
                     ("--nginx", {"default": shutil.which("nginx") or "/usr/sbin/nginx"}))


if __name__ == "__main__":
    main()
