"""e2e: amplification abuse against the memory budget, the cost model and the
cancellation of running work, while normal traffic keeps flowing.

Starts the attnserve binary with --memory_limit_bytes=1 GiB and
--kv_cache_bytes=256 MiB, runs a thread of normal calls (F32 Q/K/V
[1, 128, 8, 64], every answer checked against NumPy) and a sampler of the
server's VmRSS (every 50 ms), and meanwhile sends from other threads:
1. output amplification: 40 concurrent F16 calls with Q [1, 1, 65536, 1],
   K [1, 1, 1, 1], V [1, 1, 1, 1024], a 128 MiB output for a 128 KiB message;
2. scratch amplification: 3 decode-shaped F16 calls, Q [1, 1, 65536, 1],
   K [1, 16384, 1, 1], V [1, 16384, 1, 1024] (33 MB messages);
3. compute amplification: F16 Q/K/V [1, 100000, 1, 1] with top_k = 64 and a
   3 s client deadline.
Every abusive call must end OK or RESOURCE_EXHAUSTED (or DEADLINE_EXCEEDED /
CANCELLED where the client gave up), every normal call OK and correct, the
server's peak RSS within budget + KV cache + 256 MiB, /metrics must show
memory rejections and no reserved bytes once it is over, and SIGTERM must
make the server exit 0.

This runs against two servers, one after the other. The first keeps the
default --max_request_flops (1e12): patterns 2 and 3 cost more than that
(over 2e12 and 1e13 FLOP-equivalents) and must be refused for cost. The second
has --max_request_flops=0 (no limit), so the expensive calls are really
admitted and only cancellation can stop them: there a small call sent right
after an abandoned compute-amplification call (deadline passed, or cancelled
by the client) must be answered within 1 s.

A summary (codes per pattern, peak RSS, normal-call p50/p99 before and during
the abuse) is printed for the CI log.

Usage: abuse_e2e_test.py --server=PATH --python_path=DIR --work_dir=DIR
"""

import collections
import concurrent.futures
import pathlib
import re
import socket
import sys
import threading
import time
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

MiB = 1 << 20
MEMORY_LIMIT_BYTES = 1 << 30
KV_CACHE_BYTES = 256 * MiB
# The budget bounds what requests hold; the KV cache has its own bound; the
# process itself (code, gRPC, threads, allocator slack) gets 256 MiB.
RSS_BOUND_BYTES = MEMORY_LIMIT_BYTES + KV_CACHE_BYTES + 256 * MiB
# 128 MiB responses plus the protobuf framing.
MAX_MESSAGE_BYTES = 256 * MiB

NORMAL_SHAPE = (1, 128, 8, 64)
NORMAL_TIMEOUT_S = 30.0  # generous: normal calls may queue behind admitted abuse
NORMAL_RTOL = 1e-5
BASELINE_S = 2.0

OUTPUT_CALLS = 40
OUTPUT_HEADS, OUTPUT_VALUE_DIM = 65536, 1024
OUTPUT_TIMEOUT_S = 60.0  # these are cheap; they must never be given up on
SCRATCH_CALLS = 3
SCRATCH_KEYS = 16384
SCRATCH_DEADLINE_S = 4.0
COMPUTE_LEN = 100000
COMPUTE_TOP_K = 64
COMPUTE_DEADLINE_S = 3.0
# The burst starts after the scratch and compute calls have arrived (sending
# three 33 MB messages from Python takes ~0.5 s on 2 busy cores).
OUTPUT_DELAY_S = 1.0
SMALL_CALL_BOUND_S = 1.0

GAVE_UP = ("DEADLINE_EXCEEDED", "CANCELLED")


def percentile(values, p):
    return float(np.percentile(values, p)) if values else float("nan")


class RssSampler(threading.Thread):
    """Reads VmRSS of `pid` every 50 ms until stopped; keeps the peak."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_bytes = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            rss = proc_status_bytes(self.pid, "VmRSS")
            if rss is not None:
                self.peak_bytes = max(self.peak_bytes, rss)
                self.samples += 1
            self._stop_event.wait(0.05)

    def stop(self):
        self._stop_event.set()
        self.join()


def proc_status_bytes(pid, field):
    """A "kB" field of /proc/<pid>/status in bytes, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class NormalTraffic(threading.Thread):
    """Closed-loop S1-like calls on a channel of their own, each answer
    checked against NumPy. Records (start, end, server total_us, code,
    error) per call."""

    def __init__(self, target, rng):
        super().__init__(daemon=True)
        self.client = attnserve_client.Client(
            target, timeout=NORMAL_TIMEOUT_S, options=[("grpc.use_local_subchannel_pool", 1)])
        # A few input sets, their NumPy outputs computed once.
        self.cases = []
        for _ in range(4):
            q, k, v = (rng.standard_normal(NORMAL_SHAPE).astype(np.float32) for _ in range(3))
            want, _ = numpy_attention.attention(q, k, v)
            self.cases.append((q, k, v, want))
        self.calls = []
        self._stop_event = threading.Event()

    def run(self):
        i = 0
        while not self._stop_event.is_set():
            q, k, v, want = self.cases[i % len(self.cases)]
            i += 1
            start = time.monotonic()
            code, error, total_us = "OK", "", 0
            try:
                result = self.client.attend(q, k, v)
                got, total_us = result.output, result.timing["total_us"]
                err = rel_error(got, want)
                if got.shape != want.shape or not err <= NORMAL_RTOL:
                    code, error = "WRONG", f"shape {got.shape}, relative error {err:.3g}"
            except grpc.RpcError as e:
                code, error = e.code().name, e.details()
            except Exception as e:  # noqa: BLE001 -- recorded, so the test fails on it
                code, error = "EXCEPTION", repr(e)
            self.calls.append((start, time.monotonic(), total_us, code, error))
            self._stop_event.wait(0.01)

    def stop(self):
        self._stop_event.set()
        self.join()
        self.client.close()

    def latencies_ms(self, begin, end):
        """Latencies of the OK calls that overlap [begin, end]."""
        return [(e - s) * 1e3 for s, e, _, code, _ in self.calls
                if code == "OK" and e >= begin and s <= end]


def rel_error(got, want):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def timed(check, method, request, timeout):
    """Calls method(request, timeout=timeout); returns (code name, details,
    seconds), the code and details from check(response) when it succeeds."""
    start = time.monotonic()
    try:
        response = method(request, timeout=timeout)
    except grpc.RpcError as e:
        return e.code().name, e.details(), time.monotonic() - start
    seconds = time.monotonic() - start
    return (*check(response), seconds)


def half(rng, shape):
    return rng.standard_normal(shape).astype(np.float16)


class AbuseE2ETest(unittest.TestCase):
    def start_server(self, name, extra_args=()):
        work = pathlib.Path(ARGS.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        server = harness.ServerProcess(
            ARGS.server, work / f"{name}.log",
            [f"--memory_limit_bytes={MEMORY_LIMIT_BYTES}", f"--kv_cache_bytes={KV_CACHE_BYTES}",
             *extra_args])
        # A channel opened before the server listens retries only after
        # seconds of gRPC's reconnect backoff; wait for the port instead.
        give_up = time.monotonic() + 20
        while time.monotonic() < give_up and server.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        client = attnserve_client.Client(server.target, timeout=10)
        try:
            server.wait_serving(client)
        except Exception:
            server.stop()
            raise
        finally:
            client.close()
        self.addCleanup(self.stop_if_running, server)
        return server

    @staticmethod
    def stop_if_running(server):
        if server.proc.poll() is None:
            server.stop()

    def abuse_stub(self, server):
        channel = grpc.insecure_channel(server.target, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1)])
        self.addCleanup(channel.close)
        return attnserve_client.attention_pb2_grpc.AttentionServiceStub(channel)

    def metrics(self, server):
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()

        def value(pattern):
            m = re.search(r"^" + pattern + r" (\S+)$", text, re.MULTILINE)
            self.assertIsNotNone(m, f"{pattern} missing from /metrics")
            return float(m.group(1))

        rejected = {reason: value(r'attnserve_rejected_requests_total\{reason="%s"\}' % reason)
                    for reason in ("memory", "queue", "cost", "size")}
        return {"reserved": value("attnserve_memory_reserved_bytes"),
                "limit": value("attnserve_memory_limit_bytes"), "rejected": rejected}

    def wait_reserved_zero(self, server, timeout=10.0):
        """Polls /metrics until no bytes are reserved; returns the last value."""
        give_up = time.monotonic() + timeout
        while True:
            reserved = self.metrics(server)["reserved"]
            if reserved == 0 or time.monotonic() > give_up:
                return reserved
            time.sleep(0.1)

    # --- the abusive patterns -------------------------------------------------
    # Requests are built before the abuse starts (16M random halves take a
    # second of Python), so each pattern only sends. Each pattern returns a
    # list of (code name, details, seconds) per call, having checked the
    # outputs of the calls that were answered.

    @staticmethod
    def output_requests(rng):
        """The output-amplification calls and V's row, every head's output."""
        q = np.ones((1, 1, OUTPUT_HEADS, 1), np.float16)
        k = np.ones((1, 1, 1, 1), np.float16)
        v = half(rng, (1, 1, 1, OUTPUT_VALUE_DIM))
        requests = [attnserve_client.build_request(q, k, v, dtype="f16",
                                                   request_id=f"output-{i}")
                    for i in range(OUTPUT_CALLS)]
        return requests, v.reshape(1, OUTPUT_VALUE_DIM)

    @staticmethod
    def scratch_requests(rng):
        q = half(rng, (1, 1, OUTPUT_HEADS, 1))
        k = half(rng, (1, SCRATCH_KEYS, 1, 1))
        v = half(rng, (1, SCRATCH_KEYS, 1, OUTPUT_VALUE_DIM))
        return [attnserve_client.build_request(q, k, v, dtype="f16", request_id=f"scratch-{i}")
                for i in range(SCRATCH_CALLS)]

    @staticmethod
    def compute_request(rng):
        q, k, v = (half(rng, (1, COMPUTE_LEN, 1, 1)) for _ in range(3))
        return attnserve_client.build_request(q, k, v, dtype="f16", top_k=COMPUTE_TOP_K,
                                              request_id="compute")

    @staticmethod
    def output_amplification(stub, prepared):
        requests, v_row = prepared
        start = threading.Barrier(len(requests))

        def call(request):
            start.wait()
            return timed(check, stub.Attend, request, OUTPUT_TIMEOUT_S)

        def check(response):
            # One key: every head's output is V's row, exactly.
            out = response.output
            if list(out.shape) != [1, 1, OUTPUT_HEADS, OUTPUT_VALUE_DIM]:
                return "WRONG", f"output shape {list(out.shape)}"
            rows = np.frombuffer(out.data, "<f2").reshape(OUTPUT_HEADS, OUTPUT_VALUE_DIM)
            sampled = np.concatenate([rows[::257], rows[-1:]])
            if not np.array_equal(sampled, np.broadcast_to(v_row, sampled.shape)):
                return "WRONG", "output rows differ from V"
            return "OK", ""

        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(call, requests))

    @staticmethod
    def scratch_amplification(stub, requests):
        def check(response):
            if list(response.output.shape) != [1, 1, OUTPUT_HEADS, OUTPUT_VALUE_DIM]:
                return "WRONG", f"output shape {list(response.output.shape)}"
            return "OK", ""

        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(
                lambda r: timed(check, stub.Attend, r, SCRATCH_DEADLINE_S), requests))

    @staticmethod
    def compute_amplification(stub, request):
        def check(response):
            if list(response.top_k_indices.shape) != [1, 1, COMPUTE_LEN, COMPUTE_TOP_K]:
                return "WRONG", f"top_k_indices shape {list(response.top_k_indices.shape)}"
            return "OK", ""

        return [timed(check, stub.Attend, request, COMPUTE_DEADLINE_S)]

    @staticmethod
    def small_call_after(stub, expensive, give_up):
        """Sends the `expensive` request, lets `give_up(future)` end it on the
        client side, then times a small call. Returns (code of the expensive
        call, seconds it ran, seconds the small call took)."""
        small = attnserve_client.build_request(
            *(np.full((1, 16, 2, 32), 0.5, np.float16) for _ in range(3)), request_id="small")
        started = time.monotonic()
        future = stub.Attend.future(expensive, timeout=COMPUTE_DEADLINE_S)
        give_up(future)
        try:
            future.result()
            code = "OK"
        except grpc.FutureCancelledError:
            code = "CANCELLED"
        except grpc.RpcError as e:
            code = e.code().name
        abandoned = time.monotonic() - started
        t = time.monotonic()
        stub.Attend(small, timeout=10)
        return code, abandoned, time.monotonic() - t

    # --- the scenario -----------------------------------------------------------

    def run_abuse(self, name, extra_args, check_cancellation):
        began = time.monotonic()
        stages = []  # (stage, seconds since began), for the summary

        def stage(what):
            stages.append((what, time.monotonic() - began))

        rng = np.random.default_rng(20261201)
        server = self.start_server(name, extra_args)
        stage("serving")
        sampler = RssSampler(server.proc.pid)
        sampler.start()
        normal = NormalTraffic(server.target, rng)
        normal.start()
        stub = self.abuse_stub(server)
        try:
            baseline_end = time.monotonic() + BASELINE_S
            # The scratch and compute calls go first, so that they compete for
            # the budget with the burst instead of all arriving once it has
            # taken the budget (they would then only ever be refused).
            patterns = {
                "scratch": (0.0, self.scratch_amplification, self.scratch_requests(rng)),
                "compute": (0.0, self.compute_amplification, self.compute_request(rng)),
                "output": (OUTPUT_DELAY_S, self.output_amplification, self.output_requests(rng))}
            expensive = self.compute_request(rng)
            time.sleep(max(0.0, baseline_end - time.monotonic()))
            abuse_begin = time.monotonic()
            stage("abuse")

            def run_pattern(delay, fn, prepared):
                time.sleep(delay)
                return fn(stub, prepared)

            with concurrent.futures.ThreadPoolExecutor(len(patterns)) as pool:
                futures = {p: pool.submit(run_pattern, *args) for p, args in patterns.items()}
                results = {p: f.result() for p, f in futures.items()}
            abuse_end = time.monotonic()
            stage("abuse over")
            after_burst = self.metrics(server)

            small_calls = []
            if check_cancellation:
                small_calls.append(("its deadline",) + self.small_call_after(
                    stub, expensive, lambda future: None))
                small_calls.append(("a client cancel",) + self.small_call_after(
                    stub, expensive, lambda future: (time.sleep(1.5), future.cancel())))
                stage("cancellation checked")
        finally:
            normal.stop()
        stage("normal traffic stopped")
        reserved_at_end = self.wait_reserved_zero(server)
        stage("reservations checked")
        final = self.metrics(server)
        hwm = proc_status_bytes(server.proc.pid, "VmHWM")
        sampler.stop()
        alive = server.proc.poll() is None
        log = server.log()
        stage("SIGTERM")
        exit_code = server.stop() if alive else server.proc.returncode
        stage("exited")

        self.print_summary(name, extra_args, dict(
            normal=normal, sampler=sampler, abuse_begin=abuse_begin, abuse_end=abuse_end,
            results=results, after_burst=after_burst, final=final,
            reserved_at_end=reserved_at_end, hwm=hwm, small_calls=small_calls, stages=stages))

        self.assertTrue(alive, f"attnserve died during the abuse:\n{log}")
        allowed = {"output": {"OK", "RESOURCE_EXHAUSTED"},
                   "scratch": {"OK", "RESOURCE_EXHAUSTED", *GAVE_UP},
                   "compute": {"OK", "RESOURCE_EXHAUSTED", *GAVE_UP}}
        for p, r in results.items():
            unexpected = [(code, details) for code, details, _ in r if code not in allowed[p]]
            self.assertEqual(unexpected, [], f"{p} amplification: unexpected outcomes")
        failed = [(code, error) for _, _, _, code, error in normal.calls if code != "OK"]
        self.assertEqual(failed, [], "normal calls failed during the abuse")
        self.assertGreater(len(normal.latencies_ms(abuse_begin, abuse_end)), 0,
                           "no normal call overlapped the abuse")
        self.assertGreater(after_burst["rejected"]["memory"], 0,
                           "the output-amplification burst was never refused for memory")
        # Requests reserve from three quarters; gRPC's buffers get the rest.
        self.assertEqual(final["limit"], MEMORY_LIMIT_BYTES - MEMORY_LIMIT_BYTES // 4)
        self.assertEqual(reserved_at_end, 0, "memory still reserved after every call ended")
        self.assertLessEqual(sampler.peak_bytes, RSS_BOUND_BYTES, "sampled VmRSS over the bound")
        self.assertIsNotNone(hwm)
        self.assertLessEqual(hwm, RSS_BOUND_BYTES, "VmHWM over the bound")
        for what, code, abandoned, small_s in small_calls:
            self.assertIn(code, GAVE_UP, f"expensive call ended by {what}")
            self.assertLessEqual(small_s, SMALL_CALL_BOUND_S,
                                 f"small call after an expensive call ended by {what}")
        self.assertEqual(exit_code, 0, f"attnserve exited {exit_code} after SIGTERM, expected "
                                       f"0:\n{log}")
        return results, final

    @staticmethod
    def print_summary(name, extra_args, v):
        """Prints what run_abuse measured (`v`) for the CI log."""
        normal, sampler = v["normal"], v["sampler"]
        abuse_begin, abuse_end = v["abuse_begin"], v["abuse_end"]
        print(f"\n[{name}] {' '.join(extra_args) or 'default --max_request_flops'}")
        for p, r in v["results"].items():
            codes = collections.Counter(code for code, _, _ in r)
            slowest = max(seconds for _, _, seconds in r)
            print(f"  {p:7s} amplification: {dict(codes)}, slowest call {slowest:.2f} s")
            for code, details in {code: d for code, d, _ in r if code != "OK"}.items():
                print(f"    e.g. {code}: {details[:300]}")
        print(f"  rejected after the burst {v['after_burst']['rejected']}, at the end "
              f"{v['final']['rejected']}; reserved at the end {v['reserved_at_end']:.0f} bytes")
        print(f"  server peak RSS: sampled VmRSS {sampler.peak_bytes / MiB:.0f} MiB "
              f"({sampler.samples} samples), VmHWM {(v['hwm'] or 0) / MiB:.0f} MiB; "
              f"bound {RSS_BOUND_BYTES / MiB:.0f} MiB")
        baseline = [c for c in normal.calls if c[3] == "OK" and c[1] < abuse_begin]
        during = [c for c in normal.calls if c[3] == "OK" and c[1] >= abuse_begin and
                  c[0] <= abuse_end]
        codes = dict(collections.Counter(c[3] for c in normal.calls))
        print(f"  normal calls {codes}:")
        for what, calls, seconds in (("without abuse", baseline, BASELINE_S),
                                     ("during abuse", during, abuse_end - abuse_begin)):
            wall = [(e - s) * 1e3 for s, e, _, _, _ in calls]
            server_ms = [c[2] / 1e3 for c in calls]
            print(f"    {what}: {len(calls)} calls in {seconds:.1f} s, p50/p99 "
                  f"{percentile(wall, 50):.1f}/{percentile(wall, 99):.1f} ms "
                  f"(server total_us p50/p99 {percentile(server_ms, 50):.1f}/"
                  f"{percentile(server_ms, 99):.1f} ms)")
        for what, code, abandoned, small_s in v["small_calls"]:
            print(f"  compute call ended by {what}: {code} after {abandoned:.2f} s; "
                  f"the next small call took {small_s * 1e3:.0f} ms")
        print("  timeline: " + ", ".join(f"{what} {t:.1f} s" for what, t in v["stages"]))
        sys.stdout.flush()

    def test_default_cost_limit(self):
        """Patterns 2 and 3 are over the default cost limit: refused for cost."""
        results, final = self.run_abuse("default_cost_limit", (), check_cancellation=False)
        for p in ("scratch", "compute"):
            for code, details, _ in results[p]:
                self.assertEqual(code, "RESOURCE_EXHAUSTED", f"{p}: {details}")
                self.assertIn("--max_request_flops", details)
        self.assertGreaterEqual(final["rejected"]["cost"], SCRATCH_CALLS + 1)

    def test_no_cost_limit(self):
        """Everything within the budget is admitted; cancellation stops it."""
        self.run_abuse("no_cost_limit", ("--max_request_flops=0",), check_cancellation=True)


def main():
    harness.run_e2e(globals())


if __name__ == "__main__":
    main()
