"""Writes a tiny random Llama-style model directory that attnserve serves
with --model=NAME=DIR: config.json and model.safetensors (F32), the
attention weights of every layer and nothing else (attnserve reads only
those).

    python3 client/python/examples/make_tiny_model.py /tmp/tiny
    build/server/attnserve --model=tiny=/tmp/tiny

Only NumPy is needed: the safetensors file is written by hand (an 8-byte
little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw little-endian data).
"""

import argparse
import json
import pathlib
import struct

import numpy as np


def to_bytes(array, dtype):
    """The little-endian bytes of a float32 array as F32 or BF16 (the upper
    16 bits of the float32, rounded to nearest even)."""
    array = np.ascontiguousarray(array, dtype="<f4")
    if dtype == "F32":
        return array.tobytes()
    bits = array.view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def write_safetensors(path, tensors, dtype="F32"):
    """Writes {name: float32 array} as one safetensors file of `dtype`."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = to_bytes(array, dtype)
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="directory to write (created if missing)")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4, help="query heads (Hq)")
    parser.add_argument("--kv_heads", type=int, default=2, help="key/value heads (Hkv)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["F32", "BF16"], default="F32",
                        help="the weights' dtype in the file")
    args = parser.parse_args()
    if args.hidden_size % args.heads or args.heads % args.kv_heads:
        parser.error("hidden_size must be a multiple of heads, heads of kv_heads")

    head_dim = args.hidden_size // args.heads
    config = {
        "model_type": "llama",
        "hidden_size": args.hidden_size,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "num_hidden_layers": args.layers,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32" if args.dtype == "F32" else "bfloat16",
    }
    rng = np.random.default_rng(args.seed)

    def linear(out_features, in_features):
        # [out, in], as torch.nn.Linear stores it; uniform in +-1/sqrt(in).
        bound = 1 / np.sqrt(in_features)
        return rng.uniform(-bound, bound, (out_features, in_features)).astype(np.float32)

    tensors = {}
    for layer in range(args.layers):
        base = f"model.layers.{layer}.self_attn."
        tensors[base + "q_proj.weight"] = linear(args.heads * head_dim, args.hidden_size)
        tensors[base + "k_proj.weight"] = linear(args.kv_heads * head_dim, args.hidden_size)
        tensors[base + "v_proj.weight"] = linear(args.kv_heads * head_dim, args.hidden_size)
        tensors[base + "o_proj.weight"] = linear(args.hidden_size, args.heads * head_dim)

    out = pathlib.Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(out / "model.safetensors", tensors, args.dtype)
    print(f"{out}: llama, {args.layers} layers, hidden {args.hidden_size}, "
          f"{args.heads} heads ({args.kv_heads} kv) of {head_dim}, {args.dtype}")


if __name__ == "__main__":
    main()
