"""e2e: shared memory from the clients' side, against the attnserve binary.

A server with --allow_shared_memory and the Python client's
SharedMemoryRegion: Attend with inputs in a region and the output written
there equals the inline Attend bit for bit (F32 and BF16, inputs mixed
inline and by reference); Decode and BatchDecode likewise against twin
sessions stepped inline; the errors (a server without the flag refuses
registration with FAILED_PRECONDITION; an unknown region and an offset
past the region's end are INVALID_ARGUMENT naming the field); the caller's
regions listed in GetServerInfo; `attnctl attend --shm` writes what `attnctl
attend` writes, `attnctl bench --shm` runs without errors. Nothing the
clients created is left in /dev/shm.

Usage: shm_e2e_test.py --server=PATH --attnctl=PATH --python_path=DIR --work_dir=DIR
"""

import glob
import json
import os
import pathlib
import subprocess
import sys
import unittest

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

ARGS = None
attnserve_client = None
grpc = None


def shm_objects(pattern):
    return sorted(glob.glob(os.path.join("/dev/shm", pattern)))


class ShmE2ETest(unittest.TestCase):
    server = None
    client = None

    @classmethod
    def setUpClass(cls):
        cls.work = harness.fresh_dir(ARGS.work_dir)
        cls.server, cls.client = harness.start_serving(ARGS.server, cls.work,
                                                       ["--allow_shared_memory"])
        cls.region = attnserve_client.SharedMemoryRegion(8 << 20)
        cls.client.register_shared_memory("io", cls.region)

    @classmethod
    def tearDownClass(cls):
        try:
            cls.client.unregister_shared_memory("io")
            cls.region.close()
            cls.client.close()
        finally:
            cls.server.stop_and_check()
        # Every object this process or attnctl created is gone.
        left = (shm_objects(f"attnserve_{os.getpid()}_*") + shm_objects("attnctl_*")
                + shm_objects("attnbench_*"))
        assert not left, f"left in /dev/shm: {left}"

    def setUp(self):
        self.rng = np.random.default_rng(abs(hash(self.id())) % (2**32))
        self.region.reset()

    def qkv(self, b, lq, hq, lk, hkv, d):
        q = self.rng.standard_normal((b, lq, hq, d)).astype(np.float32)
        k = self.rng.standard_normal((b, lk, hkv, d)).astype(np.float32)
        v = self.rng.standard_normal((b, lk, hkv, d)).astype(np.float32)
        return q, k, v

    # --- Attend -------------------------------------------------------------

    def test_attend_in_shared_memory_equals_inline_bit_for_bit(self):
        q, k, v = self.qkv(2, 24, 4, 40, 2, 32)
        for dtype in ("f32", "bf16"):
            with self.subTest(dtype=dtype):
                self.region.reset()
                inline = self.client.attend(q, k, v, dtype=dtype, causal=True, lse=True)
                out = self.region.alloc(inline.output.shape, dtype)
                r = self.client.attend(self.region.put(q, dtype), self.region.put(k, dtype),
                                       self.region.put(v, dtype), causal=True, lse=True,
                                       output_shm=out)
                self.assertEqual(r.output_shm.offset, out.offset)
                self.assertEqual(r.output_shm.dtype, dtype)
                np.testing.assert_array_equal(r.output, inline.output)
                np.testing.assert_array_equal(r.lse, inline.lse)  # lse still inline
                if dtype == "f32":  # F32 outputs view the region
                    self.assertFalse(r.output.flags.owndata)

                # Some tensors inline, some by reference; the output inline.
                mixed = self.client.attend(self.region.put(q, dtype), k, self.region.put(v, dtype),
                                           dtype=dtype, causal=True)
                self.assertIsNone(mixed.output_shm)
                np.testing.assert_array_equal(mixed.output, inline.output)

    def test_bias_by_reference_and_output_by_name(self):
        q, k, v = self.qkv(1, 8, 2, 16, 2, 16)
        bias = self.rng.standard_normal((1, 2, 8, 16)).astype(np.float32)
        inline = self.client.attend(q, k, v, bias=bias)
        r = self.client.attend(q, k, v, bias=self.region.put(bias),
                               output_shm=("io", self.region.alloc(q.shape).offset))
        # Named by region name only: the result says where, the caller reads.
        self.assertIsNone(r.output)
        self.assertEqual(r.output_shm.region, "io")
        got = attnserve_client.ShmTensor(self.region, r.output_shm.offset, r.output_shm.shape)
        np.testing.assert_array_equal(got.array(), inline.output)

    # --- Sessions -----------------------------------------------------------

    def open_twins(self, n):
        """n pairs of sessions with the same prefilled cache."""
        pairs = []
        for _ in range(n):
            _, k, v = self.qkv(1, 1, 4, 12, 2, 16)
            pair = [self.client.create_session(2, 16) for _ in range(2)]
            for s in pair:
                self.client.decode(s, np.zeros((1, 4, 16), np.float32), k[0], v[0])
            pairs.append(pair)
        return pairs

    def test_decode_and_batch_decode_in_shared_memory(self):
        (a, a_twin), (b, b_twin) = self.open_twins(2)
        try:
            q, k, v = (x[0] for x in self.qkv(1, 2, 4, 2, 2, 16))
            want = self.client.decode(a_twin, q, k, v, lse=True)
            out = self.region.alloc(want.output.shape)
            got = self.client.decode(a, self.region.put(q), self.region.put(k),
                                     self.region.put(v), lse=True, output_shm=out)
            np.testing.assert_array_equal(got.output, want.output)
            np.testing.assert_array_equal(got.lse, want.lse)
            self.assertEqual(got.context_tokens, want.context_tokens)
            self.assertEqual(got.output_shm.offset, out.offset)

            steps = [tuple(x[0] for x in self.qkv(1, 1, 4, 1, 2, 16)) for _ in range(2)]
            want = self.client.batch_decode(0, [(s, *t) for s, t in zip((a_twin, b_twin), steps)])
            entries = [(s, *(self.region.put(x) for x in t)) for s, t in zip((a, b), steps)]
            outs = [self.region.alloc(w.output.shape) for w in want]
            got = attnserve_client.raise_first_error(
                self.client.batch_decode(0, entries, output_shm=outs))
            for g, w, o in zip(got, want, outs):
                np.testing.assert_array_equal(g.output, w.output)
                self.assertEqual(g.output_shm.offset, o.offset)
                self.assertEqual(g.context_tokens, w.context_tokens)
        finally:
            for s in (a, a_twin, b, b_twin):
                self.client.close_session(s)

    # --- Errors and listing -------------------------------------------------

    def assert_invalid(self, call, *fragments):
        with self.assertRaises(grpc.RpcError) as cm:
            call()
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT,
                         cm.exception.details())
        for fragment in fragments:
            self.assertIn(fragment, cm.exception.details())

    def test_unknown_region_and_offsets_past_the_end_name_the_field(self):
        q, k, v = self.qkv(1, 4, 2, 8, 2, 16)
        ghost = attnserve_client.ShmTensor("no_such_region", 0, q.shape)
        self.assert_invalid(lambda: self.client.attend(ghost, k, v), "query.shm.region",
                            "no_such_region")
        end = self.region.byte_size - 64  # a 512-byte key does not fit there
        past = attnserve_client.ShmTensor(self.region, end, k.shape)
        self.assert_invalid(lambda: self.client.attend(q, past, v), "key.shm.offset")
        self.assert_invalid(lambda: self.client.attend(q, k, v, output_shm=("io", end)),
                            "output_shm")
        # The region still serves.
        r = self.client.attend(self.region.put(q), k, v)
        np.testing.assert_array_equal(r.output, self.client.attend(q, k, v).output)

    def test_registration_errors(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.client.register_shared_memory("io", self.region)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.ALREADY_EXISTS)
        with self.assertRaises(grpc.RpcError) as cm:
            self.client.unregister_shared_memory("never_registered")
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)
        with self.assertRaises(grpc.RpcError) as cm:
            self.client.register_shared_memory("big", self.region.key,
                                               byte_size=self.region.byte_size + 1)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)

        off, off_client = harness.start_serving(ARGS.server, self.work, log_name="off.log")
        try:
            with attnserve_client.SharedMemoryRegion(4096) as region:
                with self.assertRaises(grpc.RpcError) as cm:
                    off_client.register_shared_memory("io", region)
                self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
                self.assertIn("--allow_shared_memory", cm.exception.details())
                self.assertFalse(off_client.server_info().limits.allow_shared_memory)
        finally:
            off_client.close()
            off.stop_and_check()

    def test_regions_are_listed_in_server_info(self):
        info = self.client.server_info()
        self.assertTrue(info.limits.allow_shared_memory)
        self.assertGreater(info.limits.max_shm_regions, 0)
        with attnserve_client.SharedMemoryRegion(1 << 16) as extra:
            self.client.register_shared_memory("part", extra.key, offset=4096, byte_size=8192)
            regions = self.client.shared_memory_regions()
            self.assertEqual(regions["io"].key, self.region.key)
            self.assertEqual(regions["io"].byte_size, self.region.byte_size)
            self.assertEqual((regions["part"].key, regions["part"].offset,
                              regions["part"].byte_size), (extra.key, 4096, 8192))
            self.client.unregister_shared_memory("part")
        self.assertNotIn("part", self.client.shared_memory_regions())

    # --- attnctl ------------------------------------------------------------

    def attnctl(self, *args, target=None, timeout=60):
        cmd = [ARGS.attnctl, f"--target={target or self.server.target}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def test_attnctl_attend_shm_writes_what_attend_writes(self):
        q, k, v = self.qkv(1, 20, 4, 28, 2, 32)
        paths = {n: str(self.work / f"{n}.npy") for n in ("q", "k", "v", "o", "o_shm")}
        for name, array in (("q", q), ("k", k), ("v", v)):
            np.save(paths[name], array)
        inputs = [f"--q={paths['q']}", f"--k={paths['k']}", f"--v={paths['v']}", "--causal"]
        for dtype in ("f32", "bf16"):
            with self.subTest(dtype=dtype):
                plain = self.attnctl("attend", *inputs, f"--dtype={dtype}", f"--out={paths['o']}")
                self.assertEqual(plain.returncode, 0, plain.stderr)
                shm = self.attnctl("attend", *inputs, f"--dtype={dtype}", "--shm",
                                   f"--out={paths['o_shm']}")
                self.assertEqual(shm.returncode, 0, shm.stderr)
                with open(paths["o"], "rb") as a, open(paths["o_shm"], "rb") as b:
                    self.assertEqual(a.read(), b.read())
                # The same line, but for the path and the timings.
                self.assertEqual(plain.stdout.split()[:2], shm.stdout.split()[:2])
        self.assertEqual(shm_objects("attnctl_*"), [])
        self.assertEqual(set(self.client.shared_memory_regions()), {"io"})

        # A server without the flag: the error, and nothing left behind.
        off, off_client = harness.start_serving(ARGS.server, self.work, log_name="off2.log")
        try:
            failed = self.attnctl("attend", *inputs, "--shm", target=off.target)
            self.assertEqual(failed.returncode, 1, failed.stdout)
            self.assertIn("FAILED_PRECONDITION", failed.stderr)
        finally:
            off_client.close()
            off.stop_and_check()
        self.assertEqual(shm_objects("attnctl_*"), [])

    def test_attnctl_bench_shm(self):
        r = self.attnctl("bench", "--shape=1,16,4,64,2,32", "--shm", "--channels=2",
                         "--concurrency=4", "--duration=1s", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        report = json.loads(r.stdout.strip().splitlines()[-1])
        self.assertIs(report["shm"], True)
        self.assertEqual(report["errors"], {})
        self.assertGreater(report["ok"], 0)
        self.assertEqual(shm_objects("attnbench_*"), [])
        self.assertEqual(set(self.client.shared_memory_regions()), {"io"})


def main():
    harness.run_e2e(globals(), ("--attnctl", {"required": True}))


if __name__ == "__main__":
    main()
