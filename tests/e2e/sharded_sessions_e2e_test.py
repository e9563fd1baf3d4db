"""e2e: KV-cache sessions split over three attnserve replicas
(CreateSession.shards), all on loopback.

Three replicas, each with a --kv_cache_bytes too small for the contexts used
here and --peers listing all three (this one among them):
- a shards=3 session of about 2.85x what one replica's cache holds (a plain
  session's capacity_tokens) prefills in chunks (one crossing a shard
  boundary) and decodes with Decode and BatchDecode, two layers stepping in
  order; every output matches NumPy over the whole context (F32 cache: 1e-5
  relative; BF16 cache: 1.6e-2), and so does Decode's lse; the session's
  capacity is the three shards' together and shards 0 and 1 are full
  (contiguous placement);
- a RoPE session (theta 10000) split over the replicas equals the same steps
  on an unsharded RoPE session of a fourth replica with a larger cache;
- the same steps fed to two sessions give bitwise identical outputs and lse;
- shards=4 is FAILED_PRECONDITION naming the three peers; ForkSession of a
  sharded session, entropy on a sharded step, and model/max_tokens/windows
  with shards are INVALID_ARGUMENT; shards on a replica without --peers is
  FAILED_PRECONDITION;
- the coordinator's /metrics counts attnserve_partial_attend_total by peer and
  code, and the fan-out histogram;
- a coordinator with --session_idle_timeout_s=2 expires a sharded session and
  closes its shards on the peers (whose own timeout is long).
Three more replicas with --auth_tokens_file (peer, alice) and
--peer_token_file: alice's sharded session works; alice calling PartialAttend
herself is PERMISSION_DENIED, without a token UNAUTHENTICATED.
Three more: one SIGKILLed fails the next step UNAVAILABLE naming its shard,
the append another shard made for that step is truncated away, and
CloseSession frees the survivors' shards.

Usage: sharded_sessions_e2e_test.py --server=PATH --python_path=DIR --work_dir=DIR
"""

import math
import pathlib
import re
import sys
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

HQ, HKV, D = 4, 2, 32  # GQA, group of 2
LAYERS = 2
# Per replica: 512 tokens per layer of an F32 session of 2 layers (1 KiB a
# token), 1024 of a BF16 one.
KV_CACHE_BYTES = 512 << 10
BLOCK_TOKENS = 16
REPLICA_FLAGS = ["--threads=1", "--backends=cpu", f"--kv_cache_bytes={KV_CACHE_BYTES}",
                 f"--kv_block_tokens={BLOCK_TOKENS}"]
CONTEXT_FACTOR = 2.85  # the long sessions' context, in one replica's capacity
CHUNK = 300            # prefill chunk (not a multiple of a block or a shard)
# Relative to max|want|: F32 accumulates in FP32 (the parts and the merge);
# a BF16 cache rounds K/V, the query and P.V's probabilities.
RTOL = {"f32": 1e-5, "bf16": 1.6e-2}
ROPE = {"theta": 10000, "style": "neox"}
# --auth_tokens_file wants tokens of 16 characters or more.
PEER_TOKEN, ALICE_TOKEN = "PEERTOKEN-e2e-sharded", "ALICETOKEN-e2e-sharded"


def rel_error(got, want):
    """max |got - want| / max |want| over the finite entries (inf if the
    finite masks differ)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    finite = np.isfinite(want)
    if got.shape != want.shape or not np.array_equal(finite, np.isfinite(got)):
        return np.inf
    if not finite.any():
        return 0.0
    scale = max(np.max(np.abs(want[finite])), 1e-30)
    return float(np.max(np.abs(got[finite] - want[finite])) / scale)


def start_replicas(work, name, count, flags, *, peers=None, token=None):
    """Starts `count` replicas with `flags`; --peers lists them all unless
    `peers` (targets) is given. Returns (servers, clients), clients sending
    `token`; stops what it started if one fails."""
    ports = [harness.free_port() for _ in range(count)]
    if peers is None:
        peers = [f"127.0.0.1:{p}" for p in ports]
    servers, clients = [], []
    try:
        for i, port in enumerate(ports):
            server, client = harness.start_serving(
                ARGS.server, work, [*flags, f"--peers={','.join(peers)}", f"--replica_id={name}-{i}"],
                log_name=f"{name}-{i}.log", port=port, token=token)
            servers.append(server)
            clients.append(client)
    except Exception:
        stop_all(servers, clients)
        raise
    return servers, clients


def stop_all(servers, clients, *, check=False):
    for c in clients:
        c.close()
    failures = []
    for s in servers:
        try:
            if check and s.proc.returncode is None:
                s.stop_and_check()
            else:
                s.stop()
        except AssertionError as e:
            failures.append(str(e))
    if failures:
        raise AssertionError("\n".join(failures))


def metrics_text(server):
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def wait_for(predicate, timeout, what):
    give_up = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"after {timeout} s: {what}")
        time.sleep(0.1)


class History:
    """One sequence's steps, kept to check the server against NumPy: the
    K/V sent to each layer, and a random source of steps."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.k = [[] for _ in range(LAYERS)]
        self.v = [[] for _ in range(LAYERS)]

    def tokens(self, layer):
        return sum(k.shape[0] for k in self.k[layer])

    def make_step(self, lq, n):
        """q [lq, HQ, D], k/v [n, HKV, D]; V scaled so outputs are not tiny."""
        q = self.rng.standard_normal((lq, HQ, D)).astype(np.float32)
        k = self.rng.standard_normal((n, HKV, D)).astype(np.float32)
        v = (self.rng.standard_normal((n, HKV, D)) * 2).astype(np.float32)
        return q, k, v

    def append(self, layer, k, v):
        self.k[layer].append(k)
        self.v[layer].append(v)

    def want(self, layer, q, dtype):
        """NumPy attention of q (the newest positions) over the layer's whole
        context, inputs rounded to the cache dtype as the server sees them."""
        rounded = [attnserve_client.round_to(x, dtype)
                   for x in (q, np.concatenate(self.k[layer]), np.concatenate(self.v[layer]))]
        return numpy_attention.attention(*rounded, causal=True)


class SessionSteps:
    """Steps of sessions checked against NumPy, for the test cases below."""

    def assert_code(self, code, fn, *args, **kwargs):
        with self.assertRaises(grpc.RpcError) as cm:
            fn(*args, **kwargs)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        return cm.exception

    def active(self, clients=None):
        return [c.server_info().sessions.active for c in (clients or self.clients)]

    def plain_capacity(self, dtype, client=None):
        """capacity_tokens of a plain session (LAYERS layers) on one replica."""
        c = client or self.clients[0]
        s = c.create_session(HKV, D, dtype=dtype, num_layers=LAYERS)
        c.close_session(s)
        return s.capacity_tokens

    def check_step(self, r, history, layer, q, dtype, lse=True, what=""):
        """r (a DecodeResult) against NumPy over the layer's history."""
        want_out, want_lse = history.want(layer, q, dtype)
        self.assertEqual(r.context_tokens, history.tokens(layer), what)
        self.assertEqual(r.output.shape, q.shape, what)
        self.assertEqual(r.output.dtype, np.float32, what)
        err = rel_error(r.output, want_out)
        self.assertLessEqual(err, RTOL[dtype], f"{what}: output relative error {err:.3g}")
        if lse:
            self.assertIsNotNone(r.lse, what)
            self.assertEqual(r.lse.shape, (1, HQ, q.shape[0]), what)
            err = rel_error(r.lse, want_lse)
            self.assertLessEqual(err, RTOL[dtype], f"{what}: lse relative error {err:.3g}")

    def decode_layers(self, client, session, history, lq, n, *, dtype, batch=False,
                      check=True):
        """One step of every layer in order (Decode, or BatchDecode of one
        entry); checks each against NumPy. Returns the results."""
        results = []
        for layer in range(LAYERS):
            q, k, v = history.make_step(lq, n)
            if batch:
                r = attnserve_client.raise_first_error(
                    client.batch_decode(layer, [(session, q, k, v)]))[0]
            else:
                r = client.decode(session, q, k, v, layer=layer, lse=True)
            history.append(layer, k, v)
            if check:
                self.check_step(r, history, layer, q, dtype, lse=not batch,
                                what=f"{dtype} layer {layer} at {history.tokens(layer)} tokens"
                                     f"{' (BatchDecode)' if batch else ''}")
            results.append(r)
        return results

    def prefill(self, client, session, history, tokens, **kwargs):
        results = []
        while history.tokens(0) < tokens:
            n = min(CHUNK, tokens - history.tokens(0))
            results += self.decode_layers(client, session, history, n, n, **kwargs)
        return results


class ShardedSessionsE2ETest(SessionSteps, unittest.TestCase):
    servers, clients = [], []
    single = single_client = None
    expiring = expiring_client = None

    @classmethod
    def setUpClass(cls):
        cls.work = harness.fresh_dir(ARGS.work_dir)
        cls.servers, cls.clients = start_replicas(cls.work, "replica", 3, REPLICA_FLAGS)
        cls.peers = sorted(s.target for s in cls.servers)
        try:
            # Unsharded reference sessions: one replica whose cache holds them.
            cls.single, cls.single_client = harness.start_serving(
                ARGS.server, cls.work / "single",
                ["--threads=1", "--backends=cpu", f"--kv_cache_bytes={16 << 20}"])
            # A coordinator whose sessions expire after 2 s; its shards live on
            # the three replicas above (10 minutes' idle timeout).
            (cls.expiring,), (cls.expiring_client,) = start_replicas(
                cls.work, "expiring", 1, ["--threads=1", "--backends=cpu",
                                          "--session_idle_timeout_s=2"], peers=cls.peers)
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        others = [s for s in (cls.single, cls.expiring) if s is not None]
        other_clients = [c for c in (cls.single_client, cls.expiring_client) if c is not None]
        stop_all(cls.servers + others, cls.clients + other_clients, check=True)

    # --- a long context over three replicas -----------------------------------

    def run_long_context(self, dtype, seed):
        cap = self.plain_capacity(dtype)
        context = math.ceil(CONTEXT_FACTOR * cap)
        c = self.clients[1]
        s = c.create_session(HKV, D, dtype=dtype, num_layers=LAYERS, shards=3)
        try:
            self.assertEqual(s.capacity_tokens, 3 * cap)
            self.assertEqual(s.num_layers, LAYERS)
            self.assertGreater(context, 2.8 * cap)
            h = History(seed)
            self.prefill(c, s, h, context, dtype=dtype)
            # Contiguous: shards 0 and 1 full, shard 2 holding the rest.
            infos = [x.server_info().sessions for x in self.clients]
            self.assertEqual([i.active for i in infos], [1, 1, 1])
            used = sorted(i.kv_cache_used_bytes for i in infos)
            self.assertEqual(used[1:], [infos[0].kv_cache_capacity_bytes] * 2, infos)
            self.assertGreater(used[0], 0)
            for _ in range(3):
                self.decode_layers(c, s, h, 1, 1, dtype=dtype)
            for _ in range(3):
                self.decode_layers(c, s, h, 1, 1, dtype=dtype, batch=True)
            self.decode_layers(c, s, h, 3, 2, dtype=dtype)  # queries beyond the new tokens
            self.assertEqual(h.tokens(0), context + 8)
        finally:
            c.close_session(s)
        self.assertEqual(self.active(), [0, 0, 0])

    def test_long_context_f32_matches_numpy(self):
        self.run_long_context("f32", 1)

    def test_long_context_bf16_matches_numpy(self):
        self.run_long_context("bf16", 2)

    def test_rope_sharded_equals_unsharded(self):
        cap = self.plain_capacity("f32")
        sharded = self.clients[0].create_session(HKV, D, num_layers=LAYERS, rotary=ROPE,
                                                 shards=3)
        single = self.single_client.create_session(HKV, D, num_layers=LAYERS, rotary=ROPE)
        try:
            total = int(2.4 * cap)  # over all three shards
            steps = [(min(CHUNK, total - t),) * 2 + (False,) for t in range(0, total, CHUNK)]
            steps += [(1, 1, False)] * 2 + [(1, 1, True)] * 2 + [(4, 3, False)]
            h = History(3)
            for lq, n, batch in steps:
                for layer in range(LAYERS):
                    q, k, v = h.make_step(lq, n)
                    got = []
                    for c, s in ((self.clients[0], sharded), (self.single_client, single)):
                        if batch:
                            got.append(attnserve_client.raise_first_error(
                                c.batch_decode(layer, [(s, q, k, v)]))[0])
                        else:
                            got.append(c.decode(s, q, k, v, layer=layer, lse=True))
                    h.append(layer, k, v)
                    what = f"layer {layer} at {h.tokens(layer)} tokens"
                    self.assertEqual(got[0].context_tokens, got[1].context_tokens, what)
                    err = rel_error(got[0].output, got[1].output)
                    self.assertLessEqual(err, RTOL["f32"], f"{what}: output {err:.3g}")
                    if not batch:
                        err = rel_error(got[0].lse, got[1].lse)
                        self.assertLessEqual(err, RTOL["f32"], f"{what}: lse {err:.3g}")
        finally:
            self.clients[0].close_session(sharded)
            self.single_client.close_session(single)
        self.assertEqual(self.active(), [0, 0, 0])

    def test_bitwise_repeatable(self):
        # The same steps on two sessions, one after the other (the second's
        # shards start on another replica): the same bytes.
        cap = self.plain_capacity("f32")
        runs = []
        for _ in range(2):
            c = self.clients[2]
            s = c.create_session(HKV, D, num_layers=LAYERS, shards=3)
            try:
                h = History(4)
                results = self.prefill(c, s, h, int(2.3 * cap), dtype="f32", check=False)
                for batch in (False, True):
                    results += self.decode_layers(c, s, h, 1, 1, dtype="f32", batch=batch,
                                                  check=False)
                runs.append([(r.output.tobytes(), None if r.lse is None else r.lse.tobytes())
                             for r in results])
            finally:
                c.close_session(s)
        self.assertEqual(len(runs[0]), len(runs[1]))
        for i, (a, b) in enumerate(zip(*runs)):
            self.assertEqual(a, b, f"step {i} differs")

    # --- refusals -------------------------------------------------------------

    def test_refusals(self):
        c = self.clients[0]
        e = self.assert_code(grpc.StatusCode.FAILED_PRECONDITION, c.create_session, HKV, D,
                             shards=4)
        for peer in self.peers:
            self.assertIn(peer, e.details())
        e = self.assert_code(grpc.StatusCode.FAILED_PRECONDITION,
                             self.single_client.create_session, HKV, D, shards=2)
        self.assertIn("--peers", e.details())
        for options in ({"max_tokens": 64}, {"window_tokens": 32, "sink_tokens": 4},
                        {"model": "tiny"}):
            self.assert_code(grpc.StatusCode.INVALID_ARGUMENT, c.create_session, HKV, D,
                             shards=2, **options)
        self.assertEqual(self.active(), [0, 0, 0])
        s = c.create_session(HKV, D, shards=3)
        try:
            h = History(5)
            q, k, v = h.make_step(4, 4)
            c.decode(s, q, k, v)
            e = self.assert_code(grpc.StatusCode.INVALID_ARGUMENT, c.fork_session, s, 2)
            self.assertIn("split over replicas", e.details())
            q, k, v = h.make_step(1, 1)
            e = self.assert_code(grpc.StatusCode.INVALID_ARGUMENT, c.decode, s, q, k, v,
                                 entropy=True)
            self.assertIn("outputs", e.details())
            # Refused steps appended nothing.
            r = c.decode(s, q, k, v, expected_context_tokens=4)
            self.assertEqual(r.context_tokens, 5)
        finally:
            c.close_session(s)
        self.assert_code(grpc.StatusCode.NOT_FOUND, c.decode, s, q, k, v)
        self.assert_code(grpc.StatusCode.NOT_FOUND, c.close_session, s)

    def test_failed_step_is_all_or_nothing(self):
        # A step whose tokens straddle shards 0 and 1 while shard 1's replica
        # is full (its capacity was counted when the session opened): shard 1
        # fails, shard 0's append is truncated away, and once there is room
        # the same step goes through and the session matches NumPy.
        cap = self.plain_capacity("f32")
        c = self.clients[0]
        s = c.create_session(HKV, D, num_layers=LAYERS, shards=3)
        fillers = []
        try:
            h = History(12)
            self.prefill(c, s, h, cap - 10, dtype="f32")
            # Shard 0's replica is full; the others hold one block per layer
            # of their (empty) shards: fill the rest of them.
            infos = [x.server_info().sessions for x in self.clients]
            shard0 = [i.kv_cache_used_bytes == i.kv_cache_capacity_bytes for i in infos]
            self.assertEqual(sum(shard0), 1, infos)
            for i, x in enumerate(self.clients):
                if not shard0[i]:
                    f = x.create_session(HKV, D, num_layers=LAYERS)
                    fillers.append((x, f))
                    for layer in range(LAYERS):
                        x.decode(f, *History(13).make_step(1, f.capacity_tokens), layer=layer)
            # 10 tokens to shard 0, 40 to shard 1 (which has room for 16).
            q, k, v = h.make_step(2, 50)
            e = self.assert_code(grpc.StatusCode.RESOURCE_EXHAUSTED, c.decode, s, q, k, v)
            self.assertRegex(e.details(), r"^shard 1 \(127\.0\.0\.1:\d+\): ")
            for x, f in fillers:
                x.close_session(f)
            fillers = []
            for layer in range(LAYERS):
                if layer > 0:
                    q, k, v = h.make_step(2, 50)
                r = c.decode(s, q, k, v, layer=layer, lse=True,
                             expected_context_tokens=cap - 10)
                h.append(layer, k, v)
                self.check_step(r, h, layer, q, "f32", what=f"layer {layer} again")
            self.decode_layers(c, s, h, 1, 1, dtype="f32")
        finally:
            for x, f in fillers:
                x.close_session(f)
            c.close_session(s)

    def test_batch_decode_outputs(self):
        # BatchDecode's outputs (lse, entropy) as Decode's: lse comes back,
        # entropy is refused for a split session.
        c = self.clients[0]
        s = c.create_session(HKV, D, shards=3)
        try:
            h = History(6)
            q, k, v = h.make_step(3, 3)
            h.append(0, k, v)
            r = attnserve_client.raise_first_error(
                c.batch_decode(0, [(s, q, k, v)], lse=True))[0]
            self.assertIsNotNone(r.lse)
            q, k, v = h.make_step(1, 1)
            [r] = c.batch_decode(0, [(s, q, k, v)], entropy=True)
            self.assertIsInstance(r, attnserve_client.BatchDecodeError)
            self.assertEqual(r.code(), grpc.StatusCode.INVALID_ARGUMENT)
        finally:
            c.close_session(s)

    # --- metrics, expiry --------------------------------------------------------

    def test_metrics_count_partial_attend_by_peer(self):
        coordinator = self.servers[0]
        c = self.clients[0]
        s = c.create_session(HKV, D, num_layers=LAYERS, shards=3)
        try:
            self.prefill(c, s, History(7), int(2.5 * self.plain_capacity("f32")),
                         dtype="f32", check=False)
        finally:
            c.close_session(s)
        text = metrics_text(coordinator)
        for peer in self.peers:
            m = re.search(r'^attnserve_partial_attend_total\{(?=[^}]*code="OK")'
                          r'(?=[^}]*peer="' + re.escape(peer) + r'")[^}]*\} (\S+)$',
                          text, re.MULTILINE)
            self.assertIsNotNone(m, f"no partial_attend_total for {peer}:\n{text}")
            self.assertGreaterEqual(float(m.group(1)), 1)
        m = re.search(r"^attnserve_partial_attend_fanout_seconds_count (\S+)$", text,
                      re.MULTILINE)
        self.assertIsNotNone(m, text)
        self.assertGreaterEqual(float(m.group(1)), 1)

    def test_idle_expiry_closes_the_shards(self):
        wait_for(lambda: self.active() == [0, 0, 0], 5, "sessions left open")
        c = self.expiring_client
        s = c.create_session(HKV, D, num_layers=LAYERS, shards=3)
        h = History(8)
        self.decode_layers(c, s, h, 5, 5, dtype="f32")
        self.assertEqual(self.active(), [1, 1, 1])
        wait_for(lambda: self.active() == [0, 0, 0], 8,
                 f"shards still open on the peers: {self.active()}")
        q, k, v = h.make_step(1, 1)
        self.assert_code(grpc.StatusCode.NOT_FOUND, c.decode, s, q, k, v)


class AuthE2ETest(SessionSteps, unittest.TestCase):
    servers, clients = [], []

    @classmethod
    def setUpClass(cls):
        work = pathlib.Path(ARGS.work_dir) / "auth"
        work.mkdir(parents=True, exist_ok=True)
        tokens = work / "tokens"
        tokens.write_text(f"peer {PEER_TOKEN}\nalice {ALICE_TOKEN}\n")
        peer_token = work / "peer_token"
        peer_token.write_text(PEER_TOKEN + "\n")
        cls.servers, cls.clients = start_replicas(
            work, "auth", 3, [*REPLICA_FLAGS, f"--auth_tokens_file={tokens}",
                              f"--peer_token_file={peer_token}"], token=ALICE_TOKEN)

    @classmethod
    def tearDownClass(cls):
        stop_all(cls.servers, cls.clients, check=True)

    def partial_attend(self, target, token):
        channel = grpc.insecure_channel(target)
        try:
            stub = attnserve_client.attention_pb2_grpc.AttentionServiceStub(channel)
            request = attnserve_client.build_batch_decode_request(
                0, [("0" * 32, *History(9).make_step(1, 1))])
            metadata = [("authorization", f"Bearer {token}")] if token else None
            return stub.PartialAttend(request, timeout=10, metadata=metadata)
        finally:
            channel.close()

    def test_alice_sharded_session_and_partial_attend(self):
        c = self.clients[0]
        s = c.create_session(HKV, D, num_layers=LAYERS, shards=3)
        try:
            cap = s.capacity_tokens // 3
            h = History(10)
            self.prefill(c, s, h, int(2.2 * cap), dtype="f32")
            self.decode_layers(c, s, h, 1, 1, dtype="f32")
            self.assertEqual([x.server_info().sessions.active for x in self.clients], [1, 1, 1])
            # The session is alice's: the peer identity does not see it.
            with attnserve_client.Client(self.servers[0].target, token=PEER_TOKEN) as peer:
                with self.assertRaises(grpc.RpcError) as cm:
                    peer.decode(s, *h.make_step(1, 1))
                self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)
        finally:
            c.close_session(s)
        self.assertEqual([x.server_info().sessions.active for x in self.clients], [0, 0, 0])
        target = self.servers[1].target
        with self.assertRaises(grpc.RpcError) as cm:
            self.partial_attend(target, ALICE_TOKEN)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.PERMISSION_DENIED,
                         cm.exception.details())
        self.assertIn("--peer_callers", cm.exception.details())
        with self.assertRaises(grpc.RpcError) as cm:
            self.partial_attend(target, None)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        # The peer identity may call it (the session is unknown: the entry says so).
        response = self.partial_attend(target, PEER_TOKEN)
        self.assertEqual(response.results[0].code, grpc.StatusCode.NOT_FOUND.value[0])


class ReplicaKilledE2ETest(SessionSteps, unittest.TestCase):
    servers, clients = [], []

    @classmethod
    def setUpClass(cls):
        work = pathlib.Path(ARGS.work_dir) / "killed"
        work.mkdir(parents=True, exist_ok=True)
        cls.servers, cls.clients = start_replicas(work, "killed", 3, REPLICA_FLAGS)

    @classmethod
    def tearDownClass(cls):
        for s in cls.servers:
            if s.proc.poll() is not None:
                s.stop()  # the killed one
        stop_all([s for s in cls.servers if s.proc.poll() is None], cls.clients, check=True)

    def test_killed_replica_fails_the_step_and_close_frees_the_rest(self):
        # The coordinator is the replica that sorts last among the peers:
        # the first session's shard 0 is then another replica.
        order = sorted(range(3), key=lambda i: self.servers[i].target)
        coordinator = order[-1]
        c = self.clients[coordinator]
        s = c.create_session(HKV, D, num_layers=LAYERS, shards=3)
        cap = s.capacity_tokens // 3
        h = History(11)
        self.prefill(c, s, h, int(1.5 * cap), dtype="f32")
        # Which replica holds which shard: shard 0 full, 1 half, 2 empty.
        used = [x.server_info().sessions.kv_cache_used_bytes for x in self.clients]
        shard_of = {i: rank for rank, i in enumerate(sorted(range(3), key=lambda i: -used[i]))}
        self.assertNotEqual(shard_of[coordinator], 0, used)
        victim = next(i for i in range(3) if shard_of[i] == 0)
        appender = next(i for i in range(3) if shard_of[i] == 1)
        appender_used = used[appender]

        self.servers[victim].proc.kill()
        self.servers[victim].proc.wait()
        # A step appending 64 tokens (4 blocks) on shard 1, failing on shard 0.
        q, k, v = h.make_step(1, 4 * BLOCK_TOKENS)
        start = time.monotonic()
        with self.assertRaises(grpc.RpcError) as cm:
            c.decode(s, q, k, v, layer=0)
        e = cm.exception
        self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE, e.details())
        self.assertTrue(e.details().startswith(f"shard 0 ({self.servers[victim].target}): "),
                        e.details())
        self.assertLess(time.monotonic() - start, 10)
        # All or nothing: shard 1's append is truncated away.
        wait_for(lambda: self.clients[appender].server_info().sessions.kv_cache_used_bytes
                 == appender_used, 5, "shard 1 kept the failed step's append")
        start = time.monotonic()
        c.close_session(s)
        self.assertLess(time.monotonic() - start, 10)
        survivors = [self.clients[i] for i in range(3) if i != victim]
        self.assertEqual([x.server_info().sessions.active for x in survivors], [0, 0])
        self.assertEqual([x.server_info().sessions.kv_cache_used_bytes for x in survivors],
                         [0, 0])
        text = metrics_text(self.servers[coordinator])
        self.assertRegex(text, r'attnserve_partial_attend_total\{code="UNAVAILABLE",peer="'
                         + re.escape(self.servers[victim].target) + r'"\} 1')


if __name__ == "__main__":
    harness.run_e2e(globals())
