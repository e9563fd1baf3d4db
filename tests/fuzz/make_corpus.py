#!/usr/bin/python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/).

attend/: small valid AttendRequest messages (serialized protos), one per
feature: plain, 3-D, causal in both alignments, sliding window, softcap, ALiBi,
GQA/MQA, bias broadcasts with -inf, key_lengths, LINEAR, lse/weights/top_k,
F16/BF16. sessions/: byte strings for sessions_fuzzer's FuzzedDataProvider
decoding, from a fixed seed.

Deterministic: rerunning it rewrites the same files. Needs python3-protobuf and
protoc (scripts/install-deps installs both).

    tests/fuzz/make_corpus.py [OUT_DIR]     (default: tests/fuzz/corpus)
"""

import hashlib
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
    ]
    return cases


def session_cases():
    """Byte strings for sessions_fuzzer, which reads its operations from them."""
    rng = random.Random(7)
    return [(f"random_{n}_{i}", bytes(rng.randrange(256) for _ in range(n)))
            for i, n in enumerate([64, 128, 256, 512, 512, 1024, 1024, 2048])]


def write(out_dir, cases):
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        old.unlink()
    for name, data in cases:
        digest = hashlib.sha1(data).hexdigest()[:8]
        (out_dir / f"{name}-{digest}").write_bytes(data)


def main():
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "corpus"
    scratch = pathlib.Path(tempfile.mkdtemp())
    try:
        pb = load_pb2(scratch)
        write(out / "attend", [(n, r.SerializeToString(deterministic=True))
                               for n, r in attend_cases(pb)])
        write(out / "sessions", session_cases())
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
