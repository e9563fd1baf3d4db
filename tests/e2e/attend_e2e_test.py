"""e2e: the attnserve binary, called through the Python client package and
attnctl, checked against NumPy.

Starts build/server/attnserve on free loopback ports, waits for SERVING, then
checks outputs of the option matrix against numpy_attention (FP32 within
1e-5 relative; F16/BF16 inputs looser), a malformed request's
INVALID_ARGUMENT followed by a normal answer, `attnctl health`, `attnctl
attend` with .npy files and a short `attnctl bench --json`. Finally SIGTERM
must make the server exit 0.

Usage: attend_e2e_test.py --server=PATH --attnctl=PATH --python_path=DIR --work_dir=DIR
"""

import json
import pathlib
import subprocess
import sys
import unittest

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
import numpy_attention  # noqa: E402

ARGS = None
attnserve_client = None
grpc = None

FP32_RTOL = 1e-5
# Half-precision inputs: the server sees the rounded inputs (as does the
# oracle here), accumulates in FP32 and rounds the output once.
HALF_RTOL = {"f16": 2e-3, "bf16": 1.6e-2}


def rel_error(got, want):
    """max |got - want| / max |want|: relative to the tensor's scale, so
    outputs near zero do not make the check meaningless."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(got)):
        return np.inf
    if not finite.any():
        return 0.0
    scale = max(np.max(np.abs(want[finite])), 1e-30)
    return float(np.max(np.abs(got[finite] - want[finite])) / scale)


def random_qkv(rng, batch, lq, hq, lk, hkv, d, dv=None, magnitude=1.0):
    dv = dv or d
    q = (rng.standard_normal((batch, lq, hq, d)) * magnitude).astype(np.float32)
    k = (rng.standard_normal((batch, lk, hkv, d)) * magnitude).astype(np.float32)
    v = rng.standard_normal((batch, lk, hkv, dv)).astype(np.float32)
    return q, k, v


class AttendE2ETest(unittest.TestCase):
    server = None
    client = None

    @classmethod
    def setUpClass(cls):
        cls.work = pathlib.Path(ARGS.work_dir)
        cls.server, cls.client = harness.start_serving(ARGS.server, cls.work)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop_and_check()

    def setUp(self):
        self.rng = np.random.default_rng(abs(hash(self.id())) % (2**32))

    def check(self, q, k, v, rtol=FP32_RTOL, dtype=None, **options):
        """Calls the server and the oracle with the same request; compares."""
        result = self.client.attend(q, k, v, lse=True, dtype=dtype, **options)
        if dtype is not None:
            q, k, v = (attnserve_client.round_to(x, dtype) for x in (q, k, v))
            if options.get("bias") is not None:
                options["bias"] = attnserve_client.round_to(options["bias"], dtype)
        want_out, want_lse = numpy_attention.attention(q, k, v, **options)
        self.assertEqual(result.output.shape, want_out.shape)
        self.assertEqual(result.lse.shape, want_lse.shape)
        err = rel_error(result.output, want_out)
        self.assertLessEqual(err, rtol, f"output relative error {err:.3g} > {rtol:g}")
        lse_err = rel_error(result.lse, want_lse)
        self.assertLessEqual(lse_err, rtol, f"lse relative error {lse_err:.3g} > {rtol:g}")
        return result

    # --- FP32 over the option matrix -------------------------------------

    def test_plain(self):
        self.check(*random_qkv(self.rng, 2, 33, 4, 33, 4, 32))

    def test_three_d_and_value_dim(self):
        q, k, v = random_qkv(self.rng, 1, 9, 2, 14, 2, 16, dv=24)
        r = self.check(q[0], k[0], v[0])
        self.assertEqual(r.output.shape, (9, 2, 24))

    def test_causal_bottom_right(self):
        self.check(*random_qkv(self.rng, 2, 17, 4, 40, 4, 32), causal=True)

    def test_causal_top_left(self):
        self.check(*random_qkv(self.rng, 1, 24, 4, 40, 4, 32), causal=True, top_left=True)

    def test_sliding_window(self):
        self.check(*random_qkv(self.rng, 1, 48, 4, 48, 4, 32), window_left=8, window_right=4)

    def test_causal_window(self):
        self.check(*random_qkv(self.rng, 2, 20, 2, 64, 2, 64), causal=True, window_left=16)

    def test_gqa_and_mqa(self):
        self.check(*random_qkv(self.rng, 2, 19, 8, 31, 2, 32), causal=True)
        self.check(*random_qkv(self.rng, 1, 12, 8, 50, 1, 64))

    def test_alibi(self):
        slopes = 2.0 ** (-8.0 * np.arange(1, 9) / 8)
        self.check(*random_qkv(self.rng, 1, 30, 8, 30, 4, 32), causal=True,
                   alibi_slopes=slopes)

    def test_softcap(self):
        # Large scores so the cap is active.
        self.check(*random_qkv(self.rng, 1, 25, 4, 37, 4, 32, magnitude=3.0), softcap=5.0,
                   scale=0.5)

    def test_bias_broadcast_and_masking(self):
        q, k, v = random_qkv(self.rng, 2, 16, 4, 24, 4, 32)
        bias = self.rng.standard_normal((1, 4, 16, 24)).astype(np.float32)
        bias[0, :, :, 5] = -np.inf
        self.check(q, k, v, bias=bias)
        self.check(q, k, v, bias=self.rng.standard_normal((24,)).astype(np.float32), causal=True)

    def test_key_lengths(self):
        self.check(*random_qkv(self.rng, 2, 8, 4, 40, 4, 32), key_lengths=[40, 25], causal=True)

    def test_fully_masked_rows(self):
        # Key length 0 masks every key of batch row 1: output 0, lse -inf.
        q, k, v = random_qkv(self.rng, 2, 4, 2, 6, 2, 16)
        r = self.client.attend(q, k, v, key_lengths=[6, 0], lse=True)
        np.testing.assert_array_equal(r.output[1], 0.0)
        self.assertTrue(np.all(np.isneginf(r.lse[1])))

    # --- half precision ---------------------------------------------------

    def test_f16(self):
        q, k, v = random_qkv(self.rng, 1, 40, 8, 40, 2, 64)
        r = self.check(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16),
                       rtol=HALF_RTOL["f16"], dtype="f16", causal=True)
        self.assertEqual(r.output.dtype, np.float16)

    def test_bf16(self):
        q, k, v = random_qkv(self.rng, 2, 21, 4, 33, 4, 32)
        r = self.check(q, k, v, rtol=HALF_RTOL["bf16"], dtype="bf16", window_left=10,
                       alibi_slopes=[0.5, 0.25, 0.125, 0.0625])
        self.assertEqual(r.output.dtype, np.float32)

    def test_stream_matches_ids(self):
        cases = {}
        for i in range(4):
            q, k, v = random_qkv(self.rng, 1, 8 + i, 4, 16, 2, 32)
            cases[f"r{i}"] = (q, k, v)
        requests = [attnserve_client.build_request(q, k, v, causal=True, request_id=rid)
                    for rid, (q, k, v) in cases.items()]
        results = list(self.client.attend_stream(requests, timeout=30))
        self.assertEqual(sorted(r.request_id for r in results), sorted(cases))
        for r in results:
            want, _ = numpy_attention.attention(*cases[r.request_id], causal=True)
            self.assertLessEqual(rel_error(r.output, want), FP32_RTOL)

    # --- errors -----------------------------------------------------------

    def test_malformed_request_then_normal(self):
        q, k, v = random_qkv(self.rng, 1, 8, 6, 8, 4, 16)  # Hq % Hkv != 0
        with self.assertRaises(grpc.RpcError) as cm:
            self.client.attend(q, k, v)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

        q, k, v = random_qkv(self.rng, 1, 8, 4, 8, 4, 16)
        request = attnserve_client.build_request(q, k, v)
        request.key.data = request.key.data[:-3]  # data length does not match shape
        with self.assertRaises(grpc.RpcError) as cm:
            self.client.attend_proto(request)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("key", cm.exception.details())

        self.check(q, k, v)  # the server still answers normally

    # --- attnctl ----------------------------------------------------------

    def attnctl(self, *args, timeout=60):
        cmd = [ARGS.attnctl, f"--target={self.server.target}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def test_attnctl_health(self):
        r = self.attnctl("health")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "SERVING")

    def test_attnctl_attend_npy(self):
        q, k, v = random_qkv(self.rng, 1, 20, 4, 28, 2, 32)
        paths = {name: str(self.work / f"{name}.npy") for name in ("q", "k", "v", "o", "lse")}
        for name, array in (("q", q), ("k", k), ("v", v)):
            np.save(paths[name], array)
        r = self.attnctl("attend", f"--q={paths['q']}", f"--k={paths['k']}",
                         f"--v={paths['v']}", "--causal", "--window_left=12",
                         f"--out={paths['o']}", f"--lse_out={paths['lse']}")
        self.assertEqual(r.returncode, 0, r.stderr)
        want_out, want_lse = numpy_attention.attention(q, k, v, causal=True, window_left=12)
        self.assertLessEqual(rel_error(np.load(paths["o"]), want_out), FP32_RTOL)
        self.assertLessEqual(rel_error(np.load(paths["lse"]), want_lse), FP32_RTOL)

    def test_attnctl_bench_json(self):
        r = self.attnctl("bench", "--shape=1,64,4,64,4,32", "--concurrency=4", "--duration=2s",
                         "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        report = json.loads(r.stdout.strip().splitlines()[-1])
        for key in ("qps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "ok", "errors"):
            self.assertIn(key, report)
        self.assertIsInstance(report["errors"], dict)
        self.assertEqual(report["errors"], {})
        self.assertGreater(report["ok"], 0)
        self.assertGreater(report["qps"], 0)
        self.assertLessEqual(report["p50_ms"], report["p99_ms"])


def main():
    harness.run_e2e(globals(), ("--attnctl", {"required": True}))


if __name__ == "__main__":
    main()
