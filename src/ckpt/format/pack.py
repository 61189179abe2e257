"""Build a snapshot payload (§3) from host arrays, without torch or shared memory.

For tools that write checkpoints from arrays they already hold (conversion,
resharding, tests): the result is byte-for-byte what the snapshot engine puts
in a slot, so ``write_rank`` / ``persist_payloads`` take it as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ckpt import _C
from ckpt.errors import ConfigError
from ckpt.snapshot.layout import (NUMPY_DTYPE, PayloadLayout, TensorSpec, crc_array_view,
                                  encode_meta, itemsize_of, plan_layout, write_header_and_meta)

DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class ArrayPiece:
    """A local array that is the piece at ``offsets`` of a tensor of ``global_shape``.

    ``dtype`` is the torch dtype name; by default the array's own numpy dtype
    name. Give it for types numpy lacks (a uint16 array holding ``bfloat16``).
    """

    array: np.ndarray
    global_shape: tuple[int, ...] | None = None
    offsets: tuple[int, ...] | None = None
    dtype: str | None = None


def _spec(name: str, item: ArrayPiece | np.ndarray) -> tuple[TensorSpec, np.ndarray]:
    piece = item if isinstance(item, ArrayPiece) else ArrayPiece(item)
    arr = np.ascontiguousarray(piece.array)
    dtype = piece.dtype or arr.dtype.name
    if piece.dtype is None and dtype not in NUMPY_DTYPE.values():
        raise ConfigError(f"array {name!r} has numpy dtype {dtype}, which has no torch name; "
                          f"pass ArrayPiece(dtype=...)")
    if itemsize_of(dtype) != arr.dtype.itemsize:
        raise ConfigError(f"array {name!r}: numpy itemsize {arr.dtype.itemsize} does not match "
                          f"{dtype}'s {itemsize_of(dtype)}")
    global_shape = piece.global_shape if piece.global_shape is not None else arr.shape
    offsets = piece.offsets if piece.offsets is not None else (0,) * arr.ndim
    return TensorSpec(name, dtype, arr.shape, global_shape, offsets, arr.nbytes), arr


def pack_payload(arrays: dict[str, ArrayPiece | np.ndarray], *, rank: int = 0,
                 world_size: int = 1, step: int = 0, job: str = "job", state: Any = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[bytearray, PayloadLayout]:
    """A complete payload (header, meta, crcs, data) holding ``arrays`` in order."""
    pairs = [_spec(name, item) for name, item in arrays.items()]
    layout = plan_layout([s for s, _ in pairs], chunk_bytes)
    meta = {"job": job, "rank": rank, "world_size": world_size, "step": step,
            "state": state if state is not None else {}}
    meta_bytes = len(encode_meta(layout, meta))
    buf = bytearray(layout.payload_bytes(meta_bytes))
    view = memoryview(buf)
    write_header_and_meta(view, layout, meta)
    data_offset = layout.data_offset(meta_bytes)
    crcs = crc_array_view(view, layout, meta_bytes)
    for placement, (_, arr) in zip(layout.tensors, pairs):
        start = data_offset + placement.data_offset
        raw = memoryview(arr).cast("B") if arr.nbytes else memoryview(b"")
        view[start:start + arr.nbytes] = raw
        for j in range(placement.num_chunks):
            off, n = placement.chunk_range(j, chunk_bytes)
            chunk = view[data_offset + off:data_offset + off + n]
            crcs[placement.first_chunk + j] = _C.crc32c(chunk)
    del crcs
    return buf, layout
