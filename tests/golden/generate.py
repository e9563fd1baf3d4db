#!/usr/bin/python3
"""Generates the golden attention cases under tests/golden/cases/.

Each case is a directory with float32 (or float16) random inputs q/k/v, an
optional bias, the expected outputs computed by PyTorch in float64, and a
case.txt with the options. The expected values are computed with explicit
float64 tensor operations (the mask and every bias built by hand, following
the semantics table of docs/ARCHITECTURE.md); standard softmax cases are cross-checked
against PyTorch's own scaled-dot-product attention and LINEAR cases against a
prefix-sum formulation, and the script fails if they disagree.

It also generates the rotary position embedding (RoPE) cases under
tests/golden/rope/: random float32 [T, H, D] inputs, int64 positions and the
rotated values computed in float64 from the definitions (NeoX with Hugging
Face's rotate_half, GPT-J as complex multiplication of interleaved pairs, and
the NONE, LINEAR, NTK, DYNAMIC and LLAMA3 frequency scalings); NeoX is
cross-checked against the complex form on the two halves and GPT-J against
NeoX on de-interleaved dims, and the script fails if they disagree.

And it generates the model layer cases under tests/golden/models/: tiny Hugging
Face-style model directories (config.json, random weights in F32, F16 or BF16
safetensors, sharded or not) for the llama family (mistral's sliding window,
llama3 RoPE scaling, qwen3's q/k norm, qwen2's biases) and bert with
cross-attention, with each layer's attention output (projections through
o_proj) computed in float64 from the weights as stored; llama-family layers are
cross-checked against PyTorch's SDPA, bert layers are torch.nn.MultiheadAttention.

And it generates the sparse attention cases under tests/golden/sparse/: block
masks (BSR indptr/indices, full blocks), key selections, global tokens and sink
logits, with the dense boolean mask built key by key from the documented
semantics (block masks also by expanding a dense block matrix, and the script
fails if the two differ); the expected values are the softmax over the visible
keys with the sink as one more logit column, dropped after the softmax, and are
cross-checked against PyTorch's SDPA with the sink folded in by rescaling.

Usage: /usr/bin/python3 tests/golden/generate.py [--out DIR] [--rope_out DIR]
                                                 [--models_out DIR] [--sparse_out DIR]
(needs python3-torch and python3-numpy; see README.md).
"""

import argparse
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

F64 = torch.float64


class Case:
    """One golden case: shapes, options and the seed of its random inputs."""

    def __init__(self, name, *, B=2, Lq=5, Lk=7, Hq=2, Hkv=None, D=8, Dv=None, seed=None,
                 dtype="f32", scale=0.0, causal=False, alignment="bottom_right",
                 window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=(),
                 bias_shape=None, bias_neg_inf=0.0, bias_masked_rows=(), key_lengths=(),
                 variant="softmax", top_k=0, lse=False, weights=False, query_3d=False,
                 q_scale=1.0, duplicate_keys=()):
        self.name = name
        self.B, self.Lq, self.Lk, self.Hq = B, Lq, Lk, Hq
        self.Hkv = Hq if Hkv is None else Hkv
        self.D = D
        self.Dv = D if Dv is None else Dv
        self.seed = seed
        self.dtype = dtype
        self.scale = scale
        self.causal = causal
        self.alignment = alignment
        self.window_left = window_left
        self.window_right = window_right
        self.softcap = softcap
        self.alibi_slopes = list(alibi_slopes)
        self.bias_shape = bias_shape
        self.bias_neg_inf = bias_neg_inf        # fraction of bias entries set to -inf
        self.bias_masked_rows = bias_masked_rows  # (b, h, i) rows of the full bias set to -inf
        self.key_lengths = list(key_lengths)
        self.variant = variant
        self.top_k = top_k
        self.lse = lse
        self.weights = weights
        self.query_3d = query_3d
        self.q_scale = q_scale                  # sharpens the attention when > 1
        self.duplicate_keys = duplicate_keys    # (src, dst) key rows copied, for top-k ties


CASES = [
    Case("plain", lse=True, weights=True, top_k=3),
    Case("plain_scale", scale=0.3, lse=True, top_k=2),
    Case("self_attention", B=1, Lq=8, Lk=8, Hq=3, D=16, lse=True, weights=True),
    Case("causal_bottom_right_lq_lt_lk", Lq=4, Lk=9, causal=True, lse=True, weights=True, top_k=4),
    Case("causal_bottom_right_lq_gt_lk", Lq=9, Lk=4, causal=True, lse=True, weights=True, top_k=2),
    Case("causal_self", B=1, Lq=8, Lk=8, Hq=2, causal=True, lse=True, weights=True),
    Case("causal_top_left", Lq=6, Lk=9, causal=True, alignment="top_left", lse=True, weights=True),
    Case("causal_top_left_lq_gt_lk", Lq=9, Lk=5, causal=True, alignment="top_left", lse=True),
    Case("decode_causal", B=2, Lq=1, Lk=17, Hq=4, Hkv=2, D=16, causal=True, lse=True, top_k=4),
    Case("window_left", B=1, Lq=10, Lk=10, window_left=2, lse=True, weights=True),
    Case("window_both", B=1, Lq=10, Lk=10, window_left=2, window_right=1, lse=True, weights=True),
    Case("window_both_lq_lt_lk", Lq=5, Lk=11, window_left=3, window_right=2, lse=True,
         weights=True),
    Case("window_top_left", Lq=5, Lk=11, window_left=1, window_right=3, alignment="top_left",
         lse=True, weights=True),
    Case("window_causal", B=1, Lq=12, Lk=12, Hq=2, causal=True, window_left=3, lse=True,
         weights=True, top_k=5),
    Case("softcap", scale=1.0, softcap=2.0, q_scale=2.0, lse=True, weights=True),
    Case("softcap_causal", Lq=6, Lk=6, scale=1.0, softcap=1.5, causal=True, q_scale=2.0, lse=True),
    Case("alibi", Hq=4, Lq=5, Lk=8, alibi_slopes=[0.5, 0.25, 0.125, 0.0625], lse=True,
         weights=True),
    Case("alibi_causal", Hq=2, Lq=8, Lk=8, alibi_slopes=[0.75, 0.1], causal=True, lse=True),
    Case("alibi_top_left", Hq=2, Lq=4, Lk=7, alibi_slopes=[0.5, 0.3], alignment="top_left",
         causal=True, lse=True),
    Case("bias_2d", bias_shape=(5, 7), bias_neg_inf=0.2, lse=True, weights=True, top_k=3),
    Case("bias_head", Hq=3, bias_shape=(3, 1, 7), bias_neg_inf=0.2, lse=True, weights=True),
    Case("bias_batch", bias_shape=(2, 1, 1, 7), bias_neg_inf=0.25, lse=True, weights=True),
    Case("bias_full_masked_row", bias_shape=(2, 2, 5, 7), bias_neg_inf=0.1,
         bias_masked_rows=[(0, 1, 2), (1, 0, 4)], lse=True, weights=True, top_k=3),
    Case("bias_causal", Lq=6, Lk=6, causal=True, bias_shape=(6, 6), lse=True),
    Case("key_lengths", Lk=7, key_lengths=[5, 0], lse=True, weights=True, top_k=6),
    Case("key_lengths_causal", Lq=4, Lk=7, key_lengths=[3, 7], causal=True, lse=True,
         weights=True, top_k=3),
    Case("key_lengths_alibi", Hq=2, Lq=3, Lk=8, key_lengths=[6, 8], alibi_slopes=[0.5, 0.2],
         lse=True),
    Case("gqa", B=2, Lq=6, Lk=9, Hq=6, Hkv=2, lse=True, weights=True, top_k=2),
    Case("gqa_causal", B=1, Lq=9, Lk=9, Hq=4, Hkv=2, D=16, causal=True, lse=True),
    Case("mqa", B=2, Lq=5, Lk=8, Hq=4, Hkv=1, lse=True, weights=True),
    Case("dv_ne_d", D=16, Dv=5, lse=True),
    Case("dv_gt_d", D=4, Dv=12, causal=True, Lq=5, Lk=5),
    Case("query_3d", B=1, Lq=6, Lk=7, Hq=2, query_3d=True, lse=True, weights=True),
    Case("topk_ties", B=1, Lq=4, Lk=8, Hq=1, duplicate_keys=[(1, 5), (2, 6), (2, 7)], top_k=8,
         weights=True),
    Case("topk_past_visible", B=1, Lq=6, Lk=6, Hq=2, causal=True, top_k=4, lse=True),
    Case("everything", B=2, Lq=7, Lk=11, Hq=4, Hkv=2, D=16, Dv=8, scale=0.2, causal=True,
         window_left=5, softcap=3.0, alibi_slopes=[0.3, 0.2, 0.1, 0.05], bias_shape=(2, 1, 7, 11),
         bias_neg_inf=0.1, key_lengths=[9, 11], q_scale=2.0, lse=True, weights=True, top_k=3),
    Case("linear", B=2, Lq=5, Lk=7, Hq=2, variant="linear"),
    Case("linear_causal", B=2, Lq=8, Lk=8, Hq=2, variant="linear", causal=True),
    Case("linear_causal_lq_lt_lk", B=1, Lq=4, Lk=9, Hq=4, Hkv=2, D=16, Dv=6, variant="linear",
         causal=True),
    Case("linear_key_lengths", B=2, Lq=5, Lk=7, Hq=2, Hkv=1, variant="linear", causal=True,
         key_lengths=[4, 0]),
    Case("plain_f16", dtype="f16", lse=True, weights=True, top_k=2),
    Case("causal_gqa_f16", B=1, Lq=6, Lk=10, Hq=4, Hkv=2, D=16, dtype="f16", causal=True,
         lse=True),
]


def f32(x):
    """The float32 value a C++ reader of case.txt will see, as a Python float."""
    return float(np.float32(x))


def visible_mask(c, key_len):
    """Boolean [B, Lq, Lk]: query i of row b may see key j (window, causal, key_lengths)."""
    i = torch.arange(c.Lq).view(1, c.Lq, 1)
    j = torch.arange(c.Lk).view(1, 1, c.Lk)
    length = key_len.view(c.B, 1, 1)
    offset = length - c.Lq if c.alignment == "bottom_right" else torch.zeros_like(length)
    diag = i + offset
    window_right = 0 if c.causal else c.window_right
    mask = j < length
    if c.window_left >= 0:
        mask = mask & (j >= diag - c.window_left)
    if window_right >= 0:
        mask = mask & (j <= diag + window_right)
    return mask, offset


def expand_kv(x, c):
    """[B, Lk, Hkv, E] -> [B, Hq, Lk, E]: query head h reads kv head h // (Hq/Hkv)."""
    return x.permute(0, 2, 1, 3).repeat_interleave(c.Hq // c.Hkv, dim=1)


def softmax_reference(c, q, k, v, bias, key_len):
    """Explicit float64 attention. q [B,Lq,Hq,D], k/v [B,Lk,Hkv,*] (float64)."""
    qh = q.permute(0, 2, 1, 3)                     # [B, Hq, Lq, D]
    kh, vh = expand_kv(k, c), expand_kv(v, c)      # [B, Hq, Lk, *]
    scale = f32(c.scale) if c.scale else f32(1.0 / math.sqrt(c.D))
    s = torch.einsum("bhid,bhjd->bhij", qh, kh) * scale
    if c.softcap:
        cap = f32(c.softcap)
        s = cap * torch.tanh(s / cap)
    mask, offset = visible_mask(c, key_len)
    if c.alibi_slopes:
        i = torch.arange(c.Lq).view(1, 1, c.Lq, 1)
        j = torch.arange(c.Lk).view(1, 1, 1, c.Lk)
        dist = (i + offset.view(c.B, 1, 1, 1) - j).abs().to(F64)
        slopes = torch.tensor([f32(x) for x in c.alibi_slopes], dtype=F64).view(1, c.Hq, 1, 1)
        s = s - slopes * dist
    if bias is not None:
        s = s + bias                                # broadcasts to [B, Hq, Lq, Lk]
    s = s.masked_fill(~mask.unsqueeze(1), -math.inf)

    row_max = s.amax(dim=-1, keepdim=True)
    fully_masked = row_max == -math.inf
    shifted = torch.where(fully_masked, torch.zeros_like(s), s - row_max)
    e = torch.exp(shifted).masked_fill(s == -math.inf, 0.0)
    total = e.sum(dim=-1, keepdim=True)
    p = torch.where(fully_masked, torch.zeros_like(e), e / torch.where(fully_masked, 1.0, total))
    out = torch.einsum("bhij,bhje->bihe", p, vh)    # [B, Lq, Hq, Dv]
    lse = torch.logsumexp(s, dim=-1)                # -inf for a fully masked row
    attended = s > -math.inf
    return out, lse, p, attended


def check_against_sdpa(c, q, k, v, bias, key_len, out, lse):
    """Cross-checks a softmax case (no softcap) against PyTorch's SDPA, with the
    mask built independently (tril/triu) and the scale folded into q."""
    sdpa = getattr(F, "scaled_dot_product_attention", None) or F._scaled_dot_product_attention
    qh = q.permute(0, 2, 1, 3)
    kh, vh = expand_kv(k, c), expand_kv(v, c)
    scale = f32(c.scale) if c.scale else f32(1.0 / math.sqrt(c.D))
    qh = qh * (scale * math.sqrt(c.D))             # SDPA divides by sqrt(D) itself
    add = torch.zeros(c.B, c.Hq, c.Lq, c.Lk, dtype=F64)
    for b in range(c.B):
        length = int(key_len[b])
        off = length - c.Lq if c.alignment == "bottom_right" else 0
        ones = torch.ones(c.Lq, c.Lk, dtype=torch.bool)
        allowed = ones.clone()
        allowed[:, length:] = False
        right = 0 if c.causal else c.window_right
        if right >= 0:
            allowed &= torch.tril(ones, diagonal=off + right)
        if c.window_left >= 0:
            allowed &= torch.triu(ones, diagonal=off - c.window_left)
        add[b] = add[b].masked_fill(~allowed, -math.inf)
        for h, slope in enumerate(c.alibi_slopes):
            for i in range(c.Lq):
                for j in range(c.Lk):
                    add[b, h, i, j] -= f32(slope) * abs(i + off - j)
    if bias is not None:
        add = add + bias
    expected, _ = sdpa(qh, kh, vh, add, 0.0, False, False)
    expected = expected.permute(0, 2, 1, 3)
    rows = lse > -math.inf                          # SDPA gives NaN on fully masked rows
    got = out.permute(0, 2, 1, 3)[rows]
    want = expected.permute(0, 2, 1, 3)[rows]
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err < 1e-12, f"{c.name}: differs from PyTorch SDPA by {err}"
    if c.causal and c.alignment == "top_left" and not (c.window_left >= 0 or c.alibi_slopes
                                                      or bias is not None or c.key_lengths):
        # PyTorch's own is_causal is top-left aligned: an independent check of the alignment.
        causal_out, _ = sdpa(qh, kh, vh, None, 0.0, False, True)
        causal_out = causal_out.permute(0, 2, 1, 3)
        got = out.permute(0, 2, 1, 3)[rows]
        want = causal_out.permute(0, 2, 1, 3)[rows]
        err = (got - want).abs().max().item() if got.numel() else 0.0
        assert err < 1e-12, f"{c.name}: differs from SDPA is_causal by {err}"


def linear_reference(c, q, k, v, key_len):
    """out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j) over visible j; φ = elu + 1."""
    phi_q = F.elu(q.permute(0, 2, 1, 3)) + 1
    phi_k = F.elu(expand_kv(k, c)) + 1
    vh = expand_kv(v, c)
    a = torch.einsum("bhid,bhjd->bhij", phi_q, phi_k)
    mask, _ = visible_mask(c, key_len)
    a = a.masked_fill(~mask.unsqueeze(1), 0.0)
    den = a.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhij,bhje->bihe", a / torch.where(den > 0, den, 1.0), vh)
    return out, mask


def check_linear_prefix_sums(c, q, k, v, key_len, out):
    """Causal LINEAR the recurrent way: running sums of φ(k_j) v_jᵀ and φ(k_j)."""
    if not c.causal:
        return
    phi_q = F.elu(q.permute(0, 2, 1, 3)) + 1       # [B, Hq, Lq, D]
    phi_k = F.elu(expand_kv(k, c)) + 1              # [B, Hq, Lk, D]
    vh = expand_kv(v, c)
    for b in range(c.B):
        length = int(key_len[b])
        off = length - c.Lq if c.alignment == "bottom_right" else 0
        kv = torch.einsum("hjd,hje->hjde", phi_k[b, :, :length], vh[b, :, :length]).cumsum(1)
        z = phi_k[b, :, :length].cumsum(1)
        for i in range(c.Lq):
            last = min(i + off, length - 1)
            if last < 0:
                want = torch.zeros(c.Hq, c.Dv, dtype=F64)
            else:
                num = torch.einsum("hd,hde->he", phi_q[b, :, i], kv[:, last])
                den = torch.einsum("hd,hd->h", phi_q[b, :, i], z[:, last])
                want = num / den.unsqueeze(-1)
            err = (out[b, i] - want).abs().max().item()
            assert err < 1e-12, f"{c.name}: differs from the prefix-sum form by {err}"


def top_k(p, attended, k):
    """Per row: the k attended keys by decreasing weight, ties lower index first;
    -1 / 0 past the attended keys."""
    key = torch.where(attended, p, torch.full_like(p, -1.0))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
    weights = torch.gather(p, -1, order)
    present = torch.gather(attended, -1, order)
    idx = torch.where(present, order, torch.full_like(order, -1)).to(torch.int32)
    return idx, torch.where(present, weights, torch.zeros_like(weights))


def make_inputs(c, gen):
    np_dtype = np.float16 if c.dtype == "f16" else np.float32

    def rand(*shape, scale=1.0):
        x = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale
        return x.numpy().astype(np_dtype)

    q = rand(c.B, c.Lq, c.Hq, c.D, scale=c.q_scale)
    k = rand(c.B, c.Lk, c.Hkv, c.D)
    v = rand(c.B, c.Lk, c.Hkv, c.Dv)
    for src, dst in c.duplicate_keys:
        k[:, dst] = k[:, src]
    bias = None
    if c.bias_shape is not None:
        bias = rand(*c.bias_shape)
        drop = torch.rand(*c.bias_shape, generator=gen).numpy() < c.bias_neg_inf
        bias[drop] = -np.inf
        for b, h, i in c.bias_masked_rows:
            bias[b, h, i, :] = -np.inf
    return q, k, v, bias


def entropy_reference(p):
    """-Σ p·ln p per row of the probabilities (0 where masked, so 0 for a
    fully masked row), in nats; checked against torch.special.entr."""
    safe = torch.where(p > 0, p, torch.ones_like(p))
    h = -(torch.where(p > 0, p * torch.log(safe), torch.zeros_like(p))).sum(dim=-1)
    entr = torch.special.entr(p).sum(dim=-1)
    if not torch.allclose(h, entr, rtol=1e-12, atol=1e-12):
        raise SystemExit("entropy: the explicit sum and torch.special.entr disagree")
    return h


def write_case(c, root):
    gen = torch.Generator().manual_seed(c.seed if c.seed is not None else sum(map(ord, c.name)))
    q, k, v, bias = make_inputs(c, gen)
    qt, kt, vt = (torch.from_numpy(x.astype(np.float64)) for x in (q, k, v))
    bt = None if bias is None else torch.from_numpy(bias.astype(np.float64))
    key_len = torch.tensor(c.key_lengths if c.key_lengths else [c.Lk] * c.B)

    results = {}
    if c.variant == "linear":
        out, _ = linear_reference(c, qt, kt, vt, key_len)
        check_linear_prefix_sums(c, qt, kt, vt, key_len, out)
    else:
        out, lse, p, attended = softmax_reference(c, qt, kt, vt, bt, key_len)
        if not c.softcap:
            check_against_sdpa(c, qt, kt, vt, bt, key_len, out, lse)
        if c.lse:
            results["lse"] = lse
            results["entropy"] = entropy_reference(p)
        if c.weights:
            results["weights"] = p
        if c.top_k:
            results["topk_idx"], results["topk_w"] = top_k(p, attended, c.top_k)

    d = root / c.name
    d.mkdir(parents=True)
    if c.query_3d:
        assert c.B == 1
        q, k, v, out = q[0], k[0], v[0], out[0]
    np.save(d / "q.npy", q)
    np.save(d / "k.npy", k)
    np.save(d / "v.npy", v)
    if bias is not None:
        np.save(d / "bias.npy", bias)
    np.save(d / "out.npy", out.numpy().astype(np.float64))
    for name, value in results.items():
        np.save(d / f"{name}.npy", value.numpy())

    options = {
        "dtype": c.dtype,
        "variant": c.variant,
        "scale": repr(f32(c.scale)),
        "causal": int(c.causal),
        "alignment": c.alignment,
        "window_left": c.window_left,
        "window_right": c.window_right,
        "softcap": repr(f32(c.softcap)),
        "alibi_slopes": ",".join(repr(f32(s)) for s in c.alibi_slopes),
        "key_lengths": ",".join(str(n) for n in c.key_lengths),
        "top_k": c.top_k,
        "lse": int(c.lse),
        "entropy": int(c.lse and c.variant == "softmax"),
        "weights": int(c.weights),
    }
    with open(d / "case.txt", "w") as f:
        for key, value in options.items():
            f.write(f"{key}={value}\n")


# ---------------------------------------------------------------------------
# Sparse attention
# ---------------------------------------------------------------------------


class SparseCase(Case):
    """A golden case with a sparse pattern (AttentionRequest::sparsity): a block
    mask (block=(R, C)) or a key selection (select=k entries per index row),
    global tokens and sink logits. The pattern is drawn from the case's
    generator after the inputs."""

    def __init__(self, name, *, block=None, per_batch=False, per_head=False, rank1=False,
                 full_blocks=False, density=0.5, select=0, query_block=1, key_block=1,
                 select_heads="q", select_batch=True, global_tokens=(), sink_logits=(), **kw):
        super().__init__(name, **kw)
        self.block = block                      # (block_rows, block_cols) or None
        self.per_batch, self.per_head, self.rank1 = per_batch, per_head, rank1
        self.full_blocks = full_blocks          # about half the listed blocks become full ones
        self.density = density                  # chance a block is listed
        self.select = select                    # key_indices entries per row (0: none)
        self.query_block, self.key_block = query_block, key_block
        self.select_heads = select_heads        # "q", "kv" or "one": the index tensor's heads
        self.select_batch = select_batch        # [B, ...] (else [1, ...])
        self.global_tokens = list(global_tokens)
        self.sink_logits = list(sink_logits)


SPARSE_CASES = [
    # R 4, C 3 over Lq 10, Lk 13: the last row block (2 rows) and key block (1
    # key) are short. Broadcast over batch rows and heads.
    SparseCase("block_broadcast", B=2, Lq=10, Lk=13, Hq=2, block=(4, 3), lse=True, weights=True),
    # One slice per (batch row, head), with full blocks.
    SparseCase("block_per_head_full", B=2, Lq=11, Lk=14, Hq=3, block=(3, 4), per_batch=True,
               per_head=True, full_blocks=True, density=0.6, lse=True, top_k=3),
    SparseCase("block_causal_uneven", B=2, Lq=9, Lk=15, Hq=2, block=(4, 6), per_batch=True,
               causal=True, density=0.7, lse=True, weights=True),
    # Top-left causal with Lq > Lk, a rank-1 indptr, R != C.
    SparseCase("block_causal_top_left_rank1", B=1, Lq=12, Lk=7, Hq=2, block=(5, 2), rank1=True,
               causal=True, alignment="top_left", density=0.7, lse=True),
    # Per key, one index row per query row and query head, -1 padded, unsorted.
    SparseCase("keys_per_key", B=2, Lq=6, Lk=11, Hq=4, Hkv=2, select=5, lse=True, weights=True),
    # Per key block (4 keys) for blocks of 3 query rows, one row per KV head.
    SparseCase("keys_per_block_gqa", B=2, Lq=10, Lk=17, Hq=4, Hkv=2, select=2, query_block=3,
               key_block=4, select_heads="kv", lse=True, weights=True),
    SparseCase("keys_broadcast_causal", B=2, Lq=7, Lk=9, Hq=2, select=4, query_block=2,
               select_heads="one", select_batch=False, causal=True, lse=True),
    # Global tokens: key 0 (a sink token), keys 5 and 9 (the diagonals of query
    # rows 1 and 5, which then see every key up to their diagonal).
    SparseCase("global_causal", B=1, Lq=8, Lk=12, Hq=2, causal=True, window_left=1,
               global_tokens=[9, 0, 5], lse=True, weights=True),
    SparseCase("global_window", B=2, Lq=9, Lk=9, Hq=2, window_left=2, window_right=1,
               global_tokens=[4, 0], key_lengths=[9, 6], lse=True, weights=True),
    # Sinks: bottom-right causal with Lq > Lk leaves rows 0..2 without a key,
    # and batch row 1 has none at all: lse = sink, output 0, entropy 0.
    SparseCase("sinks", B=2, Lq=7, Lk=4, Hq=3, causal=True, key_lengths=[4, 0],
               sink_logits=[-0.5, 1.0, 2.5], lse=True, weights=True, top_k=2),
    SparseCase("sinks_keys_global", B=1, Lq=6, Lk=10, Hq=2, select=3, global_tokens=[2],
               sink_logits=[0.75, -1.25], lse=True, weights=True),
    SparseCase("everything", B=2, Lq=9, Lk=14, Hq=4, Hkv=2, D=8, block=(4, 5), per_head=True,
               full_blocks=True, density=0.6, global_tokens=[3, 12], sink_logits=[0.5, -1, 2, 1.5],
               causal=True, scale=0.3, softcap=4.0, alibi_slopes=[0.3, 0.2, 0.1, 0.05],
               bias_shape=(2, 1, 9, 14), bias_neg_inf=0.1, key_lengths=[12, 14], q_scale=2.0,
               lse=True, weights=True, top_k=3),
]


def draw_block_mask(c, gen):
    """(indptr, indices, full_indptr, full_indices) as int32 numpy arrays: per
    slice and row block, each key block listed with probability c.density;
    row block 1 of the first slice lists none."""
    rows, cols = -(-c.Lq // c.block[0]), -(-c.Lk // c.block[1])
    slices = (c.B if c.per_batch else 1) * (c.Hq if c.per_head else 1)
    indptr, indices, full_indptr, full_indices = [0], [], [0], []
    for s in range(slices):
        if s > 0:
            indptr.append(indptr[-1])
            full_indptr.append(full_indptr[-1])
        for r in range(rows):
            listed = torch.rand(cols, generator=gen) < c.density
            to_full = torch.rand(cols, generator=gen) < 0.5
            for col in range(cols):
                if not listed[col] or (s == 0 and r == 1):
                    continue
                (full_indices if c.full_blocks and to_full[col] else indices).append(col)
            indptr.append(len(indices))
            full_indptr.append(len(full_indices))
    shape = (rows + 1,) if c.rank1 else (c.B if c.per_batch else 1, c.Hq if c.per_head else 1,
                                        rows + 1)
    as_i32 = lambda x, s: np.array(x, dtype=np.int32).reshape(s)
    return (as_i32(indptr, shape), as_i32(indices, (len(indices),)),
            as_i32(full_indptr, shape), as_i32(full_indices, (len(full_indices),)))


def draw_key_indices(c, gen):
    """int32 [B or 1, Hq or Hkv or 1, ceil(Lq / query_block), k]: distinct units
    in random order, up to a third of each row -1."""
    rows, units = -(-c.Lq // c.query_block), -(-c.Lk // c.key_block)
    heads = {"q": c.Hq, "kv": c.Hkv, "one": 1}[c.select_heads]
    out = np.full((c.B if c.select_batch else 1, heads, rows, c.select), -1, dtype=np.int32)
    for index in np.ndindex(*out.shape[:3]):
        pad = int(torch.randint(0, c.select // 3 + 1, (1,), generator=gen))
        chosen = torch.randperm(units, generator=gen)[:c.select - pad]
        row = np.full(c.select, -1, dtype=np.int32)
        row[:len(chosen)] = chosen.numpy()
        out[index] = row[torch.randperm(c.select, generator=gen).numpy()]
    return out


def sparse_visible(c, pattern, key_len):
    """Boolean [B, Hq, Lq, Lk] from the documented semantics, key by key: a key
    within the row's length is visible if it is global or the query row is
    (and, with causal, not after the diagonal), or else if it is inside the
    causal/window range and the row's block list or key selection has it."""
    globals_ = set(c.global_tokens)
    group = c.Hq // c.Hkv
    vis = torch.zeros(c.B, c.Hq, c.Lq, c.Lk, dtype=torch.bool)
    for b, h, i, j in np.ndindex(c.B, c.Hq, c.Lq, c.Lk):
        length = int(key_len[b])
        diag = i + (length - c.Lq if c.alignment == "bottom_right" else 0)
        if j >= length:
            continue
        if (j in globals_ or diag in globals_) and (not c.causal or j <= diag):
            vis[b, h, i, j] = True
            continue
        right = 0 if c.causal else c.window_right
        if (c.window_left >= 0 and j < diag - c.window_left) or (right >= 0 and j > diag + right):
            continue
        if c.block is not None:
            indptr, indices, full_indptr, full_indices = pattern["block"]
            at = (i // c.block[0],) if c.rank1 else (
                b if c.per_batch else 0, h if c.per_head else 0, i // c.block[0])
            row_end = at[:-1] + (at[-1] + 1,)
            listed = set(indices[indptr[at]:indptr[row_end]].tolist())
            listed |= set(full_indices[full_indptr[at]:full_indptr[row_end]].tolist())
            vis[b, h, i, j] = j // c.block[1] in listed
        elif c.select:
            ki = pattern["keys"]
            head = {"q": h, "kv": h // group, "one": 0}[c.select_heads]
            row = ki[b if c.select_batch else 0, head, i // c.query_block]
            vis[b, h, i, j] = j // c.key_block in set(row.tolist())
        else:
            vis[b, h, i, j] = True
    return vis


def check_block_mask_by_expansion(c, pattern, key_len, vis):
    """The block mask's part of `vis`, rebuilt from a dense [rows, cols] block
    matrix per slice, expanded with repeat_interleave and cropped to [Lq, Lk]."""
    indptr, indices, full_indptr, full_indices = pattern["block"]
    R, C = c.block
    rows, cols = -(-c.Lq // R), -(-c.Lk // C)
    flat_ptr, flat_full = indptr.reshape(-1), full_indptr.reshape(-1)
    slices = flat_ptr.size // (rows + 1)
    blocks = torch.zeros(slices, rows, cols, dtype=torch.bool)
    for s in range(slices):
        for r in range(rows):
            for ptr, idx in ((flat_ptr, indices), (flat_full, full_indices)):
                at = s * (rows + 1) + r
                blocks[s, r, torch.from_numpy(idx[ptr[at]:ptr[at + 1]]).long()] = True
    dense = blocks.repeat_interleave(R, 1).repeat_interleave(C, 2)[:, :c.Lq, :c.Lk]
    dense = dense.view(c.B if c.per_batch else 1, c.Hq if c.per_head else 1, c.Lq, c.Lk)
    in_range, offset = visible_mask(c, key_len)          # [B, Lq, Lk]
    i = torch.arange(c.Lq).view(1, c.Lq, 1)
    j = torch.arange(c.Lk).view(1, 1, c.Lk)
    diag = i + offset.view(c.B, 1, 1)
    g = torch.tensor(c.global_tokens, dtype=torch.long)
    is_global = (j.unsqueeze(-1) == g).any(-1) | (diag.unsqueeze(-1) == g).any(-1)
    is_global = is_global & (j < key_len.view(c.B, 1, 1))
    if c.causal:
        is_global = is_global & (j <= diag)
    want = (in_range.unsqueeze(1) & dense) | is_global.unsqueeze(1)
    assert torch.equal(want.expand_as(vis), vis), f"{c.name}: the block mask's expansion differs"


def sparse_softmax_reference(c, q, k, v, bias, key_len, vis, sinks):
    """Explicit float64 attention over the visible keys, the sink (if any) one
    more logit column that takes probability and is dropped afterwards."""
    qh = q.permute(0, 2, 1, 3)
    kh, vh = expand_kv(k, c), expand_kv(v, c)
    scale = f32(c.scale) if c.scale else f32(1.0 / math.sqrt(c.D))
    s = torch.einsum("bhid,bhjd->bhij", qh, kh) * scale
    if c.softcap:
        cap = f32(c.softcap)
        s = cap * torch.tanh(s / cap)
    _, offset = visible_mask(c, key_len)
    if c.alibi_slopes:
        i = torch.arange(c.Lq).view(1, 1, c.Lq, 1)
        j = torch.arange(c.Lk).view(1, 1, 1, c.Lk)
        dist = (i + offset.view(c.B, 1, 1, 1) - j).abs().to(F64)
        slopes = torch.tensor([f32(x) for x in c.alibi_slopes], dtype=F64).view(1, c.Hq, 1, 1)
        s = s - slopes * dist
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~vis, -math.inf)
    if sinks is not None:
        s_ext = torch.cat([s, sinks.view(1, c.Hq, 1, 1).expand(c.B, c.Hq, c.Lq, 1)], dim=-1)
    else:
        s_ext = s
    row_max = s_ext.amax(dim=-1, keepdim=True)
    fully_masked = row_max == -math.inf
    e = torch.exp(s_ext - torch.where(fully_masked, 0.0, row_max)).masked_fill(
        s_ext == -math.inf, 0.0)
    p_ext = torch.where(fully_masked, 0.0, e / torch.where(fully_masked, 1.0,
                                                             e.sum(-1, keepdim=True)))
    p = p_ext[..., :c.Lk]
    out = torch.einsum("bhij,bhje->bihe", p, vh)
    return out, torch.logsumexp(s_ext, dim=-1), p, p_ext, s > -math.inf, s


def check_sparse_against_sdpa(c, q, k, v, s_masked, sinks, out):
    """Without softcap: PyTorch's SDPA with the masked logits' additive part
    (mask, ALiBi, bias) as attn_mask, then the sink folded in by rescaling:
    out = out_without_sink · sigmoid(lse_without_sink − sink)."""
    sdpa = getattr(F, "scaled_dot_product_attention", None) or F._scaled_dot_product_attention
    qh = q.permute(0, 2, 1, 3)
    kh, vh = expand_kv(k, c), expand_kv(v, c)
    scale = f32(c.scale) if c.scale else f32(1.0 / math.sqrt(c.D))
    add = s_masked - torch.einsum("bhid,bhjd->bhij", qh, kh) * scale   # -inf where masked
    add = torch.where(s_masked == -math.inf, -math.inf, add)
    expected, _ = sdpa(qh * (scale * math.sqrt(c.D)), kh, vh, add, 0.0, False, False)
    lse = torch.logsumexp(s_masked, dim=-1)
    rows = lse > -math.inf
    if sinks is not None:
        expected = expected * torch.sigmoid(lse - sinks.view(1, c.Hq, 1)).unsqueeze(-1)
    got = out.permute(0, 2, 1, 3)[rows]
    err = (got - expected[rows]).abs().max().item() if got.numel() else 0.0
    assert err < 1e-12, f"{c.name}: differs from PyTorch SDPA by {err}"
    masked = out.permute(0, 2, 1, 3)[~rows]
    assert masked.numel() == 0 or masked.abs().max().item() == 0, f"{c.name}: masked rows not 0"


def write_sparse_case(c, root):
    gen = torch.Generator().manual_seed(sum(map(ord, "sparse/" + c.name)))
    q, k, v, bias = make_inputs(c, gen)
    qt, kt, vt = (torch.from_numpy(x.astype(np.float64)) for x in (q, k, v))
    bt = None if bias is None else torch.from_numpy(bias.astype(np.float64))
    key_len = torch.tensor(c.key_lengths if c.key_lengths else [c.Lk] * c.B)

    pattern = {}
    if c.block is not None:
        pattern["block"] = draw_block_mask(c, gen)
    if c.select:
        pattern["keys"] = draw_key_indices(c, gen)
    vis = sparse_visible(c, pattern, key_len)
    if c.block is not None:
        check_block_mask_by_expansion(c, pattern, key_len, vis)
    sinks = None
    if c.sink_logits:
        sinks = torch.tensor([f32(x) for x in c.sink_logits], dtype=F64)

    out, lse, p, p_ext, attended, s_masked = sparse_softmax_reference(c, qt, kt, vt, bt, key_len,
                                                                      vis, sinks)
    if not c.softcap:
        check_sparse_against_sdpa(c, qt, kt, vt, s_masked, sinks, out)
    results = {}
    if c.lse:
        results["lse"] = lse
        results["entropy"] = entropy_reference(p_ext)  # the sink is one more outcome
    if c.weights:
        results["weights"] = p
    if c.top_k:
        results["topk_idx"], results["topk_w"] = top_k(p, attended, c.top_k)

    d = root / c.name
    d.mkdir(parents=True)
    np.save(d / "q.npy", q)
    np.save(d / "k.npy", k)
    np.save(d / "v.npy", v)
    if bias is not None:
        np.save(d / "bias.npy", bias)
    if c.block is not None:
        for stem, value in zip(("block_indptr", "block_indices", "full_indptr", "full_indices"),
                               pattern["block"]):
            if c.full_blocks or not stem.startswith("full"):
                np.save(d / f"{stem}.npy", value)
    if c.select:
        np.save(d / "key_indices.npy", pattern["keys"])
    if c.global_tokens:
        np.save(d / "global_tokens.npy", np.array(c.global_tokens, dtype=np.int64))
    if c.sink_logits:
        np.save(d / "sink_logits.npy", np.array(c.sink_logits, dtype=np.float32))
    np.save(d / "mask.npy", vis.numpy().astype(np.int32))
    np.save(d / "out.npy", out.numpy().astype(np.float64))
    for name, value in results.items():
        np.save(d / f"{name}.npy", value.numpy())

    options = {
        "dtype": c.dtype,
        "variant": c.variant,
        "scale": repr(f32(c.scale)),
        "causal": int(c.causal),
        "alignment": c.alignment,
        "window_left": c.window_left,
        "window_right": c.window_right,
        "softcap": repr(f32(c.softcap)),
        "alibi_slopes": ",".join(repr(f32(s)) for s in c.alibi_slopes),
        "key_lengths": ",".join(str(n) for n in c.key_lengths),
        "top_k": c.top_k,
        "lse": int(c.lse),
        "entropy": int(c.lse),
        "weights": int(c.weights),
        "block_rows": c.block[0] if c.block else 0,
        "block_cols": c.block[1] if c.block else 0,
        "query_block": c.query_block,
        "key_block": c.key_block,
    }
    with open(d / "case.txt", "w") as f:
        for key, value in options.items():
            f.write(f"{key}={value}\n")


# ---------------------------------------------------------------------------
# Rotary position embedding (RoPE)
# ---------------------------------------------------------------------------


class RopeCase:
    """One RoPE case: x [T, H, D] rotated at `positions` with the given config."""

    def __init__(self, name, *, H=2, D=8, positions, theta=10000.0, rotary_dim=0, style="neox",
                 scaling="none", factor=1.0, original_max_positions=0, low_freq_factor=1.0,
                 high_freq_factor=4.0):
        self.name = name
        self.H, self.D = H, D
        self.positions = list(positions)
        self.T = len(self.positions)
        self.theta = theta
        self.rotary_dim = rotary_dim            # 0 = D, as on the wire
        self.style = style                      # neox | gptj
        self.scaling = scaling                  # none | linear | ntk | dynamic | llama3
        self.factor = factor
        self.original_max_positions = original_max_positions
        self.low_freq_factor = low_freq_factor
        self.high_freq_factor = high_freq_factor


ROPE_CASES = [
    RopeCase("neox_full_default_dim", H=2, D=8, positions=range(8)),
    RopeCase("neox_partial", H=2, D=64, rotary_dim=32,
             positions=[5, 0, 100000, 3, 3, 77, 4096, 1]),
    RopeCase("neox_decode_far", H=3, D=16, positions=[123456]),
    RopeCase("gptj", H=3, D=16, style="gptj", positions=[9, 2, 0, 100000, 31, 30, 65535]),
    RopeCase("gptj_partial", H=2, D=16, rotary_dim=8, style="gptj",
             positions=[0, 1, 2, 50000, 7, 6]),
    RopeCase("linear", H=2, D=16, scaling="linear", factor=4.0,
             positions=[3, 100000, 0, 17, 16, 8191]),
    RopeCase("ntk", H=2, D=16, scaling="ntk", factor=2.0, positions=[0, 12, 4000, 100000, 5]),
    # n = 201 > 64: the base grows with the call's last position.
    RopeCase("dynamic_past_original", H=2, D=16, scaling="dynamic", factor=2.0,
             original_max_positions=64, positions=[10, 200, 0, 63, 64, 150]),
    # n = 64 = original_max_positions: unscaled (the boundary).
    RopeCase("dynamic_below_original", H=2, D=16, scaling="dynamic", factor=2.0,
             original_max_positions=64, positions=[63, 0, 40, 7, 62]),
    # Llama 3.1's settings: head_dim 64, theta 500000, all three bands in use.
    RopeCase("llama3", H=2, D=64, theta=500000.0, scaling="llama3", factor=8.0,
             original_max_positions=8192, low_freq_factor=1.0, high_freq_factor=4.0,
             positions=[0, 1, 8191, 100000, 131071, 42, 9000, 2]),
    RopeCase("llama3_gptj_partial", H=3, D=16, rotary_dim=12, style="gptj", scaling="llama3",
             factor=4.0, original_max_positions=64, low_freq_factor=1.5, high_freq_factor=3.0,
             positions=[100, 0, 64, 1000, 15, 16, 100000]),
]


def rope_inverse_frequencies(c, rd, positions):
    """The rd/2 inverse frequencies theta^(-2i/rd), scaled as `c.scaling` says
    (LINEAR is applied to the positions instead, in rope_angles)."""
    theta, factor = f32(c.theta), f32(c.factor)
    exponents = torch.arange(0, rd, 2, dtype=F64) / rd
    if c.scaling == "ntk":
        theta = theta * factor ** (rd / (rd - 2))
    elif c.scaling == "dynamic":
        # Hugging Face "dynamic": the sequence length is the last position + 1,
        # never taken below the trained context (where the base is unchanged).
        omp = c.original_max_positions
        seq_len = max(int(positions.max()) + 1, omp)
        theta = theta * ((factor * seq_len / omp) - (factor - 1)) ** (rd / (rd - 2))
    inv_freq = 1.0 / theta ** exponents
    if c.scaling == "llama3":
        omp = c.original_max_positions
        low, high = f32(c.low_freq_factor), f32(c.high_freq_factor)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > omp / low, inv_freq / factor, inv_freq)
        smooth = (omp / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= omp / high) & (wavelen <= omp / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_angles(c, rd, positions):
    """[T, rd/2] float64 angles position·inv_freq."""
    pos = positions.to(F64)
    if c.scaling == "linear":
        pos = pos / f32(c.factor)               # position interpolation
    return pos[:, None] * rope_inverse_frequencies(c, rd, positions)[None, :]


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_neox(x, angles):
    """Hugging Face's apply_rotary_pos_emb on x [T, H, rd]: halves paired."""
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]     # [T, 1, rd]
    return x * emb.cos() + rotate_half(x) * emb.sin()


def rope_neox_complex(x, angles):
    """The same rotation as complex numbers x[i] + j·x[i + rd/2]."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(
        torch.ones_like(angles), angles)[:, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


def rope_gptj(x, angles):
    """Interleaved pairs (2i, 2i + 1) as complex numbers, times e^(j·angle)."""
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    z = z * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    return torch.view_as_real(z).reshape(x.shape)


def rope_reference(c, x, positions):
    """x [T, H, D] float64 -> rotated copy; dims past rotary_dim unchanged."""
    rd = c.rotary_dim or c.D
    assert rd % 2 == 0 and 2 <= rd <= c.D, c.name
    angles = rope_angles(c, rd, positions)
    head, tail = x[..., :rd], x[..., rd:]
    if c.style == "neox":
        out = rope_neox(head, angles)
        err = (out - rope_neox_complex(head, angles)).abs().max().item()
        assert err < 1e-12, f"{c.name}: rotate_half and complex NeoX differ by {err}"
    else:
        out = rope_gptj(head, angles)
        # GPT-J is NeoX on de-interleaved dims: evens as the first half.
        perm = torch.cat((torch.arange(0, rd, 2), torch.arange(1, rd, 2)))
        via_neox = torch.empty_like(head)
        via_neox[..., perm] = rope_neox(head[..., perm], angles)
        err = (out - via_neox).abs().max().item()
        assert err < 1e-12, f"{c.name}: complex GPT-J and de-interleaved NeoX differ by {err}"
    return torch.cat((out, tail), dim=-1)


def write_rope_case(c, root):
    gen = torch.Generator().manual_seed(sum(map(ord, c.name)))
    x = torch.randn(c.T, c.H, c.D, generator=gen, dtype=torch.float32).numpy()
    positions = np.array(c.positions, dtype=np.int64)
    out = rope_reference(c, torch.from_numpy(x.astype(np.float64)), torch.from_numpy(positions))

    d = root / c.name
    d.mkdir(parents=True)
    np.save(d / "x.npy", x)
    np.save(d / "positions.npy", positions)
    np.save(d / "out.npy", out.numpy().astype(np.float64))
    options = {
        "theta": repr(f32(c.theta)),
        "rotary_dim": c.rotary_dim,
        "style": c.style,
        "scaling": c.scaling,
        "factor": repr(f32(c.factor)),
        "original_max_positions": c.original_max_positions,
        "low_freq_factor": repr(f32(c.low_freq_factor)),
        "high_freq_factor": repr(f32(c.high_freq_factor)),
    }
    with open(d / "case.txt", "w") as f:
        for key, value in options.items():
            f.write(f"{key}={value}\n")


# ---------------------------------------------------------------------------
# Model layers: random-weight model directories for src/model/
# ---------------------------------------------------------------------------


class ModelCase:
    """One model directory: a Hugging Face config, random weights stored as
    `dtype` (F32, F16 or BF16) in `shards` safetensors files, and the expected
    output of every layer's attention module on random inputs x."""

    def __init__(self, name, config, *, dtype, shards=1, extra=(), positions=None,
                 B=2, L=7, memory_tokens=5):
        self.name = name
        self.config = config
        self.dtype = dtype
        self.shards = shards                    # 1, or one file per layer
        self.extra = list(extra)                # (name, shape): tensors the loader ignores
        self.positions = positions              # also expected_positions_layer{l}.npy
        self.B, self.L = B, L
        self.memory_tokens = memory_tokens      # encoder length for cross-attention
        cfg = config
        self.family = "bert" if cfg["model_type"] in ("bert", "roberta") else "llama"
        self.layers = cfg["num_hidden_layers"]
        self.hidden = cfg["hidden_size"]
        self.Hq = cfg["num_attention_heads"]
        self.Hkv = cfg.get("num_key_value_heads", self.Hq)
        self.D = cfg.get("head_dim") or self.hidden // self.Hq
        self.cross = self.family == "bert" and cfg.get("add_cross_attention", False)
        # Hugging Face's modules: bert has every bias; qwen2 has q/k/v biases and
        # none on o; llama and qwen3 follow attention_bias for all four; mistral
        # has none; qwen3 normalizes each head's q and k.
        model_type = cfg["model_type"]
        if self.family == "bert":
            self.qkv_bias = self.o_bias = True
        elif model_type == "qwen2":
            self.qkv_bias, self.o_bias = True, False
        else:
            self.qkv_bias = self.o_bias = cfg.get("attention_bias", False)
        self.qk_norm = model_type == "qwen3"
        self.norm_eps = cfg.get("rms_norm_eps", 1e-6)
        self.sliding_window = cfg.get("sliding_window") or 0


MODEL_CASES = [
    ModelCase("mistral_window", dtype="F32", config={
        "model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2,
        "rope_theta": 10000.0, "sliding_window": 4, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096, "torch_dtype": "float32"},
        extra=[("model.embed_tokens.weight", (32, 64)),
               ("model.layers.0.mlp.gate_proj.weight", (16, 64))]),
    # Original context 16 with factor 8, 1, 4: the first frequency is in the
    # smoothed band, the others are divided by the factor.
    ModelCase("llama3_scaled", dtype="F32", config={
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 1, "num_hidden_layers": 2, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        "attention_bias": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 128,
        "torch_dtype": "float32"},
        positions=[0, 3, 4, 10, 11, 12, 40]),
    ModelCase("qwen3_qknorm_bf16", dtype="BF16", config={
        "model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 2,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "attention_bias": False,
        "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}),
    ModelCase("qwen2_bias_f16_sharded", dtype="F16", shards=2, config={
        "model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "torch_dtype": "float16"}),
    ModelCase("bert_cross", dtype="F32", config={
        "model_type": "bert", "hidden_size": 48, "num_attention_heads": 4,
        "num_hidden_layers": 2, "is_decoder": True, "add_cross_attention": True,
        "position_embedding_type": "absolute", "layer_norm_eps": 1e-12,
        "intermediate_size": 96, "torch_dtype": "float32"},
        extra=[(f"bert.encoder.layer.{layer}.attention.output.LayerNorm.{part}", (48,))
               for layer in range(2) for part in ("weight", "bias")]),
]


def round_weights(values, dtype):
    """float64 array -> (the stored little-endian array, its exact float64 values).

    F32 and F16 round to nearest even (NumPy converts float64 to float16 in one
    step); BF16 rounds the float64 value to 8 significant bits, to nearest even,
    and stores the upper half of the equal float32."""
    if dtype == "F32":
        stored = values.astype("<f4")
    elif dtype == "F16":
        stored = values.astype("<f2")
    elif dtype == "BF16":
        mantissa, exponent = np.frexp(values)
        rounded = np.ldexp(np.rint(mantissa * 256.0), exponent - 8)
        bits = rounded.astype(np.float32).view(np.uint32)
        assert (bits & 0xFFFF == 0).all() and (bits.view(np.float32) == rounded).all()
        stored = (bits >> 16).astype("<u2")
        return stored, rounded
    else:
        raise ValueError(dtype)
    return stored, stored.astype(np.float64)


def write_safetensors(path, tensors):
    """tensors: [(name, dtype, stored array)], written in that order."""
    header, offset = {}, 0
    for name, dtype, stored in tensors:
        header[name] = {"dtype": dtype, "shape": list(stored.shape),
                        "data_offsets": [offset, offset + stored.nbytes]}
        offset += stored.nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, stored in tensors:
            f.write(np.ascontiguousarray(stored).tobytes())


def attention_tensor_names(c, layer, block):
    """{role: tensor name} of one attention block ("self" or "cross")."""
    if c.family == "bert":
        prefix = f"bert.encoder.layer.{layer}." + ("attention" if block == "self"
                                                    else "crossattention")
        names = {role: f"{prefix}.self.{hf}.weight"
                 for role, hf in (("q", "query"), ("k", "key"), ("v", "value"))}
        names.update({f"b{role}": f"{prefix}.self.{hf}.bias"
                      for role, hf in (("q", "query"), ("k", "key"), ("v", "value"))})
        names.update(o=f"{prefix}.output.dense.weight", bo=f"{prefix}.output.dense.bias")
        return names
    prefix = f"model.layers.{layer}.self_attn"
    names = {role: f"{prefix}.{role}_proj.weight" for role in "qkvo"}
    if c.qkv_bias:
        names.update({f"b{role}": f"{prefix}.{role}_proj.bias" for role in "qkv"})
    if c.o_bias:
        names["bo"] = f"{prefix}.o_proj.bias"
    if c.qk_norm:
        names.update(q_norm=f"{prefix}.q_norm.weight", k_norm=f"{prefix}.k_norm.weight")
    return names


def make_attention_weights(c, gen, layer, block):
    """Random float64 weights of one block, as {name: (role, array)}: weights
    N(0, 1/in), biases N(0, 0.5²), q/k norm weights uniform in [0.8, 1.2]."""
    shapes = {"q": (c.Hq * c.D, c.hidden), "k": (c.Hkv * c.D, c.hidden),
              "v": (c.Hkv * c.D, c.hidden), "o": (c.hidden, c.Hq * c.D)}
    out = {}
    for role, name in attention_tensor_names(c, layer, block).items():
        if role in shapes:
            rows, cols = shapes[role]
            value = torch.randn(rows, cols, generator=gen, dtype=F64) / math.sqrt(cols)
        elif role.startswith("b"):
            value = torch.randn(shapes[role[1:]][0], generator=gen, dtype=F64) * 0.5
        else:
            value = 0.8 + 0.4 * torch.rand(c.D, generator=gen, dtype=F64)
        out[name] = (role, value.numpy())
    return out


def model_rope_case(c, positions):
    """The RopeCase of config.json's rope_theta and rope_scaling (NeoX, full D)."""
    cfg = c.config
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "none"))
    assert kind in ("none", "default", "llama3"), kind
    if kind != "llama3":
        return RopeCase(c.name, H=c.Hq, D=c.D, positions=positions, theta=cfg["rope_theta"])
    return RopeCase(c.name, H=c.Hq, D=c.D, positions=positions, theta=cfg["rope_theta"],
                    scaling="llama3", factor=scaling["factor"],
                    original_max_positions=scaling["original_max_position_embeddings"],
                    low_freq_factor=scaling["low_freq_factor"],
                    high_freq_factor=scaling["high_freq_factor"])


def linear(x, w, role):
    y = x @ torch.from_numpy(w[role]).T
    bias = w.get("b" + role)
    return y if bias is None else y + torch.from_numpy(bias)


def llama_mask(c, L):
    """Boolean [L, L]: query i sees key j iff j <= i (and i - j < sliding_window)."""
    i = torch.arange(L).view(L, 1)
    j = torch.arange(L).view(1, L)
    mask = j <= i
    if c.sliding_window:
        mask = mask & (i - j < c.sliding_window)
    return mask


def llama_layer_reference(c, w, x, positions):
    """y = o_proj(attention(q, k, v)) in float64; x [B, L, hidden], w {role: array}."""
    B, L, _ = x.shape
    q = linear(x, w, "q").view(B, L, c.Hq, c.D)
    k = linear(x, w, "k").view(B, L, c.Hkv, c.D)
    v = linear(x, w, "v").view(B, L, c.Hkv, c.D)
    if c.qk_norm:
        def rms_norm(t, weight):
            return t / torch.sqrt(t.pow(2).mean(dim=-1, keepdim=True) + c.norm_eps) * weight
        q = rms_norm(q, torch.from_numpy(w["q_norm"]))
        k = rms_norm(k, torch.from_numpy(w["k_norm"]))
    rope = model_rope_case(c, positions.tolist())
    q = rope_reference(rope, q, positions)        # [B, L, H, D] broadcasts over B
    k = rope_reference(rope, k, positions)
    group = c.Hq // c.Hkv
    kh = k.permute(0, 2, 1, 3).repeat_interleave(group, dim=1)   # [B, Hq, L, D]
    vh = v.permute(0, 2, 1, 3).repeat_interleave(group, dim=1)
    qh = q.permute(0, 2, 1, 3)
    mask = llama_mask(c, L)
    s = torch.einsum("bhid,bhjd->bhij", qh, kh) / math.sqrt(c.D)
    p = torch.softmax(s.masked_fill(~mask, -math.inf), dim=-1)
    out = torch.einsum("bhij,bhjd->bihd", p, vh).reshape(B, L, c.Hq * c.D)

    # Independent check: PyTorch's SDPA with an additive mask from tril/triu.
    sdpa = getattr(F, "scaled_dot_product_attention", None) or F._scaled_dot_product_attention
    ones = torch.ones(L, L, dtype=torch.bool)
    allowed = torch.tril(ones)
    if c.sliding_window:
        allowed &= torch.triu(ones, diagonal=1 - c.sliding_window)
    add = torch.zeros(L, L, dtype=F64).masked_fill(~allowed, -math.inf)
    want = sdpa(qh, kh, vh, add, 0.0, False, False)
    want = want[0] if isinstance(want, tuple) else want
    err = (want.permute(0, 2, 1, 3).reshape(B, L, -1) - out).abs().max().item()
    assert err < 1e-12, f"{c.name}: differs from PyTorch SDPA by {err}"
    return linear(out, w, "o")


def bert_block_reference(c, w, x, memory=None):
    """torch.nn.MultiheadAttention with the block's weights; no mask."""
    mha = torch.nn.MultiheadAttention(c.hidden, c.Hq, bias=True, batch_first=True, dtype=F64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.from_numpy(np.concatenate([w["q"], w["k"], w["v"]])))
        mha.in_proj_bias.copy_(torch.from_numpy(np.concatenate([w["bq"], w["bk"], w["bv"]])))
        mha.out_proj.weight.copy_(torch.from_numpy(w["o"]))
        mha.out_proj.bias.copy_(torch.from_numpy(w["bo"]))
        kv = x if memory is None else memory
        return mha(x, kv, kv, need_weights=False)[0]


def write_model_case(c, root):
    gen = torch.Generator().manual_seed(sum(map(ord, "model/" + c.name)))
    d = root / c.name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(c.config, indent=2) + "\n")
    (d / "case.json").write_text(json.dumps(
        {"batch": c.B, "tokens": c.L, "layers": c.layers, "cross": c.cross}) + "\n")

    x = torch.randn(c.B, c.L, c.hidden, generator=gen, dtype=torch.float32).numpy()
    np.save(d / "x.npy", x)
    xt = torch.from_numpy(x.astype(np.float64))
    memory = None
    if c.cross:
        memory = torch.randn(c.B, c.memory_tokens, c.hidden, generator=gen,
                             dtype=torch.float32).numpy()
        np.save(d / "memory.npy", memory)
        memory = torch.from_numpy(memory.astype(np.float64))

    files = [[] for _ in range(c.shards)]       # [(name, dtype, stored)] per file
    for name, shape in c.extra:
        value = torch.randn(*shape, generator=gen, dtype=F64).numpy()
        files[0].append((name, c.dtype, round_weights(value, c.dtype)[0]))
    for layer in range(c.layers):
        shard = files[layer * c.shards // c.layers]
        for block in ("self", "cross") if c.cross else ("self",):
            w = {}
            for name, (role, value) in make_attention_weights(c, gen, layer, block).items():
                stored, exact = round_weights(value, c.dtype)
                shard.append((name, c.dtype, stored))
                w[role] = exact
            if c.family == "bert":
                y = bert_block_reference(c, w, xt, memory if block == "cross" else None)
            else:
                positions = torch.arange(c.L)
                y = llama_layer_reference(c, w, xt, positions)
                if c.positions is not None:
                    y_pos = llama_layer_reference(c, w, xt, torch.tensor(c.positions))
                    np.save(d / f"expected_positions_layer{layer}.npy",
                            y_pos.numpy().astype(np.float32))
            stem = "expected_layer" if block == "self" else "expected_cross_layer"
            np.save(d / f"{stem}{layer}.npy", y.numpy().astype(np.float32))
    if c.positions is not None:
        np.save(d / "positions.npy", np.array(c.positions, dtype=np.int64))

    if c.shards == 1:
        write_safetensors(d / "model.safetensors", files[0])
        return
    weight_map, total = {}, 0
    for index, tensors in enumerate(files):
        file_name = f"model-{index + 1:05d}-of-{c.shards:05d}.safetensors"
        write_safetensors(d / file_name, tensors)
        for name, _, stored in tensors:
            weight_map[name] = file_name
            total += stored.nbytes
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


def fresh_dir(path):
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def main():
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=here / "cases")
    parser.add_argument("--rope_out", type=Path, default=here / "rope")
    parser.add_argument("--models_out", type=Path, default=here / "models")
    parser.add_argument("--sparse_out", type=Path, default=here / "sparse")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    fresh_dir(args.out)
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    for c in CASES:
        write_case(c, args.out)
    print(f"wrote {len(CASES)} cases to {args.out}")

    fresh_dir(args.sparse_out)
    names = [c.name for c in SPARSE_CASES]
    assert len(names) == len(set(names)), "duplicate sparse case names"
    for c in SPARSE_CASES:
        write_sparse_case(c, args.sparse_out)
    print(f"wrote {len(SPARSE_CASES)} sparse cases to {args.sparse_out}")

    fresh_dir(args.rope_out)
    names = [c.name for c in ROPE_CASES]
    assert len(names) == len(set(names)), "duplicate RoPE case names"
    for c in ROPE_CASES:
        write_rope_case(c, args.rope_out)
    print(f"wrote {len(ROPE_CASES)} RoPE cases to {args.rope_out}")

    fresh_dir(args.models_out)
    names = [c.name for c in MODEL_CASES]
    assert len(names) == len(set(names)), "duplicate model case names"
    for c in MODEL_CASES:
        write_model_case(c, args.models_out)
    print(f"wrote {len(MODEL_CASES)} model cases to {args.models_out}")


if __name__ == "__main__":
    main()
