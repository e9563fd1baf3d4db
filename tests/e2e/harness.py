"""Helpers for e2e tests: free loopback ports and an attnserve process.

ServerProcess starts the real attnserve binary on free loopback ports, waits
until grpc.health.v1 says SERVING, and stops it with SIGTERM, returning the
exit status. Its log goes to a file that is printed when a test fails.
"""

import argparse
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import unittest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _ephemeral_low():
    """The lowest port the kernel hands out to outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago: a random one below
    the ephemeral range when there is room, so that the connections other
    tests open meanwhile (which take their local ports from that range)
    cannot take it before the server binds it."""
    low = _ephemeral_low()
    if low > 12000:
        for _ in range(64):
            port = random.randrange(10000, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_e2e(script_globals, *extra_flags):
    """The main() of every e2e script: parses --server, --python_path,
    --work_dir and `extra_flags` ((name, argparse keyword arguments) pairs),
    imports the installed Python client, sets the script's ARGS, grpc and
    attnserve_client, and runs its unittest cases; unknown arguments go to
    unittest."""
    parser = argparse.ArgumentParser()
    for name in ("--server", "--python_path", "--work_dir"):
        parser.add_argument(name, required=True)
    for name, options in extra_flags:
        parser.add_argument(name, **options)
    args, rest = parser.parse_known_args()
    import grpc
    attnserve_client = import_installed_client(args.python_path)
    script_globals.update(ARGS=args, grpc=grpc, attnserve_client=attnserve_client)
    unittest.main(module=script_globals["__name__"], argv=[sys.argv[0], *rest], verbosity=2)


def start_serving(binary, work_dir, extra_args=(), *, log_name="attnserve.log", port=None,
                  token=None):
    """Starts attnserve with its log `log_name` in `work_dir` (made if
    missing), on `port` (default: a free one), and a Client to it (sending
    `token`), and waits until it is SERVING; stops the server if that fails.
    Returns (server, client). Needs run_e2e's client import."""
    import attnserve_client
    work = pathlib.Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(binary, work / log_name, extra_args, port=port)
    try:
        client = attnserve_client.Client(server.target, timeout=30, token=token)
        server.wait_serving(client)
    except Exception:
        server.stop()
        raise
    return server, client


def import_installed_client(python_path):
    """Imports attnserve_client from python_path, where the build installed
    it with pip (tests/e2e/CMakeLists.txt), and returns it. Raises
    RuntimeError unless it came from there with the gRPC stubs its build
    compiled, so the tests check the package as users install it, not the
    checkout's client/python."""
    path = str(pathlib.Path(python_path).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    import attnserve_client
    where = pathlib.Path(attnserve_client.__file__).resolve()
    if not where.is_relative_to(path):
        raise RuntimeError(f"attnserve_client imported from {where}, not from {path}")
    stubs = attnserve_client.attention_pb2.__name__
    if stubs != "attnserve_client._generated.attention_pb2":
        raise RuntimeError(f"attnserve_client's stubs are {stubs}, not the ones built in")
    return attnserve_client


def fresh_dir(path):
    """`path` as an empty directory (removed first if it exists)."""
    path = pathlib.Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


class ServerProcess:
    def __init__(self, binary, log_path, extra_args=(), port=None):
        # A port chosen before the start lets replicas name each other (--peers).
        self.port = port if port is not None else free_port()
        self.metrics_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.args = [binary, f"--listen={self.target}",
                     f"--metrics_listen=127.0.0.1:{self.metrics_port}", *extra_args]
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_serving(self, client, timeout=20.0):
        """Waits until the gRPC port accepts connections (a client whose
        first connection is refused backs off for seconds before it tries
        again), then polls health through `client` (an
        attnserve_client.Client)."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                raise RuntimeError(f"attnserve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                client.wait_until_serving(timeout=0.5)
                return
            except TimeoutError:
                pass
        raise TimeoutError(f"attnserve not SERVING after {timeout} s:\n{self.log()}")

    def stop(self, timeout=20.0):
        """SIGTERM, then waits; returns the exit status (kills after timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._log.close()
                raise
        self._log.close()
        return self.proc.returncode

    def stop_and_check(self):
        """stop(), raising AssertionError unless the server exited 0."""
        code = self.stop()
        if code != 0:
            raise AssertionError(f"attnserve exited {code} after SIGTERM, expected 0:\n"
                                 f"{self.log()}")

    def log(self):
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")
