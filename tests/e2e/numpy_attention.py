"""Attention in NumPy (float64), written from the semantics table of docs/ARCHITECTURE.md,
independently of the server's kernels: the oracle of the e2e tests.

Sparse attention follows the comment above `message Sparsity` in
proto/attnserve/v1/attention.proto: a query row sees the keys of its range
(key_lengths, causal, window) that its block-mask row lists or its key
selection selects, united with the global tokens; sink logits add
exp(sink[h]) to the softmax denominator. The sparse forms are read by duck
typing (block_rows, block_cols, indptr, indices, full_indptr, full_indices;
indices, query_block, key_block), so the oracle does not import the client.
"""

import numpy as np


def _block_lists(block_mask, batch, hq, lq, lk):
    """Dense [B, Hq, Lq, Lk] booleans: key j in a block that the block mask
    lists for query i's row block (full blocks included)."""
    rows, cols = int(block_mask.block_rows), int(block_mask.block_cols)
    row_blocks, col_blocks = -(-lq // rows), -(-lk // cols)
    out = np.zeros((batch, hq, lq, lk), dtype=bool)
    pairs = [(block_mask.indptr, block_mask.indices)]
    if getattr(block_mask, "full_indptr", None) is not None:
        pairs.append((block_mask.full_indptr, block_mask.full_indices))
    for indptr, indices in pairs:
        indptr = np.asarray(indptr, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64)
        if indptr.ndim == 1:
            indptr = indptr[None, None]
        for b in range(batch):
            for h in range(hq):
                ptr = indptr[b if indptr.shape[0] > 1 else 0, h if indptr.shape[1] > 1 else 0]
                blocks = np.zeros((row_blocks, col_blocks), dtype=bool)
                for r in range(row_blocks):
                    blocks[r, indices[ptr[r]:ptr[r + 1]]] = True
                i = np.arange(lq) // rows
                j = np.arange(lk) // cols
                out[b, h] |= blocks[i[:, None], j[None, :]]
    return out


def _selected_keys(key_indices, batch, hq, hkv, lq, lk):
    """Dense [B, Hq, Lq, Lk] booleans: key j in a unit that query i's index
    row selects (-1 pads)."""
    sel = np.asarray(getattr(key_indices, "indices", key_indices), dtype=np.int64)
    query_block = int(getattr(key_indices, "query_block", 1) or 1)
    key_block = int(getattr(key_indices, "key_block", 1) or 1)
    heads = sel.shape[1]
    out = np.zeros((batch, hq, lq, lk), dtype=bool)
    unit = np.arange(lk) // key_block
    for b in range(batch):
        for h in range(hq):
            lh = h if heads == hq else (h // (hq // hkv) if heads == hkv else 0)
            for i in range(lq):
                units = sel[b, lh, i // query_block]
                out[b, h, i] = np.isin(unit, units[units >= 0])
    return out


def visible_mask(batch, hq, hkv, lq, lk, *, causal=False, top_left=False, window_left=None,
                 window_right=None, key_lengths=None, block_mask=None, key_indices=None,
                 global_tokens=None):
    """[B, Hq, Lq, Lk] booleans: whether query i of head h in batch row b
    sees key j (KeyVisibleToHead in src/attention/params.h)."""
    i = np.arange(lq)[:, None]
    j = np.arange(lk)[None, :]
    lists = None
    if block_mask is not None:
        lists = _block_lists(block_mask, batch, hq, lq, lk)
    elif key_indices is not None:
        lists = _selected_keys(key_indices, batch, hq, hkv, lq, lk)
    globals_ = np.asarray(global_tokens if global_tokens is not None else [], dtype=np.int64)
    out = np.zeros((batch, hq, lq, lk), dtype=bool)
    for b in range(batch):
        length = lk if key_lengths is None else int(key_lengths[b])
        diag = i + (0 if top_left else length - lq)
        within = j < length
        vis = within
        if causal:
            vis = vis & (j <= diag)
        if window_left is not None and window_left >= 0:
            vis = vis & (j >= diag - window_left)
        if window_right is not None and window_right >= 0:
            vis = vis & (j <= diag + window_right)
        vis = np.broadcast_to(vis, (hq, lq, lk))
        if lists is not None:
            vis = vis & lists[b]
        if globals_.size:
            glob = within & (np.isin(j, globals_) | np.isin(diag, globals_))
            if causal:
                glob = glob & (j <= diag)
            vis = vis | glob[None]
        out[b] = vis
    return out


def attention(q, k, v, *, scale=0.0, causal=False, top_left=False, window_left=None,
              window_right=None, softcap=0.0, alibi_slopes=None, bias=None, key_lengths=None,
              block_mask=None, key_indices=None, global_tokens=None, sink_logits=None,
              with_entropy=False):
    """Returns (output [B, Lq, Hq, Dv], lse [B, Hq, Lq]) in float64, and the
    entropy [B, Hq, Lq] (nats) third when with_entropy.

    q [B, Lq, Hq, D] (or 3-D), k [B, Lk, Hkv, D], v [B, Lk, Hkv, Dv]. A 3-D
    query gives a 3-D output; lse keeps its batch dim of 1, as on the wire.
    Sparse forms as the proto's Sparsity: block_mask (BSR), key_indices (an
    index array or an object with indices, query_block, key_block),
    global_tokens, sink_logits (one per query head; each sink is one more
    outcome of the softmax, for lse and entropy too, with no value).
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
    visible = visible_mask(batch, hq, hkv, lq, lk, causal=causal, top_left=top_left,
                           window_left=window_left, window_right=window_right,
                           key_lengths=key_lengths, block_mask=block_mask,
                           key_indices=key_indices, global_tokens=global_tokens)
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes, dtype=np.float64)[:, None, None]
        for b in range(batch):
            length = lk if key_lengths is None else int(key_lengths[b])
            diag = i + (0 if top_left else length - lq)
            s[b] += -slopes * np.abs(diag - j)[None]
    if bias is not None:
        s = s + np.asarray(bias, dtype=np.float64)
    s = np.where(visible, s, -np.inf)

    sink = np.full((hq,), -np.inf)
    if sink_logits is not None and len(sink_logits):
        sink = np.asarray(sink_logits, dtype=np.float64).reshape(hq)
    sink = np.broadcast_to(sink[None, :, None, None], s.shape[:3] + (1,))
    m_keys = np.max(s, axis=-1, keepdims=True)
    keys_seen = np.isfinite(m_keys)
    m = np.maximum(m_keys, sink)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    p_sink = np.where(keys_seen, np.exp(sink - m_safe), 0.0)
    total = np.sum(p, axis=-1, keepdims=True) + p_sink
    with np.errstate(divide="ignore", invalid="ignore"):
        probs = np.where(keys_seen, p / np.where(total > 0, total, 1.0), 0.0)
        sink_prob = np.where(keys_seen, p_sink / np.where(total > 0, total, 1.0), 0.0)
        lse = np.where(keys_seen[..., 0],
                       np.log(np.where(total[..., 0] > 0, total[..., 0], 1.0)) + m_safe[..., 0],
                       sink[..., 0])  # a row without keys: the sink alone (or -inf)
        terms = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
        sink_term = np.where(sink_prob > 0,
                             sink_prob * np.log(np.where(sink_prob > 0, sink_prob, 1.0)), 0.0)
        entropy = -(np.sum(terms, axis=-1) + sink_term[..., 0])
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    if three_d:
        out = out[0]
    if with_entropy:
        return out, lse, entropy
    return out, lse


def rel_error(got, want):
    """max |got - want| / max |want| over the finite entries of want (inf if
    got and want are not finite in the same places): relative to the
    tensor's scale, so entries near zero do not make a check meaningless."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(got)) or not np.array_equal(got[~finite],
                                                                          want[~finite]):
        return np.inf
    if not finite.any():
        return 0.0
    scale = max(np.max(np.abs(want[finite])), 1e-30)
    return float(np.max(np.abs(got[finite] - want[finite])) / scale)
