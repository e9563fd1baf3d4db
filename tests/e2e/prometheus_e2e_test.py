"""e2e: a real Prometheus server scraping a real attnserve.

Starts attnserve and Debian's `prometheus` on free loopback ports (scrape and
rule evaluation every second, a temporary TSDB, deploy/prometheus's rules
loaded), drives traffic through the Python client in two rounds, and asserts
through Prometheus' HTTP API that:

- the target is up and the docs/ARCHITECTURE.md series exist (process_*, build info,
  queue capacity, KV cache, ...);
- counters move by exactly the traffic sent (requests by code, FLOPs);
- histogram_quantile over attnserve_request_duration_seconds_bucket gives a
  latency between the fastest bucket and the slowest call the client saw;
- every rule of attnserve-rules.yml is loaded and evaluates healthily, and
  the recording rules give values (request rate > 0, queue utilization).

Usage: prometheus_e2e_test.py --server=PATH --python_path=DIR --work_dir=DIR
       [--prometheus=/usr/bin/prometheus]
"""

import concurrent.futures
import json
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import unittest
import urllib.parse
import urllib.request

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
RULES = REPO / "deploy" / "prometheus" / "attnserve-rules.yml"
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

ARGS = None
attnserve_client = None
grpc = None

# One small request: B=1, Lq=Lk=32, Hq=Hkv=4, D=32.
SHAPE = (1, 32, 4, 32)
FLOPS_PER_CALL = 4 * 1 * 4 * 32 * 32 * 32
QUEUE_CAPACITY = 300


def wait_for(what, predicate, timeout=20.0, interval=0.2):
    """Polls predicate() until it returns a truthy value, which is returned."""
    give_up = time.monotonic() + timeout
    last = None
    while time.monotonic() < give_up:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, ValueError, KeyError) as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what}: not after {timeout} s (last: {last!r})")


def wait_listening(port, proc, log, timeout=20.0):
    def listening():
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    wait_for(f"port {port} listening", listening, timeout, interval=0.02)


class Prometheus:
    """A Prometheus server on loopback scraping `targets` every second."""

    def __init__(self, binary, work, targets, rule_files=()):
        self.port = harness.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "900ms"},
            "rule_files": [str(f) for f in rule_files],
            "scrape_configs": [{"job_name": "attnserve",
                                "static_configs": [{"targets": list(targets)}]}],
        }
        work.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: no YAML writer needed.
        (work / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self.log_path = work / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc, self.log)
        wait_for("prometheus ready", lambda: self.get("/-/ready", raw=True))

    def log(self):
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def get(self, path, raw=False, **params):
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read()
        if raw:
            return body
        reply = json.loads(body)
        if reply.get("status") != "success":
            raise ValueError(f"{path} {params}: {reply}")
        return reply["data"]

    def query(self, expr):
        """Instant query: list of (labels dict, float value)."""
        data = self.get("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def value(self, expr):
        """The single value of `expr`; None if it has no series."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) != 1:
            raise ValueError(f"{expr}: expected one series, got {result}")
        return result[0][1]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class PrometheusE2ETest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        work = pathlib.Path(ARGS.work_dir)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        cls.server = harness.ServerProcess(ARGS.server, work / "attnserve.log",
                                           [f"--queue_capacity={QUEUE_CAPACITY}"])
        cls.prometheus = None
        try:
            wait_listening(cls.server.port, cls.server.proc, cls.server.log)
            cls.client = attnserve_client.Client(cls.server.target, timeout=30)
            cls.server.wait_serving(cls.client)
            cls.prometheus = Prometheus(ARGS.prometheus, work / "prometheus",
                                        [f"127.0.0.1:{cls.server.metrics_port}"], [RULES])
            cls.instance = f"127.0.0.1:{cls.server.metrics_port}"
            cls.sel = f'job="attnserve",instance="{cls.instance}"'
            wait_for("target up", lambda: cls.prometheus.value(f"up{{{cls.sel}}}") == 1)
            cls.drive_traffic()
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        if cls.prometheus is not None:
            cls.prometheus.stop()
        cls.server.stop()

    @classmethod
    def scraped_total(cls, code):
        v = cls.prometheus.value(
            f'attnserve_requests_total{{{cls.sel},method="Attend",code="{code}"}}')
        return v or 0.0

    @classmethod
    def attend_round(cls, calls, bad_calls):
        """`calls` valid Attend calls from 8 threads and `bad_calls` malformed
        ones; returns the client-side latencies of the valid ones."""
        rng = np.random.default_rng(calls)
        q, k, v = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))

        def one(_):
            start = time.perf_counter()
            cls.client.attend(q, k, v)
            return time.perf_counter() - start

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            latencies = list(pool.map(one, range(calls)))
        for _ in range(bad_calls):
            try:
                cls.client.attend(q, k[:, :, :3], v)  # Hq % Hkv != 0
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
            else:
                raise AssertionError("a malformed request was answered OK")
        return latencies

    @classmethod
    def drive_traffic(cls):
        """Two rounds with a scrape in between, so rates see an increase."""
        cls.round1 = (20, 1)
        cls.round2 = (300, 4)
        cls.latencies = cls.attend_round(*cls.round1)
        ok1 = cls.round1[0]
        wait_for("round 1 scraped", lambda: cls.scraped_total("OK") == ok1)
        cls.flops_after_round1 = cls.prometheus.value(f"sum(attnserve_flops_total{{{cls.sel}}})")
        cls.latencies += cls.attend_round(*cls.round2)
        ok = ok1 + cls.round2[0]
        wait_for("round 2 scraped", lambda: cls.scraped_total("OK") == ok)

    def test_key_series_exist(self):
        for name in ("attnserve_build_info", "attnserve_queue_capacity", "attnserve_queue_depth",
                     "attnserve_inflight_requests", "attnserve_requests_total",
                     "attnserve_request_duration_seconds_bucket",
                     "attnserve_queue_duration_seconds_bucket",
                     "attnserve_compute_duration_seconds_bucket", "attnserve_batch_size_bucket",
                     "attnserve_flops_total", "attnserve_workspace_bytes",
                     "attnserve_kv_cache_bytes", "attnserve_sessions_active",
                     "process_resident_memory_bytes", "process_cpu_seconds_total",
                     "process_open_fds", "process_start_time_seconds"):
            with self.subTest(series=name):
                self.assertTrue(self.prometheus.query(f"{name}{{{self.sel}}}"), name)
        self.assertEqual(self.prometheus.value(f"attnserve_queue_capacity{{{self.sel}}}"),
                         QUEUE_CAPACITY)
        info = self.prometheus.query(f"attnserve_build_info{{{self.sel}}}")
        self.assertEqual(info[0][1], 1)
        self.assertIn("cpu", info[0][0]["backends"])
        self.assertGreater(self.prometheus.value(f"process_resident_memory_bytes{{{self.sel}}}"),
                           1 << 20)

    def test_counters_move_with_traffic(self):
        self.assertEqual(self.scraped_total("OK"), self.round1[0] + self.round2[0])
        self.assertEqual(self.scraped_total("INVALID_ARGUMENT"), self.round1[1] + self.round2[1])
        flops = self.prometheus.value(f"sum(attnserve_flops_total{{{self.sel}}})")
        self.assertAlmostEqual(flops, FLOPS_PER_CALL * (self.round1[0] + self.round2[0]),
                               delta=1)
        self.assertAlmostEqual(flops - self.flops_after_round1, FLOPS_PER_CALL * self.round2[0],
                               delta=1)
        # The OK counter went 20 -> 320 between scrapes inside the last minute.
        increase = self.prometheus.value(
            f'increase(attnserve_requests_total{{{self.sel},method="Attend",code="OK"}}[1m])')
        self.assertGreater(increase, 0)
        batches = self.prometheus.value(f"attnserve_batch_size_count{{{self.sel}}}")
        self.assertGreaterEqual(batches, 1)
        self.assertLessEqual(batches, self.round1[0] + self.round2[0])
        # Every valid call went through the queue once.
        queued = self.prometheus.value(f"attnserve_queue_duration_seconds_count{{{self.sel}}}")
        self.assertEqual(queued, self.round1[0] + self.round2[0])
        self.assertEqual(self.prometheus.value(f"attnserve_inflight_requests{{{self.sel}}}"), 0)

    def test_histogram_quantile_is_sane(self):
        bucket = f'attnserve_request_duration_seconds_bucket{{{self.sel},method="Attend"}}'
        p50 = self.prometheus.value(f"histogram_quantile(0.5, sum by (le) ({bucket}))")
        p99 = self.prometheus.value(f"histogram_quantile(0.99, sum by (le) ({bucket}))")
        # Server time is part of the client's time: never above the slowest call
        # (plus one bucket's interpolation), never below the first bucket.
        slowest = max(self.latencies)
        self.assertGreater(p50, 0)
        self.assertGreaterEqual(p99, p50)
        self.assertLessEqual(p50, 2 * slowest)
        self.assertLessEqual(p99, 2 * slowest)
        self.assertLess(p99, 5.0)
        # The rate form the dashboard and rules use also gives a number.
        rate_p90 = self.prometheus.value(
            f"histogram_quantile(0.9, sum by (le) (rate({bucket}[1m])))")
        self.assertIsNotNone(rate_p90)
        self.assertGreater(rate_p90, 0)
        self.assertLessEqual(rate_p90, 2 * slowest)

    def test_rules_loaded_and_healthy(self):
        text = RULES.read_text()
        expected = {line.split(":", 1)[1].strip() for line in text.splitlines()
                    if line.strip().startswith(("- alert:", "- record:"))}
        self.assertGreater(len(expected), 5)

        def evaluated_rules():
            rules = [r for g in self.prometheus.get("/api/v1/rules")["groups"]
                     for r in g["rules"]]
            if any(r["health"] == "unknown" for r in rules):
                return None  # not evaluated yet
            return rules

        rules = wait_for("every rule evaluated", evaluated_rules)
        self.assertEqual({r["name"] for r in rules}, expected)
        for r in rules:
            with self.subTest(rule=r["name"]):
                self.assertEqual(r["health"], "ok", r.get("lastError"))
        # Recording rules produce series from attnserve's metrics.
        utilization = wait_for("queue utilization recorded", lambda: self.prometheus.query(
            f"instance:attnserve_queue_utilization:ratio{{{self.sel}}}"))
        self.assertGreaterEqual(utilization[0][1], 0)
        self.assertLessEqual(utilization[0][1], 1)
        rate = wait_for("request rate recorded", lambda: self.prometheus.value(
            'sum(job:attnserve_requests:rate5m{job="attnserve"})'))
        self.assertGreater(rate, 0)
        # A healthy instance: its down alert does not fire.
        firing = self.prometheus.query('ALERTS{alertname="AttnserveInstanceDown"}')
        self.assertEqual(firing, [])


def main():
    harness.run_e2e(globals(), ("--prometheus", {"default": "/usr/bin/prometheus"}))


if __name__ == "__main__":
    main()
