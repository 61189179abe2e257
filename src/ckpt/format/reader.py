"""Read a committed checkpoint step: tensor table, state skeletons, tensors, slices.

Every chunk read is decompressed and its crc32c checked before any of its
bytes are returned; a mismatch raises CorruptChunkError naming the file, the
tensor and the chunk. Slice reads read only the chunks that hold the slice.
Thread-safe for concurrent reads (positional reads, per-thread decompressors).
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from ckpt import _C
from ckpt.errors import ConfigError, CorruptCheckpointError, CorruptChunkError
from ckpt.format.metadata import ChunkRef, TensorPiece, parse_table_bytes
from ckpt.snapshot.layout import itemsize_of, numpy_dtype_of
from ckpt.storage.fs import MANIFEST_NAME, read_manifest

__all__ = ["StepReader", "TensorPiece", "box_intersection"]


def box_intersection(a_off: tuple[int, ...], a_shape: tuple[int, ...], b_off: tuple[int, ...],
                     b_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Intersection of two n-d boxes as (offsets, shape), or None when empty."""
    lo = tuple(max(a, b) for a, b in zip(a_off, b_off))
    hi = tuple(min(a + n, b + m) for a, n, b, m in zip(a_off, a_shape, b_off, b_shape))
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi))


def _runs(shape: tuple[int, ...], box_off: tuple[int, ...], box_shape: tuple[int, ...],
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


class StepReader:
    """A committed step directory, validated on open (manifest, files, sizes)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.chunks_read = 0
        self.bytes_read = 0
        if not self.path.is_dir():
            raise CorruptCheckpointError(f"{self.path} is not a directory")
        if not (self.path / MANIFEST_NAME).exists():
            has_rank_files = any(p.name.startswith("rank-") for p in self.path.iterdir())
            why = ("it was never committed (a writer died or the disk filled) or its manifest "
                   "was deleted" if has_rank_files else "it does not look like a ckpt step at all")
            raise CorruptCheckpointError(
                f"{self.path / MANIFEST_NAME} is missing: {why}; use an earlier step")
        self.manifest = read_manifest(self.path)
        try:
            self.step = int(self.manifest["step"])
            self.world_size = int(self.manifest["world_size"])
            ranks = {int(r): info for r, info in self.manifest["ranks"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{self.path / MANIFEST_NAME} lacks {exc}") from None
        if set(ranks) != set(range(self.world_size)):
            raise CorruptCheckpointError(
                f"{self.path / MANIFEST_NAME} lists ranks {sorted(ranks)} for world_size "
                f"{self.world_size}")
        self._ranks = ranks
        for rank, info in ranks.items():
            self._check_size(info["data"], info["data_bytes"])
            if not (self.path / info["meta"]).is_file():
                raise CorruptCheckpointError(f"{self.path / info['meta']} is missing")
        self._tables: dict[int, tuple[list[TensorPiece], Any, dict[str, Any]]] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _check_size(self, name: str, expected: int) -> None:
        path = self.path / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path} is missing") from None
        if size != expected:
            raise CorruptCheckpointError(
                f"{path} is {size} bytes, the manifest recorded {expected}: the file is "
                f"{'truncated' if size < expected else 'longer than written'}")

    # -- tables -------------------------------------------------------------------------
    def _table(self, rank: int) -> tuple[list[TensorPiece], Any, dict[str, Any]]:
        if rank not in self._ranks:
            raise ConfigError(f"rank {rank} is not in this step (world_size {self.world_size})")
        with self._lock:
            if rank not in self._tables:
                info = self._ranks[rank]
                path = self.path / info["meta"]
                blob = path.read_bytes()
                if _C.crc32c(blob) != info["meta_crc32c"]:
                    raise CorruptCheckpointError(
                        f"{path}: crc32c {_C.crc32c(blob):#010x} does not match the manifest's "
                        f"{info['meta_crc32c']:#010x}; the tensor table is damaged")
                self._tables[rank] = parse_table_bytes(blob, str(path))
            return self._tables[rank]

    def tensors(self) -> list[TensorPiece]:
        """Every tensor piece of every rank, rank by rank, in payload order."""
        return [p for r in range(self.world_size) for p in self._table(r)[0]]

    def pieces(self, name: str) -> list[TensorPiece]:
        found = [p for p in self.tensors() if p.name == name]
        if not found:
            raise KeyError(f"no tensor named {name!r} in {self.path}")
        return found

    def state_skeleton(self, rank: int) -> Any:
        """The tree skeleton of ``rank``'s snapshot (non-tensor values; tensors as refs)."""
        return self._table(rank)[1]

    def meta(self, rank: int) -> dict[str, Any]:
        """The snapshot meta of ``rank`` (job, rank, world_size, step, chunk_bytes, ...)."""
        return self._table(rank)[2]

    # -- chunks ---------------------------------------------------------------------------
    def _fd(self, name: str) -> int:
        with self._lock:
            if name not in self._fds:
                self._fds[name] = os.open(self.path / name, os.O_RDONLY)
            return self._fds[name]

    def read_chunk(self, piece: TensorPiece, chunk: ChunkRef) -> bytes:
        """The raw bytes of one chunk, crc-checked. CorruptChunkError when damaged."""
        path = self.path / piece.file
        where = f"{path}: tensor {piece.name!r} chunk {chunk.index}"
        stored = os.pread(self._fd(piece.file), chunk.stored_bytes, chunk.stored_offset)
        self.chunks_read += 1
        self.bytes_read += len(stored)
        if len(stored) != chunk.stored_bytes:
            raise CorruptChunkError(f"{where}: file ends after {len(stored)} of "
                                    f"{chunk.stored_bytes} stored bytes (truncated)")
        raw = stored
        if chunk.compressed:
            dec = getattr(self._local, "dec", None)
            if dec is None:
                dec = self._local.dec = zstandard.ZstdDecompressor()
            try:
                raw = dec.decompress(stored, max_output_size=chunk.raw_bytes)
            except zstandard.ZstdError as exc:
                raise CorruptChunkError(f"{where}: zstd frame does not decode ({exc})") from None
        if len(raw) != chunk.raw_bytes:
            raise CorruptChunkError(f"{where}: decodes to {len(raw)} bytes, expected "
                                    f"{chunk.raw_bytes}")
        actual = _C.crc32c(raw)
        if actual != chunk.crc32c:
            raise CorruptChunkError(f"{where}: crc32c {actual:#010x} != recorded "
                                    f"{chunk.crc32c:#010x}; the bytes are damaged")
        return raw

    def read_tensor_into(self, name: str, rank: int, out_buffer: Any) -> None:
        """Fill ``out_buffer`` (writable, exactly the piece's raw size) with ``rank``'s piece."""
        piece = next((p for p in self._table(rank)[0] if p.name == name), None)
        if piece is None:
            raise KeyError(f"rank {rank} of {self.path} has no tensor named {name!r}")
        out = memoryview(out_buffer)
        if not out.contiguous or out.readonly:
            raise ConfigError(f"out_buffer for {name!r} must be writable and contiguous")
        out = out.cast("B") if out.nbytes else memoryview(bytearray())
        if out.nbytes != piece.raw_bytes:
            raise ConfigError(f"out_buffer holds {out.nbytes} bytes, tensor {name!r} of rank "
                              f"{rank} needs {piece.raw_bytes}")
        for chunk in piece.chunks:
            out[chunk.raw_offset:chunk.raw_offset + chunk.raw_bytes] = self.read_chunk(piece, chunk)

    def read_slice(self, name: str, offsets: tuple[int, ...] | list[int],
                   shape: tuple[int, ...] | list[int]) -> np.ndarray:
        """The box ``[offsets, offsets + shape)`` of the global tensor ``name``.

        Assembled from whichever ranks' pieces overlap it, reading only their
        chunks that hold bytes of the box. Returns a numpy array of the box's
        shape (dtypes numpy lacks come as same-width unsigned ints, see
        ``numpy_dtype_of``). Raises CorruptCheckpointError if the pieces do not
        cover the box.
        """
        pieces = self.pieces(name)
        offsets, shape = tuple(int(v) for v in offsets), tuple(int(v) for v in shape)
        first = pieces[0]
        if len(offsets) != len(first.global_shape) or len(shape) != len(first.global_shape):
            raise ConfigError(f"tensor {name!r} has {len(first.global_shape)} dimensions; got "
                              f"offsets {offsets} and shape {shape}")
        if any(o < 0 or n < 0 or o + n > g for o, n, g in zip(offsets, shape, first.global_shape)):
            raise ConfigError(f"box at {offsets} of shape {shape} is outside tensor {name!r} of "
                              f"global shape {first.global_shape}")
        np_dtype = numpy_dtype_of(first.dtype)
        result = np.empty(shape, dtype=np_dtype)
        covered = np.zeros(shape, dtype=bool)
        # Replicas (the same box on several ranks, e.g. DDP) are read once; a damaged
        # replica falls back to the next one.
        replicas: dict[tuple, list[TensorPiece]] = {}
        for piece in pieces:
            replicas.setdefault((piece.offsets, piece.shape), []).append(piece)
        for (piece_off, piece_shape), group in replicas.items():
            hit = box_intersection(piece_off, piece_shape, offsets, shape)
            if hit is None:
                continue
            lo, box_shape = hit
            dst = tuple(slice(a - b, a - b + n) for a, b, n in zip(lo, offsets, box_shape))
            if covered[dst].all():
                continue
            local = tuple(a - b for a, b in zip(lo, piece_off))
            result[dst] = self._read_box_from_replicas(group, local, box_shape, np_dtype)
            covered[dst] = True
        if not covered.all():
            raise CorruptCheckpointError(
                f"tensor {name!r}: the stored pieces cover {int(covered.sum())} of the "
                f"{covered.size} elements of the box at {offsets} of shape {shape}")
        return result

    def _read_box_from_replicas(self, group: list[TensorPiece], local_off: tuple[int, ...],
                                box_shape: tuple[int, ...], np_dtype: np.dtype) -> np.ndarray:
        first_error: CorruptChunkError | None = None
        for piece in group:
            try:
                return self._read_box(piece, local_off, box_shape, np_dtype)
            except CorruptChunkError as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise first_error

    def _read_box(self, piece: TensorPiece, local_off: tuple[int, ...],
                  box_shape: tuple[int, ...], np_dtype: np.dtype) -> np.ndarray:
        itemsize = itemsize_of(piece.dtype)
        starts, run_bytes = _runs(piece.shape, local_off, box_shape, itemsize)
        nominal = piece.chunks[0].raw_bytes if piece.chunks else 1
        first = starts // nominal
        last = (starts + run_bytes - 1) // nominal
        # Every chunk index in [first[i], last[i]] for every run; runs hold distinct bytes,
        # so this has at most (runs + chunks) entries.
        spans = last - first + 1
        ends = np.cumsum(spans)
        needed = np.unique(np.repeat(first, spans)
                           + np.arange(int(ends[-1]) if len(ends) else 0)
                           - np.repeat(ends - spans, spans)).tolist()
        # np.empty of a large size maps zero pages lazily: only chunks read are touched.
        buf = np.empty(piece.raw_bytes, dtype=np.uint8)
        for j in needed:
            chunk = piece.chunks[j]
            buf[chunk.raw_offset:chunk.raw_offset + chunk.raw_bytes] = np.frombuffer(
                self.read_chunk(piece, chunk), dtype=np.uint8)
        arr = buf.view(np_dtype).reshape(piece.shape)
        return arr[tuple(slice(o, o + n) for o, n in zip(local_off, box_shape))]

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> StepReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
