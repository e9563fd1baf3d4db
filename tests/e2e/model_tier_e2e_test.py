"""e2e: attnserve as the attention tier of a model server, through the Python
client package.

A tiny transformer (2 layers, hidden 64, Hq 4, Hkv 2, head_dim 16, RoPE NeoX
theta 10000, RMSNorm, an MLP, vocab 50, random weights from a fixed seed)
runs twice: all in NumPy (float64, its own RoPE and causal attention over its
own cache), and with its attention done by attnserve, which holds the KV
caches of every layer, rotates the keys and queries, and is sent unrotated
q/k/v per layer. Starts build/server/attnserve with --kv_block_tokens=4, then:
- prefills a 14-token prompt through a 2-layer RoPE session (one Decode per
  layer), forks it three times (3 full blocks shared per layer, the partial
  one copied: GetServerInfo's shared blocks and bytes, /metrics'
  attnserve_session_forks_total) and decodes 32 tokens in each fork, every
  layer-step of the three ONE BatchDecode; each step's logits must match the
  NumPy model's (attnserve_batch_decode_entries counts the entries);
- in that run, bad entries fail alone and change nothing: an unknown session
  (NOT_FOUND), a session twice in one call (INVALID_ARGUMENT), layer 1 before
  layer 0 and layer 0 twice (FAILED_PRECONDITION), a stale
  expected_context_tokens (FAILED_PRECONDITION); the next steps still match;
- ForkSession past the length and CreateSession with an odd rotary_dim fail
  with the documented codes;
- a sinks session (sink_tokens 4, window_tokens 8, RoPE GPT-J on 8 of 16
  dims) decodes 40 tokens; each step matches a NumPy StreamingLLM reference
  (the first block and the blocks holding the last 8 tokens, keys and the
  query rotated at their places in that kept cache) and context_tokens stays
  bounded;
- ModelSession (one prompt sequence, two forks) steps the model and matches;
- one BatchDecodeStream carries two micro-batches per layer-step, the
  responses matched by request_id.
Finally SIGTERM must make the server exit 0.

Usage: model_tier_e2e_test.py --server=PATH --python_path=DIR --work_dir=DIR
"""

import pathlib
import queue
import re
import sys
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

BLOCK_TOKENS = 4
KV_CACHE_BYTES = 64 << 20

# The model.
LAYERS, HIDDEN, HQ, HKV, D, MLP, VOCAB = 2, 64, 4, 2, 16, 128, 50
THETA = 10000.0
ROTARY = {"theta": THETA, "style": "neox"}  # rotary_dim 0 = head_dim
PROMPT_TOKENS = 14  # 3 full blocks of 4 and a partial one
FORK_FIRST_TOKENS = (3, 17, 42)  # each fork starts its continuation differently
DECODE_STEPS = 32
# Logits: F32 attention on the server against float64 NumPy.
RTOL = ATOL = 1e-4

# The sinks session.
SINK_TOKENS, WINDOW_TOKENS = 4, 8
SINK_ROTARY = {"theta": THETA, "style": "gptj", "rotary_dim": 8}
SINK_STEPS = 40


def rope(x, positions, *, theta=THETA, rotary_dim=0, style="neox"):
    """x [L, H, D] rotated (float64): token t at positions[t]; the pairs
    (i, i + rd/2) for NeoX, (2i, 2i + 1) for GPT-J, angle pos * theta^(-2i/rd);
    dims past rotary_dim unchanged."""
    x = np.array(x, dtype=np.float64)
    rd = rotary_dim or x.shape[-1]
    inv_freq = theta ** (-np.arange(0, rd, 2, dtype=np.float64) / rd)
    angle = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    if style == "neox":
        a, b = x[..., :rd // 2].copy(), x[..., rd // 2:rd].copy()
        x[..., :rd // 2], x[..., rd // 2:rd] = a * cos - b * sin, b * cos + a * sin
    else:
        a, b = x[..., 0:rd:2].copy(), x[..., 1:rd:2].copy()
        x[..., 0:rd:2], x[..., 1:rd:2] = a * cos - b * sin, b * cos + a * sin
    return x


def rms_norm(x, gain):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * gain


class TinyModel:
    """The weights and the per-layer pieces around attention (float64)."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)

        def w(fan_in, fan_out):
            return rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)

        self.embed = rng.standard_normal((VOCAB, HIDDEN))
        self.layers = []
        for _ in range(LAYERS):
            self.layers.append({
                "g_attn": 1 + 0.1 * rng.standard_normal(HIDDEN),
                "wq": w(HIDDEN, HQ * D), "wk": w(HIDDEN, HKV * D), "wv": w(HIDDEN, HKV * D),
                "wo": w(HQ * D, HIDDEN),
                "g_mlp": 1 + 0.1 * rng.standard_normal(HIDDEN),
                "w1": w(HIDDEN, MLP), "w2": w(MLP, HIDDEN)})
        self.g_final = 1 + 0.1 * rng.standard_normal(HIDDEN)
        self.lm_head = w(HIDDEN, VOCAB)

    def qkv(self, layer, x):
        """Unrotated q [n, HQ, D], k and v [n, HKV, D] of hidden states x [n, HIDDEN]."""
        p = self.layers[layer]
        h = rms_norm(x, p["g_attn"])
        n = x.shape[0]
        return ((h @ p["wq"]).reshape(n, HQ, D), (h @ p["wk"]).reshape(n, HKV, D),
                (h @ p["wv"]).reshape(n, HKV, D))

    def finish_layer(self, layer, x, attn):
        """The residual stream after attention output attn [n, HQ, D] and the MLP."""
        p = self.layers[layer]
        x = x + np.asarray(attn, dtype=np.float64).reshape(x.shape[0], HQ * D) @ p["wo"]
        h = rms_norm(x, p["g_mlp"]) @ p["w1"]
        return x + (h / (1 + np.exp(-h))) @ p["w2"]  # SiLU

    def logits(self, x):
        return rms_norm(x, self.g_final) @ self.lm_head


MODEL = TinyModel(seed=20260)


class NumpySequence:
    """One sequence run entirely in NumPy: its own rotated-key cache per layer."""

    def __init__(self):
        self.k = [np.zeros((0, HKV, D)) for _ in range(LAYERS)]
        self.v = [np.zeros((0, HKV, D)) for _ in range(LAYERS)]

    @property
    def length(self):
        return self.k[0].shape[0]

    def forward(self, tokens):
        """Logits [n, VOCAB] of the new tokens."""
        x = MODEL.embed[np.asarray(tokens)]
        positions = np.arange(self.length, self.length + len(tokens))
        for layer in range(LAYERS):
            q, k, v = MODEL.qkv(layer, x)
            self.k[layer] = np.concatenate([self.k[layer], rope(k, positions)])
            self.v[layer] = np.concatenate([self.v[layer], v])
            out, _ = numpy_attention.attention(rope(q, positions), self.k[layer], self.v[layer],
                                               causal=True)
            x = MODEL.finish_layer(layer, x, out)
        return MODEL.logits(x)

    def fork(self, tokens):
        s = NumpySequence()
        s.k = [k[:tokens].copy() for k in self.k]
        s.v = [v[:tokens].copy() for v in self.v]
        return s


def f32(x):
    return np.asarray(x, dtype=np.float32)


def server_forward(step_layer, tokens_per_seq):
    """Runs the model over new tokens of several sequences with attnserve doing
    attention: step_layer(layer, qs, ks, vs) returns one output per sequence.
    Returns the logits, one [n, VOCAB] per sequence."""
    xs = [MODEL.embed[np.asarray(t)] for t in tokens_per_seq]
    for layer in range(LAYERS):
        qkv = [MODEL.qkv(layer, x) for x in xs]
        outs = step_layer(layer, [f32(q) for q, _, _ in qkv], [f32(k) for _, k, _ in qkv],
                          [f32(v) for _, _, v in qkv])
        xs = [MODEL.finish_layer(layer, x, o) for x, o in zip(xs, outs)]
    return [MODEL.logits(x) for x in xs]


def streaming_kept(total):
    """Token indices a sinks session keeps after `total` tokens: the first
    ceil(SINK_TOKENS / BLOCK_TOKENS) blocks and every block holding one of the
    last WINDOW_TOKENS tokens."""
    sink_end = -(-SINK_TOKENS // BLOCK_TOKENS) * BLOCK_TOKENS
    window_start = ((total - WINDOW_TOKENS) // BLOCK_TOKENS) * BLOCK_TOKENS
    return [j for j in range(total) if j < sink_end or j >= window_start]


class ModelTierE2ETest(unittest.TestCase):
    server = None
    client = None

    @classmethod
    def setUpClass(cls):
        cls.server, cls.client = harness.start_serving(
            ARGS.server, ARGS.work_dir,
            [f"--kv_cache_bytes={KV_CACHE_BYTES}", f"--kv_block_tokens={BLOCK_TOKENS}"])

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop_and_check()

    # --- helpers ------------------------------------------------------------

    def metrics_text(self):
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def metric(self, text, pattern):
        m = re.search(r"^" + pattern + r" (\S+)$", text, re.MULTILINE)
        self.assertIsNotNone(m, f"{pattern} missing from /metrics")
        return float(m.group(1))

    def closing(self, session):
        """Closes `session` when the test ends, if it is still open."""
        def close():
            try:
                self.client.close_session(session)
            except grpc.RpcError:
                pass
        self.addCleanup(close)
        return session

    def assert_code(self, code, fn, *args, **kwargs):
        with self.assertRaises(grpc.RpcError) as cm:
            fn(*args, **kwargs)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        return cm.exception

    def assert_entry_error(self, result, code, *words):
        self.assertIsInstance(result, attnserve_client.BatchDecodeError)
        self.assertEqual(result.code(), code, result.details())
        for w in words:
            self.assertIn(w, result.details())

    def assert_logits(self, got, want, what):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=what)

    def random_tokens(self, rng, n):
        return [int(t) for t in rng.integers(0, VOCAB, n)]

    # --- tests --------------------------------------------------------------

    def test_forks_batch_decode_match_numpy(self):
        c = self.client
        rng = np.random.default_rng(1)
        prompt = self.random_tokens(rng, PROMPT_TOKENS)
        before = self.metrics_text()
        forks_before = self.metric(before, "attnserve_session_forks_total")
        entries_count_before = self.metric(before, "attnserve_batch_decode_entries_count")
        entries_sum_before = self.metric(before, "attnserve_batch_decode_entries_sum")

        # Prefill, layer by layer: one Decode of all the prompt's tokens each.
        parent = self.closing(
            c.create_session(HKV, D, dtype="f32", num_layers=LAYERS, rotary=ROTARY))
        self.assertEqual(parent.num_layers, LAYERS)
        self.assertEqual(parent.block_tokens, BLOCK_TOKENS)
        reference = NumpySequence()
        want = reference.forward(prompt)

        def decode_layer(layer, qs, ks, vs):
            r = c.decode(parent, qs[0], ks[0], vs[0], layer=layer)
            self.assertEqual(r.context_tokens, PROMPT_TOKENS)
            return [r.output]

        got, = server_forward(decode_layer, [prompt])
        self.assertEqual(got.shape, (PROMPT_TOKENS, VOCAB))
        self.assert_logits(got, want, "prefill logits")

        # Three forks of the prompt: 3 full blocks shared per layer, 2 tokens copied.
        forks = [self.closing(c.fork_session(parent, PROMPT_TOKENS)) for _ in FORK_FIRST_TOKENS]
        for f in forks:
            self.assertEqual(f.context_tokens, PROMPT_TOKENS)
            self.assertEqual(f.shared_tokens, PROMPT_TOKENS // BLOCK_TOKENS * BLOCK_TOKENS)
            self.assertEqual(f.num_layers, LAYERS)
        info = c.server_info().sessions
        self.assertEqual(info.kv_blocks_shared, LAYERS * (PROMPT_TOKENS // BLOCK_TOKENS))
        self.assertGreater(info.kv_cache_shared_bytes, 0)
        self.assertLessEqual(info.kv_cache_shared_bytes, info.kv_cache_used_bytes)
        text = self.metrics_text()
        self.assertEqual(self.metric(text, "attnserve_session_forks_total") - forks_before,
                         len(forks))
        self.assertEqual(self.metric(text, "attnserve_kv_blocks_shared"), info.kv_blocks_shared)
        self.assertEqual(self.metric(text, r'attnserve_kv_cache_bytes\{state="shared"\}'),
                         info.kv_cache_shared_bytes)
        # The parent is done: its blocks stay, held by the forks.
        c.close_session(parent)
        self.assertEqual(c.server_info().sessions.kv_blocks_shared, info.kv_blocks_shared)

        refs = [reference.fork(PROMPT_TOKENS) for _ in forks]
        tokens = list(FORK_FIRST_TOKENS)
        generated = [[] for _ in forks]
        calls = entries = 0
        junk = (np.ones((1, HQ, D), np.float32), np.ones((1, HKV, D), np.float32),
                np.ones((1, HKV, D), np.float32))

        for step in range(DECODE_STEPS):
            length = PROMPT_TOKENS + step  # tokens each fork's layers hold before the step
            if step == 7:
                # Layer 1 before layer 0: refused, nothing appended.
                r = c.batch_decode(1, [(forks[1], *junk)])
                calls, entries = calls + 1, entries + 1
                self.assert_entry_error(r[0], grpc.StatusCode.FAILED_PRECONDITION,
                                        "entries[0].layer", "layers step in order")

            def batch_layer(layer, qs, ks, vs):
                nonlocal calls, entries
                batch = [(f, q, k, v) for f, q, k, v in zip(forks, qs, ks, vs)]
                good = list(range(len(forks)))  # where each fork's result is
                if step == 3 and layer == 0:
                    # An unknown session between the forks fails alone.
                    batch.insert(1, ("0" * 32, *junk))
                    good = [0, 2, 3]
                if step == 5 and layer == 1:
                    # The same session twice: the second entry is refused.
                    batch.append((forks[1], *junk))
                if step == 9 and layer == 0:
                    # Fork 2 claims a token its cache does not hold.
                    batch = [(*e, length + (i == 2)) for i, e in enumerate(batch)]
                results = c.batch_decode(layer, batch)
                calls, entries = calls + 1, entries + len(batch)
                self.assertEqual(len(results), len(batch))
                if step == 3 and layer == 0:
                    self.assert_entry_error(results[1], grpc.StatusCode.NOT_FOUND,
                                            "entries[1].session_id")
                if step == 5 and layer == 1:
                    self.assert_entry_error(results[3], grpc.StatusCode.INVALID_ARGUMENT,
                                            "entries[3].session_id", "entries[1]")
                if step == 9 and layer == 0:
                    self.assert_entry_error(results[2], grpc.StatusCode.FAILED_PRECONDITION,
                                            "entries[2].expected_context_tokens")
                    # Its cache is unchanged: the same step, retried alone, lands.
                    results[2:] = c.batch_decode(0, [batch[2][:4] + (length,)])
                    calls, entries = calls + 1, entries + 1
                outs = []
                for i in good:
                    r = results[i]
                    self.assertIsInstance(r, attnserve_client.DecodeResult,
                                          f"step {step} layer {layer} entry {i}: {r}")
                    self.assertEqual(r.context_tokens, length + 1)
                    self.assertEqual(r.output.shape, (1, HQ, D))
                    outs.append(r.output)
                if step == 9 and layer == 0:
                    # Layer 0 again for a fork that just did it: refused.
                    r = c.batch_decode(0, [(forks[0], *junk)])
                    calls, entries = calls + 1, entries + 1
                    self.assert_entry_error(r[0], grpc.StatusCode.FAILED_PRECONDITION,
                                            "layer 0 starts a new step")
                    # A fork mid-step: layer 1 is a token short of layer 0.
                    self.assert_code(grpc.StatusCode.FAILED_PRECONDITION, c.fork_session,
                                     forks[0], length + 1)
                return outs

            got = server_forward(batch_layer, [[t] for t in tokens])
            for i, ref in enumerate(refs):
                want = ref.forward([tokens[i]])
                self.assert_logits(got[i], want, f"fork {i}, step {step}")
                generated[i].append(tokens[i])
                tokens[i] = int(np.argmax(want[-1]))  # greedy, on the NumPy model

        self.assertEqual(len({tuple(g) for g in generated}), len(forks),
                         "the continuations should differ")
        text = self.metrics_text()
        self.assertEqual(self.metric(text, "attnserve_batch_decode_entries_count")
                         - entries_count_before, calls)
        self.assertEqual(self.metric(text, "attnserve_batch_decode_entries_sum")
                         - entries_sum_before, entries)

        # Past the length: FAILED_PRECONDITION; 0 tokens: INVALID_ARGUMENT.
        final = PROMPT_TOKENS + DECODE_STEPS
        e = self.assert_code(grpc.StatusCode.FAILED_PRECONDITION, c.fork_session, forks[0],
                             final + 1)
        self.assertIn("tokens", e.details())
        self.assert_code(grpc.StatusCode.INVALID_ARGUMENT, c.fork_session, forks[0], 0)
        self.assert_code(grpc.StatusCode.NOT_FOUND, c.fork_session, parent, 1)
        for f in forks:
            c.close_session(f)
        info = c.server_info().sessions
        self.assertEqual((info.active, info.kv_blocks_shared, info.kv_cache_shared_bytes),
                         (0, 0, 0))

    def test_create_session_rejects_bad_rotary(self):
        c = self.client
        active = c.server_info().sessions.active
        e = self.assert_code(grpc.StatusCode.INVALID_ARGUMENT, c.create_session, HKV, D,
                             num_layers=LAYERS, rotary={"rotary_dim": 7})
        self.assertIn("rotary.rotary_dim", e.details())
        e = self.assert_code(grpc.StatusCode.INVALID_ARGUMENT, c.create_session, HKV, D,
                             rotary={"rotary_dim": D + 2})
        self.assertIn("rotary.rotary_dim", e.details())
        e = self.assert_code(grpc.StatusCode.INVALID_ARGUMENT, c.create_session, HKV, D,
                             rotary={"scaling": "dynamic", "factor": 2,
                                     "original_max_positions": 16},
                             sink_tokens=SINK_TOKENS, window_tokens=WINDOW_TOKENS)
        self.assertIn("rotary.scaling", e.details())
        self.assertEqual(c.server_info().sessions.active, active)

    def test_sinks_window_with_rope_matches_streaming_llm(self):
        c = self.client
        rng = np.random.default_rng(2)
        s = self.closing(c.create_session(HKV, D, rotary=SINK_ROTARY, sink_tokens=SINK_TOKENS,
                                          window_tokens=WINDOW_TOKENS))
        freed_before = self.metric(self.metrics_text(),
                                   r'attnserve_kv_evictions_total\{reason="window"\}')
        keys = np.zeros((0, HKV, D))
        values = np.zeros((0, HKV, D))
        max_kept = (-(-SINK_TOKENS // BLOCK_TOKENS) * BLOCK_TOKENS + WINDOW_TOKENS
                    + BLOCK_TOKENS - 1)
        rope_args = {"theta": THETA, "rotary_dim": SINK_ROTARY["rotary_dim"], "style": "gptj"}
        for step, n in enumerate([6] + [1] * SINK_STEPS):
            q = f32(rng.standard_normal((n, HQ, D)))
            k = f32(rng.standard_normal((n, HKV, D)))
            v = f32(rng.standard_normal((n, HKV, D)))
            r = c.decode(s, q, k, v, lse=True)
            keys = np.concatenate([keys, k])
            values = np.concatenate([values, v])
            kept = streaming_kept(keys.shape[0])
            self.assertEqual(r.context_tokens, len(kept), f"step {step}")
            self.assertLessEqual(r.context_tokens, max_kept)
            # Positions are places in the kept cache: keys at 0..len-1, the
            # queries at the last n of them.
            places = np.arange(len(kept))
            want, want_lse = numpy_attention.attention(
                rope(q, places[-n:], **rope_args), rope(keys[kept], places, **rope_args),
                values[kept], causal=True)
            np.testing.assert_allclose(r.output, want, rtol=1e-4, atol=1e-5,
                                       err_msg=f"step {step}, {keys.shape[0]} tokens seen, "
                                               f"{len(kept)} kept")
            np.testing.assert_allclose(r.lse, want_lse, rtol=1e-4, atol=1e-5,
                                       err_msg=f"lse, step {step}")
        self.assertEqual(keys.shape[0], 6 + SINK_STEPS)
        freed = self.metric(self.metrics_text(),
                            r'attnserve_kv_evictions_total\{reason="window"\}') - freed_before
        self.assertEqual(freed, (keys.shape[0] - len(streaming_kept(keys.shape[0])))
                         // BLOCK_TOKENS)
        # Its window has moved: no fork.
        self.assert_code(grpc.StatusCode.FAILED_PRECONDITION, c.fork_session, s, 1)
        c.close_session(s)

    def test_model_session_matches_numpy(self):
        rng = np.random.default_rng(3)
        prompt = self.random_tokens(rng, 10)
        active = self.client.server_info().sessions.active
        ModelSession = attnserve_client.ModelSession
        with ModelSession(self.client, 1, HKV, D, num_layers=LAYERS, dtype="f32",
                          rotary=ROTARY) as m:
            reference = NumpySequence()
            want = reference.forward(prompt)
            got, = server_forward(m.step_layer, [prompt])
            self.assert_logits(got, want, "ModelSession prefill")
            for _ in range(2):
                m.fork(0, len(prompt))
            self.assertEqual(m.num_sequences, 3)
            refs = [reference] + [reference.fork(len(prompt)) for _ in range(2)]
            tokens = [5, 6, 7]
            for step in range(4):
                got = server_forward(m.step_layer, [[t] for t in tokens])
                for i, ref in enumerate(refs):
                    want = ref.forward([tokens[i]])
                    self.assert_logits(got[i], want, f"ModelSession sequence {i}, step {step}")
                    tokens[i] = int(np.argmax(want[-1]))
            self.assertEqual(m.tokens, [[len(prompt) + 4] * LAYERS] * 3)
            # Out of order: the first failed entry's error, naming the sequence.
            one = [f32(np.ones((1, HQ, D)))] * 3, [f32(np.ones((1, HKV, D)))] * 3
            with self.assertRaises(attnserve_client.BatchDecodeError) as cm:
                m.step_layer(1, one[0], one[1], one[1])
            self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
            self.assertIn("sequence 0", cm.exception.details())
            self.assertEqual(self.client.server_info().sessions.active, active + 3)
        self.assertEqual(self.client.server_info().sessions.active, active)

    def test_batch_decode_stream_micro_batches(self):
        c = self.client
        rng = np.random.default_rng(4)
        prompt = self.random_tokens(rng, 6)
        parent = self.closing(c.create_session(HKV, D, num_layers=LAYERS, rotary=ROTARY))
        reference = NumpySequence()
        reference.forward(prompt)
        server_forward(lambda layer, qs, ks, vs: [c.decode(parent, qs[0], ks[0], vs[0],
                                                           layer=layer).output], [prompt])
        forks = [self.closing(c.fork_session(parent, len(prompt))) for _ in range(4)]
        c.close_session(parent)
        refs = [reference.fork(len(prompt)) for _ in forks]
        groups = {"a": [0, 1], "b": [2, 3]}  # two micro-batches
        tokens = [11, 12, 13, 14]

        requests = queue.Queue()

        def feed():
            while True:
                r = requests.get()
                if r is None:
                    return
                yield r

        stream = c.batch_decode_stream(feed(), timeout=60)
        try:
            for step in range(2):
                def stream_layer(layer, qs, ks, vs):
                    # Both micro-batches' messages go out before either answer is read.
                    for name, members in groups.items():
                        requests.put(attnserve_client.build_batch_decode_request(
                            layer, [(forks[i], qs[i], ks[i], vs[i]) for i in members],
                            request_id=f"step{step}-layer{layer}-{name}"))
                    answers = {}
                    for _ in groups:
                        br = next(stream)
                        self.assertNotIn(br.request_id, answers)
                        answers[br.request_id] = br
                    self.assertEqual(set(answers),
                                     {f"step{step}-layer{layer}-{n}" for n in groups})
                    outs = [None] * len(forks)
                    for name, members in groups.items():
                        br = answers[f"step{step}-layer{layer}-{name}"]
                        self.assertEqual(len(br.results), len(members))
                        for i, r in zip(members, br.results):
                            self.assertIsInstance(r, attnserve_client.DecodeResult, str(r))
                            self.assertEqual(r.context_tokens, len(prompt) + step + 1)
                            outs[i] = r.output
                    return outs

                got = server_forward(stream_layer, [[t] for t in tokens])
                for i, ref in enumerate(refs):
                    want = ref.forward([tokens[i]])
                    self.assert_logits(got[i], want, f"stream fork {i}, step {step}")
                    tokens[i] = int(np.argmax(want[-1]))
        finally:
            requests.put(None)
        self.assertEqual(list(stream), [])
        for f in forks:
            c.close_session(f)


def main():
    harness.run_e2e(globals())


if __name__ == "__main__":
    main()
