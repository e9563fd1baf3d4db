"""e2e: KV-cache sessions of the attnserve binary over gRPC, through the
Python client package and attnctl.

Starts build/server/attnserve with a small --kv_cache_bytes on free loopback
ports, then:
- opens 120 sessions (F32, BF16 and F16 caches) from a thread pool, prefills
  each and runs several decode steps, checking every step's output and lse
  against NumPy attention over the concatenated K/V (causal, bottom-right)
  and its context_tokens; checks the session gauges in /metrics and
  GetServerInfo, and NOT_FOUND once the sessions are closed;
- fills the cache to the last block: appends and new sessions get
  RESOURCE_EXHAUSTED naming --kv_cache_bytes and change nothing, and closing
  a session makes room again;
- runs `attnctl bench --sessions 8 --context 256 --json` for 2 s and checks
  the report's keys and that its sessions were closed.
Finally SIGTERM must make the server exit 0.

Usage: test_sessions.py --server=PATH --attnctl=PATH --python_path=DIR --work_dir=DIR
"""

import concurrent.futures
import json
import pathlib
import re
import subprocess
import sys
import unittest
import urllib.request

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
import numpy_attention  # noqa: E402

ARGS = None
attnserve_client = None
grpc = None

KV_CACHE_BYTES = 16 << 20
BLOCK_TOKENS = 16
SESSIONS = 120
HQ, HKV, D = 4, 2, 32  # GQA, group of 2
# The server converts K/V and the query to the cache dtype and accumulates in
# FP32; the oracle sees the same rounded inputs, so only the kernel's own
# rounding (probabilities in the cache dtype for P.V) is left.
RTOL = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.6e-2}
CACHE_DTYPES = ("f32", "bf16", "f16")
DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


def rel_error(got, want):
    """max |got - want| / max |want| over the finite entries (inf if the
    finite masks differ)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(got)):
        return np.inf
    if not finite.any():
        return 0.0
    scale = max(np.max(np.abs(want[finite])), 1e-30)
    return float(np.max(np.abs(got[finite] - want[finite])) / scale)


def block_bytes(dtype):
    return BLOCK_TOKENS * HKV * (D + D) * DTYPE_BYTES[dtype]


def blocks_for(tokens):
    return max(1, -(-tokens // BLOCK_TOKENS))  # a session holds at least one block


class SessionsE2ETest(unittest.TestCase):
    server = None
    client = None

    @classmethod
    def setUpClass(cls):
        cls.server, cls.client = harness.start_serving(
            ARGS.server, ARGS.work_dir,
            [f"--kv_cache_bytes={KV_CACHE_BYTES}", f"--kv_block_tokens={BLOCK_TOKENS}"])

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop_and_check()

    # --- helpers ------------------------------------------------------------

    def metrics(self):
        """The session gauges of /metrics: (sessions_active, used, capacity)."""
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()

        def gauge(pattern):
            m = re.search(r"^" + pattern + r" (\S+)$", text, re.MULTILINE)
            self.assertIsNotNone(m, f"{pattern} missing from /metrics")
            return float(m.group(1))

        return (gauge(r"attnserve_sessions_active"),
                gauge(r'attnserve_kv_cache_bytes\{state="used"\}'),
                gauge(r'attnserve_kv_cache_bytes\{state="capacity"\}'))

    def assert_code(self, code, fn, *args, **kwargs):
        with self.assertRaises(grpc.RpcError) as cm:
            fn(*args, **kwargs)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        return cm.exception

    def step(self, session, history, rng, tokens, dtype, lq=None):
        """Appends `tokens` random tokens to `session`, with `lq` (default:
        all of them) new queries, and checks the answer against NumPy over
        history + the new K/V. history: dict with 'k', 'v' lists; updated."""
        lq = tokens if lq is None else lq
        q = rng.standard_normal((lq, HQ, D)).astype(np.float32)
        k = rng.standard_normal((tokens, HKV, D)).astype(np.float32)
        v = rng.standard_normal((tokens, HKV, D)).astype(np.float32)
        r = self.client.decode(session, q, k, v, lse=True)
        history["k"].append(k)
        history["v"].append(v)
        k_all = np.concatenate(history["k"])
        v_all = np.concatenate(history["v"])
        self.assertEqual(r.context_tokens, k_all.shape[0])
        self.assertEqual(r.output.shape, (lq, HQ, D))
        self.assertEqual(r.output.dtype, np.float32)
        self.assertEqual(r.lse.shape, (1, HQ, lq))
        q, k_all, v_all = (attnserve_client.round_to(x, dtype) for x in (q, k_all, v_all))
        want_out, want_lse = numpy_attention.attention(q, k_all, v_all, causal=True)
        err = rel_error(r.output, want_out)
        self.assertLessEqual(err, RTOL[dtype], f"{dtype} cache, {k_all.shape[0]} tokens: "
                                               f"output relative error {err:.3g}")
        lse_err = rel_error(r.lse, want_lse)
        self.assertLessEqual(lse_err, RTOL[dtype], f"{dtype} cache: lse error {lse_err:.3g}")
        return r

    # --- tests --------------------------------------------------------------

    def run_session(self, index):
        """Opens one session, prefills it and decodes; returns (session,
        cache dtype, tokens). The session stays open."""
        rng = np.random.default_rng(1000 + index)
        dtype = CACHE_DTYPES[index % len(CACHE_DTYPES)]
        session = self.client.create_session(HKV, D, dtype=dtype)
        self.assertEqual(len(session.session_id), 32)  # 128 bits, hex
        self.assertEqual(session.block_tokens, BLOCK_TOKENS)
        history = {"k": [], "v": []}
        self.step(session, history, rng, int(rng.integers(17, 65)), dtype)  # prefill
        for tokens in (1, 1, 2, 1):  # decode steps; the 2-token one is causal inside
            self.step(session, history, rng, tokens, dtype)
        return session, dtype, sum(k.shape[0] for k in history["k"])

    def test_many_sessions_concurrently(self):
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            opened = list(pool.map(self.run_session, range(SESSIONS)))
        self.assertEqual(len({s.session_id for s, _, _ in opened}), SESSIONS)

        active, used, capacity = self.metrics()
        self.assertEqual(active, SESSIONS)
        self.assertEqual(capacity, KV_CACHE_BYTES)
        want_used = sum(blocks_for(tokens) * block_bytes(dtype) for _, dtype, tokens in opened)
        self.assertEqual(used, want_used)
        info = self.client.server_info().sessions
        self.assertEqual(info.active, SESSIONS)
        self.assertEqual(info.kv_cache_used_bytes, want_used)
        self.assertEqual(info.block_tokens, BLOCK_TOKENS)

        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda o: self.client.close_session(o[0]), opened))
        active, used, _ = self.metrics()
        self.assertEqual((active, used), (0, 0))

        closed = opened[0][0]
        one = np.zeros((1, HKV, D), np.float32)
        self.assert_code(grpc.StatusCode.NOT_FOUND, self.client.decode, closed,
                         np.zeros((1, HQ, D), np.float32), one, one)
        self.assert_code(grpc.StatusCode.NOT_FOUND, self.client.close_session, closed)
        self.assert_code(grpc.StatusCode.NOT_FOUND, self.client.close_session, "0" * 32)

    def test_full_cache_rejects_then_recovers(self):
        rng = np.random.default_rng(7)
        small = self.client.create_session(HKV, D)
        small_history = {"k": [], "v": []}
        self.step(small, small_history, rng, BLOCK_TOKENS, "f32")  # exactly one block

        big = self.client.create_session(HKV, D)
        q1 = rng.standard_normal((1, HQ, D)).astype(np.float32)
        # Append in shrinking chunks until even one block does not fit: the
        # cache is then full to the last byte (every block here is F32).
        for chunk in (4096, 256, BLOCK_TOKENS):
            k = rng.standard_normal((chunk, HKV, D)).astype(np.float32)
            while True:
                try:
                    self.client.decode(big, q1, k, k)
                except grpc.RpcError as e:
                    self.assertEqual(e.code(), grpc.StatusCode.RESOURCE_EXHAUSTED, e.details())
                    self.assertIn("kv_cache_bytes", e.details())
                    break
        active, used, capacity = self.metrics()
        self.assertEqual(active, 2)
        self.assertEqual(used, capacity)

        new_kv = rng.standard_normal((1, HKV, D)).astype(np.float32)
        new_q = rng.standard_normal((1, HQ, D)).astype(np.float32)
        e = self.assert_code(grpc.StatusCode.RESOURCE_EXHAUSTED, self.client.decode, small,
                             new_q, new_kv, new_kv)
        self.assertIn("kv_cache_bytes", e.details())
        e = self.assert_code(grpc.StatusCode.RESOURCE_EXHAUSTED, self.client.create_session,
                             HKV, D)
        self.assertIn("kv_cache_bytes", e.details())

        # Closing the big session frees room; the refused step left the small
        # session as it was (step() checks context_tokens and the output over
        # exactly its own tokens).
        self.client.close_session(big)
        self.step(small, small_history, rng, 1, "f32")
        other = self.client.create_session(HKV, D, dtype="bf16")
        self.step(other, {"k": [], "v": []}, rng, 5, "bf16")
        for s in (small, other):
            self.client.close_session(s)
        active, used, _ = self.metrics()
        self.assertEqual((active, used), (0, 0))

    def test_attnctl_bench_sessions(self):
        cmd = [ARGS.attnctl, f"--target={self.server.target}", "bench", "--sessions=8",
               "--context=256", "--hq=8", "--hkv=2", "--d=64", "--cache_dtype=bf16",
               "--concurrency=4", "--duration=2s", "--json"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        report = json.loads(r.stdout.strip().splitlines()[-1])
        for key in ("tokens_per_s", "qps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "ok",
                    "errors", "prefill_s"):
            self.assertIn(key, report)
        self.assertEqual(report["errors"], {})
        self.assertGreater(report["ok"], 0)
        self.assertGreater(report["tokens_per_s"], 0)
        self.assertLessEqual(report["p50_ms"], report["p90_ms"])
        self.assertLessEqual(report["p90_ms"], report["p99_ms"])
        self.assertLessEqual(report["p99_ms"], report["p999_ms"])
        self.assertEqual(report["prefill_tokens"], 8 * 256)
        self.assertGreater(report["context_tokens_max"], 256)
        self.assertEqual(report["close_errors"], 0)
        active, used, _ = self.metrics()
        self.assertEqual((active, used), (0, 0))


def main():
    harness.run_e2e(globals(), ("--attnctl", {"required": True}))


if __name__ == "__main__":
    main()
