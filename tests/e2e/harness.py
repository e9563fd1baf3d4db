"""Helpers for e2e tests: free loopback ports and an attnserve process.

ServerProcess starts the real attnserve binary on free loopback ports, waits
until grpc.health.v1 says SERVING, and stops it with SIGTERM, returning the
exit status. Its log goes to a file that is printed when a test fails.
"""

import os
import signal
import socket
import subprocess
import sys
import time


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_client_to_path(repo_root, gen_dir):
    """Makes `import attnserve_client` work, with stubs generated in gen_dir."""
    os.environ["ATTNSERVE_PY_GEN"] = str(gen_dir)
    path = os.path.join(repo_root, "client", "python")
    if path not in sys.path:
        sys.path.insert(0, path)


class ServerProcess:
    def __init__(self, binary, log_path, extra_args=()):
        self.port = free_port()
        self.metrics_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.args = [binary, f"--listen={self.target}",
                     f"--metrics_listen=127.0.0.1:{self.metrics_port}", *extra_args]
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_serving(self, client, timeout=20.0):
        """Polls health through `client` (an attnserve_client.Client)."""
        give_up = time.monotonic() + timeout
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

    def log(self):
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")
