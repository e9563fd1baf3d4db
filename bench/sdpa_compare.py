#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention (flash backend) on the benchmark shapes.

The yardstick for the cuda backend: prints one JSON line per shape, with the
keys of `attn_bench --json` (shape, backend, dtype, ms, gflops, gbps) plus
`mode`:
  device          inputs already on the GPU; times the SDPA kernel alone
                  (compare with flash_kernel_bench, the cuda backend's kernel
                  on device-resident inputs);
  host_roundtrip  inputs in host memory, copied to the GPU, attention, output
                  copied back (compare with `attn_bench --backend=cuda`, which
                  times Backend::Run from host buffers the same way).

Usage: python3 bench/sdpa_compare.py [--shapes P1,P2,P3,P4] [--dtype bf16]
                                     [--min_time 1.0] [--modes device,host_roundtrip]
Needs torch with CUDA; run it on the GPU machine beside attn_bench.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# docs/ARCHITECTURE.md "Benchmark shapes and FLOPs": B, Hq, Hkv, Lq, Lk, D, causal.
SHAPES = {
    "P1": (4, 12, 12, 512, 512, 64, False),
    "P2": (1, 32, 8, 2048, 2048, 128, True),
    "P3": (1, 8, 8, 8192, 8192, 64, True),
    "P4": (16, 32, 8, 1, 4096, 128, False),
    "S1": (1, 8, 8, 128, 128, 64, False),
}
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def flops(b, hq, lq, lk, d, causal):
    f = 4.0 * b * hq * lq * lk * d
    return f / 2 if causal and lq == lk else f


def make_attend(hq, hkv):
    """Returns attend(q, k, v, causal) on [B, H, L, D] tensors, GQA included.

    Uses SDPA's enable_gqa when this torch has it (no K/V copies, like the cuda
    backend); otherwise K/V are expanded once, outside the timed region.
    """
    group = hq // hkv

    def attend_gqa(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)

    def attend_plain(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attend_gqa, attend_plain


def time_loop(fn, min_time, sync):
    for _ in range(5):
        fn()
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and iters >= 10:
            return elapsed / iters


def time_device(fn, min_time):
    """Kernel time with CUDA events over back-to-back launches."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    iters = 10
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end)
        if ms / 1e3 >= min_time:
            return ms / 1e3 / iters
        iters *= 2


def run_shape(name, dtype_name, modes, min_time):
    b, hq, hkv, lq, lk, d, causal = SHAPES[name]
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(0)
    # Wire layout [B, L, H, D]; SDPA takes [B, H, L, D] (a transposed view).
    q_host = torch.randn(b, lq, hq, d, generator=gen).to(dtype)
    k_host = torch.randn(b, lk, hkv, d, generator=gen).to(dtype)
    v_host = torch.randn(b, lk, hkv, d, generator=gen).to(dtype)

    attend_gqa, attend_plain = make_attend(hq, hkv)
    q, k, v = (t.cuda().transpose(1, 2) for t in (q_host, k_host, v_host))
    gqa = "native"
    attend = attend_gqa
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            attend(q, k, v, causal)
    except (RuntimeError, TypeError):
        gqa = "expanded" if hq != hkv else "none"
        attend = attend_plain
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    if hq == hkv:
        gqa = "none"

    f = flops(b, hq, lq, lk, d, causal)
    io_bytes = (q_host.numel() + k_host.numel() + v_host.numel() + b * lq * hq * d) * q_host.element_size()
    results = []
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        if "device" in modes:
            seconds = time_device(lambda: attend(q, k, v, causal), min_time)
            results.append(("device", seconds))
        if "host_roundtrip" in modes:
            def roundtrip():
                qd, kd, vd = (t.to("cuda", non_blocking=False).transpose(1, 2)
                              for t in (q_host, k_host, v_host))
                if attend is attend_plain and hq != hkv:
                    kd = kd.repeat_interleave(hq // hkv, dim=1)
                    vd = vd.repeat_interleave(hq // hkv, dim=1)
                out = attend(qd, kd, vd, causal).transpose(1, 2).contiguous()
                return out.cpu()
            seconds = time_loop(roundtrip, min_time, torch.cuda.synchronize)
            results.append(("host_roundtrip", seconds))
    for mode, seconds in results:
        print(json.dumps({
            "shape": name, "backend": "torch_sdpa_flash", "mode": mode, "dtype": dtype_name,
            "B": b, "Hq": hq, "Hkv": hkv, "Lq": lq, "Lk": lk, "D": d, "causal": causal,
            "gqa": gqa, "ms": round(seconds * 1e3, 4), "gflops": round(f / seconds / 1e9, 2),
            "gbps": round(io_bytes / seconds / 1e9, 3), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
        }), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="P1,P2,P3,P4")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--min_time", type=float, default=1.0)
    parser.add_argument("--modes", default="device,host_roundtrip")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sdpa_compare: no CUDA device visible to torch")
    modes = set(args.modes.split(","))
    for name in args.shapes.split(","):
        run_shape(name, args.dtype, modes, args.min_time)


if __name__ == "__main__":
    main()
