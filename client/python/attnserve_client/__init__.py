"""attnserve_client: a NumPy client for attnserve, the attention microservice.

    import numpy as np
    import attnserve_client

    with attnserve_client.Client("localhost:50051") as c:
        q = np.random.randn(1, 128, 8, 64).astype(np.float32)
        k = np.random.randn(1, 128, 8, 64).astype(np.float32)
        v = np.random.randn(1, 128, 8, 64).astype(np.float32)
        r = c.attend(q, k, v, causal=True, lse=True)
        print(r.output.shape, r.lse.shape, r.backend)

        # Block-sparse: 64x64 blocks, the lower triangle of blocks, for every head.
        mask = attnserve_client.block_mask_from_dense(np.tril(np.ones((2, 2), bool)), 64, 64)
        r = c.attend(q, k, v, block_mask=mask, global_tokens=[0], sink_logits=[0.0] * 8)

    # A server on this host (--allow_shared_memory): tensors by reference.
    with attnserve_client.SharedMemoryRegion(16 << 20) as region, \
            attnserve_client.Client("localhost:50051") as c:
        c.register_shared_memory("io", region)
        r = c.attend(region.put(q), region.put(k), region.put(v),
                     output_shm=region.alloc(q.shape))
        print(r.output.sum())  # r.output views the region
        c.unregister_shared_memory("io")

    # The same attention with the keys split over three replicas, merged by lse:
    clients = [attnserve_client.Client(t) for t in ("a:50051", "b:50051", "c:50051")]
    r = attnserve_client.sharded_attend(clients, q, k, v, causal=True, lse=True)
"""

from .client import (AttendFuture, AttendLayerResult, AttendResult, BatchDecodeError,
                     BatchResult, Client, DecodeResult, ForkedSession, ModelSession, Session,
                     batch_results_from_proto, build_batch_decode_request,
                     build_decode_request, build_layer_request, build_request,
                     decode_result_from_proto, layer_result_from_proto, raise_first_error,
                     result_from_proto, rotary_to_proto, tls_credentials)
from .shared_memory import SharedMemoryRegion, ShmTensor, unique_key as unique_shm_key
from .sharded import (ShardedAttendError, key_ranges, merge_attention_state_pair,
                      merge_attention_states, sharded_attend)
from .sparsity import (BlockMask, KeySelection, Sparsity, block_mask_from_dense,
                       sparsity_to_proto)
from .tensors import BF16, F16, F32, round_to
from . import _stubs

attention_pb2, attention_pb2_grpc, health_pb2, health_pb2_grpc = _stubs.load()

__all__ = ["AttendFuture", "AttendLayerResult", "AttendResult", "BatchDecodeError",
           "BatchResult", "Client", "DecodeResult", "ForkedSession", "ModelSession", "Session",
           "batch_results_from_proto", "build_batch_decode_request", "build_decode_request",
           "build_layer_request", "build_request", "decode_result_from_proto",
           "layer_result_from_proto", "raise_first_error", "result_from_proto",
           "rotary_to_proto", "tls_credentials",
           "SharedMemoryRegion", "ShmTensor", "unique_shm_key",
           "ShardedAttendError", "key_ranges", "merge_attention_state_pair",
           "merge_attention_states", "sharded_attend",
           "BlockMask", "KeySelection", "Sparsity", "block_mask_from_dense", "sparsity_to_proto",
           "F32", "F16", "BF16", "round_to", "attention_pb2", "attention_pb2_grpc", "health_pb2",
           "health_pb2_grpc"]
