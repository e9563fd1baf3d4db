#!/usr/bin/python3
"""PyTorch's peer for `attn_bench --layer`: one Llama-style attention layer on the CPU.

The layer is the one attnserve's layer path computes: q/k/v projections
(x · Wᵀ), RoPE (NeoX pairing, theta 500000) on q and k, GQA causal softmax
attention with torch.nn.functional.scaled_dot_product_attention (kv heads
repeated when this torch's SDPA has no enable_gqa, as Hugging Face's
repeat_kv; --fold_gqa avoids that copy on decode steps), and the output
projection; random weights, weights and activations in --dtype, as PyTorch
runs them.

Shapes (hidden 4096, 32 query heads, 8 kv heads, head_dim 128):
  L1  prefill: one sequence of 512 new tokens, causal.
  L2  decode: 16 sequences, one new token each, over a KV cache of 1024
      tokens already there (prepared before timing); the step writes the new
      k/v into slot 1024 of a preallocated 1025-slot cache and attends over
      all 1025 keys.

Reported: median ms of a step, GFLOP/s (projections 2·M·K·N each, attention
4·D·Hq per visible (query, key) pair, so causal prefill counts the lower
half plus the diagonal), the median ms of the projections (q, k, v, o) and
of the attention part (RoPE, cache write, kv repeat, SDPA, head reshapes)
from explicit timers around each part of the same steps, the BLAS library
torch uses (from /proc/self/maps after a matmul, else torch.__config__), the
library that ran this dtype's matmul (oneDNN's verbose log of a probe
matmul, else the BLAS) and the CPU capability ATen dispatches to.

Usage: /usr/bin/python3 bench/torch_layer.py [--shape=L1|L2] [--dtype=f32|bf16]
                                             [--threads=2] [--iters N] [--warmup N]
                                             [--fold_gqa] [--json]
With --json, stdout is one JSON line {"shape", "dtype", "ms", "gflops",
"proj_ms", "attn_ms", "threads", "blas", "gemm", "isa", "torch"}; the notes go
to stderr.
"""
import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

HIDDEN, HQ, HKV, D = 4096, 32, 8, 128
THETA = 500000.0
# name: (sequences, new tokens per sequence, tokens already cached)
SHAPES = {"L1": (1, 512, 0), "L2": (16, 1, 1024)}
DEFAULT_ITERS = {"L1": 5, "L2": 20}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="L1")
    parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=0, help="timed steps (0: 5 for L1, 20 for L2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--fold_gqa", action="store_true",
                        help="without enable_gqa: attend unmasked (decode) steps with each kv "
                             "head's query heads folded into the query length instead of "
                             "repeating K/V")
    args = parser.parse_args()
    if args.threads < 1 or args.iters < 0 or args.warmup < 0:
        parser.error("--threads must be >= 1, --iters and --warmup >= 0")
    args.iters = args.iters or DEFAULT_ITERS[args.shape]
    return args


def flops(batch, new, past):
    m = batch * new
    proj = 2.0 * m * HIDDEN * (HQ * D + 2 * HKV * D) + 2.0 * m * (HQ * D) * HIDDEN
    visible = new * past + new * (new + 1) / 2      # query i sees past + i + 1 keys
    return proj + 4.0 * D * HQ * batch * visible


def blas_library(torch):
    """The BLAS mapped into this process after a matmul (Debian's alternatives
    resolve to a directory such as openblas-pthread/), else torch's BLAS_INFO."""
    a = torch.randn(64, 64)
    (a @ a).sum().item()
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "/" in line}
    for path in sorted(paths):
        name = os.path.basename(path)
        folder = os.path.basename(os.path.dirname(path))
        if name.startswith("libmkl_"):               # not libmkldnn (oneDNN)
            return "mkl"
        if "openblas" in name or "openblas" in folder:
            return folder if folder.startswith("openblas") else "openblas"
        if "blis" in name:
            return "blis"
    for path in sorted(paths):
        if re.search(r"/libblas\.so", path):
            return "reference-blas (" + path + ")"
    match = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return match.group(1) if match else "unknown"


def gemm_library(torch, dtype, blas):
    """Which library runs a matmul of `dtype`: oneDNN (with its kernel) when
    oneDNN's verbose log shows a primitive executing, else the BLAS."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    if mkldnn is None or not hasattr(mkldnn, "verbose") or not mkldnn.is_available():
        return blas
    x = torch.randn(16, 256).to(dtype)
    w = torch.randn(256, 256).to(dtype)
    sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with mkldnn.verbose(mkldnn.VERBOSE_ON):
                torch.nn.functional.linear(x, w)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        for line in log:
            fields = line.strip().split(",")
            if len(fields) > 4 and fields[1] == "exec":
                return f"onednn:{fields[3]}:{fields[4]}"
    return blas


def cpu_isa(torch):
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    if get is not None:
        return get()
    match = re.search(r"CPU capability usage: (\S+)", torch.__config__.show())
    return match.group(1) if match else "unknown"


def make_sdpa(torch, fold_gqa):
    """attend(q, k, v, causal) on [B, H, L, D] -> [B, Hq, Lq, D], and a note.

    GQA: SDPA's enable_gqa when this torch has it; else, with fold_gqa and no
    mask (a decode step), each kv head's query heads folded into the query
    length ([B, Hkv, group·Lq, D], no copy of K/V); else the kv heads repeated
    (a copy of K and V each step, as Hugging Face's repeat_kv)."""
    F = torch.nn.functional
    sdpa = getattr(F, "scaled_dot_product_attention", None)
    group = HQ // HKV
    if sdpa is not None:
        try:
            t = torch.zeros(1, 2, 1, 4)
            sdpa(t, t[:, :1], t[:, :1], enable_gqa=True)
            return (lambda q, k, v, causal: sdpa(q, k, v, is_causal=causal, enable_gqa=True),
                    "scaled_dot_product_attention, enable_gqa")
        except TypeError:
            pass
        name = "scaled_dot_product_attention"
    else:
        old = F._scaled_dot_product_attention       # PyTorch 1.13: returns (out, weights)
        name = "_scaled_dot_product_attention (1.13)"

        def sdpa(q, k, v, is_causal):
            return old(q, k, v, None, 0.0, False, is_causal)[0]

    def attend(q, k, v, causal):
        if fold_gqa and not causal:
            b, _, lq, d = q.shape
            out = sdpa(q.reshape(b, HKV, group * lq, d), k, v, is_causal=False)
            return out.view(b, HQ, lq, d)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return sdpa(q, k, v, is_causal=causal)
    how = "query heads folded per kv head when unmasked, else kv heads repeated" if fold_gqa \
        else "kv heads repeated"
    return attend, f"{name}, {how}"


def build_layer(torch, shape, dtype, fold_gqa=False, seed=0):
    """Random weights, inputs and (L2) a filled KV cache for `shape`; returns
    (step, inputs). step() runs the layer once and returns (y, total seconds,
    projection seconds, attention seconds)."""
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(seed)
    batch, new, past = SHAPES[shape]
    total = past + new
    causal = new > 1                                # decode: the new token sees every key

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(dtype)

    wq = rand(HQ * D, HIDDEN, scale=HIDDEN ** -0.5)
    wk = rand(HKV * D, HIDDEN, scale=HIDDEN ** -0.5)
    wv = rand(HKV * D, HIDDEN, scale=HIDDEN ** -0.5)
    wo = rand(HIDDEN, HQ * D, scale=(HQ * D) ** -0.5)
    x = rand(batch, new, HIDDEN)
    # RoPE tables for the new tokens' positions (a model computes them once per step).
    inv_freq = 1.0 / THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = torch.arange(past, total, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)   # [new, D], broadcast over B, H
    k_cache = v_cache = None
    if past:
        k_cache = torch.empty(batch, HKV, total, D, dtype=dtype)
        v_cache = torch.empty(batch, HKV, total, D, dtype=dtype)
        k_cache[:, :, :past] = rand(batch, HKV, past, D)
        v_cache[:, :, :past] = rand(batch, HKV, past, D)
    attend, note = make_sdpa(torch, fold_gqa)

    def rotate_half(t):                             # Hugging Face's: (-x2, x1)
        return torch.cat((-t[..., D // 2:], t[..., :D // 2]), dim=-1)

    def step():
        t0 = time.perf_counter()
        q = F.linear(x, wq)
        k = F.linear(x, wk)
        v = F.linear(x, wv)
        t1 = time.perf_counter()
        q = q.view(batch, new, HQ, D).transpose(1, 2)
        k = k.view(batch, new, HKV, D).transpose(1, 2)
        v = v.view(batch, new, HKV, D).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past:
            k_cache[:, :, past:total] = k
            v_cache[:, :, past:total] = v
            k, v = k_cache, v_cache
        out = attend(q, k, v, causal)
        out = out.transpose(1, 2).reshape(batch, new, HQ * D)
        t2 = time.perf_counter()
        y = F.linear(out, wo)
        t3 = time.perf_counter()
        return y, t3 - t0, (t1 - t0) + (t3 - t2), t2 - t1

    inputs = {"x": x, "wq": wq, "wk": wk, "wv": wv, "wo": wo, "cos": cos, "sin": sin,
              "k_cache": k_cache, "v_cache": v_cache, "note": note}
    return step, inputs


def main():
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)       # before torch loads its BLAS
    import torch

    torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    step, inputs = build_layer(torch, args.shape, dtype, args.fold_gqa)
    with torch.inference_mode():
        for _ in range(args.warmup):
            step()
        runs = [step()[1:] for _ in range(args.iters)]
    ms, proj_ms, attn_ms = (statistics.median(r[i] for r in runs) * 1e3 for i in range(3))
    work = flops(*SHAPES[args.shape])
    gflops = work / (ms * 1e-3) / 1e9

    blas = blas_library(torch)
    gemm = gemm_library(torch, dtype, blas)
    isa = cpu_isa(torch)
    notes = (f"torch {torch.__version__}, {args.threads} threads, blas {blas}, "
             f"{args.dtype} matmul: {gemm}\nattention: {inputs['note']}\nisa: {isa}")
    if args.json:
        print(notes, file=sys.stderr)
        print(json.dumps({"shape": args.shape, "dtype": args.dtype, "ms": round(ms, 3),
                          "gflops": round(gflops, 2), "proj_ms": round(proj_ms, 3),
                          "attn_ms": round(attn_ms, 3), "threads": args.threads,
                          "blas": blas, "gemm": gemm, "isa": isa,
                          "torch": torch.__version__}))
    else:
        print(notes)
        print(f"{args.shape} {args.dtype}: {ms:.2f} ms, {gflops:.1f} GFLOP/s "
              f"({work / 1e9:.2f} GFLOP; projections {proj_ms:.2f} ms, "
              f"attention {attn_ms:.2f} ms; median of {args.iters})")


if __name__ == "__main__":
    main()
