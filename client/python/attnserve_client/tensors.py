"""NumPy arrays <-> attnserve.v1.Tensor.

The wire carries raw little-endian row-major bytes. NumPy has float32 and
float16 but no bfloat16, so BF16 travels as float32 arrays rounded to
bfloat16 (round to nearest even) on the way out and widened back to float32
on the way in.
"""

import numpy as np

from . import _stubs

_pb = _stubs.load()[0]

F32 = "f32"
F16 = "f16"
BF16 = "bf16"

_WIRE = {F32: _pb.F32, F16: _pb.F16, BF16: _pb.BF16}
_NAMES = {"f32": F32, "float32": F32, "f16": F16, "float16": F16, "bf16": BF16,
          "bfloat16": BF16}


def dtype_name(dtype):
    """Normalises 'f32'/'float32'/np.float32/... to 'f32', 'f16' or 'bf16'."""
    if isinstance(dtype, str):
        key = dtype.lower()
    else:
        key = np.dtype(dtype).name
    if key not in _NAMES:
        raise ValueError(f"dtype: expected f32, f16 or bf16, got {dtype!r}")
    return _NAMES[key]


def wire_dtype(dtype):
    """The attnserve.v1.DType enum value of 'f32', 'f16' or 'bf16'."""
    return _WIRE[dtype_name(dtype)]


def float_to_bf16_bits(a):
    """float32 array -> uint16 bfloat16 bit patterns, round to nearest even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded).astype(np.uint16)


def bf16_bits_to_float(bits):
    """uint16 bfloat16 bit patterns -> float32 array (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to(a, dtype):
    """The float32 values `a` takes once sent as `dtype` (what the server sees)."""
    dtype = dtype_name(dtype)
    a = np.asarray(a, dtype=np.float32)
    if dtype == F16:
        return a.astype(np.float16).astype(np.float32)
    if dtype == BF16:
        return bf16_bits_to_float(float_to_bf16_bits(a)).reshape(a.shape)
    return a


def to_proto(array, dtype, out=None):
    """Fills (or returns a new) Tensor with `array` encoded as `dtype`."""
    dtype = dtype_name(dtype)
    t = out if out is not None else _pb.Tensor()
    a = np.asarray(array)
    t.dtype = _WIRE[dtype]
    t.shape[:] = [int(d) for d in a.shape]
    if dtype == F32:
        data = np.ascontiguousarray(a, dtype="<f4").tobytes()
    elif dtype == F16:
        data = np.ascontiguousarray(a, dtype="<f2").tobytes()
    else:
        data = float_to_bf16_bits(a.astype(np.float32)).astype("<u2").tobytes()
    t.data = data
    return t


def from_proto(t):
    """Tensor -> NumPy array (F32/BF16 -> float32, F16 -> float16, I32 -> int32)."""
    shape = tuple(t.shape)
    if t.dtype == _pb.F32:
        return np.frombuffer(t.data, dtype="<f4").reshape(shape).astype(np.float32)
    if t.dtype == _pb.F16:
        return np.frombuffer(t.data, dtype="<f2").reshape(shape).astype(np.float16)
    if t.dtype == _pb.BF16:
        return bf16_bits_to_float(np.frombuffer(t.data, dtype="<u2")).reshape(shape)
    if t.dtype == _pb.I32:
        return np.frombuffer(t.data, dtype="<i4").reshape(shape).astype(np.int32)
    raise ValueError(f"tensor dtype: expected F32, F16, BF16 or I32, got {t.dtype}")
