"""Shared memory for a server on the same host: tensors by reference.

A SharedMemoryRegion is a POSIX shared-memory object (a file of /dev/shm on
Linux) mapped into this process. Registered with the server
(Client.register_shared_memory), the server maps it too: request tensors
then name their place in it (ShmTensor) instead of travelling in the
message, and the server writes the output there when asked (output_shm=).

    region = SharedMemoryRegion(64 << 20)           # /dev/shm/attnserve_<pid>_..., mode 0600
    client.register_shared_memory("io", region)
    q_ref, k_ref, v_ref = region.put(q), region.put(k), region.put(v)
    r = client.attend(q_ref, k_ref, v_ref, output_shm=region.alloc(q.shape))
    r.output                                        # float32 array viewing the region
    client.unregister_shared_memory("io")
    region.close()                                  # unmaps and unlinks

The region's owner (the process that created it) unlinks it on close(), or
at interpreter exit at the latest. Not thread-safe: put() and alloc() move
one cursor.
"""

import dataclasses
import itertools
import mmap
import os
import re
import secrets
import weakref

import numpy as np

from . import _stubs
from . import tensors

_pb = _stubs.load()[0]

SHM_DIR = "/dev/shm"
ALIGNMENT = 64  # put() and alloc() start each tensor on a cache line

_KEY = re.compile(r"/[A-Za-z0-9_.-]{1,254}")
_counter = itertools.count()
# Wire dtype name -> the little-endian NumPy dtype of its bytes (BF16: the bits).
_STORAGE = {tensors.F32: "<f4", tensors.F16: "<f2", tensors.BF16: "<u2"}
_ITEMSIZE = {tensors.F32: 4, tensors.F16: 2, tensors.BF16: 2}
_NAME_OF_WIRE = {_pb.F32: tensors.F32, _pb.F16: tensors.F16, _pb.BF16: tensors.BF16}


def unique_key(prefix="attnserve"):
    """A shm key no other live process uses: "/<prefix>_<pid>_<n>_<random>"."""
    return f"/{prefix}_{os.getpid()}_{next(_counter)}_{secrets.token_hex(4)}"


def check_key(key):
    """Raises ValueError unless key is "/" then 1-254 of [A-Za-z0-9_.-]."""
    if not isinstance(key, str) or not _KEY.fullmatch(key) or key in ("/.", "/.."):
        raise ValueError(f"key: expected \"/\" then 1-254 of [A-Za-z0-9_.-], got {key!r}")


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclasses.dataclass(frozen=True)
class ShmTensor:
    """A tensor's place in a registered region, usable wherever attend,
    decode and batch_decode take an array: `region` (a SharedMemoryRegion
    registered with Client.register_shared_memory, or the name a region was
    registered under), `offset` in bytes from the region's start, `shape`,
    and `dtype` on the wire ('f32', 'f16' or 'bf16'). SharedMemoryRegion.put
    and alloc make them."""
    region: object
    offset: int
    shape: tuple
    dtype: str = tensors.F32

    @property
    def region_name(self):
        if isinstance(self.region, SharedMemoryRegion):
            if self.region.name is None:
                raise ValueError(f"region {self.region.key}: expected it registered "
                                 "(Client.register_shared_memory), got an unregistered one")
            return self.region.name
        return str(self.region)

    @property
    def nbytes(self):
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[self.dtype]

    def to_proto(self, out):
        """Fills the Tensor message `out`: dtype, shape and shm, no data."""
        out.dtype = tensors.wire_dtype(self.dtype)
        out.shape[:] = [int(d) for d in self.shape]
        out.ClearField("data")
        out.shm.region = self.region_name
        out.shm.offset = int(self.offset)
        return out

    def array(self, copy=False):
        """The tensor's values: for F32 and F16 a NumPy array viewing the
        region (copy=True: a copy), for BF16 a float32 copy (NumPy has no
        bfloat16). Needs the region's mapping (region a SharedMemoryRegion)."""
        if not isinstance(self.region, SharedMemoryRegion):
            raise ValueError(f"region: expected a SharedMemoryRegion to read from, got "
                             f"the name {self.region!r}")
        return self.region.array(self, copy=copy)


def ref_to_proto(ref, out):
    """Fills the SharedMemoryRef message `out` from a ShmTensor or a
    (region, offset) pair, region a SharedMemoryRegion or a name."""
    if isinstance(ref, ShmTensor):
        out.region, out.offset = ref.region_name, int(ref.offset)
        return out
    region, offset = ref
    out.region = ShmTensor(region, offset, ()).region_name
    out.offset = int(offset)
    return out


def tensor_to_proto(value, dtype, out):
    """Fills the Tensor `out` from an array (encoded as dtype) or a
    ShmTensor (its own dtype, by reference)."""
    if isinstance(value, ShmTensor):
        return value.to_proto(out)
    return tensors.to_proto(value, dtype, out)


def output_from_proto(t, asked=None):
    """A response tensor -> (array, ShmTensor or None). When the server
    wrote it to shared memory (t.shm set), the array views (or, for BF16,
    copies) the region if `asked` (the output_shm given: a ShmTensor or a
    (region, offset) pair) holds the SharedMemoryRegion of that name, and is
    None otherwise."""
    if not t.HasField("shm"):
        return tensors.from_proto(t), None
    region = t.shm.region
    candidate = asked.region if isinstance(asked, ShmTensor) else (
        asked[0] if isinstance(asked, (tuple, list)) else None)
    if isinstance(candidate, SharedMemoryRegion) and candidate.name == region:
        region = candidate
    if t.dtype not in _NAME_OF_WIRE:
        raise ValueError(f"output dtype: expected F32, F16 or BF16 in shared memory, got {t.dtype}")
    ref = ShmTensor(region, int(t.shm.offset), tuple(t.shape), _NAME_OF_WIRE[t.dtype])
    return (ref.array() if isinstance(region, SharedMemoryRegion) else None), ref


class SharedMemoryRegion:
    """A POSIX shared-memory object mapped read-write into this process.

    SharedMemoryRegion(byte_size, key=None, mode=0o600) creates the object
    (key default unique_key(); FileExistsError if it exists) with its pages
    allocated (OSError ENOSPC when /dev/shm is too small, rather than SIGBUS
    on a later write) and owns it: close() unlinks it. mode must let the
    server's user read and write (0o600: the same user; 0o660 and a shared
    group otherwise). SharedMemoryRegion.open(key) maps an existing object
    without owning it.
    """

    def __init__(self, byte_size, key=None, *, mode=0o600):
        byte_size = int(byte_size)
        if byte_size <= 0:
            raise ValueError(f"byte_size: expected > 0, got {byte_size}")
        key = unique_key() if key is None else key
        check_key(key)
        path = SHM_DIR + key
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # os.open applies the umask
            os.ftruncate(fd, byte_size)
            os.posix_fallocate(fd, 0, byte_size)
            self._map = mmap.mmap(fd, byte_size)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        self._init(key, byte_size, owner=True)

    @classmethod
    def open(cls, key):
        """Maps all of the existing object `key`, without owning it."""
        check_key(key)
        fd = os.open(SHM_DIR + key, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size <= 0:
                raise ValueError(f"key: expected a non-empty object, got {key} of 0 bytes")
            self = cls.__new__(cls)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._init(key, size, owner=False)
        return self

    def _init(self, key, byte_size, owner):
        self.key = key
        self.byte_size = byte_size
        self.owner = owner
        self.name = None  # set by Client.register_shared_memory
        self._next = 0
        self._finalizer = weakref.finalize(self, _unlink, SHM_DIR + key) if owner else None

    @property
    def closed(self):
        return self._map is None

    @property
    def buffer(self):
        """A memoryview of the whole mapping; ValueError once closed."""
        if self._map is None:
            raise ValueError(f"region {self.key}: closed")
        return memoryview(self._map)

    def _place(self, offset, nbytes):
        """The offset to use (None: the next free aligned one), checked."""
        if offset is None:
            offset = -(-self._next // ALIGNMENT) * ALIGNMENT
        offset = int(offset)
        if offset < 0 or offset + nbytes > self.byte_size:
            raise ValueError(f"offset: expected room for {nbytes} bytes in {self.key} of "
                             f"{self.byte_size} bytes, got {offset}")
        self._next = max(self._next, offset + nbytes)
        return offset

    def _storage(self, ref):
        # frombuffer holds a buffer export of the mapping (np.ndarray(buffer=)
        # would not), so close() cannot unmap it from under the array.
        if self._map is None:
            raise ValueError(f"region {self.key}: closed")
        count = int(np.prod(ref.shape, dtype=np.int64))
        return np.frombuffer(self._map, dtype=_STORAGE[ref.dtype], count=count,
                             offset=ref.offset).reshape(ref.shape)

    def put(self, array, dtype=None, offset=None):
        """Writes `array` encoded as dtype ('f32', 'f16', 'bf16'; default
        f16 for float16 arrays, else f32) at `offset` (None: after what
        put/alloc placed last, aligned to 64 bytes); returns its ShmTensor."""
        a = np.asarray(array)
        if dtype is None:
            dtype = tensors.F16 if a.dtype == np.float16 else tensors.F32
        dtype = tensors.dtype_name(dtype)
        ref = self.alloc(a.shape, dtype, offset)
        if dtype == tensors.BF16:
            self._storage(ref)[...] = tensors.float_to_bf16_bits(a.astype(np.float32))
        else:
            self._storage(ref)[...] = a
        return ref

    def alloc(self, shape, dtype=tensors.F32, offset=None):
        """Reserves room for a tensor (an output_shm=, say) without writing
        it; returns its ShmTensor. offset as in put."""
        shape = tuple(int(d) for d in shape)
        dtype = tensors.dtype_name(dtype)
        ref = ShmTensor(self, 0, shape, dtype)
        return dataclasses.replace(ref, offset=self._place(offset, ref.nbytes))

    def reset(self):
        """The next put/alloc without an offset starts at 0 again."""
        self._next = 0

    def array(self, ref, copy=False):
        """The values at `ref` (a ShmTensor of this region): as ShmTensor.array."""
        if ref.offset < 0 or ref.offset + ref.nbytes > self.byte_size:
            raise ValueError(f"offset: expected room for {ref.nbytes} bytes in {self.key} of "
                             f"{self.byte_size} bytes, got {ref.offset}")
        stored = self._storage(ref)
        if ref.dtype == tensors.BF16:
            return tensors.bf16_bits_to_float(stored).reshape(ref.shape)
        out = stored.view(np.float32 if ref.dtype == tensors.F32 else np.float16)
        return out.copy() if copy else out

    def unlink(self):
        """Removes the name now (the mapping stays usable)."""
        _unlink(SHM_DIR + self.key)
        if self._finalizer is not None:
            self._finalizer.detach()
        self.owner = False

    def close(self):
        """Unlinks the object (owner only) and unmaps it. While NumPy
        arrays still view the mapping it stays mapped until they are gone."""
        if self.owner:
            self.unlink()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # arrays view it; the mapping goes with the last of them
            self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"SharedMemoryRegion(key={self.key!r}, byte_size={self.byte_size}, "
                f"name={self.name!r}, owner={self.owner})")
