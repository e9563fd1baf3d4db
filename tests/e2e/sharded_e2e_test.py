"""e2e: attention split along the keys over three attnserve replicas and
merged by lse (attnserve_client.sharded_attend), all on loopback.

- sharded_attend over the three replicas equals one Attend on one replica
  (F32: max abs error <= 1e-5 x max|V|; F16/BF16 inputs looser) and NumPy over
  the whole context, output and lse, for causal bottom-right (Lq < Lk and
  Lq == Lk, where the last part has rows that see none of its keys), causal
  top-left, sliding windows, ALiBi, GQA/MQA, RoPE, a 3-D query and fewer
  keys than replicas.
- The same sharded call twice gives bitwise identical output and lse.
- merge_attention_states of one replica's parts (key_offset/total_keys sent
  by hand) equals the whole call too.
- The server refuses key_offset < 0, total_keys < key_offset + Lk and
  key_offset with key_lengths with INVALID_ARGUMENT naming the field; the
  client refuses options that do not split or merge with ValueError.
- A replica stopped (SIGTERM, exited) makes sharded_attend raise naming that
  part's target, with code UNAVAILABLE.

Usage: sharded_e2e_test.py --server=PATH --python_path=DIR --work_dir=DIR
"""

import pathlib
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

REPLICAS = 3
# Tolerances relative to max|V|: F32 accumulates in FP32 either way; the
# half-precision parts are each rounded to their dtype before the merge, and
# the merged output once more.
TOL = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.6e-2}
REPLICA_FLAGS = ["--threads=1", "--backends=cpu"]


def max_abs(got, want):
    """max |got - want| over the finite entries of want; inf when the
    infinities (masked rows' lse) are not in the same places."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(got)) or not np.array_equal(got[~finite],
                                                                          want[~finite]):
        return np.inf
    return float(np.max(np.abs(got[finite] - want[finite]), initial=0.0))


def start_replica(work, name):
    return harness.start_serving(ARGS.server, work, REPLICA_FLAGS, log_name=f"{name}.log")


class ShardedE2ETest(unittest.TestCase):
    servers = []
    clients = []

    @classmethod
    def setUpClass(cls):
        cls.work = harness.fresh_dir(ARGS.work_dir)
        cls.servers, cls.clients = [], []
        try:
            for i in range(REPLICAS):
                server, client = start_replica(cls.work, f"replica-{i}")
                cls.servers.append(server)
                cls.clients.append(client)
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for c in cls.clients:
            c.close()
        for s in cls.servers:
            s.stop_and_check()

    def setUp(self):
        self.rng = np.random.default_rng(abs(hash(self.id())) % (2**32))

    def qkv(self, batch, lq, hq, lk, hkv, d, dv=None):
        dv = dv or d
        q = self.rng.standard_normal((batch, lq, hq, d)).astype(np.float32)
        k = self.rng.standard_normal((batch, lk, hkv, d)).astype(np.float32)
        v = (self.rng.standard_normal((batch, lk, hkv, dv)) * 3).astype(np.float32)
        return q, k, v

    def check(self, q, k, v, dtype="f32", numpy=True, **options):
        """sharded_attend over the replicas against one Attend on replica 0
        and against NumPy; returns the sharded result."""
        tol = TOL[dtype] * float(np.max(np.abs(v)))
        sent = (q.astype(np.float16), k.astype(np.float16), v.astype(np.float16)) \
            if dtype == "f16" else (q, k, v)
        wire = None if dtype == "f16" else dtype
        got = attnserve_client.sharded_attend(self.clients, *sent, dtype=wire, lse=True,
                                              **options)
        single = self.clients[0].attend(*sent, dtype=wire, lse=True, **options)
        self.assertEqual(got.output.shape, single.output.shape)
        self.assertEqual(got.output.dtype, single.output.dtype)
        self.assertEqual(got.lse.shape, single.lse.shape)
        self.assertEqual(got.lse.dtype, np.float32)
        err = max_abs(got.output, single.output)
        self.assertLessEqual(err, tol, f"output vs one Attend: {err:.3g} > {tol:.3g}")
        lse_err = max_abs(got.lse, single.lse)
        self.assertLessEqual(lse_err, 1e-5 * max(1.0, float(np.max(np.abs(
            single.lse[np.isfinite(single.lse)]), initial=1.0))),
            f"lse vs one Attend: {lse_err:.3g}")
        self.assertEqual(len(got.timing["parts"]), min(REPLICAS, k.shape[-3]))
        if numpy:
            rounded = [attnserve_client.round_to(x, dtype) for x in (q, k, v)]
            want_out, want_lse = numpy_attention.attention(*rounded, **options)
            err = max_abs(got.output, want_out)
            self.assertLessEqual(err, tol, f"output vs NumPy: {err:.3g} > {tol:.3g}")
            lse_err = max_abs(got.lse, want_lse)
            self.assertLessEqual(lse_err, 1e-4, f"lse vs NumPy: {lse_err:.3g}")
        return got

    # --- sharded equals whole -------------------------------------------------

    def test_causal_bottom_right_fewer_queries(self):
        self.check(*self.qkv(2, 7, 4, 61, 4, 32), causal=True)

    def test_causal_bottom_right_square(self):
        # Lq == Lk: the last part's first rows see none of its keys (lse -inf there).
        q, k, v = self.qkv(1, 48, 4, 48, 4, 32)
        self.check(q, k, v, causal=True)
        part = self.clients[2].attend(q, k[:, 32:], v[:, 32:], causal=True, lse=True,
                                      key_offset=32, total_keys=48)
        self.assertTrue(np.all(np.isneginf(part.lse[:, :, :32])))
        self.assertTrue(np.all(part.output[:, :32] == 0))
        self.assertTrue(np.all(np.isfinite(part.lse[:, :, 32:])))

    def test_causal_top_left(self):
        self.check(*self.qkv(1, 20, 4, 45, 4, 32), causal=True, top_left=True)

    def test_decode_like(self):
        self.check(*self.qkv(1, 1, 8, 300, 2, 64), causal=True)

    def test_sliding_window(self):
        self.check(*self.qkv(1, 40, 4, 40, 4, 32), window_left=6, window_right=3)
        self.check(*self.qkv(2, 16, 4, 90, 2, 32), causal=True, window_left=20)

    def test_alibi(self):
        slopes = 2.0 ** (-8.0 * np.arange(1, 9) / 8)
        self.check(*self.qkv(1, 12, 8, 50, 4, 32), causal=True, alibi_slopes=slopes)
        self.check(*self.qkv(1, 30, 8, 30, 8, 16), alibi_slopes=slopes)

    def test_gqa_and_mqa(self):
        self.check(*self.qkv(2, 9, 8, 40, 2, 32, dv=24), causal=True)
        self.check(*self.qkv(1, 5, 8, 33, 1, 64))

    def test_softcap_and_scale(self):
        self.check(*self.qkv(1, 6, 4, 37, 2, 32), causal=True, softcap=5.0, scale=0.3)

    def test_rotary(self):
        # Each part is sent its keys' positions in the whole sequence.
        q, k, v = self.qkv(1, 10, 4, 50, 2, 32)
        rope = {"theta": 10000, "style": "neox"}
        self.check(q, k, v, numpy=False, causal=True, rotary=rope)
        self.check(q, k, v, numpy=False, causal=True, rotary=rope,
                   key_positions=np.arange(50) * 2, query_positions=np.arange(10) + 95)

    def test_three_d_query_and_few_keys(self):
        q, k, v = self.qkv(1, 5, 4, 2, 2, 16)
        got = self.check(q[0], k[0], v[0], causal=True)  # 2 keys: 2 parts
        self.assertEqual(got.output.shape, (5, 4, 16))
        self.assertEqual(got.lse.shape, (1, 4, 5))
        self.check(*self.qkv(1, 3, 4, 1, 2, 16))  # 1 key: 1 part

    def test_half_precision(self):
        q, k, v = self.qkv(2, 11, 8, 70, 2, 64)
        got = self.check(q, k, v, dtype="bf16", causal=True, window_left=30)
        self.assertEqual(got.output.dtype, np.float32)
        np.testing.assert_array_equal(got.output, attnserve_client.round_to(got.output, "bf16"))
        got = self.check(q, k, v, dtype="f16", causal=True)
        self.assertEqual(got.output.dtype, np.float16)

    def test_bitwise_repeatable(self):
        q, k, v = self.qkv(2, 13, 8, 101, 2, 32)
        for dtype in ("f32", "bf16"):
            a = attnserve_client.sharded_attend(self.clients, q, k, v, causal=True, lse=True,
                                                dtype=dtype)
            b = attnserve_client.sharded_attend(self.clients, q, k, v, causal=True, lse=True,
                                                dtype=dtype)
            self.assertEqual(a.output.tobytes(), b.output.tobytes(), dtype)
            self.assertEqual(a.lse.tobytes(), b.lse.tobytes(), dtype)

    def test_merge_by_hand_and_no_lse(self):
        # Parts sent by hand to one replica, merged with merge_attention_states.
        q, k, v = self.qkv(1, 8, 4, 30, 2, 32)
        whole = self.clients[1].attend(q, k, v, causal=True, lse=True)
        parts = []
        for start, end in ((0, 4), (4, 17), (17, 30)):
            r = self.clients[1].attend(q, k[:, start:end], v[:, start:end], causal=True,
                                       lse=True, key_offset=start, total_keys=30)
            parts.append((r.output, r.lse))
        out, lse = attnserve_client.merge_attention_states(parts)
        tol = 1e-5 * float(np.max(np.abs(v)))
        self.assertLessEqual(max_abs(out, whole.output), tol)
        self.assertLessEqual(max_abs(lse, whole.lse), 1e-5 * max(1, np.max(np.abs(whole.lse))))
        # lse not asked: none returned; total_keys 0 on the last part means key_offset + Lk.
        got = attnserve_client.sharded_attend(self.clients, q, k, v, causal=True)
        self.assertIsNone(got.lse)
        last = self.clients[1].attend(q, k[:, 17:], v[:, 17:], causal=True, lse=True,
                                      key_offset=17)
        np.testing.assert_array_equal(last.output, parts[2][0])
        np.testing.assert_array_equal(last.lse, parts[2][1])

    # --- errors -----------------------------------------------------------------

    def assert_invalid(self, field, q, k, v, **options):
        with self.assertRaises(grpc.RpcError) as cm:
            self.clients[0].attend(q, k, v, **options)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT,
                         cm.exception.details())
        self.assertTrue(cm.exception.details().startswith(field), cm.exception.details())

    def test_invalid_offsets(self):
        q, k, v = self.qkv(2, 4, 4, 10, 4, 16)
        self.assert_invalid("key_offset", q, k, v, key_offset=-1)
        self.assert_invalid("key_offset", q, k, v, key_offset=-5, total_keys=20)
        self.assert_invalid("total_keys", q, k, v, key_offset=5, total_keys=14)
        self.assert_invalid("total_keys", q, k, v, total_keys=9)
        self.assert_invalid("key_lengths", q, k, v, key_offset=3, key_lengths=[10, 8])
        self.assert_invalid("key_lengths", q, k, v, total_keys=12, key_lengths=[10, 8])
        # The server still answers normally.
        self.clients[0].attend(q, k, v, key_offset=5, total_keys=15)

    def test_refused_options(self):
        q, k, v = self.qkv(1, 4, 4, 10, 4, 16)
        for name, value in (("key_lengths", [10]), ("bias", np.zeros((1, 1, 4, 10))),
                            ("weights", True), ("top_k", 2), ("entropy", True),
                            ("linear", True), ("output_shm", ("region", 0))):
            with self.assertRaisesRegex(ValueError, name):
                attnserve_client.sharded_attend(self.clients, q, k, v, **{name: value})
        # Inputs in shared memory are not sliced here.
        in_shm = attnserve_client.ShmTensor("region", 0, k.shape, "f32")
        with self.assertRaisesRegex(ValueError, "k: expected an array"):
            attnserve_client.sharded_attend(self.clients, q, in_shm, v)
        with self.assertRaises(ValueError):
            attnserve_client.sharded_attend([], q, k, v)

    def test_replica_stopped(self):
        # A fourth replica of its own, stopped, as the last of three parts.
        server, client = start_replica(self.work, "replica-stopped")
        try:
            q, k, v = self.qkv(1, 4, 4, 30, 2, 16)
            clients = [self.clients[0], self.clients[1], client]
            attnserve_client.sharded_attend(clients, q, k, v, causal=True)
            self.assertEqual(server.stop(), 0, server.log())
            with self.assertRaises(grpc.RpcError) as cm:
                attnserve_client.sharded_attend(clients, q, k, v, causal=True)
            e = cm.exception
            self.assertIsInstance(e, attnserve_client.ShardedAttendError)
            self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE, e.details())
            self.assertEqual((e.index, e.target, e.keys), (2, server.target, (20, 30)))
            self.assertIn(server.target, str(e))
            self.assertIn("part 2 of 3", e.details())
            # The others still answer.
            attnserve_client.sharded_attend(clients[:2], q, k, v, causal=True)
        finally:
            client.close()
            server.stop()


if __name__ == "__main__":
    harness.run_e2e(globals())
