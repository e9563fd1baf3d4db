"""Sparse attention: block masks, key selection, global tokens and sinks.

A query row's visible keys are, in this order (proto `Sparsity`, README
"Sparse attention"): the keys of its range (key_lengths, causal, window)
that its block_mask row lists or its key_indices row selects; united with
the global tokens (a global key is seen by every query, a global query sees
every key, both within key_lengths and, with causal, not past the query's
diagonal). sink_logits then add exp(sink_logits[h]) to each row's softmax
denominator.

Index arrays travel as I32 tensors. Only what the wire cannot carry is
checked here (integer arrays within int32); the server checks the rest and
answers INVALID_ARGUMENT naming the field (sparsity.block_mask.indptr[...]).
"""

import dataclasses
from typing import Optional, Sequence

import numpy as np

from . import _stubs

_pb = _stubs.load()[0]

_I32_MIN, _I32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


def indices_to_proto(array, field, out=None):
    """Fills (or returns a new) Tensor with an integer array as I32. field
    names the array in the ValueError raised for a non-integer array or a
    value outside int32."""
    a = np.asarray(array)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{field}: expected an integer array, got dtype {a.dtype}")
    if a.size and (a.min() < _I32_MIN or a.max() > _I32_MAX):
        raise ValueError(f"{field}: expected values within int32, got "
                         f"[{a.min()}, {a.max()}]")
    t = out if out is not None else _pb.Tensor()
    t.dtype = _pb.I32
    t.shape[:] = [int(d) for d in a.shape]
    t.data = np.ascontiguousarray(a, dtype="<i4").tobytes()
    return t


@dataclasses.dataclass(frozen=True)
class BlockMask:
    """A block-sparse mask in BSR form (FlashInfer's
    BlockSparseAttentionWrapper): query rows in blocks of block_rows, keys in
    blocks of block_cols (the last of each may be short). indptr: int
    [B or 1, Hq or 1, ceil(Lq / block_rows) + 1] (or 1-D for one slice);
    row block r of slice (b, h) sees key blocks
    indices[indptr[b, h, r]:indptr[b, h, r + 1]], increasing; slices follow
    one another in indices. full_indptr / full_indices, the same layout:
    blocks known to be fully visible (FlexAttention's full blocks); they
    join the pattern and must not repeat a block of indices in a row.
    block_mask_from_dense builds one from a boolean block matrix."""
    block_rows: int
    block_cols: int
    indptr: np.ndarray
    indices: np.ndarray
    full_indptr: Optional[np.ndarray] = None
    full_indices: Optional[np.ndarray] = None

    def to_proto(self, out=None):
        """Fills (or returns a new) attnserve.v1.BlockMask."""
        m = out if out is not None else _pb.BlockMask()
        m.block_rows = int(self.block_rows)
        m.block_cols = int(self.block_cols)
        where = "sparsity.block_mask"
        indices_to_proto(self.indptr, f"{where}.indptr", m.indptr)
        indices_to_proto(self.indices, f"{where}.indices", m.indices)
        if (self.full_indptr is None) != (self.full_indices is None):
            raise ValueError(f"{where}.full_indptr, full_indices: expected both or neither")
        if self.full_indptr is not None:
            indices_to_proto(self.full_indptr, f"{where}.full_indptr", m.full_indptr)
            indices_to_proto(self.full_indices, f"{where}.full_indices", m.full_indices)
        return m


@dataclasses.dataclass(frozen=True)
class KeySelection:
    """Per query (or block of query_block queries), the keys (or blocks of
    key_block keys) to attend, as DeepSeek Sparse Attention's top-k or NSA's
    and MoBA's selected blocks. indices: int [B, Hq or Hkv or 1,
    ceil(Lq / query_block), k], each a key number (key_block 1) or key block
    number; -1 pads; no duplicates in a row; any order."""
    indices: np.ndarray
    query_block: int = 1
    key_block: int = 1

    def to_proto(self, out=None):
        """Fills (or returns a new) attnserve.v1.KeySelection."""
        s = out if out is not None else _pb.KeySelection()
        indices_to_proto(self.indices, "sparsity.key_indices.indices", s.indices)
        s.query_block = int(self.query_block)
        s.key_block = int(self.key_block)
        return s


@dataclasses.dataclass(frozen=True)
class Sparsity:
    """One request's (or BatchDecode entry's) sparse attention: the keyword
    arguments block_mask, key_indices, global_tokens and sink_logits of
    Client.attend and Client.decode in one value (batch_decode's
    per-entry `sparsity`)."""
    block_mask: Optional[BlockMask] = None
    key_indices: Optional[KeySelection] = None  # or a bare int array (blocks of 1)
    global_tokens: Optional[Sequence[int]] = None
    sink_logits: Optional[Sequence[float]] = None

    def empty(self):
        """No form set (an empty global_tokens or sink_logits list sets none)."""
        return (self.block_mask is None and self.key_indices is None and
                _none_or_empty(self.global_tokens) and _none_or_empty(self.sink_logits))

    def to_proto(self, out=None):
        """Fills (or returns a new) attnserve.v1.Sparsity."""
        return sparsity_to_proto(self.block_mask, self.key_indices, self.global_tokens,
                                 self.sink_logits, out)


def _none_or_empty(values):
    return values is None or np.asarray(values).size == 0


def sparsity_to_proto(block_mask=None, key_indices=None, global_tokens=None, sink_logits=None,
                      out=None):
    """Fills (or returns a new) attnserve.v1.Sparsity. block_mask: a
    BlockMask; key_indices: a KeySelection, or an int array of key numbers
    (query_block = key_block = 1); global_tokens: key positions; sink_logits:
    one per query head. None leaves a form unset."""
    s = out if out is not None else _pb.Sparsity()
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise ValueError(f"block_mask: expected a BlockMask (see block_mask_from_dense), "
                             f"got {type(block_mask).__name__}")
        block_mask.to_proto(s.block_mask)
    if key_indices is not None:
        if not isinstance(key_indices, KeySelection):
            key_indices = KeySelection(np.asarray(key_indices))
        key_indices.to_proto(s.key_indices)
    if global_tokens is not None:
        tokens = np.asarray(global_tokens).reshape(-1)
        if tokens.size and (tokens.dtype == np.bool_ or not np.issubdtype(tokens.dtype, np.integer)):
            raise ValueError(f"sparsity.global_tokens: expected integer key positions, "
                             f"got {tokens.dtype}")
        s.global_tokens[:] = [int(t) for t in tokens]
    if sink_logits is not None:
        s.sink_logits[:] = [float(x) for x in np.asarray(sink_logits).reshape(-1)]
    return s


def _bsr(blocks):
    """[S1, S2, R, C] booleans -> (indptr [S1, S2, R + 1], indices [nnz]),
    slices following one another."""
    counts = blocks.sum(axis=-1, dtype=np.int64)          # [S1, S2, R]
    ends = np.cumsum(counts.reshape(-1)).reshape(counts.shape)
    starts = ends[..., :1] - counts[..., :1]
    indptr = np.concatenate([starts, ends], axis=-1).astype(np.int32)
    indices = np.nonzero(blocks)[-1].astype(np.int32)     # C order: increasing per row
    return indptr, indices


def block_mask_from_dense(mask_blocks, block_rows, block_cols, full_blocks=None):
    """A BlockMask from a boolean block matrix: mask_blocks[b, h, r, c] true
    when row block r of batch row b and query head h sees key block c.
    mask_blocks is [B or 1, Hq or 1, row_blocks, col_blocks], or 2-D
    [row_blocks, col_blocks] for one pattern shared by every row and head
    (rank-1 indptr), with row_blocks = ceil(Lq / block_rows) and col_blocks
    = ceil(Lk / block_cols). full_blocks (optional, the same shape): the
    visible blocks known to be fully visible; they become full_indptr /
    full_indices and the other visible blocks indptr / indices."""
    blocks = np.asarray(mask_blocks)
    if blocks.ndim not in (2, 4):
        raise ValueError(f"mask_blocks: expected [B or 1, Hq or 1, row_blocks, col_blocks] or "
                         f"[row_blocks, col_blocks], got shape {list(blocks.shape)}")
    blocks = blocks.astype(bool)
    full = None
    if full_blocks is not None:
        full = np.asarray(full_blocks).astype(bool)
        if full.shape != blocks.shape:
            raise ValueError(f"full_blocks: expected mask_blocks' shape {list(blocks.shape)}, "
                             f"got {list(full.shape)}")
        full = full & blocks
        blocks = blocks & ~full
    two_d = blocks.ndim == 2
    expand = (lambda a: a[None, None]) if two_d else (lambda a: a)
    indptr, indices = _bsr(expand(blocks))
    full_indptr = full_indices = None
    if full is not None:
        full_indptr, full_indices = _bsr(expand(full))
        if two_d:
            full_indptr = full_indptr[0, 0]
    if two_d:
        indptr = indptr[0, 0]
    return BlockMask(int(block_rows), int(block_cols), indptr, indices, full_indptr,
                     full_indices)
