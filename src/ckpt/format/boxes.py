"""Box geometry of stored tensor pieces: intersections, byte runs, tilings, read plans
(no I/O).

A piece is the box ``[offsets, offsets + shape)`` of its global tensor. A step's
pieces of one tensor must *tile* it: the distinct boxes (replicas, as under DDP,
share one) are disjoint and together cover every element. Reading any box of a
tensor, and so restoring onto another layout, relies on that; ``tiling_of``
checks it once per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import numpy as np

from ckpt.errors import ConfigError, CorruptCheckpointError
from ckpt.format.metadata import ChunkRef, PieceGeometry, TensorPiece

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, shape)
P = TypeVar("P", bound=PieceGeometry)


def box_intersection(a_off: tuple[int, ...], a_shape: tuple[int, ...], b_off: tuple[int, ...],
                     b_shape: tuple[int, ...]) -> Box | None:
    """Intersection of two n-d boxes as (offsets, shape), or None when empty."""
    lo = tuple(max(a, b) for a, b in zip(a_off, b_off))
    hi = tuple(min(a + n, b + m) for a, n, b, m in zip(a_off, a_shape, b_off, b_shape))
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi))


def byte_runs(shape: tuple[int, ...], box_off: tuple[int, ...], box_shape: tuple[int, ...],
              itemsize: int) -> tuple[np.ndarray, int]:
    """Byte starts of the contiguous runs a box occupies in a C-ordered array, and run length."""
    nd = len(shape)
    # Trailing dimensions the box covers fully merge into one contiguous run.
    k = nd
    while k > 0 and box_off[k - 1] == 0 and box_shape[k - 1] == shape[k - 1]:
        k -= 1
    run_elems = math.prod(box_shape[k:]) if k == nd else math.prod(shape[k:])
    if k == 0:
        return np.zeros(1, dtype=np.int64), run_elems * itemsize
    run_elems = box_shape[k - 1] * math.prod(shape[k:])
    strides = [math.prod(shape[d + 1:]) for d in range(nd)]
    starts = np.zeros(1, dtype=np.int64)
    for d in range(k - 1):
        idx = np.arange(box_off[d], box_off[d] + box_shape[d], dtype=np.int64) * strides[d]
        starts = (starts[:, None] + idx[None, :]).ravel()
    starts = starts + box_off[k - 1] * strides[k - 1]
    return starts * itemsize, run_elems * itemsize


def box_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of a box of ``shape`` with elements of ``itemsize`` bytes."""
    for d in shape:
        itemsize *= int(d)
    return itemsize


def contiguous_span(piece: Box, offsets: tuple[int, ...], shape: tuple[int, ...],
                    itemsize: int) -> tuple[int, int] | None:
    """The byte range ``[start, end)`` that ``piece`` (a box inside the box ``offsets``,
    ``shape``) occupies in the box's C-ordered bytes, or None when it is not one range:
    it must span the box fully in every dimension after its last partial one, and be
    one element thick in every dimension before it."""
    piece_off, piece_shape = piece
    partial = [d for d, (n, m) in enumerate(zip(piece_shape, shape)) if n != m]
    last = partial[-1] if partial else -1
    if any(piece_shape[d] != 1 for d in range(last)):
        return None
    start, stride = 0, itemsize
    for d in reversed(range(len(shape))):
        start += (piece_off[d] - offsets[d]) * stride
        stride *= shape[d]
    return start, start + box_bytes(piece_shape, itemsize)


def check_box(name: str, global_shape: tuple[int, ...], offsets: Sequence[int],
              shape: Sequence[int]) -> Box:
    """``(offsets, shape)`` as int tuples; ConfigError unless the box lies in the tensor."""
    off, shp = tuple(int(v) for v in offsets), tuple(int(v) for v in shape)
    if len(off) != len(global_shape) or len(shp) != len(global_shape):
        raise ConfigError(f"tensor {name!r} has {len(global_shape)} dimensions; got "
                          f"offsets {off} and shape {shp}")
    if any(o < 0 or n < 0 or o + n > g for o, n, g in zip(off, shp, global_shape)):
        raise ConfigError(f"box at {off} of shape {shp} is outside tensor {name!r} of "
                          f"global shape {global_shape}")
    return off, shp


@dataclass(frozen=True)
class Tiling:
    """How a step stores one global tensor: each distinct box with the pieces holding it."""

    name: str
    dtype: str
    global_shape: tuple[int, ...]
    groups: tuple[tuple[Box, tuple[PieceGeometry, ...]], ...]  # non-empty boxes only

    def overlapping(self, offsets: tuple[int, ...], shape: tuple[int, ...]
                    ) -> list[tuple[Box, Box, tuple[PieceGeometry, ...]]]:
        """(group box, intersection, pieces) for every group that meets the box."""
        out = []
        for box, pieces in self.groups:
            hit = box_intersection(box[0], box[1], offsets, shape)
            if hit is not None:
                out.append((box, hit, pieces))
        return out


def tiling_of(name: str, pieces: Sequence[PieceGeometry], where: str) -> Tiling:
    """Group ``pieces`` (every rank's, of tensor ``name``) by box and check that the boxes
    tile the global tensor. CorruptCheckpointError says what is wrong otherwise."""
    if not pieces:
        raise CorruptCheckpointError(f"{where}: no piece of tensor {name!r} is stored")
    first = pieces[0]
    groups: dict[Box, list[PieceGeometry]] = {}
    for p in pieces:
        if p.dtype != first.dtype or p.global_shape != first.global_shape:
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r} is {first.dtype} of global shape "
                f"{list(first.global_shape)} on rank {first.rank} but {p.dtype} of "
                f"{list(p.global_shape)} on rank {p.rank}; the ranks did not write one tensor "
                f"(a model that differs by rank?)")
        if any(o < 0 or o + n > g for o, n, g in zip(p.offsets, p.shape, p.global_shape)):
            raise CorruptCheckpointError(
                f"{where}: rank {p.rank}'s piece of {name!r} at {list(p.offsets)} of shape "
                f"{list(p.shape)} lies outside the global shape {list(p.global_shape)}")
        if math.prod(p.shape):
            groups.setdefault((p.offsets, p.shape), []).append(p)
    boxes = sorted(groups)
    total = sum(math.prod(shape) for _, shape in boxes)
    volume = math.prod(first.global_shape)
    _check_disjoint(name, boxes, groups, where)
    if total != volume:
        raise CorruptCheckpointError(
            f"{where}: the pieces of tensor {name!r} hold {total} of its {volume} elements; "
            f"a rank's table is missing rows, or the step was not written by one job")
    return Tiling(name, first.dtype, first.global_shape,
                  tuple((box, tuple(groups[box])) for box in boxes))


def _check_disjoint(name: str, boxes: list[Box], groups: dict[Box, list[PieceGeometry]],
                    where: str) -> None:
    """Distinct boxes must not overlap: a sweep along dimension 0 (boxes sorted by offset)
    compares each box only with those whose dim-0 range is still open."""
    if not boxes or not boxes[0][0]:
        return  # a 0-d tensor has one box
    active: list[Box] = []
    for box in boxes:
        start = box[0][0]
        active = [a for a in active if a[0][0] + a[1][0] > start]
        for other in active:
            if box_intersection(other[0], other[1], box[0], box[1]) is not None:
                a, b = groups[other][0], groups[box][0]
                raise CorruptCheckpointError(
                    f"{where}: rank {a.rank}'s piece of {name!r} at {list(a.offsets)} "
                    f"(shape {list(a.shape)}) overlaps rank {b.rank}'s at {list(b.offsets)} "
                    f"(shape {list(b.shape)}); such a step cannot be read by box")
        active.append(box)


def box_view(name: str, out_buffer: Any, nbytes: int, offsets: tuple, shape: tuple
             ) -> memoryview:
    """``out_buffer`` as a byte view; ConfigError unless writable, contiguous, ``nbytes``."""
    out = memoryview(out_buffer)
    if not out.contiguous or out.readonly:
        raise ConfigError(f"out_buffer for {name!r} must be writable and contiguous")
    out = out.cast("B") if out.nbytes else memoryview(bytearray())
    if out.nbytes != nbytes:
        raise ConfigError(f"out_buffer holds {out.nbytes} bytes, the box of {name!r} at "
                          f"{list(offsets)} of shape {list(shape)} needs {nbytes}")
    return out


def preferred(pieces: tuple[P, ...], rank: int | None) -> tuple[P, ...]:
    """Replicas in read order: ``rank``'s own copy first, then by rank."""
    return tuple(sorted(pieces, key=lambda p: (p.rank != rank, p.rank)))


def plan_direct_reads(piece: TensorPiece, hit: Box, offsets: tuple[int, ...],
                      shape: tuple[int, ...], itemsize: int, out: memoryview,
                      work: list[tuple[TensorPiece, memoryview, list[ChunkRef], int]],
                      cut: list[tuple[np.ndarray, int, int, memoryview]]) -> bool:
    """Plan the read of ``hit`` (a box of ``piece`` inside the box ``offsets``, ``shape``,
    whose bytes are ``out``) as chunk reads straight into ``out``: appends to ``work``
    (``StepReader._read_chunks`` items) and, for the at most two chunks the range cuts,
    to ``cut`` (a chunk-sized buffer to read into, and what of it to copy where).
    False, planning nothing, when ``hit`` is not one byte range of both boxes."""
    in_box = contiguous_span(hit, offsets, shape, itemsize)
    in_piece = contiguous_span(hit, piece.offsets, piece.shape, itemsize)
    if in_box is None or in_piece is None:
        return False
    dst = out[in_box[0]:in_box[1]]
    lo, hi = in_piece
    if not piece.chunks:
        return True
    nominal = piece.chunks[0].raw_bytes
    whole = []
    for chunk in piece.chunks[lo // nominal:(hi - 1) // nominal + 1]:
        c_lo, c_hi = chunk.raw_offset, chunk.raw_offset + chunk.raw_bytes
        if lo <= c_lo and c_hi <= hi:
            whole.append(chunk)
            continue
        chunk_copy = np.empty(chunk.raw_bytes, dtype=np.uint8)  # no zeroing: it is read
        work.append((piece, memoryview(chunk_copy), [chunk], c_lo))
        a, b = max(lo, c_lo), min(hi, c_hi)
        cut.append((chunk_copy, a - c_lo, b - c_lo, dst[a - lo:b - lo]))
    if whole:
        work.append((piece, dst, whole, lo))
    return True
