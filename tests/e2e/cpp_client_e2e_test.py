"""e2e: a C++ service linking only the client library (attnserve_client)
against a real attnserve.

- client/examples/attend_example sends an Attend and the same attention split
  over two key ranges and merged by lse (ShardedAttend); it exits 0 when the
  two agree, and prints the shapes that came back.
- The same binary loads no oneDNN or OpenMP runtime (tests/link checks its
  symbols too).

Usage: cpp_client_e2e_test.py --server=PATH --python_path=DIR --work_dir=DIR --example=PATH
"""

import pathlib
import subprocess
import sys
import unittest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

ARGS = None
attnserve_client = None
grpc = None


class CppClientE2ETest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = harness.fresh_dir(ARGS.work_dir)
        cls.server, cls.client = harness.start_serving(ARGS.server, cls.work, ["--threads=1"])

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop_and_check()

    def test_attend_and_sharded_attend_agree(self):
        done = subprocess.run([ARGS.example, self.server.target], capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(done.returncode, 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
        self.assertIn("Attend: output [1, 64, 8, 32], lse [1, 8, 64]", done.stdout)
        self.assertIn("ShardedAttend over 2 parts: output [1, 64, 8, 32]", done.stdout)
        self.assertTrue(done.stdout.endswith("ok\n"), done.stdout)

    def test_loads_no_onednn_or_openmp(self):
        libraries = subprocess.run(["ldd", ARGS.example], capture_output=True, text=True,
                                   check=True).stdout
        for heavy in ("libdnnl", "libgomp", "libomp"):
            self.assertNotIn(heavy, libraries)


if __name__ == "__main__":
    harness.run_e2e(globals(), ("--example", {"required": True}))
