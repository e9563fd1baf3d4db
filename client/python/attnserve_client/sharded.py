"""Attention split along the keys: merging partial attentions by their
log-sum-exp, and one Attend fanned out over several replicas.

A part of the keys gives, per query row and head, its output v (softmax over
that part's keys only) and its log-sum-exp s (natural log). Two parts merge
exactly:

    m = max(s_a, s_b)
    s = m + ln(e^(s_a - m) + e^(s_b - m))
    v = e^(s_a - s)·v_a + e^(s_b - s)·v_b

An empty part (a row that sees none of its keys) has s = -inf and v = 0; two
empty parts merge to s = -inf, v = 0. attnserve's lse is natural-log
(FlashInfer's merge_state takes base-2 lse by default: multiply those by
ln 2 first).
"""

import concurrent.futures
import time

import grpc
import numpy as np

from . import tensors
from .client import AttendResult
from .shared_memory import ShmTensor

# Options whose outputs cannot be merged from parts by lse, or that do not
# split along the keys with key_offset (key_lengths, a bias over all keys).
_REFUSED = (("key_lengths", "a per-row key length does not split with key_offset"),
            ("bias", "a bias over [B, Hq, Lq, Lk] is not split"),
            ("weights", "the probabilities are not merged from parts"),
            ("top_k", "top-k keys are not merged from parts"),
            ("entropy", "the entropy is not merged from parts"),
            ("linear", "LINEAR attention has no lse"),
            ("block_mask", "sparse attention does not combine with sharded keys"),
            ("key_indices", "sparse attention does not combine with sharded keys"),
            ("global_tokens", "sparse attention does not combine with sharded keys"),
            ("sink_logits", "sparse attention does not combine with sharded keys"),
            ("sparsity", "sparse attention does not combine with sharded keys"),
            ("output_shm", "the parts' outputs are merged here, not written to a region"))
# Refused when given at all (not None); the others when true.
_REFUSED_WHEN_GIVEN = ("key_lengths", "bias", "block_mask", "key_indices", "global_tokens",
                       "sink_logits", "sparsity", "output_shm")


class ShardedAttendError(grpc.RpcError):
    """A part of a sharded_attend that failed. Like the grpc.RpcError of a
    plain call: code() is the part's grpc.StatusCode; details() (and str())
    name the part, its target and its keys before the server's message.
    index: the part's place (its client's place in the list), target: the
    client's target, keys: (start, end) of the part's key range, cause: the
    original grpc.RpcError."""

    def __init__(self, index, count, target, keys, cause):
        code = cause.code() if callable(getattr(cause, "code", None)) else None
        details = cause.details() if callable(getattr(cause, "details", None)) else str(cause)
        self._code = code if code is not None else grpc.StatusCode.UNKNOWN
        self._details = (f"part {index} of {count} ({target}, keys [{keys[0]}, {keys[1]})): "
                         f"{self._code.name}: {details}")
        super().__init__(self._details)
        self.index = index
        self.target = target
        self.keys = keys
        self.cause = cause

    def code(self):
        return self._code

    def details(self):
        return self._details


def _canonical(part, index):
    """(output, lse) -> float64 output [B, Lq, Hq, Dv] and lse [B, Hq, Lq],
    with the part's original ranks."""
    if len(part) != 2:
        raise ValueError(f"parts[{index}]: expected (output, lse), got {len(part)} items")
    out = np.asarray(part[0])
    lse = np.asarray(part[1])
    if out.ndim == 3:
        if lse.ndim == 2:
            lse = lse[None]
        out = out[None]
    if out.ndim != 4 or lse.ndim != 3:
        raise ValueError(f"parts[{index}]: expected output [B, Lq, Hq, Dv] with lse "
                         f"[B, Hq, Lq] (or [Lq, Hq, Dv] with [1, Hq, Lq] or [Hq, Lq]), got "
                         f"{list(np.shape(part[0]))} and {list(np.shape(part[1]))}")
    b, lq, hq, _ = out.shape
    if lse.shape != (b, hq, lq):
        raise ValueError(f"parts[{index}]: expected lse {[b, hq, lq]} for output "
                         f"{list(np.shape(part[0]))}, got {list(np.shape(part[1]))}")
    return out.astype(np.float64), lse.astype(np.float64)


def _merge64(a, b):
    """One merge of two canonical float64 states."""
    (va, sa), (vb, sb) = a, b
    m = np.maximum(sa, sb)
    empty = m == -np.inf
    m_safe = np.where(empty, 0.0, m)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        wa = np.exp(sa - m_safe)
        wb = np.exp(sb - m_safe)
        total = wa + wb  # >= 1 unless both parts are empty
        s = np.where(empty, -np.inf, m_safe + np.log(np.where(empty, 1.0, total)))
        fa = np.where(empty, 0.0, wa / np.where(empty, 1.0, total))
        fb = np.where(empty, 0.0, wb / np.where(empty, 1.0, total))
        # [B, Hq, Lq] -> [B, Lq, Hq, 1], the output's layout.
        fa = fa.transpose(0, 2, 1)[..., None]
        fb = fb.transpose(0, 2, 1)[..., None]
        # An empty part's output (0 from the server) does not enter at all.
        v = np.where(fa > 0, fa * va, 0.0) + np.where(fb > 0, fb * vb, 0.0)
    return v, s


def _finish(state, first):
    """The float64 state rounded to float32, in the first part's ranks."""
    v, s = state
    out_ndim = np.ndim(first[0])
    lse_ndim = np.ndim(first[1])
    v = v.astype(np.float32)
    s = s.astype(np.float32)
    if out_ndim == 3:
        v = v[0]
    if lse_ndim == 2:
        s = s[0]
    return v, s


def merge_attention_states(parts):
    """Merges partial attentions over disjoint key ranges into the attention
    over their union: parts is a list of (output, lse) pairs, output
    [B, Lq, Hq, Dv] with lse [B, Hq, Lq] (natural log, as attnserve returns
    them), or output [Lq, Hq, Dv] with lse [1, Hq, Lq] (what a 3-D query
    gets) or [Hq, Lq]. Every part has the same shapes.

    Folds pairwise in list order (((p0 + p1) + p2) + ...), carrying float64
    throughout and rounding once at the end: returns (output float32, lse
    float32) in the first part's shapes. Rows empty in every part come back
    with lse -inf and output 0. The order of the parts changes the result
    only by float64 rounding; merging a chain of pairs with
    merge_attention_state_pair rounds to float32 at every step instead.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("parts: expected at least one (output, lse) pair, got none")
    states = [_canonical(p, i) for i, p in enumerate(parts)]
    shape = states[0][0].shape
    for i, (v, _) in enumerate(states[1:], 1):
        if v.shape != shape:
            raise ValueError(f"parts[{i}]: expected output {list(np.shape(parts[0][0]))} "
                             f"like parts[0], got {list(np.shape(parts[i][0]))}")
    state = states[0]
    for other in states[1:]:
        state = _merge64(state, other)
    return _finish(state, parts[0])


def merge_attention_state_pair(a, b):
    """Merges two partial attentions, each an (output, lse) pair as in
    merge_attention_states; returns (output float32, lse float32),
    computed in float64."""
    return merge_attention_states([a, b])


def key_ranges(lk, n):
    """The key ranges sharded_attend gives n clients over lk keys:
    min(n, lk) contiguous (start, end) pairs (at least one), sizes differing
    by at most one, the longer ones first."""
    n = max(1, min(int(n), int(lk)))
    size, extra = divmod(int(lk), n)
    ranges, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def _positions_part(name, positions, batch, lk, start, end):
    """A part's slice of per-token positions (one per key, or B x Lk)."""
    p = np.asarray(positions).reshape(-1)
    if p.size == lk:
        return p[start:end]
    if p.size == batch * lk:
        return p.reshape(batch, lk)[:, start:end].reshape(-1)
    raise ValueError(f"{name}: expected {lk} (one per key) or {batch * lk} (B x Lk) "
                     f"positions, got {p.size}")


def _output_dtype(q, dtype):
    if dtype is None:
        dtype = tensors.F16 if np.asarray(q).dtype == np.float16 else tensors.F32
    return tensors.dtype_name(dtype)


class _Part:
    """One part in flight: its future, and when it started and finished."""

    def __init__(self, index, client, keys):
        self.index = index
        self.client = client
        self.keys = keys
        self.future = None
        self.started = 0.0
        self.finished = None

    def done(self, _future=None):
        self.finished = time.monotonic()


def sharded_attend(clients, q, k, v, **attend_kwargs):
    """One Attend split along the keys over several replicas and merged:
    the same answer as clients[0].attend(q, k, v, **attend_kwargs), within
    rounding, with each replica computing a part of the keys.

    K and V are split into N = min(len(clients), Lk) contiguous key ranges
    as even as possible (key_ranges); client i gets the whole q and range i,
    with key_offset = its start and total_keys = Lk, so causal masks (either
    alignment), windows, ALiBi and RoPE positions count positions in the
    whole sequence, and lse=True. The parts run concurrently (gRPC futures
    for a Client's attend_future, else a thread each); their (output, lse)
    are merged in order by merge_attention_states.

    attend_kwargs as in Client.attend (causal, top_left, window_left/right,
    scale, softcap, alibi_slopes, rotary with query_positions and
    key_positions, dtype, backend, priority, lse, timeout, metadata, ...).
    key_offset and total_keys place q, k, v themselves in a longer sequence
    (the parts are then offset from key_offset). With rotary, each part is
    sent its keys' explicit positions (by default key_offset + j for key j,
    and total_keys - Lq + i, at least 0, for query i). request_id, if given,
    becomes "<request_id>/<part>". Refused with ValueError: key_lengths,
    bias, weights, top_k, entropy, linear and sparse attention (block_mask,
    key_indices, global_tokens, sink_logits, sparsity) (not split, or not
    mergeable), and shared memory (ShmTensor inputs, output_shm).

    Returns an AttendResult: output in q's dtype (float16 for F16, float32
    holding bfloat16 values for BF16, float32 for F32), lse float32
    [B, Hq, Lq] if lse=True, backend the parts' backends (comma-joined
    when they differ), and timing: queue_us, compute_us, total_us and
    batch_size of the slowest part by the server's clock, client_us (the
    whole call measured here), merge_us, and parts: one dict per part with
    index, target, keys, its server timing, start_us (when it started,
    from the call's start: the parts before it were built and sent first)
    and client_us (its round trip measured here, from building its request
    to its answer).

    A part's RPC error is raised as ShardedAttendError (a grpc.RpcError:
    code() the part's code, details() naming the part's index, target and
    key range); the lowest-index failing part is the one raised and the
    parts still running are cancelled.
    """
    t0 = time.monotonic()
    clients = list(clients)
    if not clients:
        raise ValueError("clients: expected at least one, got none")
    options = dict(attend_kwargs)
    for name, why in _REFUSED:
        value = options.get(name)
        if (value is not None) if name in _REFUSED_WHEN_GIVEN else bool(value):
            raise ValueError(f"sharded_attend: {name} is not supported ({why})")
    want_lse = bool(options.pop("lse", False))
    key_offset = int(options.pop("key_offset", 0) or 0)
    total_keys = int(options.pop("total_keys", 0) or 0)
    request_id = options.pop("request_id", "") or ""
    for name, value in (("q", q), ("k", k), ("v", v)):
        if isinstance(value, ShmTensor):
            raise ValueError(f"{name}: expected an array (sharded_attend slices the keys here), "
                             f"got a ShmTensor; read it from its region first")
    q = np.asarray(q)
    k = np.asarray(k)
    v = np.asarray(v)
    if k.ndim not in (3, 4) or v.ndim != k.ndim:
        raise ValueError(f"k, v: expected [B, Lk, Hkv, D] and [B, Lk, Hkv, Dv] (or 3-D), got "
                         f"{list(k.shape)} and {list(v.shape)}")
    lk = k.shape[-3]
    lq = q.shape[-3] if q.ndim >= 3 else 0
    batch = k.shape[0] if k.ndim == 4 else 1
    whole = total_keys if total_keys else key_offset + lk
    if options.get("rotary") is not None:
        qpos = options.get("query_positions")
        if qpos is None:
            options["query_positions"] = np.maximum(0, whole - lq + np.arange(lq))
        kpos = options.pop("key_positions", None)
        if kpos is None:
            kpos = key_offset + np.arange(lk)
    else:
        kpos = options.pop("key_positions", None)
    out_dtype = _output_dtype(q, options.get("dtype"))

    ranges = key_ranges(lk, len(clients))
    parts = []
    pool = None
    try:
        for i, (start, end) in enumerate(ranges):
            part = _Part(i, clients[i], (start, end))
            kwargs = dict(options, lse=True, key_offset=key_offset + start, total_keys=whole)
            if request_id:
                kwargs["request_id"] = f"{request_id}/{i}"
            if kpos is not None:
                kwargs["key_positions"] = _positions_part("key_positions", kpos, batch, lk,
                                                          start, end)
            kp = k[:, start:end] if k.ndim == 4 else k[start:end]
            vp = v[:, start:end] if v.ndim == 4 else v[start:end]
            part.started = time.monotonic()
            if hasattr(part.client, "attend_future"):
                part.future = part.client.attend_future(q, kp, vp, **kwargs)
            else:
                if pool is None:
                    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(ranges))
                part.future = pool.submit(part.client.attend, q, kp, vp, **kwargs)
            part.future.add_done_callback(part.done)
            parts.append(part)

        results = []
        for part in parts:
            try:
                results.append(part.future.result())
            except grpc.RpcError as e:
                for other in parts:
                    other.future.cancel()
                raise ShardedAttendError(part.index, len(ranges),
                                         getattr(part.client, "target", "?"), part.keys,
                                         e) from e
    finally:
        if pool is not None:
            pool.shutdown(wait=False)

    t_merge = time.monotonic()
    out, lse = merge_attention_states([(r.output, r.lse) for r in results])
    if out_dtype == tensors.F16:
        out = out.astype(np.float16)
    elif out_dtype == tensors.BF16:
        out = tensors.round_to(out, tensors.BF16)
    t_end = time.monotonic()

    part_timing = []
    for part, r in zip(parts, results):
        finished = part.finished if part.finished is not None else t_merge
        part_timing.append(dict(r.timing, index=part.index,
                                target=getattr(part.client, "target", "?"), keys=part.keys,
                                start_us=int((part.started - t0) * 1e6),
                                client_us=int((finished - part.started) * 1e6)))
    slowest = max(results, key=lambda r: r.timing.get("total_us", 0)).timing
    timing = dict(slowest, client_us=int((t_end - t0) * 1e6),
                  merge_us=int((t_end - t_merge) * 1e6), parts=part_timing)
    backends = []
    for r in results:
        if r.backend not in backends:
            backends.append(r.backend)
    return AttendResult(output=out, lse=lse if want_lse else None, backend=",".join(backends),
                        request_id=request_id, timing=timing)
