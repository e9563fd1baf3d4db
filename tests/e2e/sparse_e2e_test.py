"""e2e: sparse attention (AttendRequest.sparsity and a session step's) over
gRPC, through the Python client package and attnctl, against NumPy.

Starts the attnserve binary on free loopback ports, then on the backends cpu
and reference checks output, lse (and entropy) against numpy_attention's
dense-mask oracle (F32 within 2e-5 relative, BF16 within 1e-2): block masks
(one pattern for every head, and per batch row and head with full blocks),
key_indices per key and per block, global tokens with and without causal,
sink logits (a fully masked row's lse is its sink), each composed with
causal, windows, softcap, ALiBi and key_lengths; a session decode and a
BatchDecode selecting keys of the cache; `attnctl attend --block_mask=m.npz
--global_tokens=...` (savez and savez_compressed); and the errors: a bad
indptr is INVALID_ARGUMENT naming sparsity.block_mask.indptr[...], onednn
answers UNIMPLEMENTED. Finally SIGTERM must make the server exit 0.

Usage: sparse_e2e_test.py --server=PATH --attnctl=PATH --python_path=DIR --work_dir=DIR
"""

import pathlib
import subprocess
import sys
import unittest

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
import numpy_attention  # noqa: E402
from numpy_attention import rel_error  # noqa: E402

ARGS = None
attnserve_client = None
grpc = None

BACKENDS = ("cpu", "reference")
TOLERANCE = {"f32": 2e-5, "bf16": 1e-2}


def random_qkv(rng, batch, lq, hq, lk, hkv, d, magnitude=1.0):
    q = (rng.standard_normal((batch, lq, hq, d)) * magnitude).astype(np.float32)
    k = (rng.standard_normal((batch, lk, hkv, d)) * magnitude).astype(np.float32)
    v = rng.standard_normal((batch, lk, hkv, d)).astype(np.float32)
    return q, k, v


def random_blocks(rng, shape, density=0.5):
    """A boolean block matrix in which every row block sees block 0 (so no
    row is fully masked unless the test wants it)."""
    blocks = rng.random(shape) < density
    blocks[..., 0] = True
    return blocks


def random_selection(rng, shape, units, pad=1):
    """Int32 [..., k]: per row k - pad distinct unit numbers below `units`
    (any order), then `pad` entries of -1."""
    *rows, k = shape
    out = np.full(shape, -1, dtype=np.int32)
    for index in np.ndindex(*rows):
        out[index][:k - pad] = rng.choice(units, size=k - pad, replace=False)
    return out


class SparseE2ETest(unittest.TestCase):
    server = None
    client = None

    @classmethod
    def setUpClass(cls):
        cls.work = harness.fresh_dir(ARGS.work_dir)
        cls.server, cls.client = harness.start_serving(ARGS.server, cls.work)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop_and_check()

    def setUp(self):
        self.rng = np.random.default_rng(abs(hash(self.id())) % (2**32))

    def check(self, q, k, v, dtype="f32", backends=BACKENDS, **options):
        """Calls every backend and the oracle with the same request; compares
        output, lse and entropy."""
        if dtype != "f32":
            q, k, v = (attnserve_client.round_to(x, dtype) for x in (q, k, v))
        want_out, want_lse, want_entropy = numpy_attention.attention(q, k, v, with_entropy=True,
                                                                     **options)
        tolerance = TOLERANCE[dtype]
        for backend in backends:
            with self.subTest(backend=backend):
                r = self.client.attend(q, k, v, dtype=dtype, backend=backend, lse=True,
                                       entropy=True, **options)
                self.assertEqual(r.backend, backend)
                self.assertEqual(r.output.shape, want_out.shape)
                for name, got, want in (("output", r.output, want_out),
                                        ("lse", r.lse, want_lse),
                                        ("entropy", r.entropy, want_entropy)):
                    err = rel_error(got, want)
                    self.assertLessEqual(err, tolerance, f"{name}: relative error {err:.3g}")
        return want_out, want_lse

    # --- block masks --------------------------------------------------------

    def test_block_mask_for_every_head(self):
        # Lq = Lk = 37 with blocks of 8 rows and 16 keys: both last blocks short.
        q, k, v = random_qkv(self.rng, 2, 37, 4, 37, 2, 32)
        blocks = random_blocks(self.rng, (5, 3))
        mask = attnserve_client.block_mask_from_dense(blocks, 8, 16)
        self.assertEqual(mask.indptr.shape, (6,))
        self.check(q, k, v, block_mask=mask)
        self.check(q, k, v, block_mask=mask, causal=True, key_lengths=[37, 20])
        self.check(q, k, v, block_mask=mask, dtype="bf16", causal=True)

    def test_block_mask_per_row_and_head_with_full_blocks(self):
        q, k, v = random_qkv(self.rng, 2, 24, 4, 40, 4, 32, magnitude=2.0)
        blocks = random_blocks(self.rng, (2, 4, 3, 5), density=0.6)
        full = blocks & (self.rng.random(blocks.shape) < 0.5)
        mask = attnserve_client.block_mask_from_dense(blocks, 8, 8, full_blocks=full)
        self.assertEqual(mask.indptr.shape, (2, 4, 4))
        self.assertGreater(mask.full_indices.size, 0)
        slopes = 2.0 ** (-8.0 * np.arange(1, 5) / 4)
        self.check(q, k, v, block_mask=mask, window_left=20, softcap=8.0,
                   alibi_slopes=slopes)
        # One pattern per head, shared by the batch rows ([1, Hq, ...]).
        mask = attnserve_client.block_mask_from_dense(blocks[:1], 8, 8, full_blocks=full[:1])
        self.check(q, k, v, block_mask=mask, causal=True, top_left=True)

    # --- key selection --------------------------------------------------------

    def test_key_indices_per_key(self):
        # [B, Hkv, Lq, k]: DSA-style top-k keys per query, shared by each GQA group.
        q, k, v = random_qkv(self.rng, 2, 9, 4, 30, 2, 32)
        selected = random_selection(self.rng, (2, 2, 9, 6), 30, pad=2)
        self.check(q, k, v, key_indices=selected)
        self.check(q, k, v, key_indices=selected, causal=True, key_lengths=[30, 17],
                   window_left=12)
        # One selection per query head, and one for every head.
        per_head = random_selection(self.rng, (2, 4, 9, 5), 30)
        self.check(q, k, v, key_indices=per_head, softcap=5.0, dtype="bf16")
        shared = random_selection(self.rng, (2, 1, 9, 5), 30)
        self.check(q, k, v, key_indices=shared, causal=True)

    def test_key_indices_per_block(self):
        # NSA/MoBA-style: blocks of 4 queries each select blocks of 8 keys.
        q, k, v = random_qkv(self.rng, 1, 14, 4, 45, 4, 32)
        selection = attnserve_client.KeySelection(
            random_selection(self.rng, (1, 4, 4, 3), 6, pad=1), query_block=4, key_block=8)
        self.check(q, k, v, key_indices=selection)
        self.check(q, k, v, key_indices=selection, causal=True,
                   alibi_slopes=[0.5, 0.25, 0.125, 0.0625])

    # --- global tokens and sinks -----------------------------------------------

    def test_global_tokens(self):
        q, k, v = random_qkv(self.rng, 2, 20, 2, 32, 2, 32)
        # Keys 0 and 5 are global, and so are the queries at key positions 20
        # and 31 (queries 8 and 19, bottom-right): they see every key.
        tokens = [0, 5, 20, 31]
        self.check(q, k, v, global_tokens=tokens)
        self.check(q, k, v, global_tokens=tokens, causal=True, window_left=3)
        self.check(q, k, v, global_tokens=tokens, window_left=2, window_right=2,
                   key_lengths=[32, 25])
        blocks = random_blocks(self.rng, (3, 4), density=0.3)
        self.check(q, k, v, global_tokens=tokens, causal=True,
                   block_mask=attnserve_client.block_mask_from_dense(blocks, 8, 8))

    def test_sink_logits(self):
        q, k, v = random_qkv(self.rng, 2, 12, 4, 20, 2, 32)
        sinks = [0.5, -1.0, 2.0, 0.0]
        self.check(q, k, v, sink_logits=sinks)
        self.check(q, k, v, sink_logits=sinks, causal=True, window_left=4, softcap=6.0)
        self.check(q, k, v, sink_logits=sinks, dtype="bf16", causal=True)
        # A row without keys: output 0, lse the sink alone, entropy 0.
        for backend in BACKENDS:
            r = self.client.attend(q, k, v, key_lengths=[20, 0], sink_logits=sinks, lse=True,
                                   entropy=True, backend=backend)
            np.testing.assert_array_equal(r.output[1], 0.0)
            np.testing.assert_allclose(r.lse[1], np.broadcast_to(np.array(sinks)[:, None],
                                                                 (4, 12)), rtol=1e-6)
            np.testing.assert_array_equal(r.entropy[1], 0.0)
            # The weights of a row sum to less than 1: the sink took the rest.
            w = self.client.attend(q, k, v, sink_logits=sinks, weights=True,
                                   backend=backend).weights
            self.assertTrue(np.all(w.sum(axis=-1) < 1.0))

    def test_everything_composed(self):
        q, k, v = random_qkv(self.rng, 2, 16, 4, 33, 2, 32)
        selection = attnserve_client.KeySelection(
            random_selection(self.rng, (2, 2, 8, 4), 9, pad=1), query_block=2, key_block=4)
        self.check(q, k, v, key_indices=selection, global_tokens=[1, 30], sink_logits=[0.1] * 4,
                   causal=True, window_left=10, softcap=10.0, key_lengths=[33, 29],
                   alibi_slopes=[0.25, 0.125, 0.0625, 0.03125])
        self.check(q, k, v, key_indices=selection, global_tokens=[1, 30], sink_logits=[0.1] * 4,
                   causal=True, dtype="bf16")

    def test_stream_request(self):
        q, k, v = random_qkv(self.rng, 1, 8, 2, 16, 2, 32)
        mask = attnserve_client.block_mask_from_dense(np.tril(np.ones((2, 2), bool)), 4, 8)
        request = attnserve_client.build_request(q, k, v, block_mask=mask, sink_logits=[0.0, 1.0],
                                                 request_id="s", backend="cpu")
        (r,) = list(self.client.attend_stream([request], timeout=30))
        want, _ = numpy_attention.attention(q, k, v, block_mask=mask, sink_logits=[0.0, 1.0])
        self.assertLessEqual(rel_error(r.output, want), TOLERANCE["f32"])

    # --- sessions ---------------------------------------------------------------

    def test_session_decode_selects_keys_of_the_cache(self):
        hq, hkv, d = 4, 2, 32
        sessions = [self.client.create_session(hkv, d) for _ in range(2)]
        try:
            ks, vs = [], []
            for s in sessions:
                _, k, v = random_qkv(self.rng, 1, 1, hq, 40, hkv, d)
                q = self.rng.standard_normal((40, hq, d)).astype(np.float32)
                self.client.decode(s, q, k[0], v[0], backend="cpu")
                ks.append(k[0])
                vs.append(v[0])
            # One step each: 2 new tokens; the queries select 10 of the 42 keys.
            steps = []
            for i in range(2):
                q, k, v = random_qkv(self.rng, 1, 2, hq, 2, hkv, d)
                ks[i] = np.concatenate([ks[i], k[0]])
                vs[i] = np.concatenate([vs[i], v[0]])
                steps.append((q[0], k[0], v[0]))
            selected = [random_selection(self.rng, (1, hkv, 2, 10), 42, pad=0) for _ in range(2)]
            sinks = [0.5, 0.0, -0.5, 1.0]

            def want(i):
                return numpy_attention.attention(
                    steps[i][0], ks[i], vs[i], causal=True, key_indices=selected[i],
                    global_tokens=[0], sink_logits=sinks)

            r = self.client.decode(sessions[0], *steps[0], key_indices=selected[0],
                                   global_tokens=[0], sink_logits=sinks, lse=True,
                                   backend="cpu")
            self.assertEqual(r.context_tokens, 42)
            out, lse = want(0)
            self.assertLessEqual(rel_error(r.output, out), TOLERANCE["f32"])
            self.assertLessEqual(rel_error(r.lse, lse), TOLERANCE["f32"])

            # The second session's step in a BatchDecode beside the first's
            # next step (one new token, its own pattern: blocks of 8 keys).
            q, k, v = random_qkv(self.rng, 1, 1, hq, 1, hkv, d)
            ks[0] = np.concatenate([ks[0], k[0]])
            vs[0] = np.concatenate([vs[0], v[0]])
            blocks = attnserve_client.KeySelection(np.array([[[[0, 5, -1]]]], np.int32),
                                                   key_block=8)
            entries = [(sessions[0], q[0], k[0], v[0], 42), (sessions[1], *steps[1], 40)]
            sparsity = [attnserve_client.Sparsity(key_indices=blocks),
                        attnserve_client.Sparsity(key_indices=selected[1], global_tokens=[0],
                                                  sink_logits=sinks)]
            results = attnserve_client.raise_first_error(self.client.batch_decode(
                0, entries, sparsity=sparsity, lse=True, backend="cpu"))
            want0, _ = numpy_attention.attention(q[0], ks[0], vs[0], causal=True,
                                                 key_indices=blocks)
            self.assertLessEqual(rel_error(results[0].output, want0), TOLERANCE["f32"])
            out, lse = want(1)
            self.assertLessEqual(rel_error(results[1].output, out), TOLERANCE["f32"])
            self.assertLessEqual(rel_error(results[1].lse, lse), TOLERANCE["f32"])
        finally:
            for s in sessions:
                self.client.close_session(s)

    # --- attnctl ----------------------------------------------------------------

    def attnctl(self, *args, timeout=60):
        cmd = [ARGS.attnctl, f"--target={self.server.target}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def test_attnctl_block_mask_and_global_tokens(self):
        q, k, v = random_qkv(self.rng, 1, 20, 4, 28, 2, 32)
        paths = {name: str(self.work / f"attnctl_{name}.npy") for name in ("q", "k", "v", "o")}
        for name, array in (("q", q), ("k", k), ("v", v)):
            np.save(paths[name], array)
        blocks = random_blocks(self.rng, (1, 4, 3, 4))
        mask = attnserve_client.block_mask_from_dense(blocks, 8, 8, full_blocks=blocks & np.eye(
            3, 4, dtype=bool))
        arrays = dict(indptr=mask.indptr, indices=mask.indices, full_indptr=mask.full_indptr,
                      full_indices=mask.full_indices, block_rows=np.int32(8),
                      block_cols=np.int32(8))
        want, _ = numpy_attention.attention(q, k, v, causal=True, block_mask=mask,
                                            global_tokens=[2, 27])
        for save in (np.savez, np.savez_compressed):
            with self.subTest(save=save.__name__):
                npz = str(self.work / f"mask_{save.__name__}.npz")
                save(npz, **arrays)
                r = self.attnctl("attend", f"--q={paths['q']}", f"--k={paths['k']}",
                                 f"--v={paths['v']}", "--causal", f"--block_mask={npz}",
                                 "--global_tokens=2,27", "--backend=cpu", f"--out={paths['o']}")
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertLessEqual(rel_error(np.load(paths["o"]), want), TOLERANCE["f32"])

        # NumPy's default int64 is read (narrowed to int32); floats are
        # refused with the flag named and the fix.
        npz = str(self.work / "mask_int64.npz")
        np.savez(npz, **{k: np.asarray(a, np.int64) for k, a in arrays.items()})
        r = self.attnctl("attend", f"--q={paths['q']}", f"--k={paths['k']}",
                         f"--v={paths['v']}", "--causal", f"--block_mask={npz}",
                         "--global_tokens=2,27", "--backend=cpu", f"--out={paths['o']}")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertLessEqual(rel_error(np.load(paths["o"]), want), TOLERANCE["f32"])
        npz = str(self.work / "mask_float.npz")
        np.savez(npz, **{**arrays, "block_rows": np.float32(8)})
        r = self.attnctl("attend", f"--q={paths['q']}", f"--k={paths['k']}",
                         f"--v={paths['v']}", f"--block_mask={npz}")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn(f"--block_mask={npz}: block_rows", r.stderr)
        self.assertIn("np.int32", r.stderr)
        # The server's message names the field when the mask is wrong.
        npz = str(self.work / "mask_bad.npz")
        np.savez(npz, **{**arrays, "block_rows": np.int32(4)})  # 5 row blocks, not 3
        r = self.attnctl("attend", f"--q={paths['q']}", f"--k={paths['k']}",
                         f"--v={paths['v']}", f"--block_mask={npz}")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("INVALID_ARGUMENT", r.stderr)
        self.assertIn("sparsity.block_mask.indptr", r.stderr)

    # --- errors -------------------------------------------------------------------

    def test_errors(self):
        q, k, v = random_qkv(self.rng, 1, 16, 2, 16, 2, 32)
        mask = attnserve_client.block_mask_from_dense(np.ones((2, 2), bool), 8, 8)
        bad = attnserve_client.BlockMask(8, 8, np.array([0, 2, 1], np.int32), mask.indices)
        with self.assertRaises(grpc.RpcError) as cm:
            self.client.attend(q, k, v, block_mask=bad, backend="cpu")
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("sparsity.block_mask.indptr[", cm.exception.details())
        # Client-side: what the wire cannot carry.
        with self.assertRaises(ValueError) as cm:
            self.client.attend(q, k, v, key_indices=np.zeros((1, 2, 16, 1)))
        self.assertIn("sparsity.key_indices.indices", str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            self.client.attend(q, k, v, global_tokens=[0.9])
        self.assertIn("sparsity.global_tokens", str(cm.exception))
        # An empty list sets no form: the request is dense (and may be sharded).
        dense = self.client.attend(q, k, v, backend="cpu")
        empty = self.client.attend(q, k, v, global_tokens=[], backend="cpu")
        np.testing.assert_array_equal(empty.output, dense.output)
        # onednn and cuda do not compute sparse attention.
        backends = {b.name for b in self.client.server_info().backends}
        for backend in sorted(backends & {"onednn", "cuda"}):
            with self.assertRaises(grpc.RpcError) as cm:
                self.client.attend(q, k, v, block_mask=mask, backend=backend)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNIMPLEMENTED, backend)
        self.check(q, k, v, block_mask=mask)  # the server still answers


def main():
    harness.run_e2e(globals(), ("--attnctl", {"required": True}))


if __name__ == "__main__":
    main()
