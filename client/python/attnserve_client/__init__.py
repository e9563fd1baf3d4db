"""attnserve_client: a NumPy client for attnserve, the attention microservice.

    import numpy as np
    import attnserve_client

    with attnserve_client.Client("localhost:50051") as c:
        q = np.random.randn(1, 128, 8, 64).astype(np.float32)
        k = np.random.randn(1, 128, 8, 64).astype(np.float32)
        v = np.random.randn(1, 128, 8, 64).astype(np.float32)
        r = c.attend(q, k, v, causal=True, lse=True)
        print(r.output.shape, r.lse.shape, r.backend)
"""

from .client import (AttendLayerResult, AttendResult, BatchDecodeError, BatchResult, Client,
                     DecodeResult, ForkedSession, ModelSession, Session,
                     batch_results_from_proto, build_batch_decode_request,
                     build_decode_request, build_layer_request, build_request,
                     decode_result_from_proto, layer_result_from_proto, raise_first_error,
                     result_from_proto, rotary_to_proto, tls_credentials)
from .tensors import BF16, F16, F32, round_to
from . import _stubs

attention_pb2, attention_pb2_grpc, health_pb2, health_pb2_grpc = _stubs.load()

__all__ = ["AttendLayerResult", "AttendResult", "BatchDecodeError", "BatchResult", "Client",
           "DecodeResult", "ForkedSession", "ModelSession", "Session",
           "batch_results_from_proto", "build_batch_decode_request", "build_decode_request",
           "build_layer_request", "build_request", "decode_result_from_proto",
           "layer_result_from_proto", "raise_first_error", "result_from_proto",
           "rotary_to_proto", "tls_credentials",
           "F32", "F16", "BF16", "round_to", "attention_pb2", "attention_pb2_grpc", "health_pb2",
           "health_pb2_grpc"]
