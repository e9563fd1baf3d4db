"""Attention in NumPy (float64), written from the semantics table of docs/ARCHITECTURE.md,
independently of the server's kernels: the oracle of the e2e tests.
"""

import numpy as np


def attention(q, k, v, *, scale=0.0, causal=False, top_left=False, window_left=None,
              window_right=None, softcap=0.0, alibi_slopes=None, bias=None, key_lengths=None):
    """Returns (output [B, Lq, Hq, Dv], lse [B, Hq, Lq]) in float64.

    q [B, Lq, Hq, D] (or 3-D), k [B, Lk, Hkv, D], v [B, Lk, Hkv, Dv]. A 3-D
    query gives a 3-D output; lse keeps its batch dim of 1, as on the wire.
    """
    three_d = q.ndim == 3
    if three_d:
        q, k, v = q[None], k[None], v[None]
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    if not scale:
        scale = 1.0 / np.sqrt(d)

    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)

    i = np.arange(lq)[:, None]
    j = np.arange(lk)[None, :]
    visible = np.zeros((batch, 1, lq, lk), dtype=bool)
    for b in range(batch):
        length = lk if key_lengths is None else int(key_lengths[b])
        diag = i + (0 if top_left else length - lq)
        vis = j < length
        if causal:
            vis = vis & (j <= diag)
        if window_left is not None and window_left >= 0:
            vis = vis & (j >= diag - window_left)
        if window_right is not None and window_right >= 0:
            vis = vis & (j <= diag + window_right)
        visible[b, 0] = vis
        if alibi_slopes is not None:
            slopes = np.asarray(alibi_slopes, dtype=np.float64)[:, None, None]
            s[b] += -slopes * np.abs(diag - j)[None]
    if bias is not None:
        s = s + np.asarray(bias, dtype=np.float64)
    s = np.where(visible, s, -np.inf)

    m = np.max(s, axis=-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    total = np.sum(p, axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        probs = np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0)
        lse = np.where(total[..., 0] > 0, np.log(np.where(total[..., 0] > 0, total[..., 0], 1.0))
                       + m_safe[..., 0], -np.inf)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    if three_d:
        return out[0], lse
    return out, lse
