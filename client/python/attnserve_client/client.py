"""Client: NumPy in, NumPy out, over attnserve's gRPC API.

One Client holds one gRPC channel; it is thread-safe and meant to be reused.
Errors from the server are raised as grpc.RpcError (e.code() is a
grpc.StatusCode such as INVALID_ARGUMENT, e.details() the message). The
entries of a BatchDecode fail one by one: a failed entry's result is a
BatchDecodeError, itself a grpc.RpcError with code() and details().
"""

import collections
import dataclasses
import time
from typing import Optional

import grpc
import numpy as np

from . import _stubs
from . import shared_memory as shm
from . import sparsity as sparse
from . import tensors

_pb, _pb_grpc, _health_pb, _health_grpc = _stubs.load()

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20


@dataclasses.dataclass
class AttendResult:
    output: np.ndarray                      # [B, Lq, Hq, Dv] (3-D if the query was)
    lse: Optional[np.ndarray] = None        # [B, Hq, Lq], float32
    weights: Optional[np.ndarray] = None    # [B, Hq, Lq, Lk], float32
    top_k_indices: Optional[np.ndarray] = None  # [B, Hq, Lq, k], int32
    top_k_weights: Optional[np.ndarray] = None  # [B, Hq, Lq, k], float32
    backend: str = ""
    request_id: str = ""
    timing: dict = dataclasses.field(default_factory=dict)  # queue_us, compute_us, ...
    # [B, Hq, Lq], float32: the attention entropy -sum p ln p per query and
    # head, in nats (0 for a fully masked row); when asked with entropy=True.
    entropy: Optional[np.ndarray] = None
    # Where the server wrote the output when asked with output_shm= (output
    # then views or copies the region; None if only the region's name was
    # given).
    output_shm: Optional[shm.ShmTensor] = None


@dataclasses.dataclass
class AttendLayerResult:
    """One AttendLayer answer: a model layer's attention output y and, when
    asked, the attention's own outputs (over x's tokens, or memory's)."""
    y: np.ndarray                           # [B, L, hidden] (rank as x), x's dtype
    lse: Optional[np.ndarray] = None        # [B, Hq, L], float32
    entropy: Optional[np.ndarray] = None    # [B, Hq, L], float32 nats
    weights: Optional[np.ndarray] = None    # [B, Hq, L, Lk], float32
    top_k_indices: Optional[np.ndarray] = None  # [B, Hq, L, k], int32
    top_k_weights: Optional[np.ndarray] = None  # [B, Hq, L, k], float32
    backend: str = ""
    request_id: str = ""
    timing: dict = dataclasses.field(default_factory=dict)  # compute_us includes the projections
    y_shm: Optional[shm.ShmTensor] = None  # where y was written (output_shm=), as AttendResult's


@dataclasses.dataclass
class Session:
    """A KV-cache session opened by Client.create_session."""
    session_id: str
    capacity_tokens: int = 0  # max_tokens, or what the server's free cache held then
    block_tokens: int = 0     # tokens per cache block
    num_layers: int = 1       # layers of the model, one paged cache each
    # The --model the session runs (its steps send hidden states); "" for
    # a plain session.
    model: str = ""


@dataclasses.dataclass
class ForkedSession(Session):
    """A session opened by Client.fork_session: it shares its parent's first
    context_tokens tokens (shared_tokens of them in shared blocks, the rest
    copied) and has the parent's settings. Usable wherever a Session is."""
    context_tokens: int = 0
    shared_tokens: int = 0


@dataclasses.dataclass
class DecodeResult:
    # [Lq, Hq, Dv] (4-D if the query was), the query's dtype; for a step of
    # hidden states (model session) the layer's y [T, hidden], hidden's dtype.
    output: np.ndarray
    lse: Optional[np.ndarray] = None  # [1, Hq, Lq], float32
    context_tokens: int = 0           # tokens in the session's cache after the append
    backend: str = ""
    request_id: str = ""
    timing: dict = dataclasses.field(default_factory=dict)  # queue_us, compute_us, ...
    entropy: Optional[np.ndarray] = None  # [1, Hq, Lq], float32 nats, when asked
    output_shm: Optional[shm.ShmTensor] = None  # as AttendResult's


class BatchDecodeError(grpc.RpcError):
    """A BatchDecode entry that failed on its own (the others may have
    succeeded). Like the grpc.RpcError of a whole call: code() is a
    grpc.StatusCode, details() the server's message (naming entries[i]).
    index is the entry's place in the batch, session_id its session."""

    def __init__(self, code, message, index, session_id=""):
        super().__init__(f"entries[{index}] ({session_id}): {code.name}: {message}")
        self._code = code
        self._message = message
        self.index = index
        self.session_id = session_id

    def code(self):
        return self._code

    def details(self):
        return self._message


@dataclasses.dataclass
class BatchResult:
    """One BatchDecode response, as Client.batch_decode_stream yields them."""
    request_id: str
    results: list  # per entry, in order: a DecodeResult or a BatchDecodeError
    backend: str = ""
    timing: dict = dataclasses.field(default_factory=dict)


def raise_first_error(results):
    """Raises the first BatchDecodeError of a batch_decode result list;
    returns the list (all DecodeResults) when there is none."""
    for r in results:
        if isinstance(r, BatchDecodeError):
            raise r
    return results


_STATUS_BY_CODE = {c.value[0]: c for c in grpc.StatusCode}


def _timing(t):
    return {"queue_us": t.queue_us, "compute_us": t.compute_us, "batch_size": t.batch_size,
            "total_us": t.total_us}


def _optional(message, name):
    """The named tensor field of `message` as an array, or None when unset."""
    return tensors.from_proto(getattr(message, name)) if message.HasField(name) else None


def decode_result_from_proto(response, output_shm=None):
    """DecodeResponse -> DecodeResult. output_shm: what the request asked
    (see result_from_proto)."""
    output, output_ref = shm.output_from_proto(response.output, output_shm)
    return DecodeResult(
        output=output,
        output_shm=output_ref,
        lse=_optional(response, "lse"),
        entropy=_optional(response, "entropy"),
        context_tokens=response.context_tokens,
        backend=response.backend,
        request_id=response.request_id,
        timing=_timing(response.timing))


def batch_results_from_proto(response, session_ids=(), output_shm=()):
    """BatchDecodeResponse -> list, one per entry in order: a DecodeResult
    (with the batch's backend, request_id and timing) or a BatchDecodeError.
    session_ids (the entries', optional) name the sessions in the errors;
    output_shm (optional) holds what each entry asked (see
    result_from_proto)."""
    timing = _timing(response.timing)
    out = []
    for i, r in enumerate(response.results):
        sid = session_ids[i] if i < len(session_ids) else ""
        if r.code != 0:
            code = _STATUS_BY_CODE.get(r.code, grpc.StatusCode.UNKNOWN)
            out.append(BatchDecodeError(code, r.message, i, sid))
            continue
        output, output_ref = shm.output_from_proto(
            r.output, output_shm[i] if i < len(output_shm) else None)
        out.append(DecodeResult(
            output=output,
            output_shm=output_ref,
            lse=_optional(r, "lse"),
            entropy=_optional(r, "entropy"),
            context_tokens=r.context_tokens,
            backend=response.backend,
            request_id=response.request_id,
            timing=dict(timing)))
    return out


def _session_id(session):
    return session.session_id if isinstance(session, Session) else str(session)


_ROTARY_STYLES = {"neox": "NEOX", "gptj": "GPTJ"}
_ROTARY_SCALINGS = {"none": "NONE", "linear": "LINEAR", "ntk": "NTK", "dynamic": "DYNAMIC",
                    "llama3": "LLAMA3"}
_ROTARY_KEYS = ("theta", "rotary_dim", "style", "scaling", "factor", "original_max_positions",
                "low_freq_factor", "high_freq_factor")


def _rotary_enum(field, value, names, enum):
    if isinstance(value, str):
        key = value.lower()
        if key not in names:
            raise ValueError(f"rotary.{field}: expected one of {', '.join(names)}, got {value!r}")
        return enum.Value(names[key])
    return int(value)


def rotary_to_proto(rotary, out=None):
    """Fills (or returns a new) RotaryEmbedding from a dict of its settings
    (theta, rotary_dim, style 'neox'|'gptj', scaling 'none'|'linear'|'ntk'|
    'dynamic'|'llama3', factor, original_max_positions, low_freq_factor,
    high_freq_factor; unset ones take the server's defaults) or a
    RotaryEmbedding proto."""
    r = out if out is not None else _pb.RotaryEmbedding()
    if isinstance(rotary, _pb.RotaryEmbedding):
        r.CopyFrom(rotary)
        return r
    unknown = sorted(set(rotary) - set(_ROTARY_KEYS))
    if unknown:
        raise ValueError(f"rotary: expected keys among {', '.join(_ROTARY_KEYS)}, "
                         f"got {', '.join(unknown)}")
    for key, value in rotary.items():
        if key == "style":
            r.style = _rotary_enum(key, value, _ROTARY_STYLES, _pb.RotaryEmbedding.Style)
        elif key == "scaling":
            r.scaling = _rotary_enum(key, value, _ROTARY_SCALINGS, _pb.RotaryEmbedding.Scaling)
        elif key in ("rotary_dim", "original_max_positions"):
            setattr(r, key, int(value))
        else:
            setattr(r, key, float(value))
    # Present even when every setting is the default: rotary={} asks for RoPE.
    r.SetInParent()
    return r


def _sparsity_of(where, sparsity, block_mask, key_indices, global_tokens, sink_logits):
    """The Sparsity of a request from its `sparsity` value or its four
    keywords (not both); None when neither is given."""
    given = sparse.Sparsity(block_mask, key_indices, global_tokens, sink_logits)
    if sparsity is None:
        return None if given.empty() else given
    if not given.empty():
        raise ValueError(f"{where}: expected sparsity or block_mask, key_indices, "
                         f"global_tokens, sink_logits, got both")
    if isinstance(sparsity, _pb.Sparsity):
        return sparsity
    if not isinstance(sparsity, sparse.Sparsity):
        raise ValueError(f"{where}.sparsity: expected a Sparsity, got "
                         f"{type(sparsity).__name__}")
    return None if sparsity.empty() else sparsity


def _set_sparsity(value, out):
    """Writes a Sparsity (or a Sparsity proto) into the message field `out`."""
    if isinstance(value, _pb.Sparsity):
        out.CopyFrom(value)
    else:
        value.to_proto(out)


def _score_options(o, scale, window_left, window_right, softcap, alibi_slopes):
    """Fills the AttentionOptions fields every call shares: scale, the
    window (None or -1: unbounded), softcap and ALiBi slopes."""
    o.scale = float(scale)
    if window_left is not None and window_left >= 0:
        o.window_left = int(window_left)
    if window_right is not None and window_right >= 0:
        o.window_right = int(window_right)
    o.softcap = float(softcap)
    if alibi_slopes is not None:
        o.alibi_slopes[:] = [float(s) for s in alibi_slopes]


def _decode_options(o, scale, window_left, softcap, alibi_slopes):
    _score_options(o, scale, window_left, None, softcap, alibi_slopes)
    o.causal = True


def _wire_dtype_for(q, dtype):
    """The request's wire dtype: `dtype`, else a ShmTensor q's own, else f16
    for a float16 q and f32 otherwise."""
    if dtype is None:
        if isinstance(q, shm.ShmTensor):
            dtype = q.dtype
        else:
            dtype = tensors.F16 if np.asarray(q).dtype == np.float16 else tensors.F32
    return tensors.dtype_name(dtype)


def _step_tensors(where, q, k, v, hidden):
    """The tensors a decode step sends: (name, array) pairs. hidden (a model
    session's step) or all of q, k and v; q/k/v given beside hidden are sent
    too, for the server to refuse."""
    given = [(n, a) for n, a in (("query", q), ("key", k), ("value", v)) if a is not None]
    if hidden is None and len(given) != 3:
        raise ValueError(f"{where}: expected q, k and v, or hidden, got "
                         f"{', '.join(n for n, _ in given) or 'none'}")
    return given + ([("hidden", hidden)] if hidden is not None else [])


def build_decode_request(session, q=None, k=None, v=None, *, hidden=None, dtype=None, scale=0.0,
                         window_left=None, softcap=0.0, alibi_slopes=None, lse=False,
                         entropy=False, backend="", priority=0, request_id="", layer=0,
                         expected_context_tokens=None, block_mask=None, key_indices=None,
                         global_tokens=None, sink_logits=None, sparsity=None, output_shm=None):
    """Builds a DecodeRequest proto from NumPy arrays.

    session: a Session or its id. q [Lq, Hq, D], k [Lnew, Hkv, D], v [Lnew,
    Hkv, Dv] (or 4-D with batch 1); or, for a model session
    (create_session(model=...)), hidden [T, hidden] (or [1, T, hidden])
    instead: the server projects q/k/v and the output is the layer's y in
    hidden's dtype. dtype on the wire as in build_request (default from q or
    hidden); the server converts K/V to the session's cache dtype.
    Attention is causal with bottom-right alignment (the new queries are
    the last positions). layer: the layer whose cache the step appends to
    (layers step in order). expected_context_tokens: if not None, the
    tokens the caller believes the layer's cache holds before the step; a
    mismatch is FAILED_PRECONDITION (so a retried step that landed is not
    appended twice). lse, entropy: also return the log-sum-exp and the
    attention entropy (nats) per query and head, [1, Hq, Lq].
    block_mask, key_indices, global_tokens, sink_logits: sparse attention
    over the session's cache after the append, as in build_request (Lk is
    the cache's tokens, positions count from its first); or sparsity, a
    Sparsity holding them. q, k, v, hidden and output_shm may be in shared
    memory, as in build_request.
    """
    sparsity = _sparsity_of("decode", sparsity, block_mask, key_indices, global_tokens,
                            sink_logits)
    sent = _step_tensors("decode", q, k, v, hidden)
    dtype = _wire_dtype_for(sent[0][1] if hidden is None else hidden, dtype)
    r = _pb.DecodeRequest(session_id=_session_id(session), request_id=request_id,
                          backend=backend, priority=priority, layer=int(layer))
    for name, array in sent:
        shm.tensor_to_proto(array, dtype, getattr(r, name))
    _decode_options(r.options, scale, window_left, softcap, alibi_slopes)
    r.outputs.lse = bool(lse)
    r.outputs.entropy = bool(entropy)
    if output_shm is not None:
        shm.ref_to_proto(output_shm, r.outputs.output_shm)
    if expected_context_tokens is not None:
        r.expected_context_tokens = int(expected_context_tokens)
    if sparsity is not None:
        _set_sparsity(sparsity, r.sparsity)
    return r


def build_batch_decode_request(layer, entries, *, dtype=None, scale=0.0, window_left=None,
                               softcap=0.0, alibi_slopes=None, lse=False, entropy=False,
                               backend="", priority=0, request_id="", block_mask=None,
                               key_indices=None, global_tokens=None, sink_logits=None,
                               sparsity=None, output_shm=None):
    """Builds a BatchDecodeRequest proto: one layer-step for many sessions.

    entries, in the order the results come back: (session, q, k, v) or
    (session, q, k, v, expected_context_tokens) tuples, shapes as in
    build_decode_request, the same Hq, Hkv, D, Dv for every entry; for
    model sessions (session, hidden) or (session, hidden,
    expected_context_tokens), hidden [T, hidden]. The options (lse and
    entropy among them) are the batch's. dtype on the wire: default from
    the first entry's q or hidden.

    Sparse attention: block_mask, key_indices, global_tokens, sink_logits
    (as in build_decode_request) apply to every entry; or sparsity, a
    Sparsity for every entry or a list with one per entry (a Sparsity or
    None), for patterns that differ between sequences.

    Shared memory: an entry's q, k, v or hidden may be a ShmTensor (see
    build_request); output_shm, a list with one per entry (a ShmTensor, a
    (region, offset) pair or None), asks the server to write each entry's
    output there.
    """
    entries = list(entries)
    if not entries:
        raise ValueError("entries: expected at least one, got none")
    if output_shm is not None and len(output_shm) != len(entries):
        raise ValueError(f"output_shm: expected one per entry ({len(entries)}), got "
                         f"{len(output_shm)}")
    if isinstance(sparsity, (list, tuple)):
        if len(sparsity) != len(entries):
            raise ValueError(f"sparsity: expected one per entry ({len(entries)}), got "
                             f"{len(sparsity)}")
        per_entry = [_sparsity_of(f"entries[{i}]", s, None, None, None, None)
                     for i, s in enumerate(sparsity)]
        if _sparsity_of("batch_decode", None, block_mask, key_indices, global_tokens,
                        sink_logits) is not None:
            raise ValueError("batch_decode: expected a per-entry sparsity list or block_mask, "
                             "key_indices, global_tokens, sink_logits, got both")
    else:
        per_entry = [_sparsity_of("batch_decode", sparsity, block_mask, key_indices,
                                  global_tokens, sink_logits)] * len(entries)
    dtype = _wire_dtype_for(entries[0][1], dtype)
    r = _pb.BatchDecodeRequest(request_id=request_id, layer=int(layer), backend=backend,
                               priority=priority)
    for i, entry in enumerate(entries):
        if len(entry) not in (2, 3, 4, 5):
            raise ValueError(f"entries[{i}]: expected (session, q, k, v[, "
                             f"expected_context_tokens]) or (session, hidden[, "
                             f"expected_context_tokens]), got {len(entry)} items")
        e = r.entries.add(session_id=_session_id(entry[0]))
        if len(entry) <= 3:
            shm.tensor_to_proto(entry[1], dtype, e.hidden)
            expected = entry[2] if len(entry) == 3 else None
        else:
            shm.tensor_to_proto(entry[1], dtype, e.query)
            shm.tensor_to_proto(entry[2], dtype, e.key)
            shm.tensor_to_proto(entry[3], dtype, e.value)
            expected = entry[4] if len(entry) == 5 else None
        if output_shm is not None and output_shm[i] is not None:
            shm.ref_to_proto(output_shm[i], e.output_shm)
        if expected is not None:
            e.expected_context_tokens = int(expected)
        if per_entry[i] is not None:
            _set_sparsity(per_entry[i], e.sparsity)
    _decode_options(r.options, scale, window_left, softcap, alibi_slopes)
    r.outputs.lse = bool(lse)
    r.outputs.entropy = bool(entropy)
    return r


def build_layer_request(model, layer, x, *, memory=None, positions=None, causal=None,
                        key_lengths=None, dtype=None, scale=0.0, window_left=None,
                        window_right=None, softcap=0.0, alibi_slopes=None, lse=False,
                        entropy=False, weights=False, top_k=0, backend="", priority=0,
                        request_id="", output_shm=None):
    """Builds an AttendLayerRequest proto: layer `layer` of the model the
    server loaded as `model` (--model=NAME=DIR), on hidden states x.

    x [B, L, hidden] (or [L, hidden]). dtype: 'f32', 'f16' or 'bf16' on the
    wire for x and memory; default f16 for a float16 x, else f32. memory
    [B, Lm, hidden] (rank as x): the encoder's output a cross-attention
    layer projects its keys and values from (models with cross_attention).
    positions: RoPE positions of x's tokens, None (0..L-1), one per token or
    B x L. causal: None is the model's default (llama causal, with
    Mistral's sliding window; bert bidirectional). key_lengths: one per row,
    keys past it are padding. scale, window_left/right, softcap and
    alibi_slopes as in build_request. Extra outputs of the attention: lse,
    entropy, weights, top_k. output_shm: where the server writes y (see
    build_request). Nothing is validated here: the server answers
    INVALID_ARGUMENT naming the field.
    """
    dtype = _wire_dtype_for(x, dtype)
    r = _pb.AttendLayerRequest(request_id=request_id, model=str(model), layer=int(layer),
                               backend=backend, priority=priority)
    tensors.to_proto(x, dtype, r.x)
    if memory is not None:
        tensors.to_proto(memory, dtype, r.memory)
    if positions is not None:
        r.positions[:] = [int(p) for p in np.asarray(positions).reshape(-1)]
    if causal is not None:
        r.causal = bool(causal)
    if key_lengths is not None:
        r.key_lengths[:] = [int(n) for n in key_lengths]
    _score_options(r.options, scale, window_left, window_right, softcap, alibi_slopes)
    r.outputs.lse = bool(lse)
    r.outputs.entropy = bool(entropy)
    r.outputs.weights = bool(weights)
    r.outputs.top_k = int(top_k)
    if output_shm is not None:
        shm.ref_to_proto(output_shm, r.outputs.output_shm)
    return r


def _attention_fields(response):
    """The fields AttendResponse and AttendLayerResponse share, as keyword
    arguments of their result classes."""
    return dict(
        lse=_optional(response, "lse"),
        entropy=_optional(response, "entropy"),
        weights=_optional(response, "weights"),
        top_k_indices=_optional(response, "top_k_indices"),
        top_k_weights=_optional(response, "top_k_weights"),
        backend=response.backend,
        request_id=response.request_id,
        timing=_timing(response.timing))


def layer_result_from_proto(response, output_shm=None):
    """AttendLayerResponse -> AttendLayerResult; output_shm as in
    result_from_proto."""
    y, y_ref = shm.output_from_proto(response.y, output_shm)
    return AttendLayerResult(y=y, y_shm=y_ref, **_attention_fields(response))


def result_from_proto(response, output_shm=None):
    """AttendResponse -> AttendResult. output_shm: the request's (a
    ShmTensor or a (region, offset) pair): when the server wrote the output
    to a region and output_shm holds that SharedMemoryRegion, the output is
    read from it (see ShmTensor.array); otherwise such an output is None and
    output_shm says where it is."""
    output, output_ref = shm.output_from_proto(response.output, output_shm)
    return AttendResult(output=output, output_shm=output_ref, **_attention_fields(response))


def build_request(q, k, v, *, dtype=None, scale=0.0, causal=False, top_left=False,
                  window_left=None, window_right=None, softcap=0.0, alibi_slopes=None,
                  linear=False, bias=None, key_lengths=None, lse=False, weights=False,
                  top_k=0, backend="", priority=0, request_id="", rotary=None,
                  query_positions=None, key_positions=None, entropy=False, key_offset=0,
                  total_keys=0, block_mask=None, key_indices=None, global_tokens=None,
                  sink_logits=None, sparsity=None, output_shm=None):
    """Builds an AttendRequest proto from NumPy arrays.

    q [B, Lq, Hq, D], k [B, Lk, Hkv, D], v [B, Lk, Hkv, Dv] (or 3-D, batch 1).
    dtype: 'f32', 'f16' or 'bf16' on the wire; default f16 for float16 queries,
    else f32. window_left/right: None (or -1) is unbounded. bias is sent in the
    request dtype. rotary: RoPE settings (see rotary_to_proto) the server
    applies to q and k, at query_positions / key_positions (each None, one
    per token, or B x tokens; default: keys 0..Lk-1, queries the last Lq of
    them). Extra outputs: lse, entropy (-sum p ln p per query and head, in
    nats), weights (the probabilities; size-capped by the server) and top_k.
    key_offset, total_keys: k and v are keys [key_offset, key_offset + Lk)
    of a sequence of total_keys keys (0: key_offset + Lk), for attention
    split along the keys (see sharded_attend); causal, windows and ALiBi
    count positions in that sequence, and a row that sees none of these
    keys has lse -inf and output 0. Not with key_lengths.

    Sparse attention (README "Sparse attention"): block_mask, a BlockMask
    (block_mask_from_dense makes one from a boolean block matrix);
    key_indices, a KeySelection or an int array [B, Hq or Hkv or 1, Lq, k]
    of key numbers (-1 pads); global_tokens, key positions every query sees
    and whose queries see every key; sink_logits, one per query head, each
    adding exp(sink) to its rows' softmax denominator. Or sparsity, a
    Sparsity holding them. Not with linear, nor with key_offset/total_keys.

    Shared memory (a server on this host with --allow_shared_memory; see
    SharedMemoryRegion): q, k, v and bias may each be a ShmTensor
    (region.put(array)), sent as a reference in its own dtype instead of
    bytes (dtype defaults to a ShmTensor q's). output_shm (a ShmTensor, e.g.
    region.alloc(shape), or a (region, offset) pair) asks the server to
    write the output there; the result's output then views the region (see
    result_from_proto).

    Nothing is validated here: the server answers INVALID_ARGUMENT naming
    the field.
    """
    sparsity = _sparsity_of("attend", sparsity, block_mask, key_indices, global_tokens,
                            sink_logits)
    dtype = _wire_dtype_for(q, dtype)
    r = _pb.AttendRequest(request_id=request_id, backend=backend, priority=priority)
    shm.tensor_to_proto(q, dtype, r.query)
    shm.tensor_to_proto(k, dtype, r.key)
    shm.tensor_to_proto(v, dtype, r.value)
    if bias is not None:
        shm.tensor_to_proto(bias, dtype, r.bias)
    if output_shm is not None:
        shm.ref_to_proto(output_shm, r.outputs.output_shm)
    if key_lengths is not None:
        r.key_lengths[:] = [int(x) for x in key_lengths]
    o = r.options
    _score_options(o, scale, window_left, window_right, softcap, alibi_slopes)
    o.causal = bool(causal)
    o.causal_alignment = _pb.TOP_LEFT if top_left else _pb.BOTTOM_RIGHT
    o.variant = _pb.LINEAR if linear else _pb.SOFTMAX
    r.outputs.lse = bool(lse)
    r.outputs.entropy = bool(entropy)
    r.outputs.weights = bool(weights)
    r.outputs.top_k = int(top_k)
    if rotary is not None:
        rotary_to_proto(rotary, r.rotary)
    if query_positions is not None:
        r.query_positions[:] = [int(p) for p in np.asarray(query_positions).reshape(-1)]
    if key_positions is not None:
        r.key_positions[:] = [int(p) for p in np.asarray(key_positions).reshape(-1)]
    r.key_offset = int(key_offset)
    r.total_keys = int(total_keys)
    if sparsity is not None:
        _set_sparsity(sparsity, r.sparsity)
    return r


def tls_credentials(ca_file=None, cert_file=None, key_file=None):
    """grpc.ChannelCredentials for a TLS server (Client's `credentials`).

    ca_file: PEM CA bundle the server certificate must chain to (None: the
    system roots). cert_file, key_file: PEM client certificate and key, for a
    server that requires mutual TLS (--tls_client_ca); both or neither.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("tls_credentials: cert_file and key_file go together")

    def read(path):
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(root_certificates=read(ca_file),
                                        private_key=read(key_file),
                                        certificate_chain=read(cert_file))


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
                   grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds "authorization: Bearer <token>" to every call. An interceptor
    rather than grpc.access_token_call_credentials, which gRPC sends over TLS
    only: a server behind a TLS-terminating sidecar is reached in plaintext."""

    def __init__(self, token):
        self._entry = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        return _CallDetails(details.method, details.timeout,
                            list(details.metadata or ()) + [self._entry], details.credentials,
                            getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


class _CallDetails(
        collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class AttendFuture:
    """An Attend in flight (Client.attend_future): a grpc.Future whose
    result() is an AttendResult."""

    def __init__(self, future, output_shm=None):
        self._future = future
        self._output_shm = output_shm

    def result(self, timeout=None):
        """Waits (at most timeout s, None: the call's deadline); returns the
        AttendResult or raises the call's grpc.RpcError."""
        return result_from_proto(self._future.result(timeout=timeout), self._output_shm)

    def exception(self, timeout=None):
        return self._future.exception(timeout=timeout)

    def cancel(self):
        return self._future.cancel()

    def cancelled(self):
        return self._future.cancelled()

    def done(self):
        return self._future.done()

    def running(self):
        return self._future.running()

    def add_done_callback(self, fn):
        """Calls fn(self) once the call ends (at once if it has)."""
        self._future.add_done_callback(lambda _: fn(self))


class Client:
    """A connection to one attnserve target ("host:port")."""

    def __init__(self, target, *, timeout=30.0, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                 credentials=None, token=None, options=()):
        """credentials: grpc.ChannelCredentials for TLS (see tls_credentials);
        None is plaintext. token: bearer token sent on every call, for a
        server with --auth_tokens_file. timeout: default deadline in seconds
        of every call."""
        channel_options = [("grpc.max_receive_message_length", max_message_bytes),
                           ("grpc.max_send_message_length", max_message_bytes), *options]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        if token:
            self._channel = grpc.intercept_channel(self._channel, _BearerToken(token))
        self.target = target
        self.timeout = timeout
        self._stub = _pb_grpc.AttentionServiceStub(self._channel)
        self._health = _health_grpc.HealthStub(self._channel)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def attend(self, q, k, v, *, timeout=None, metadata=None, **options):
        """One attention computation; options as in build_request.

        Returns an AttendResult. Raises grpc.RpcError on any error.
        """
        return self.attend_proto(build_request(q, k, v, **options), timeout=timeout,
                                 metadata=metadata, output_shm=options.get("output_shm"))

    def attend_proto(self, request, *, timeout=None, metadata=None, output_shm=None):
        """Sends a ready AttendRequest proto; returns an AttendResult
        (output_shm as in result_from_proto)."""
        response = self._stub.Attend(request, timeout=timeout or self.timeout,
                                     metadata=metadata)
        return result_from_proto(response, output_shm)

    def attend_future(self, q, k, v, *, timeout=None, metadata=None, **options):
        """Starts one Attend without waiting for it; options as in
        build_request. Returns an AttendFuture: result() waits and returns
        the AttendResult or raises grpc.RpcError; cancel(), done() and
        add_done_callback(fn) (fn gets the AttendFuture) as grpc.Future's."""
        return self.attend_proto_future(build_request(q, k, v, **options), timeout=timeout,
                                        metadata=metadata, output_shm=options.get("output_shm"))

    def attend_proto_future(self, request, *, timeout=None, metadata=None, output_shm=None):
        """attend_future for a ready AttendRequest proto."""
        return AttendFuture(self._stub.Attend.future(request, timeout=timeout or self.timeout,
                                                     metadata=metadata), output_shm)

    def attend_stream(self, requests, *, timeout=None, metadata=None):
        """Sends AttendRequest protos on one AttendStream; yields AttendResults
        as they come (possibly out of order; match on request_id)."""
        for response in self._stub.AttendStream(iter(requests), timeout=timeout,
                                                metadata=metadata):
            yield result_from_proto(response)

    # --- Layers of loaded models ---------------------------------------------

    def attend_layer(self, model, layer, x, *, timeout=None, metadata=None, **options):
        """One attention layer of a model the server loaded (--model=NAME=DIR)
        on hidden states x: y = o_proj(attention(q_proj(x), k_proj(m),
        v_proj(m))), m = x or `memory`. Options as in build_layer_request
        (memory, positions, causal, key_lengths, lse, entropy, weights,
        top_k, ...). Returns an AttendLayerResult, y in x's dtype.

        NOT_FOUND for a model the server has not loaded; INVALID_ARGUMENT
        naming the field ("x.shape", "layer", "memory", "positions", ...).
        """
        return self.attend_layer_proto(build_layer_request(model, layer, x, **options),
                                       timeout=timeout, metadata=metadata,
                                       output_shm=options.get("output_shm"))

    def attend_layer_proto(self, request, *, timeout=None, metadata=None, output_shm=None):
        """Sends a ready AttendLayerRequest proto; returns an AttendLayerResult."""
        response = self._stub.AttendLayer(request, timeout=timeout or self.timeout,
                                          metadata=metadata)
        return layer_result_from_proto(response, output_shm)

    # --- KV-cache sessions ---------------------------------------------------

    def create_session(self, num_kv_heads=0, head_dim=0, *, model="", value_dim=0, dtype="f32",
                       max_tokens=0, num_layers=None, rotary=None, sink_tokens=0,
                       window_tokens=0, shards=0, timeout=None, metadata=None):
        """Opens a KV-cache session; returns a Session.

        dtype: storage of the cache, 'f32', 'f16' or 'bf16'. max_tokens: bound
        on the tokens it may hold per layer (0: as many as the server's cache
        holds). num_layers: one paged cache per model layer (default 1);
        decode names the layer, and layers step in order. rotary: RoPE
        settings (a dict, see rotary_to_proto, or a RotaryEmbedding proto):
        the server rotates new queries and keys at the session's positions,
        so callers send unrotated ones. sink_tokens, window_tokens: with
        window_tokens > 0 the session keeps its first sink_tokens and last
        window_tokens tokens (rounded up to blocks) and frees the rest
        (attention sinks). RESOURCE_EXHAUSTED when the server's cache is full.

        model: a model the server loaded (--model; llama family): the
        session is that model's attention module, its steps send hidden
        states (decode(session, hidden=...)). num_kv_heads, head_dim,
        num_layers and rotary then come from the model (any given must
        agree). NOT_FOUND for an unknown model, INVALID_ARGUMENT for one of
        another family.

        shards: > 0 splits the session's context over that many of the
        server's --peers (this server coordinating): each peer holds a
        contiguous range of the tokens, every step fans out to them and is
        merged by lse, and capacity_tokens is the shards' together.
        FAILED_PRECONDITION when fewer peers are found; not with model,
        sinks windows or max_tokens, and such a session is not forked.
        """
        if num_layers is None:
            num_layers = 0 if model else 1
        request = _pb.CreateSessionRequest(
            num_kv_heads=int(num_kv_heads), head_dim=int(head_dim), value_dim=int(value_dim),
            dtype=tensors.wire_dtype(dtype), max_tokens=int(max_tokens),
            num_layers=int(num_layers), sink_tokens=int(sink_tokens),
            window_tokens=int(window_tokens), model=str(model), shards=int(shards))
        if rotary is not None:
            rotary_to_proto(rotary, request.rotary)
        response = self._stub.CreateSession(request, timeout=timeout or self.timeout,
                                            metadata=metadata)
        return Session(response.session_id, response.capacity_tokens, response.block_tokens,
                       response.num_layers or max(int(num_layers), 1), model=str(model))

    def fork_session(self, session, tokens, *, timeout=None, metadata=None):
        """Opens a session sharing the first `tokens` tokens of every layer
        of `session` (full blocks shared, the partial one copied), with its
        settings; it continues at position `tokens`. Returns a ForkedSession.
        FAILED_PRECONDITION when tokens exceed the parent's length or the
        parent has window_tokens (sinks sessions are not forked); NOT_FOUND
        as for decode.
        """
        response = self._stub.ForkSession(
            _pb.ForkSessionRequest(session_id=_session_id(session), tokens=int(tokens)),
            timeout=timeout or self.timeout, metadata=metadata)
        parent = session if isinstance(session, Session) else None
        return ForkedSession(response.session_id,
                             capacity_tokens=parent.capacity_tokens if parent else 0,
                             block_tokens=parent.block_tokens if parent else 0,
                             num_layers=parent.num_layers if parent else 1,
                             model=parent.model if parent else "",
                             context_tokens=response.context_tokens,
                             shared_tokens=response.shared_tokens)

    def decode(self, session, q=None, k=None, v=None, *, hidden=None, timeout=None,
               metadata=None, **options):
        """One decode step: appends k/v to the session's cache of `layer`
        (default 0) and attends q over that whole cache. A prefill is a
        decode with many tokens. A model session's step sends hidden
        [T, hidden] instead of q/k/v, and its output is the layer's y.
        Options as in build_decode_request (layer, expected_context_tokens,
        scale, ...). Returns a DecodeResult.

        NOT_FOUND for a closed, expired or unknown session; RESOURCE_EXHAUSTED
        when the cache is full; FAILED_PRECONDITION for a layer out of order
        or a stale expected_context_tokens (the session is then unchanged).
        """
        return self.decode_proto(build_decode_request(session, q, k, v, hidden=hidden, **options),
                                 timeout=timeout, metadata=metadata,
                                 output_shm=options.get("output_shm"))

    def decode_proto(self, request, *, timeout=None, metadata=None, output_shm=None):
        """Sends a ready DecodeRequest proto; returns a DecodeResult."""
        response = self._stub.Decode(request, timeout=timeout or self.timeout, metadata=metadata)
        return decode_result_from_proto(response, output_shm)

    def batch_decode(self, layer, entries, *, timeout=None, metadata=None, **options):
        """One layer-step for many sessions in one call (one backend call).

        entries: (session, q, k, v) or (session, q, k, v,
        expected_context_tokens) tuples, or (session, hidden[,
        expected_context_tokens]) for model sessions; options as in
        build_batch_decode_request, for the whole batch. Returns a list, one
        item per entry in order: a DecodeResult, or a BatchDecodeError for an
        entry that failed on its own (its cache is unchanged; the others
        went ahead). raise_first_error(results) raises the first of those.
        A failure of the whole call (deadline, queue, memory budget) is
        raised as grpc.RpcError, and then no entry's cache changed.
        """
        entries = list(entries)
        request = build_batch_decode_request(layer, entries, **options)
        return self.batch_decode_proto(request, timeout=timeout, metadata=metadata,
                                       output_shm=options.get("output_shm") or ())

    def batch_decode_proto(self, request, *, timeout=None, metadata=None, output_shm=()):
        """Sends a ready BatchDecodeRequest proto; returns the list of
        batch_decode (output_shm: the entries', as there)."""
        response = self._stub.BatchDecode(request, timeout=timeout or self.timeout,
                                          metadata=metadata)
        return batch_results_from_proto(response, [e.session_id for e in request.entries],
                                        output_shm)

    def batch_decode_stream(self, requests, *, timeout=None, metadata=None):
        """Sends BatchDecodeRequest protos (build_batch_decode_request; give
        each a request_id) on one BatchDecodeStream, so layer-steps of
        independent micro-batches overlap; yields a BatchResult per request
        as they complete (possibly out of order: match on request_id). Entry
        failures are in the results; a failure of a whole request ends the
        stream with grpc.RpcError. Requests in flight together may run in any
        order: a session's next layer-step belongs on the stream only after
        its previous one has answered (else FAILED_PRECONDITION), so
        pipeline different micro-batches, not the layers of one.
        """
        sent = {}

        def remember():
            for r in requests:
                sent[r.request_id] = [e.session_id for e in r.entries]
                yield r

        for response in self._stub.BatchDecodeStream(remember(), timeout=timeout,
                                                     metadata=metadata):
            yield BatchResult(
                request_id=response.request_id,
                results=batch_results_from_proto(response, sent.pop(response.request_id, ())),
                backend=response.backend,
                timing=_timing(response.timing))

    def close_session(self, session, *, timeout=None, metadata=None):
        """Frees the session's cache. NOT_FOUND if it is not open."""
        self._stub.CloseSession(_pb.CloseSessionRequest(session_id=_session_id(session)),
                                timeout=timeout or self.timeout, metadata=metadata)

    def server_info(self, *, timeout=None):
        """The ServerInfo proto: version, backends, dtypes, limits, sessions
        and the loaded models (`models`, ModelDescription protos)."""
        return self._stub.GetServerInfo(_pb.GetServerInfoRequest(),
                                        timeout=timeout or self.timeout)

    # --- Shared memory (a server on this host) --------------------------------

    def register_shared_memory(self, name, region, *, offset=0, byte_size=None, timeout=None,
                               metadata=None):
        """Lets the server map a POSIX shared-memory object as this caller's
        region `name` (1-128 of [A-Za-z0-9_.-]), so tensors can name places
        in it (ShmTensor) instead of carrying their bytes.

        region: a SharedMemoryRegion, registered whole; it remembers `name`,
        which its put() and alloc() references then carry. Or the key
        ("/attn_in") of an object the caller created: byte_size is then
        required, and [offset, offset + byte_size) of the object is the
        region (references count from offset).

        FAILED_PRECONDITION when the server runs without
        --allow_shared_memory, cannot open or map the object, or it is
        smaller than offset + byte_size; INVALID_ARGUMENT for a bad name,
        key, offset or size; ALREADY_EXISTS for a name in use;
        RESOURCE_EXHAUSTED past the server's --max_shm_regions.
        """
        if isinstance(region, shm.SharedMemoryRegion):
            if offset != 0 or byte_size is not None:
                raise ValueError("offset, byte_size: expected none with a SharedMemoryRegion "
                                 "(registered whole), got some")
            key, byte_size = region.key, region.byte_size
        else:
            key = str(region)
            if byte_size is None:
                raise ValueError(f"byte_size: expected the region's size with key {key!r}, "
                                 "got none")
        self._stub.RegisterSharedMemory(
            _pb.RegisterSharedMemoryRequest(name=name, key=key, offset=int(offset),
                                            byte_size=int(byte_size)),
            timeout=timeout or self.timeout, metadata=metadata)
        if isinstance(region, shm.SharedMemoryRegion):
            region.name = name

    def unregister_shared_memory(self, name="", *, timeout=None, metadata=None):
        """Forgets this caller's region `name` (the server unmaps it once no
        call in flight uses it); "" forgets all of this caller's regions.
        NOT_FOUND for a name not registered."""
        self._stub.UnregisterSharedMemory(_pb.UnregisterSharedMemoryRequest(name=name),
                                          timeout=timeout or self.timeout, metadata=metadata)

    def shared_memory_regions(self, *, timeout=None):
        """This caller's registered regions, by name: a dict of
        SharedMemoryRegion protos (name, key, offset, byte_size), from
        server_info()."""
        return {r.name: r for r in self.server_info(timeout=timeout).shm_regions}

    def models(self, *, timeout=None):
        """The models the server loaded (--model), by name: a dict of
        ModelDescription protos (family, num_layers, hidden_size, num_heads,
        num_kv_heads, head_dim, dtype, cross_attention, causal, ...)."""
        return {m.name: m for m in self.server_info(timeout=timeout).models}

    def health(self, service="", *, timeout=None):
        """grpc.health.v1 status name: 'SERVING', 'NOT_SERVING', ..."""
        response = self._health.Check(_health_pb.HealthCheckRequest(service=service),
                                      timeout=timeout or self.timeout)
        return _health_pb.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout=30.0):
        """Polls health until SERVING; raises TimeoutError after `timeout` s."""
        give_up = time.monotonic() + timeout
        last = None
        while time.monotonic() < give_up:
            try:
                status = self.health(timeout=min(1.0, max(0.05, give_up - time.monotonic())))
                if status == "SERVING":
                    return
                last = status
            except grpc.RpcError as e:
                last = e.code()
            time.sleep(0.05)
        raise TimeoutError(f"{self.target} not SERVING after {timeout} s (last: {last})")


class ModelSession:
    """The KV caches of the sequences of a multi-layer model on one Client:
    one session (with num_layers layers) per sequence, stepped one layer at a
    time for every sequence in ONE batch_decode call.

        with ModelSession(client, 4, num_kv_heads=8, head_dim=128,
                          num_layers=32, dtype="bf16") as m:
            for layer in range(32):
                outs = m.step_layer(layer, qs, ks, vs)  # one array per sequence

    With model="NAME" (a model the server loaded) the sessions are that
    model's attention modules: dims and layers come from the model, and
    step_layer(layer, hidden=xs) sends hidden states, returning each layer's y.

    Layers step in order (layer l of a token after layer l-1; layer 0 after
    the last layer of the previous token): the server refuses others with
    FAILED_PRECONDITION. Each entry carries the tokens its layer's cache
    holds (tokens[i][layer]) as expected_context_tokens, so a retried step
    that already landed is refused, not appended twice. Not thread-safe.
    """

    def __init__(self, client, n_sequences, num_kv_heads=0, head_dim=0, *, num_layers=None,
                 **session_options):
        """Opens n_sequences sessions; session_options as in
        Client.create_session (model, dtype, rotary, sink_tokens, ...). On
        a failure closes those opened and re-raises."""
        if n_sequences < 1:
            raise ValueError(f"n_sequences: expected >= 1, got {n_sequences}")
        self.client = client
        self.sessions = []
        self.tokens = []  # per sequence, per layer: tokens in that layer's cache
        try:
            for _ in range(n_sequences):
                s = client.create_session(num_kv_heads, head_dim, num_layers=num_layers,
                                          **session_options)
                self.sessions.append(s)
                self.tokens.append([0] * s.num_layers)
        except BaseException:
            self.close()
            raise
        self.num_layers = self.sessions[0].num_layers

    @property
    def num_sequences(self):
        return len(self.sessions)

    def fork(self, index, tokens):
        """Adds a sequence sharing the first `tokens` tokens of every layer
        of sequence `index` (Client.fork_session); returns its index."""
        if not 0 <= index < len(self.sessions):
            raise IndexError(f"index: expected in [0, {len(self.sessions)}), got {index}")
        forked = self.client.fork_session(self.sessions[index], tokens)
        self.sessions.append(forked)
        self.tokens.append([forked.context_tokens] * self.num_layers)
        return len(self.sessions) - 1

    def step_layer(self, layer, qs=None, ks=None, vs=None, *, hidden=None, **options):
        """One layer-step of every sequence in one batch_decode: qs[i], ks[i],
        vs[i] are sequence i's q [Lq, Hq, D] and new k/v [Lnew, Hkv, D|Dv];
        for model sessions hidden[i] is its hidden states [T, hidden]
        instead. Returns the outputs [Lq, Hq, Dv] (model sessions: the
        layer's y [T, hidden]), one per sequence. Options as in
        Client.batch_decode. If entries fail, raises the first one's
        BatchDecodeError, its message naming the sequence; the entries that
        succeeded went ahead (and their token counts with them).
        """
        n = len(self.sessions)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected in [0, {self.num_layers}), got {layer}")
        if hidden is not None:
            if qs is not None or ks is not None or vs is not None:
                raise ValueError("qs, ks, vs: expected none with hidden")
            if len(hidden) != n:
                raise ValueError(f"hidden: expected one per sequence ({n}), got {len(hidden)}")
            entries = [(self.sessions[i], hidden[i], self.tokens[i][layer]) for i in range(n)]
        else:
            if qs is None or ks is None or vs is None:
                raise ValueError("qs, ks, vs: expected all three, or hidden")
            if not len(qs) == len(ks) == len(vs) == n:
                raise ValueError(f"qs, ks, vs: expected one per sequence ({n}), got "
                                 f"{len(qs)}, {len(ks)}, {len(vs)}")
            entries = [(self.sessions[i], qs[i], ks[i], vs[i], self.tokens[i][layer])
                       for i in range(n)]
        results = self.client.batch_decode(layer, entries, **options)
        first_error = None
        outputs = []
        for i, r in enumerate(results):
            if isinstance(r, BatchDecodeError):
                if first_error is None:
                    first_error = BatchDecodeError(
                        r.code(), f"sequence {i} (session {r.session_id}): {r.details()}",
                        i, r.session_id)
                outputs.append(None)
                continue
            self.tokens[i][layer] = r.context_tokens
            outputs.append(r.output)
        if first_error is not None:
            raise first_error
        return outputs

    def close(self):
        """Closes every sequence's session (errors of sessions already gone
        are ignored); the ModelSession then holds none."""
        for s in self.sessions:
            try:
                self.client.close_session(s)
            except grpc.RpcError:
                pass
        self.sessions = []
        self.tokens = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
