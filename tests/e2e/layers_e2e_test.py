"""e2e: attention layers from a model's weights (--model=NAME=DIR), through
the Python client package, against the golden model directories of
tests/golden/models/ (float64 PyTorch references; tests/golden/README.md).

Starts attnserve with --model=CASE=tests/golden/models/CASE for the five
cases, then:
- GetServerInfo lists the five models with their family, heads, head_dim,
  layers and dtype (F32, or BF16 for the BF16 checkpoint when the CPU has
  AVX-512 BF16);
- AttendLayer of every case and layer on x.npy matches expected_layer{l}.npy,
  at llama3_scaled's uneven positions expected_positions_layer{l}.npy, and
  bert_cross's cross-attention on memory.npy expected_cross_layer{l}.npy;
- x as F16 comes back F16, as BF16 comes back BF16 (widened to float32),
  each equal to the F32 call on the rounded x up to the output's rounding;
- the attention's own outputs (weights, entropy, top-k, lse) agree with
  each other and show the family's default mask (Mistral's window of 4,
  bert bidirectional); causal=True and key_lengths change the mask as
  documented;
- bad requests: INVALID_ARGUMENT naming x.shape, layer, memory, positions;
  NOT_FOUND for an unknown model;
- model sessions: two sessions per llama-family case prefill 4 tokens by
  Decode (layer 0, then 1) and step 3 tokens by BatchDecode, every output
  the expected rows, with an F32 and a BF16 cache; the same through
  ModelSession and BatchDecodeStream; F16 hidden states answer F16;
  CreateSession of a bert model, q/k/v on a model session and hidden on a
  plain one are INVALID_ARGUMENT naming the field;
- a server given a model directory without config.json, with a tensor
  missing from its safetensors or with a truncated safetensors file exits
  non-zero naming the file (the directory for the missing tensor) and the
  tensor.
Finally SIGTERM must make the server exit 0.

Tolerances, relative to max|expected|: 2e-6 for F32 compute (the golden
values are float64; F16 weights are computed in F32); 1e-2 where the
server computes the BF16 checkpoint with BF16 matmuls (x is rounded to
BF16, 2^-9 relative, on the way into each projection); 2e-2 for a session
with a BF16 cache (K and V rounded to BF16 as well).

Usage: layers_e2e_test.py --server=PATH --python_path=DIR --work_dir=DIR
"""

import json
import pathlib
import queue
import shutil
import struct
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

GOLDEN = harness.REPO_ROOT / "tests" / "golden" / "models"
CASES = ("mistral_window", "llama3_scaled", "qwen3_qknorm_bf16", "qwen2_bias_f16_sharded",
         "bert_cross")
LLAMA_CASES = CASES[:4]
LAYERS = 2

# What each model must be, from its config.json: family, layers, hidden,
# Hq, Hkv, D, cross_attention, causal, sliding_window, qk_norm.
DESCRIPTIONS = {
    "mistral_window": ("llama", LAYERS, 64, 4, 2, 16, False, True, 4, False),
    "llama3_scaled": ("llama", LAYERS, 64, 4, 1, 16, False, True, 0, False),
    "qwen3_qknorm_bf16": ("llama", LAYERS, 64, 4, 2, 32, False, True, 0, True),
    "qwen2_bias_f16_sharded": ("llama", LAYERS, 64, 4, 2, 16, False, True, 0, False),
    "bert_cross": ("bert", LAYERS, 48, 4, 4, 12, True, False, 0, False),
}

F32_TOLERANCE = 2e-6
BF16_WEIGHTS_TOLERANCE = 1e-2
BF16_CACHE_TOLERANCE = 2e-2

PREFILL_TOKENS = 4
TOKENS = 7  # of x.npy


def load(case, name):
    return np.load(GOLDEN / case / name)


def cpu_has_bf16_matmul():
    """The server's rule for keeping BF16 weights BF16: AVX-512 BF16."""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")),
                     [])
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"))


def relative_error(got, want):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def write_safetensors(path, tensors):
    """Writes {name: (dtype string, shape, bytes)} as a safetensors file."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, data in tensors.values():
            f.write(data)


def read_safetensors(path):
    """{name: (dtype string, shape, bytes)} of a safetensors file."""
    raw = pathlib.Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    body = raw[8 + n:]
    return {name: (h["dtype"], h["shape"], body[h["data_offsets"][0]:h["data_offsets"][1]])
            for name, h in header.items()}


class LayersE2ETest(unittest.TestCase):
    server = None
    client = None
    models = None

    @classmethod
    def setUpClass(cls):
        cls.work = pathlib.Path(ARGS.work_dir)
        cls.server, cls.client = harness.start_serving(
            ARGS.server, cls.work,
            [f"--model={case}={GOLDEN / case}" for case in CASES])
        cls.models = cls.client.models()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop_and_check()

    # --- helpers ------------------------------------------------------------

    def tolerance(self, case):
        """The layer tolerance of `case`, from the dtype the server computes in."""
        bf16 = self.models[case].dtype == attnserve_client.attention_pb2.BF16
        return BF16_WEIGHTS_TOLERANCE if bf16 else F32_TOLERANCE

    def assert_close(self, got, want, tolerance, what):
        self.assertEqual(got.shape, want.shape, what)
        err = relative_error(got, want)
        self.assertLessEqual(err, tolerance, f"{what}: relative error {err:.3g}")

    def assert_code(self, code, fn, *args, **kwargs):
        with self.assertRaises(grpc.RpcError) as cm:
            fn(*args, **kwargs)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        return cm.exception.details()

    def closing(self, session):
        def close():
            try:
                self.client.close_session(session)
            except grpc.RpcError:
                pass
        self.addCleanup(close)
        return session

    # --- AttendLayer ----------------------------------------------------------

    def test_server_info_lists_the_models(self):
        pb = attnserve_client.attention_pb2
        self.assertEqual(sorted(self.models), sorted(CASES))
        for case, want in DESCRIPTIONS.items():
            m = self.models[case]
            got = (m.family, m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads,
                   m.head_dim, m.cross_attention, m.causal, m.sliding_window, m.qk_norm)
            self.assertEqual(got, want, case)
            self.assertEqual(m.model_type, json.loads((GOLDEN / case / "config.json")
                                                      .read_text())["model_type"])
            self.assertGreater(m.weight_bytes, 0, case)
            # RoPE for the llama family only.
            self.assertEqual(m.HasField("rotary"), m.family == "llama", case)
            bf16 = case == "qwen3_qknorm_bf16" and cpu_has_bf16_matmul()
            self.assertEqual(m.dtype, pb.BF16 if bf16 else pb.F32, case)
        self.assertEqual(self.models["llama3_scaled"].rotary.scaling, pb.RotaryEmbedding.LLAMA3)

    def test_every_layer_matches_the_reference(self):
        for case in CASES:
            x = load(case, "x.npy")
            for layer in range(LAYERS):
                r = self.client.attend_layer(case, layer, x)
                self.assertEqual(r.y.dtype, np.float32)
                self.assert_close(r.y, load(case, f"expected_layer{layer}.npy"),
                                  self.tolerance(case), f"{case} layer {layer}")
                self.assertEqual(r.timing["batch_size"], 1)
                self.assertTrue(r.backend)
            # One sequence as a 2-D x: a 2-D y, the same rows.
            r = self.client.attend_layer(case, 0, x[1])
            self.assert_close(r.y, load(case, "expected_layer0.npy")[1], self.tolerance(case),
                              f"{case} 2-D x")

    def test_positions(self):
        case = "llama3_scaled"
        x, positions = load(case, "x.npy"), load(case, "positions.npy")
        for layer in range(LAYERS):
            want = load(case, f"expected_positions_layer{layer}.npy")
            self.assert_close(self.client.attend_layer(case, layer, x, positions=positions).y,
                              want, F32_TOLERANCE, f"positions, layer {layer}")
            # The same positions per row (B x L) are the same call.
            per_row = np.stack([positions, positions])
            self.assert_close(self.client.attend_layer(case, layer, x, positions=per_row).y,
                              want, F32_TOLERANCE, f"B x L positions, layer {layer}")
        # Positions change the answer (RoPE is applied): 0..6 is expected_layer0.
        self.assertGreater(relative_error(load(case, "expected_layer0.npy"),
                                          load(case, "expected_positions_layer0.npy")), 1e-3)

    def test_cross_attention(self):
        case = "bert_cross"
        x, memory = load(case, "x.npy"), load(case, "memory.npy")
        for layer in range(LAYERS):
            r = self.client.attend_layer(case, layer, x, memory=memory, weights=True)
            self.assert_close(r.y, load(case, f"expected_cross_layer{layer}.npy"),
                              F32_TOLERANCE, f"cross layer {layer}")
            # Every query sees memory's 5 tokens.
            self.assertEqual(r.weights.shape, (2, 4, TOKENS, memory.shape[1]))
            self.assertTrue(np.all(r.weights > 0))

    def test_half_precision_inputs(self):
        for case in ("mistral_window", "qwen3_qknorm_bf16"):
            x = load(case, "x.npy")
            for dtype, numpy_dtype, rounding in (("f16", np.float16, 2.0 ** -11),
                                                 ("bf16", np.float32, 2.0 ** -8)):
                with self.subTest(case=case, dtype=dtype):
                    sent = x.astype(np.float16) if dtype == "f16" else x
                    r = self.client.attend_layer(case, 1, sent, dtype=dtype)
                    self.assertEqual(r.y.dtype, numpy_dtype)
                    self.assertEqual(r.y.shape, x.shape)
                    # The F32 call on the values the server received, up to
                    # the rounding of the output (half an ulp, twice for margin).
                    rounded = attnserve_client.round_to(x, dtype)
                    want = self.client.attend_layer(case, 1, rounded).y
                    self.assert_close(r.y, want, 2 * rounding, f"{case} {dtype}")
                    self.assert_close(r.y, load(case, "expected_layer1.npy"),
                                      max(self.tolerance(case), 8 * rounding),
                                      f"{case} {dtype} against the reference")

    def test_attention_outputs_show_the_mask(self):
        # Mistral: causal with a window of 4 (query i sees keys i-3..i).
        x = load("mistral_window", "x.npy")
        r = self.client.attend_layer("mistral_window", 0, x, lse=True, entropy=True,
                                     weights=True, top_k=3)
        w = r.weights.astype(np.float64)
        self.assertEqual(w.shape, (2, 4, TOKENS, TOKENS))
        i, j = np.meshgrid(np.arange(TOKENS), np.arange(TOKENS), indexing="ij")
        visible = (j <= i) & (i - j < 4)
        self.assertTrue(np.all(w[..., ~visible] == 0))
        self.assertTrue(np.all(w[..., visible] > 0))
        np.testing.assert_allclose(w.sum(axis=-1), 1, atol=1e-5)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.sum(np.where(w > 0, w * np.log(w), 0), axis=-1)
        np.testing.assert_allclose(r.entropy, entropy, atol=1e-4)
        self.assertEqual(r.lse.shape, (2, 4, TOKENS))
        self.assertTrue(np.all(np.isfinite(r.lse)))
        self.assertEqual(r.top_k_indices.shape, (2, 4, TOKENS, 3))
        np.testing.assert_allclose(r.top_k_weights, np.take_along_axis(w, r.top_k_indices
                                                                       .clip(0), -1)
                                   * (r.top_k_indices >= 0), atol=1e-6)
        # Query 0 sees one key: the rest of its top 3 are -1.
        self.assertTrue(np.all(r.top_k_indices[:, :, 0, 1:] == -1))

        # bert: bidirectional by default; causal=True makes query t see 0..t,
        # so its y is the bidirectional y of the first t + 1 tokens' last row.
        x = load("bert_cross", "x.npy")
        r = self.client.attend_layer("bert_cross", 0, x, weights=True)
        self.assertTrue(np.all(r.weights > 0))
        causal = self.client.attend_layer("bert_cross", 0, x, causal=True).y
        for t in (2, 4, TOKENS - 1):
            prefix = self.client.attend_layer("bert_cross", 0, x[:, :t + 1]).y
            self.assert_close(causal[:, t], prefix[:, t], F32_TOLERANCE, f"causal token {t}")
        # key_lengths: row 1's keys past 4 are padding, so its first 4
        # queries are the 4-token call's.
        padded = self.client.attend_layer("bert_cross", 1, x, key_lengths=[TOKENS, 4]).y
        short = self.client.attend_layer("bert_cross", 1, x[1:, :4]).y
        self.assert_close(padded[1:, :4], short, F32_TOLERANCE, "key_lengths row 1")
        self.assert_close(padded[0], load("bert_cross", "expected_layer1.npy")[0],
                          F32_TOLERANCE, "key_lengths row 0")

    def test_bad_requests_name_the_field(self):
        c = self.client
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        x = load("mistral_window", "x.npy")
        self.assertIn("x.shape", self.assert_code(invalid, c.attend_layer, "mistral_window", 0,
                                                  x[..., :63]))
        self.assertIn("x.shape", self.assert_code(invalid, c.attend_layer, "mistral_window", 0,
                                                  x[None]))
        for layer in (LAYERS, -1):
            self.assertIn("layer", self.assert_code(invalid, c.attend_layer, "mistral_window",
                                                    layer, x))
        self.assertIn("memory", self.assert_code(invalid, c.attend_layer, "mistral_window", 0,
                                                 x, memory=x))
        self.assertIn("positions", self.assert_code(invalid, c.attend_layer, "llama3_scaled", 0,
                                                    x, positions=[0, 1, 2]))
        details = self.assert_code(grpc.StatusCode.NOT_FOUND, c.attend_layer, "no_such_model",
                                   0, x)
        self.assertIn("model", details)
        self.assertIn("mistral_window", details)  # the loaded models are listed

    # --- model sessions -------------------------------------------------------

    def check_sessions(self, case, cache_dtype, tolerance):
        """Two sessions of `case`: prefill by Decode, then single-token
        BatchDecode steps, every output the expected rows."""
        c = self.client
        x = load(case, "x.npy")
        want = [load(case, f"expected_layer{layer}.npy") for layer in range(LAYERS)]
        sessions = [self.closing(c.create_session(model=case, dtype=cache_dtype))
                    for _ in range(2)]
        for s in sessions:
            self.assertEqual((s.num_layers, s.model), (LAYERS, case))
        for layer in range(LAYERS):
            for b, s in enumerate(sessions):
                r = c.decode(s, hidden=x[b, :PREFILL_TOKENS], layer=layer,
                             expected_context_tokens=0)
                self.assertEqual(r.context_tokens, PREFILL_TOKENS)
                self.assertEqual(r.output.dtype, np.float32)
                self.assert_close(r.output, want[layer][b, :PREFILL_TOKENS], tolerance,
                                  f"{case} {cache_dtype} prefill, layer {layer}, row {b}")
        for t in range(PREFILL_TOKENS, TOKENS):
            for layer in range(LAYERS):
                results = attnserve_client.raise_first_error(c.batch_decode(
                    layer, [(s, x[b, t:t + 1], t) for b, s in enumerate(sessions)]))
                for b, r in enumerate(results):
                    self.assertEqual(r.context_tokens, t + 1)
                    self.assert_close(r.output, want[layer][b, t:t + 1], tolerance,
                                      f"{case} {cache_dtype} token {t}, layer {layer}, row {b}")
        for s in sessions:
            c.close_session(s)

    def test_model_sessions_match_the_reference(self):
        for case in LLAMA_CASES:
            with self.subTest(case=case, cache="f32"):
                self.check_sessions(case, "f32", self.tolerance(case))
            with self.subTest(case=case, cache="bf16"):
                self.check_sessions(case, "bf16", BF16_CACHE_TOLERANCE)

    def test_model_session_and_batch_decode_stream(self):
        case = "qwen2_bias_f16_sharded"
        x = load(case, "x.npy")
        want = [load(case, f"expected_layer{layer}.npy") for layer in range(LAYERS)]
        tolerance = self.tolerance(case)
        with attnserve_client.ModelSession(self.client, 2, model=case) as m:
            self.assertEqual(m.num_layers, LAYERS)
            for t0, t1 in ((0, PREFILL_TOKENS), (PREFILL_TOKENS, PREFILL_TOKENS + 1)):
                for layer in range(LAYERS):
                    outs = m.step_layer(layer, hidden=[x[0, t0:t1], x[1, t0:t1]])
                    for b, y in enumerate(outs):
                        self.assert_close(y, want[layer][b, t0:t1], tolerance,
                                          f"ModelSession tokens {t0}..{t1}, layer {layer}")
            self.assertEqual(m.tokens, [[PREFILL_TOKENS + 1] * LAYERS] * 2)

            # The rest of the tokens on one BatchDecodeStream, a layer-step at a time.
            requests = queue.Queue()

            def feed():
                while (r := requests.get()) is not None:
                    yield r

            stream = self.client.batch_decode_stream(feed(), timeout=60)
            try:
                for t in range(PREFILL_TOKENS + 1, TOKENS):
                    for layer in range(LAYERS):
                        requests.put(attnserve_client.build_batch_decode_request(
                            layer, [(s, x[b, t:t + 1], t) for b, s in enumerate(m.sessions)],
                            request_id=f"t{t}-l{layer}"))
                        answer = next(stream)
                        self.assertEqual(answer.request_id, f"t{t}-l{layer}")
                        for b, r in enumerate(attnserve_client.raise_first_error(
                                answer.results)):
                            self.assertEqual(r.context_tokens, t + 1)
                            self.assert_close(r.output, want[layer][b, t:t + 1], tolerance,
                                              f"stream token {t}, layer {layer}, row {b}")
            finally:
                requests.put(None)
            self.assertEqual(list(stream), [])

    def test_model_session_errors(self):
        c = self.client
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        case = "mistral_window"
        x = load(case, "x.npy")
        self.assertIn("model", self.assert_code(invalid, c.create_session, model="bert_cross"))
        self.assertIn("model", self.assert_code(grpc.StatusCode.NOT_FOUND, c.create_session,
                                                model="no_such_model"))
        self.assertIn("num_kv_heads", self.assert_code(invalid, c.create_session, 3,
                                                       model=case))

        s = self.closing(c.create_session(model=case))
        q = np.zeros((1, 4, 16), np.float32)
        kv = np.zeros((1, 2, 16), np.float32)
        self.assertIn("hidden", self.assert_code(invalid, c.decode, s, q, kv, kv))
        self.assertIn("hidden", self.assert_code(invalid, c.decode, s, hidden=x[0, :2, :63]))
        plain = self.closing(c.create_session(2, 16))
        self.assertIn("hidden", self.assert_code(invalid, c.decode, plain, hidden=x[0, :2]))
        # The refused steps changed nothing: the session starts at 0, and
        # F16 hidden states come back F16.
        r = c.decode(s, hidden=x[0, :PREFILL_TOKENS].astype(np.float16),
                     expected_context_tokens=0)
        self.assertEqual(r.output.dtype, np.float16)
        self.assert_close(r.output, load(case, "expected_layer0.npy")[0, :PREFILL_TOKENS], 4e-3,
                          "F16 hidden")
        # In a BatchDecode, a model session's entry with q/k/v fails alone.
        a, b = (self.closing(c.create_session(model=case)) for _ in range(2))
        results = c.batch_decode(0, [(a, x[1, :PREFILL_TOKENS]), (b, q, kv, kv)])
        self.assertEqual(results[0].context_tokens, PREFILL_TOKENS)
        self.assertIsInstance(results[1], attnserve_client.BatchDecodeError)
        self.assertEqual(results[1].code(), invalid)
        self.assertIn("hidden", results[1].details())
        self.assertEqual(c.decode(b, hidden=x[0, :1], expected_context_tokens=0).context_tokens,
                         1)

    # --- bad model directories --------------------------------------------------

    def start_failing(self, model_dir):
        """Runs attnserve with --model=bad=model_dir; returns (exit code, output)."""
        port, metrics_port = harness.free_port(), harness.free_port()
        done = subprocess.run(
            [ARGS.server, f"--listen=127.0.0.1:{port}",
             f"--metrics_listen=127.0.0.1:{metrics_port}", f"--model=bad={model_dir}"],
            capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout + done.stderr

    def test_bad_model_directory_stops_the_server(self):
        no_config = self.work / "no_config"
        shutil.rmtree(no_config, ignore_errors=True)
        no_config.mkdir(parents=True)
        shutil.copy(GOLDEN / "mistral_window" / "model.safetensors", no_config)
        code, output = self.start_failing(no_config)
        self.assertNotEqual(code, 0, output)
        self.assertIn("config.json", output)

        missing = self.work / "missing_tensor"
        shutil.rmtree(missing, ignore_errors=True)
        shutil.copytree(GOLDEN / "llama3_scaled", missing)
        tensors = read_safetensors(missing / "model.safetensors")
        gone = "model.layers.1.self_attn.v_proj.weight"
        del tensors[gone]
        write_safetensors(missing / "model.safetensors", tensors)
        code, output = self.start_failing(missing)
        self.assertNotEqual(code, 0, output)
        self.assertIn(gone, output)
        self.assertIn("missing_tensor", output)  # the directory: any shard could have held it

        truncated = self.work / "truncated"
        shutil.rmtree(truncated, ignore_errors=True)
        shutil.copytree(GOLDEN / "mistral_window", truncated)
        data = (truncated / "model.safetensors").read_bytes()
        (truncated / "model.safetensors").write_bytes(data[:-100])
        code, output = self.start_failing(truncated)
        self.assertNotEqual(code, 0, output)
        self.assertIn(str(truncated / "model.safetensors"), output)


def main():
    harness.run_e2e(globals())


if __name__ == "__main__":
    main()
