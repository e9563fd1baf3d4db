#!/usr/bin/python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/).

attend/: small valid AttendRequest messages (serialized protos), one per
feature: plain, 3-D, causal in both alignments, sliding window, softcap, ALiBi,
GQA/MQA, bias broadcasts with -inf, key_lengths, LINEAR, lse/entropy/weights/top_k,
F16/BF16. sessions/: inputs for sessions_fuzzer's FuzzedDataProvider decoding,
one scripted scenario per feature (layers stepping in order, Rollback, forks
sharing blocks, eviction with shared blocks, sinks windows, RoPE, expiry) and a
few random byte strings, from a fixed seed. model/: model_fuzzer's inputs,
a selector byte (0 safetensors, 1 config.json) then the file: every golden
model's config.json (tests/golden/models/) and small safetensors files in
F32, F16, BF16 and a dtype the reader only skips (I64).

Deterministic: rerunning it rewrites the same files. Needs python3-protobuf and
protoc (scripts/install-deps installs both).

    tests/fuzz/make_corpus.py [OUT_DIR]     (default: tests/fuzz/corpus)
"""

import hashlib
import json
import pathlib
import random
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTO_DIR = HERE.parents[1] / "proto"


def load_pb2(scratch):
    subprocess.run(["protoc", f"--proto_path={PROTO_DIR}", f"--python_out={scratch}",
                    "attnserve/v1/attention.proto"], check=True)
    sys.path.insert(0, str(scratch))
    from attnserve.v1 import attention_pb2  # pylint: disable=import-outside-toplevel
    return attention_pb2


def tensor_bytes(rng, dtype, count):
    """`count` values in [-2, 2) encoded as `dtype` (1 F32, 2 F16, 3 BF16)."""
    values = [rng.uniform(-2, 2) for _ in range(count)]
    if dtype == 1:
        return struct.pack(f"<{count}f", *values)
    if dtype == 2:
        return struct.pack(f"<{count}e", *values)
    # BF16: the high half of the F32 bits (truncation is fine for seeds).
    return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:]
                    for v in values)


def product(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def attend_cases(pb):
    """(name, AttendRequest) pairs."""
    rng = random.Random(20240601)

    def request(q, k, v, dtype=1, **fields):
        r = pb.AttendRequest()
        # priority 1: attend_fuzzer folds the values of mutants into a small range.
        r.priority = 1
        for tensor, shape in ((r.query, q), (r.key, k), (r.value, v)):
            tensor.dtype = dtype
            tensor.shape.extend(shape)
            tensor.data = tensor_bytes(rng, dtype, product(shape))
        for name, value in fields.items():
            if name == "options":
                r.options.CopyFrom(pb.AttentionOptions(**value))
            elif name == "outputs":
                r.outputs.CopyFrom(pb.OutputSpec(**value))
            elif name == "key_lengths":
                r.key_lengths.extend(value)
            elif name == "bias":
                shape, masked = value
                r.bias.dtype = dtype
                r.bias.shape.extend(shape)
                raw = bytearray(tensor_bytes(rng, dtype, product(shape)))
                size = 4 if dtype == 1 else 2
                neg_inf = {1: struct.pack("<f", float("-inf")), 2: b"\x00\xfc",
                           3: b"\x80\xff"}[dtype]
                for i in masked:
                    raw[i * size:(i + 1) * size] = neg_inf
                r.bias.data = bytes(raw)
            else:
                setattr(r, name, value)
        return r

    b, lq, lk, hq, hkv, d = 2, 3, 5, 4, 2, 8
    q4, k4, v4 = [b, lq, hq, d], [b, lk, hkv, d], [b, lk, hkv, d]
    cases = [
        ("plain", request([1, 4, 2, 8], [1, 6, 2, 8], [1, 6, 2, 8], priority=0)),
        ("3d", request([4, 2, 8], [6, 2, 8], [6, 2, 4])),
        ("gqa", request(q4, k4, v4)),
        ("mqa_dv", request([1, 2, 4, 16], [1, 7, 1, 16], [1, 7, 1, 6])),
        ("causal", request(q4, k4, v4, options={"causal": True})),
        ("causal_top_left", request([1, 6, 2, 4], [1, 4, 2, 4], [1, 4, 2, 4],
                                    options={"causal": True, "causal_alignment": 1})),
        ("window", request([1, 6, 1, 4], [1, 6, 1, 4], [1, 6, 1, 4],
                           options={"window_left": 2, "window_right": 1})),
        ("softcap_scale", request(q4, k4, v4, options={"softcap": 5.0, "scale": 0.7})),
        ("alibi", request(q4, k4, v4, options={"alibi_slopes": [0.5, 0.25, 0.125, 0.0625],
                                                "causal": True})),
        ("bias_full", request(q4, k4, v4, bias=([b, hq, lq, lk], [0, 7, 13]), priority=0)),
        ("bias_broadcast", request(q4, k4, v4, bias=([1, lk], [1, 3]), outputs={"lse": True})),
        ("bias_masks_row", request([1, 2, 1, 4], [1, 3, 1, 4], [1, 3, 1, 4],
                                   bias=([2, 1], [0]), outputs={"lse": True, "weights": True})),
        ("key_lengths", request(q4, k4, v4, key_lengths=[3, 0], outputs={"lse": True})),
        ("linear", request(q4, k4, v4, options={"variant": 1})),
        ("linear_causal", request(q4, k4, v4, options={"variant": 1, "causal": True},
                                  key_lengths=[5, 2])),
        ("outputs", request(q4, k4, v4, options={"causal": True},
                            outputs={"lse": True, "weights": True, "top_k": 3})),
        ("top_k_all", request([1, 2, 2, 4], [1, 4, 2, 4], [1, 4, 2, 4], outputs={"top_k": 4},
                              key_lengths=[2])),
        ("f16", request(q4, k4, v4, dtype=2, options={"causal": True}, outputs={"lse": True},
                       priority=0)),
        ("f16_bias", request(q4, k4, v4, dtype=2, bias=([hq, 1, lk], [2]))),
        ("bf16", request(q4, k4, v4, dtype=3, outputs={"top_k": 2})),
        ("bf16_linear", request(q4, k4, v4, dtype=3, options={"variant": 1})),
        # Lq = 1, head dims multiples of 16, no bias/ALiBi/softcap: the cpu backend's decode tiles.
        ("decode", request([1, 1, 4, 16], [1, 8, 1, 16], [1, 8, 1, 16], outputs={"lse": True},
                           backend="cpu", request_id="r1")),
        ("decode_f16_window", request([1, 1, 4, 16], [1, 12, 1, 16], [1, 12, 1, 32], dtype=2,
                                      options={"window_left": 6})),
        ("head_dim_80", request([1, 3, 1, 80], [1, 3, 1, 80], [1, 3, 1, 80])),
        ("entropy", request(q4, k4, v4, options={"causal": True}, key_lengths=[3, 0],
                            outputs={"lse": True, "entropy": True})),
        ("decode_entropy", request([1, 1, 4, 16], [1, 8, 1, 16], [1, 8, 1, 16],
                                   outputs={"entropy": True}, backend="cpu")),
    ]
    return cases


class SessionsInput:
    """Writes a sessions_fuzzer input operation by operation.

    FuzzedDataProvider reads integers from the end of the input (the first
    byte read is the most significant) and tensor bytes from the front, so the
    two are kept apart and joined at the end. Each method mirrors one operation
    of sessions_fuzzer.cc, reading what it reads in the same order; the caller
    says what the fuzzer's model will do (ok=), and this keeps just enough of
    it to index sessions and leases and to size tensors.
    """

    SCALINGS = ["none", "linear", "ntk", "dynamic"]
    LAYERS = [1, 1, 2, 3, 3, 0, -1, 1025]
    MIN_BLOCK_BYTES = [0, 0, 64, 4096, -1]

    def __init__(self, rng, kv_cache_bytes=1 << 16, block_tokens=4, idle_timeout_s=5,
                 lru=True, max_sessions=6, min_block_bytes=0):
        self.rng = rng
        self.front = bytearray()
        self.tail = bytearray()  # in reading order
        self.sessions = []  # per fuzzer session: row sizes, layers' positions, last append
        self.leased = set()
        self.timeout = idle_timeout_s
        self.int(kv_cache_bytes, -1, 1 << 16)
        self.int(block_tokens, 0, 17)
        self.int(idle_timeout_s, -1, 10)
        self.boolean(lru)
        self.int(max_sessions, 0, 6)
        self.int(self.MIN_BLOCK_BYTES.index(min_block_bytes), 0, 4)

    # FuzzedDataProvider's encoding.
    def int(self, value, lo, hi):
        assert lo <= value <= hi, (value, lo, hi)
        span, n = hi - lo, 0
        while n < 8 and span >> (8 * n) > 0:
            n += 1
        self.tail += (value - lo).to_bytes(n, "big")

    def byte(self, value):
        self.int(value, 0, 255)

    def boolean(self, value):
        self.byte(1 if value else 0)

    def data(self):
        return bytes(self.front) + bytes(reversed(self.tail))

    def op(self, code):
        self.int(code, 0, 10)

    def owner(self, stranger):
        self.int(0 if stranger else 1, 0, 7)

    def leased_index(self, session):
        return sorted(self.leased).index(session)

    # Operations. A session is its index in the fuzzer's list (creations and
    # forks that succeeded, in order).
    def create(self, heads=1, head_dim=2, value_dim=0, dtype=1, max_tokens=0, layers=1,
               window=None, sinks=0, rope=None, ok=True):
        """dtype 1 F32, 2 F16, 3 BF16. rope: (style "neox" or "gptj",
        scaling, then indices into rotary_dim {0, 2, 3, 4}, theta {1e4, 0,
        0.5, 5e5} and factor {1, 2, 0.5})."""
        self.op(0)
        self.int(heads, -1, 4)
        self.int(head_dim, -1, 9)
        self.int(value_dim, -1, 9)
        self.int(dtype - 1, 0, 3)
        self.int(max_tokens, -1, 41)
        self.int(self.LAYERS.index(layers), 0, 7)
        if window is None:
            self.int(0, 0, 7)
        else:
            self.int(6, 0, 7)
            self.int(window, -1, 25)
            self.int(sinks, -1, 21)
        if rope is None:
            self.int(0, 0, 7)
        else:
            style, scaling, rotary, theta, factor = rope
            self.int(5, 0, 7)
            self.boolean(style == "gptj")
            self.int(self.SCALINGS.index(scaling), 0, 3)
            self.int(rotary, 0, 3)
            self.int(theta, 0, 3)
            self.int(factor, 0, 2)
        if ok:
            self.sessions.append({"k": heads * head_dim, "v": heads * (value_dim or head_dim),
                                  "pos": [0] * max(layers, 1), "undo": None})

    def acquire(self, session, stranger=False, ok=True):
        self.op(1)
        self.byte(session)
        self.owner(stranger)
        if ok:
            self.leased.add(session)
            self.sessions[session]["undo"] = None

    def append(self, session, tokens, layer=None, in_dtype=1, ok=True):
        """layer None: the layer the fuzzer steps next (past layer 0 it
        appends what that layer lags, which `tokens` must be); else that
        layer (-1 and num_layers are out of range)."""
        s = self.sessions[session]
        self.op(2)
        self.byte(self.leased_index(session))
        self.byte(self.rng.randrange(192) if layer is None else 192 + layer + 1)
        self.int(tokens, 0, 40)
        self.int(0, 0, 15)  # key well formed
        self.int(0, 0, 15)  # value well formed
        self.int(1, 0, 15)  # as many values as keys
        for row in (s["k"], s["v"]):
            self.int(in_dtype - 1, 0, 2)
            self.front += tensor_bytes(self.rng, in_dtype, tokens * row)
        if ok:
            pos = s["pos"]
            if layer is None:
                layer = next((i for i in range(1, len(pos)) if pos[i] != pos[i - 1]), 0)
                assert layer == 0 or pos[layer - 1] - pos[layer] == tokens
            s["undo"] = (layer, pos[layer])
            pos[layer] += tokens

    def step(self, session, tokens, in_dtype=1):
        """`tokens` on every layer, in order."""
        for _ in self.sessions[session]["pos"]:
            self.append(session, tokens, in_dtype=in_dtype)

    def truncate(self, session, layer, length):
        self.op(4)
        self.byte(self.leased_index(session))
        self.byte(layer)
        self.byte(length + 1)
        s = self.sessions[session]
        s["pos"][layer] = min(s["pos"][layer], length)
        s["undo"] = None

    def release(self, session):
        self.op(5)
        self.byte(self.leased_index(session))
        self.leased.discard(session)

    def close(self, session, stranger=False):
        self.op(6)
        self.byte(session)
        self.owner(stranger)

    def advance(self, seconds):
        self.op(7)
        self.boolean(False)
        self.int(seconds, 0, 2 * self.timeout)

    def advance_to(self, session, seconds):
        """The clock to `session`'s last use plus `seconds`."""
        self.op(7)
        self.boolean(True)
        self.byte(session)
        self.int(seconds, 0, 2 * self.timeout)

    def expire(self):
        self.op(8)

    def rollback(self, session):
        self.op(9)
        self.byte(self.leased_index(session))
        s = self.sessions[session]
        if s["undo"] is not None:
            layer, pos = s["undo"]
            s["pos"][layer] = pos
            s["undo"] = None

    def fork(self, session, tokens, stranger=False, ok=True):
        """tokens in [-1, the parent's shortest layer + 1]."""
        self.op(10)
        self.byte(session)
        self.owner(stranger)
        self.byte(tokens + 1)
        if ok:
            parent = self.sessions[session]
            self.sessions.append({"k": parent["k"], "v": parent["v"],
                                  "pos": [tokens] * len(parent["pos"]), "undo": None})


def session_scripts(rng):
    """(name, SessionsInput) pairs: one scripted scenario per feature."""
    scripts = []

    # Three layers stepping in order; a layer out of order (FAILED_PRECONDITION)
    # and out of range (INVALID_ARGUMENT); Rollback of the last append; F16 and
    # BF16 inputs into an F16 cache; Truncate.
    x = SessionsInput(rng)
    x.create(heads=2, head_dim=4, value_dim=3, dtype=2, layers=3)
    x.acquire(0)
    x.step(0, 3)
    x.append(0, 5)
    x.append(0, 5)
    x.append(0, 2, layer=0, ok=False)
    x.append(0, 5, layer=3, ok=False)
    x.append(0, 5, layer=-1, ok=False)
    x.rollback(0)
    x.append(0, 5, in_dtype=3)
    x.append(0, 5)
    x.step(0, 7, in_dtype=2)
    x.rollback(0)
    x.rollback(0)
    x.release(0)
    x.acquire(0)
    x.truncate(0, 2, 4)
    x.append(0, 2, layer=2, ok=False)
    x.release(0)
    x.close(0)
    scripts.append(("layers_rollback", x))

    # Forks share full blocks (counted once) and copy the partial block;
    # forks of forks (three holders); FAILED_PRECONDITION past the length,
    # INVALID_ARGUMENT below 1, ABORTED while leased, NOT_FOUND for a stranger.
    x = SessionsInput(rng, block_tokens=4)
    x.create(heads=1, head_dim=2, dtype=2, layers=2)
    x.acquire(0)
    x.step(0, 6)
    x.step(0, 5)
    x.fork(0, 4, ok=False)  # leased: ABORTED
    x.release(0)
    x.fork(0, 8)
    x.fork(0, 10)
    x.fork(2, 9)
    x.fork(0, 12, ok=False)
    x.fork(0, 0, ok=False)
    x.fork(0, 4, stranger=True, ok=False)
    x.acquire(3)
    x.step(3, 4)
    x.release(3)
    x.close(0)
    x.acquire(1)
    x.step(1, 2)
    x.rollback(1)
    x.release(1)
    x.close(2)
    x.fork(3, 13)
    scripts.append(("fork_share", x))

    # A small cache under lru_idle with shared blocks: an append that would fit
    # only by evicting sessions whose blocks were shared is refused without
    # evicting (CouldFit counts ever-shared blocks as staying); new sessions
    # evict the least recently used idle ones, freeing only unshared blocks.
    x = SessionsInput(rng, kv_cache_bytes=640, block_tokens=4, max_sessions=4)
    x.create()  # F32, 1 x 2 dims: 64-byte blocks, 10 fit
    x.acquire(0)
    x.append(0, 16)
    x.release(0)
    x.fork(0, 16)
    x.create()
    x.acquire(2)
    x.append(2, 16)
    x.append(2, 12, ok=False)
    x.append(2, 4)
    x.append(2, 8, ok=False)
    x.close(1)
    x.append(2, 8, ok=False)
    x.release(2)
    x.create()
    x.create()
    x.fork(2, 6)
    x.acquire(4)
    x.append(4, 30)
    x.release(4)
    scripts.append(("fork_evict", x))

    # A sinks window (two sink blocks, a window of 5) on two layers: blocks
    # between the sinks and the window are dropped and freed, Rollback puts
    # them back, Fork refuses the session, max_tokens counts what is kept.
    x = SessionsInput(rng, block_tokens=2)
    x.create(heads=2, head_dim=3, dtype=3, layers=2, window=5, sinks=3, max_tokens=12)
    x.acquire(0)
    for tokens in (3, 2, 4, 1, 6):
        x.step(0, tokens)
    x.rollback(0)
    x.append(0, 6)
    x.append(0, 6)
    x.rollback(0)
    x.rollback(0)
    x.append(0, 6)
    x.release(0)
    x.fork(0, 2, ok=False)
    x.acquire(0)
    x.append(0, 6)
    x.step(0, 20)
    x.release(0)
    scripts.append(("window", x))

    # A window in a full cache (reject): an append past the bound fails after
    # freeing the blocks the previous append's window moved past; Rollback
    # then (known store bug 1 in sessions_fuzzer.cc, which it steers around).
    x = SessionsInput(rng, kv_cache_bytes=160, block_tokens=2, lru=False)
    x.create(window=2)
    x.acquire(0)
    x.append(0, 3)
    x.append(0, 3)
    x.append(0, 12, ok=False)
    x.rollback(0)
    x.append(0, 1)
    x.rollback(0)
    x.release(0)
    scripts.append(("window_full", x))

    # RoPE: keys rotated at their positions; with sinks and a window the sink
    # keys are rewritten at position + dropped; Rollback across a window move.
    x = SessionsInput(rng, block_tokens=2)
    x.create(heads=1, head_dim=4, dtype=1, window=4, sinks=2, rope=("neox", "none", 0, 0, 0))
    x.create(heads=2, head_dim=6, value_dim=2, dtype=2, layers=2,
             rope=("gptj", "dynamic", 3, 3, 1))
    x.acquire(0)
    x.acquire(1)
    for tokens in (2, 3, 3, 5):
        x.append(0, tokens)
        x.step(1, tokens)
    x.rollback(0)
    x.append(0, 7)
    x.release(0)
    x.release(1)
    x.fork(1, 9)
    x.acquire(2)
    x.step(2, 3)
    x.release(2)
    scripts.append(("rope_window", x))

    # Expiry at exactly idle_timeout (kept) and just past it (expired); a
    # leased session never expires; the reject policy; max_sessions.
    x = SessionsInput(rng, block_tokens=3, idle_timeout_s=3, lru=False, max_sessions=2)
    x.create(layers=2)
    x.create(dtype=2)
    x.create(ok=False)
    x.acquire(1)
    x.advance_to(0, 3)
    x.expire()
    x.advance(1)
    x.expire()
    x.create()
    x.release(1)
    x.close(1, stranger=True)
    scripts.append(("expire_reject", x))
    return scripts


def session_cases():
    """Byte strings for sessions_fuzzer: the scripted scenarios, and random
    bytes from a fixed seed."""
    rng = random.Random(7)
    cases = [(name, x.data()) for name, x in session_scripts(rng)]
    cases += [(f"random_{n}_{i}", bytes(rng.randrange(256) for _ in range(n)))
              for i, n in enumerate([256, 1024, 2048])]
    return cases


def safetensors(tensors):
    """A safetensors file of {name: (dtype, shape, data bytes)}."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def model_cases():
    """Inputs for model_fuzzer: golden configs and small safetensors files."""
    cases = []
    for config in sorted((HERE.parents[1] / "tests" / "golden" / "models").glob("*/config.json")):
        cases.append((f"config_{config.parent.name}", b"\x01" + config.read_bytes()))
    rng = random.Random(11)
    w = bytes(rng.randrange(256) for _ in range(4 * 8 * 4))
    cases.append(("safetensors_f32", b"\x00" + safetensors({
        "model.layers.0.self_attn.q_proj.weight": ("F32", [8, 4], w),
        "model.layers.0.self_attn.q_proj.bias": ("F32", [8], w[:32])})))
    cases.append(("safetensors_f16_bf16", b"\x00" + safetensors({
        "a": ("F16", [4, 4], w[:32]), "b": ("BF16", [2, 8], w[32:64]),
        "c": ("I64", [2], w[64:80]), "d": ("F32", [0], b"")})))
    return cases


def write(out_dir, cases):
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        old.unlink()
    for name, data in cases:
        digest = hashlib.sha1(data).hexdigest()[:8]
        (out_dir / f"{name}-{digest}").write_bytes(data)


def main():
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "corpus"
    write(out / "sessions", session_cases())  # needs no protobuf
    write(out / "model", model_cases())
    scratch = pathlib.Path(tempfile.mkdtemp())
    try:
        pb = load_pb2(scratch)
        write(out / "attend", [(n, r.SerializeToString(deterministic=True))
                               for n, r in attend_cases(pb)])
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
