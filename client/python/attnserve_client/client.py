"""Client: NumPy in, NumPy out, over attnserve's gRPC API.

One Client holds one gRPC channel; it is thread-safe and meant to be reused.
Errors from the server are raised as grpc.RpcError (e.code() is a
grpc.StatusCode such as INVALID_ARGUMENT, e.details() the message).
"""

import collections
import dataclasses
import time
from typing import Optional

import grpc
import numpy as np

from . import _stubs
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


@dataclasses.dataclass
class Session:
    """A KV-cache session opened by Client.create_session."""
    session_id: str
    capacity_tokens: int = 0  # max_tokens, or what the server's free cache held then
    block_tokens: int = 0     # tokens per cache block


@dataclasses.dataclass
class DecodeResult:
    output: np.ndarray                # [Lq, Hq, Dv] (4-D if the query was), the query's dtype
    lse: Optional[np.ndarray] = None  # [1, Hq, Lq], float32
    context_tokens: int = 0           # tokens in the session's cache after the append
    backend: str = ""
    request_id: str = ""
    timing: dict = dataclasses.field(default_factory=dict)  # queue_us, compute_us, ...


def _timing(t):
    return {"queue_us": t.queue_us, "compute_us": t.compute_us, "batch_size": t.batch_size,
            "total_us": t.total_us}


def decode_result_from_proto(response):
    """DecodeResponse -> DecodeResult."""
    return DecodeResult(
        output=tensors.from_proto(response.output),
        lse=tensors.from_proto(response.lse) if response.HasField("lse") else None,
        context_tokens=response.context_tokens,
        backend=response.backend,
        request_id=response.request_id,
        timing=_timing(response.timing))


def _session_id(session):
    return session.session_id if isinstance(session, Session) else str(session)


def build_decode_request(session, q, k, v, *, dtype=None, scale=0.0, window_left=None,
                         softcap=0.0, alibi_slopes=None, lse=False, backend="", priority=0,
                         request_id=""):
    """Builds a DecodeRequest proto from NumPy arrays.

    session: a Session or its id. q [Lq, Hq, D], k [Lnew, Hkv, D], v [Lnew,
    Hkv, Dv] (or 4-D with batch 1). dtype on the wire as in build_request;
    the server converts K/V to the session's cache dtype. Attention is causal
    with bottom-right alignment (the new queries are the last positions).
    """
    if dtype is None:
        dtype = tensors.F16 if np.asarray(q).dtype == np.float16 else tensors.F32
    dtype = tensors.dtype_name(dtype)
    r = _pb.DecodeRequest(session_id=_session_id(session), request_id=request_id,
                          backend=backend, priority=priority)
    tensors.to_proto(q, dtype, r.query)
    tensors.to_proto(k, dtype, r.key)
    tensors.to_proto(v, dtype, r.value)
    o = r.options
    o.scale = float(scale)
    o.causal = True
    if window_left is not None and window_left >= 0:
        o.window_left = int(window_left)
    o.softcap = float(softcap)
    if alibi_slopes is not None:
        o.alibi_slopes[:] = [float(s) for s in alibi_slopes]
    r.outputs.lse = bool(lse)
    return r


def result_from_proto(response):
    """AttendResponse -> AttendResult."""
    def optional(name):
        return tensors.from_proto(getattr(response, name)) if response.HasField(name) else None

    return AttendResult(
        output=tensors.from_proto(response.output),
        lse=optional("lse"),
        weights=optional("weights"),
        top_k_indices=optional("top_k_indices"),
        top_k_weights=optional("top_k_weights"),
        backend=response.backend,
        request_id=response.request_id,
        timing=_timing(response.timing))


def build_request(q, k, v, *, dtype=None, scale=0.0, causal=False, top_left=False,
                  window_left=None, window_right=None, softcap=0.0, alibi_slopes=None,
                  linear=False, bias=None, key_lengths=None, lse=False, weights=False,
                  top_k=0, backend="", priority=0, request_id=""):
    """Builds an AttendRequest proto from NumPy arrays.

    q [B, Lq, Hq, D], k [B, Lk, Hkv, D], v [B, Lk, Hkv, Dv] (or 3-D, batch 1).
    dtype: 'f32', 'f16' or 'bf16' on the wire; default f16 for float16 queries,
    else f32. window_left/right: None (or -1) is unbounded. bias is sent in the
    request dtype. Nothing is validated here: the server answers
    INVALID_ARGUMENT naming the field.
    """
    if dtype is None:
        dtype = tensors.F16 if np.asarray(q).dtype == np.float16 else tensors.F32
    dtype = tensors.dtype_name(dtype)
    r = _pb.AttendRequest(request_id=request_id, backend=backend, priority=priority)
    tensors.to_proto(q, dtype, r.query)
    tensors.to_proto(k, dtype, r.key)
    tensors.to_proto(v, dtype, r.value)
    if bias is not None:
        tensors.to_proto(bias, dtype, r.bias)
    if key_lengths is not None:
        r.key_lengths[:] = [int(x) for x in key_lengths]
    o = r.options
    o.scale = float(scale)
    o.causal = bool(causal)
    o.causal_alignment = _pb.TOP_LEFT if top_left else _pb.BOTTOM_RIGHT
    if window_left is not None and window_left >= 0:
        o.window_left = int(window_left)
    if window_right is not None and window_right >= 0:
        o.window_right = int(window_right)
    o.softcap = float(softcap)
    if alibi_slopes is not None:
        o.alibi_slopes[:] = [float(s) for s in alibi_slopes]
    o.variant = _pb.LINEAR if linear else _pb.SOFTMAX
    r.outputs.lse = bool(lse)
    r.outputs.weights = bool(weights)
    r.outputs.top_k = int(top_k)
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
                                 metadata=metadata)

    def attend_proto(self, request, *, timeout=None, metadata=None):
        """Sends a ready AttendRequest proto; returns an AttendResult."""
        response = self._stub.Attend(request, timeout=timeout or self.timeout,
                                     metadata=metadata)
        return result_from_proto(response)

    def attend_stream(self, requests, *, timeout=None, metadata=None):
        """Sends AttendRequest protos on one AttendStream; yields AttendResults
        as they come (possibly out of order; match on request_id)."""
        for response in self._stub.AttendStream(iter(requests), timeout=timeout,
                                                metadata=metadata):
            yield result_from_proto(response)

    # --- KV-cache sessions ---------------------------------------------------

    def create_session(self, num_kv_heads, head_dim, *, value_dim=0, dtype="f32", max_tokens=0,
                       timeout=None, metadata=None):
        """Opens a KV-cache session; returns a Session.

        dtype: storage of the cache, 'f32', 'f16' or 'bf16'. max_tokens: bound
        on the tokens it may hold (0: as many as the server's cache holds).
        RESOURCE_EXHAUSTED when the server's cache is full.
        """
        request = _pb.CreateSessionRequest(
            num_kv_heads=int(num_kv_heads), head_dim=int(head_dim), value_dim=int(value_dim),
            dtype=tensors.wire_dtype(dtype), max_tokens=int(max_tokens))
        response = self._stub.CreateSession(request, timeout=timeout or self.timeout,
                                            metadata=metadata)
        return Session(response.session_id, response.capacity_tokens, response.block_tokens)

    def decode(self, session, q, k, v, *, timeout=None, metadata=None, **options):
        """One decode step: appends k/v to the session's cache and attends q
        over the whole cache. A prefill is a decode with many tokens. Options
        as in build_decode_request. Returns a DecodeResult.

        NOT_FOUND for a closed, expired or unknown session; RESOURCE_EXHAUSTED
        when the cache is full (the session is then unchanged).
        """
        return self.decode_proto(build_decode_request(session, q, k, v, **options),
                                 timeout=timeout, metadata=metadata)

    def decode_proto(self, request, *, timeout=None, metadata=None):
        """Sends a ready DecodeRequest proto; returns a DecodeResult."""
        response = self._stub.Decode(request, timeout=timeout or self.timeout, metadata=metadata)
        return decode_result_from_proto(response)

    def close_session(self, session, *, timeout=None, metadata=None):
        """Frees the session's cache. NOT_FOUND if it is not open."""
        self._stub.CloseSession(_pb.CloseSessionRequest(session_id=_session_id(session)),
                                timeout=timeout or self.timeout, metadata=metadata)

    def server_info(self, *, timeout=None):
        """The ServerInfo proto: version, backends, dtypes, limits."""
        return self._stub.GetServerInfo(_pb.GetServerInfoRequest(),
                                        timeout=timeout or self.timeout)

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
