"""Read a committed checkpoint step: tensor table, state skeletons, tensors, slices.

Every chunk read is decompressed and its crc32c checked before any of its
bytes are returned; a mismatch raises CorruptChunkError naming the file, the
tensor and the chunk. Slice reads read only the chunks that hold the slice.
Whole tensors are read in big positional reads straight into the caller's
buffers by a few threads, which overlap the disk with crc32c and zstd (both
release the GIL). Thread-safe for concurrent reads (positional reads,
per-thread decompressors).
"""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from ckpt import _C
from ckpt.errors import ConfigError, CorruptCheckpointError, CorruptChunkError
from ckpt.format.boxes import (Tiling, box_bytes, box_intersection, box_view, byte_runs,
                               check_box, plan_direct_reads, preferred, tiling_of)
from ckpt.format.metadata import ChunkRef, TensorPiece, parse_table_bytes
from ckpt.snapshot.layout import itemsize_of, numpy_dtype_of
from ckpt.storage.fs import (DAMAGED_ADVICE, MANIFEST_NAME, check_manifest, damaged,
                             read_manifest)

__all__ = ["StepReader", "TensorPiece", "box_intersection"]


# Reads of this size keep the disk streaming; several in flight keep its queue full while
# other threads checksum (crc32c and zstd release the GIL).
DEFAULT_SEGMENT_BYTES = 16 << 20
DEFAULT_READ_THREADS = 4
_ZEROS = bytes(1 << 20)


def _zeros(nbytes: int) -> bytes:
    return _ZEROS[:nbytes] if nbytes <= len(_ZEROS) else bytes(nbytes)


def _batches(segments: list[tuple[Any, Any, list[ChunkRef], int]], tasks: int
             ) -> list[list[tuple[Any, Any, list[ChunkRef], int]]]:
    """``segments`` in order, cut into about ``tasks`` runs of similar stored size (each
    segment alone when there are no more than ``tasks``)."""
    if len(segments) <= tasks:
        return [[seg] for seg in segments]
    sizes = [sum(c.stored_bytes for c in seg[2]) for seg in segments]
    target = max(1, sum(sizes) // tasks)
    out: list[list[tuple[Any, Any, list[ChunkRef], int]]] = [[]]
    run_bytes = 0
    for seg, size in zip(segments, sizes):
        if out[-1] and run_bytes + size > target:
            out.append([])
            run_bytes = 0
        out[-1].append(seg)
        run_bytes += size
    return out


def _read_regular(path: Path) -> bytes:
    """The bytes of the regular file ``path``; CorruptCheckpointError for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing; {DAMAGED_ADVICE}") from None
    except OSError as exc:
        raise damaged(str(path), f"it cannot be opened as a regular file ({exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise damaged(str(path), "it is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; fewer bytes only at end of file. Returns bytes read."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _segments(chunks: list[ChunkRef], segment_bytes: int) -> list[list[ChunkRef]]:
    """Runs of chunks one positional read can fetch: adjacent on disk, all raw (and then
    adjacent in the piece too) or all compressed, at most ``segment_bytes`` stored."""
    out: list[list[ChunkRef]] = []
    run: list[ChunkRef] = []
    run_bytes = 0
    for c in chunks:
        if run:
            prev = run[-1]
            joins = (c.compressed == prev.compressed
                     and c.stored_offset == prev.stored_offset + prev.stored_bytes
                     and run_bytes + c.stored_bytes <= segment_bytes
                     and (c.compressed or (c.stored_bytes == c.raw_bytes
                                           and c.raw_offset == prev.raw_offset + prev.raw_bytes)))
            if not joins:
                out.append(run)
                run, run_bytes = [], 0
        if not run and not c.compressed and c.stored_bytes != c.raw_bytes:
            out.append([c])  # inconsistent raw chunk: read alone, _decode names it
            continue
        run.append(c)
        run_bytes += c.stored_bytes
    if run:
        out.append(run)
    return out


class StepReader:
    """A committed step directory, validated on open (manifest, files, sizes)."""

    def __init__(self, path: str | os.PathLike[str], *, read_threads: int = DEFAULT_READ_THREADS,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        if read_threads < 1 or segment_bytes < 1:
            raise ConfigError(f"read_threads ({read_threads}) and segment_bytes "
                              f"({segment_bytes}) must be positive")
        self.path = Path(path)
        self.read_threads = read_threads
        self.segment_bytes = segment_bytes
        self._executor: ThreadPoolExecutor | None = None
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
        self.step, self.world_size, ranks = check_manifest(self.manifest,
                                                           str(self.path / MANIFEST_NAME))
        self._ranks = ranks
        # Rows may point into any rank's data file (replicas), and nowhere else.
        self._data_files = {info["data"]: info["data_bytes"] for info in ranks.values()}
        for rank, info in ranks.items():
            self._check_size(info["data"], info["data_bytes"])
            self._check_regular(info["meta"])
        self._tables: dict[int, tuple[list[TensorPiece], Any, dict[str, Any]]] = {}
        self._by_name: dict[str, list[TensorPiece]] | None = None
        self._rank_indexes: dict[int, dict[str, TensorPiece]] = {}
        self._tilings: dict[str, Tiling] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _check_regular(self, name: str) -> int:
        """Size of the step's file ``name``; CorruptCheckpointError unless a regular file."""
        path = self.path / name
        try:
            st = os.lstat(path)  # a symlink or FIFO in a step dir is damage, never followed
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path} is missing; {DAMAGED_ADVICE}") from None
        except OSError as exc:
            raise damaged(str(path), f"it cannot be examined ({exc})") from None
        if not stat.S_ISREG(st.st_mode):
            raise damaged(str(path), "it is not a regular file")
        return st.st_size

    def _check_size(self, name: str, expected: int) -> None:
        path = self.path / name
        size = self._check_regular(name)
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
                blob = _read_regular(path)
                if _C.crc32c(blob) != info["meta_crc32c"]:
                    raise CorruptCheckpointError(
                        f"{path}: crc32c {_C.crc32c(blob):#010x} does not match the manifest's "
                        f"{info['meta_crc32c']:#010x}; the tensor table is damaged; "
                        f"{DAMAGED_ADVICE}")
                self._tables[rank] = parse_table_bytes(blob, str(path), rank=rank,
                                                       data_files=self._data_files)
            return self._tables[rank]

    def tensors(self) -> list[TensorPiece]:
        """Every tensor piece of every rank, rank by rank, in payload order."""
        return [p for r in range(self.world_size) for p in self._table(r)[0]]

    def table_path(self, rank: int) -> Path:
        """The Parquet tensor table of ``rank``."""
        return self.path / self._ranks[rank]["meta"]

    def rank_pieces(self, rank: int) -> list[TensorPiece]:
        """The tensor pieces of ``rank``, in payload order (its table is checked on first use)."""
        return list(self._table(rank)[0])

    def pieces(self, name: str) -> list[TensorPiece]:
        """Every rank's pieces of tensor ``name`` (KeyError when no rank stores it)."""
        found = self._pieces_by_name().get(name)
        if not found:
            raise KeyError(f"no tensor named {name!r} in {self.path}")
        return list(found)

    def _pieces_by_name(self) -> dict[str, list[TensorPiece]]:
        if self._by_name is None:
            by_name: dict[str, list[TensorPiece]] = {}
            for p in self.tensors():
                by_name.setdefault(p.name, []).append(p)
            self._by_name = by_name
        return self._by_name

    def _rank_index(self, rank: int) -> dict[str, TensorPiece]:
        index = self._rank_indexes.get(rank)
        if index is None:
            index = self._rank_indexes[rank] = {p.name: p for p in self._table(rank)[0]}
        return index

    def tiling(self, name: str) -> Tiling:
        """How the step stores tensor ``name`` (its distinct boxes and the pieces holding
        each), checked once: the boxes must tile the global tensor (CorruptCheckpointError)."""
        tiling = self._tilings.get(name)
        if tiling is None:
            tiling = self._tilings[name] = tiling_of(name, self.pieces(name), str(self.path))
        return tiling

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
                fd = os.open(self.path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                if hasattr(os, "posix_fadvise"):
                    # Tensors are read front to back in big ranges: a wider readahead
                    # window keeps the disk busy between our requests.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[name] = fd
            return self._fds[name]

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.read_threads,
                                                    thread_name_prefix="ckpt-read")
            return self._executor

    def _count(self, chunks: int, stored_bytes: int) -> None:
        with self._lock:
            self.chunks_read += chunks
            self.bytes_read += stored_bytes

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec = getattr(self._local, "dec", None)
        if dec is None:
            dec = self._local.dec = zstandard.ZstdDecompressor()
        return dec

    def _decode(self, where: str, stored: Any, chunk: ChunkRef) -> Any:
        """Raw bytes of a chunk from its stored bytes (not yet crc-checked)."""
        if len(stored) != chunk.stored_bytes:
            raise CorruptChunkError(f"{where}: file ends after {len(stored)} of "
                                    f"{chunk.stored_bytes} stored bytes (truncated)")
        raw = stored
        if chunk.compressed:
            try:
                # zstd sizes its output from the frame header: a damaged header must not
                # make it allocate what it says (a flipped bit can claim exabytes).
                content_bytes = zstandard.frame_content_size(stored)
                if content_bytes not in (-1, chunk.raw_bytes):
                    raise CorruptChunkError(
                        f"{where}: zstd frame header says {content_bytes} bytes, the chunk "
                        f"holds {chunk.raw_bytes}; the bytes are damaged")
                raw = self._decompressor().decompress(stored, max_output_size=chunk.raw_bytes)
            except (zstandard.ZstdError, MemoryError, ValueError) as exc:
                raise CorruptChunkError(f"{where}: zstd frame does not decode "
                                        f"({type(exc).__name__}: {exc}); the bytes are "
                                        f"damaged") from None
        if len(raw) != chunk.raw_bytes:
            raise CorruptChunkError(f"{where}: decodes to {len(raw)} bytes, expected "
                                    f"{chunk.raw_bytes}")
        return raw

    @staticmethod
    def _check_crc(where: str, raw: Any, chunk: ChunkRef) -> None:
        actual = _C.crc32c(raw)
        if actual != chunk.crc32c:
            raise CorruptChunkError(f"{where}: crc32c {actual:#010x} != recorded "
                                    f"{chunk.crc32c:#010x}; the bytes are damaged")

    def _where(self, piece: TensorPiece, chunk: ChunkRef) -> str:
        return f"{self.path / piece.file}: tensor {piece.name!r} chunk {chunk.index}"

    def read_chunk(self, piece: TensorPiece, chunk: ChunkRef) -> bytes:
        """The raw bytes of one chunk, crc-checked. CorruptChunkError when damaged."""
        where = self._where(piece, chunk)
        stored = os.pread(self._fd(piece.file), chunk.stored_bytes, chunk.stored_offset)
        self._count(1, len(stored))
        raw = self._decode(where, stored, chunk)
        self._check_crc(where, raw, chunk)
        return raw

    def read_tensor_into(self, name: str, rank: int, out_buffer: Any) -> None:
        """Fill ``out_buffer`` (writable, exactly the piece's raw size) with ``rank``'s piece.

        Same contract as ``read_tensors_into`` for one tensor.
        """
        self.read_tensors_into(rank, [(name, out_buffer)])

    def read_tensors_into(self, rank: int, requests: list[tuple[str, Any]]) -> None:
        """Fill each ``(name, out_buffer)`` of ``requests`` with ``rank``'s piece ``name``.

        Each buffer must be writable, contiguous and exactly the piece's raw size.
        The pieces are read in big contiguous ranges straight into the buffers
        (raw chunks are never copied; zstd chunks are decoded into them) by
        ``read_threads`` threads, and every chunk's crc32c is checked before this
        returns. On CorruptChunkError (naming file, tensor and chunk of the first
        damaged chunk in request order) every read has stopped, and no damaged or
        unverified byte is left in a buffer: the ranges of failed chunks are
        zeroed; other ranges hold verified bytes or their previous contents.
        """
        table = self._rank_index(rank)
        work: list[tuple[TensorPiece, memoryview, list[ChunkRef]]] = []
        for name, out_buffer in requests:
            piece = table.get(name)
            if piece is None:
                raise KeyError(f"rank {rank} of {self.path} has no tensor named {name!r}")
            work.append((piece, self._out_view(piece, out_buffer), list(piece.chunks), 0))
        self._read_chunks(work)

    @staticmethod
    def _out_view(piece: TensorPiece, out_buffer: Any) -> memoryview:
        out = memoryview(out_buffer)
        if not out.contiguous or out.readonly:
            raise ConfigError(f"out_buffer for {piece.name!r} must be writable and contiguous")
        out = out.cast("B") if out.nbytes else memoryview(bytearray())
        if out.nbytes != piece.raw_bytes:
            raise ConfigError(f"out_buffer holds {out.nbytes} bytes, tensor {piece.name!r} of "
                              f"rank {piece.rank} needs {piece.raw_bytes}")
        return out

    def _read_chunks(self, work: list[tuple[TensorPiece, memoryview, list[ChunkRef], int]]
                     ) -> None:
        """Read the listed chunks of each piece into its ``out`` view, checked: the raw
        byte ``i`` of the piece lands at ``out[i - raw_base]`` (work items are
        ``(piece, out, chunks, raw_base)``; ``out`` need only hold the listed chunks)."""
        segments = [(piece, out, seg, raw_base) for piece, out, chunks, raw_base in work
                    for seg in _segments(chunks, self.segment_bytes)]
        if len(segments) <= 1 or self.read_threads <= 1:
            for seg in segments:
                self._read_segment(*seg)
            return
        pool = self._pool()
        # Thousands of small tensors make thousands of segments: a pool task each would
        # cost more than the reads (~50 us per submit), so runs of them go as one task.
        futures = [pool.submit(self._read_segments, batch)
                   for batch in _batches(segments, 4 * self.read_threads)]
        try:
            for fut in futures:
                fut.result()
        finally:
            # Never return (or raise) while a thread may still write into a buffer.
            for fut in futures:
                fut.cancel()
            wait(futures)

    def _read_segments(self, batch: list[tuple[TensorPiece, memoryview, list[ChunkRef], int]]
                       ) -> None:
        for seg in batch:
            self._read_segment(*seg)

    def _read_segment(self, piece: TensorPiece, out: memoryview, chunks: list[ChunkRef],
                      raw_base: int = 0) -> None:
        """Read stored-contiguous chunks with one positional read, then check each.

        Raw chunks land directly in ``out`` (raw offset minus ``raw_base``); compressed
        ones are decoded into it.
        """
        first, last = chunks[0], chunks[-1]
        fd = self._fd(piece.file)
        base = first.stored_offset
        span = last.stored_offset + last.stored_bytes - base
        compressed = first.compressed
        if compressed or first.stored_bytes != first.raw_bytes:
            stored = memoryview(bytearray(span))
        else:
            stored = out[first.raw_offset - raw_base:first.raw_offset - raw_base + span]
        k = 0
        try:
            got = _pread_into(fd, stored, base)  # an I/O error may leave part of a read behind
            self._count(len(chunks), got)
            for k, chunk in enumerate(chunks):
                where = self._where(piece, chunk)
                lo = chunk.stored_offset - base
                part = stored[lo:min(lo + chunk.stored_bytes, max(got, lo))]
                raw = self._decode(where, part, chunk)
                self._check_crc(where, raw, chunk)
                if compressed:
                    at = chunk.raw_offset - raw_base
                    out[at:at + chunk.raw_bytes] = raw
        except BaseException:
            for chunk in chunks[k:]:  # damaged or unverified: leave nothing of it behind
                at = chunk.raw_offset - raw_base
                out[at:at + chunk.raw_bytes] = _zeros(chunk.raw_bytes)
            raise

    def read_slice(self, name: str, offsets: tuple[int, ...] | list[int],
                   shape: tuple[int, ...] | list[int]) -> np.ndarray:
        """The box ``[offsets, offsets + shape)`` of the global tensor ``name``.

        Assembled from whichever ranks' pieces overlap it, reading only their
        chunks that hold bytes of the box. Returns a numpy array of the box's
        shape (dtypes numpy lacks come as same-width unsigned ints, see
        ``numpy_dtype_of``). Raises CorruptCheckpointError if the stored pieces
        do not tile the tensor.
        """
        tiling = self.tiling(name)
        offsets, shape = check_box(name, tiling.global_shape, offsets, shape)
        result = np.empty(shape, dtype=numpy_dtype_of(tiling.dtype))
        # The tiling guarantees the pieces it meets cover the box exactly once.
        self._fill_box(tiling, tiling.overlapping(offsets, shape), offsets, shape, result,
                       prefer_rank=None)
        return result

    def read_boxes_into(self, requests: list[tuple[str, Any, Any, Any]], *,
                        prefer_rank: int | None = None) -> None:
        """Fill each ``(name, offsets, shape, out_buffer)`` with that box of the global
        tensor ``name``, in C order; each buffer writable, contiguous, exactly its bytes.

        This is how a step is read onto another parallel layout. Where the part of a
        stored piece that a box needs is one byte range of both (the piece itself, or a
        dim-0 slice of it, as FSDP shards are), its chunks are read straight into the
        buffer, except the at most two that the range cuts, which go through a chunk-sized
        buffer; all of these are one batch of big parallel reads. Other parts (a column
        shard, say) are assembled through a temporary copy. Only chunks that hold bytes
        of a box are read. Of replicas (the same box on several ranks, as under DDP),
        ``prefer_rank``'s copy is read, else the lowest rank's; if a chunk is damaged, the
        whole request is read again part by part, each damaged part from its next replica.
        Every chunk's crc32c is checked before this returns; on CorruptChunkError no
        damaged byte is left in a buffer.
        """
        work: list[tuple[TensorPiece, memoryview, list[ChunkRef], int]] = []
        cut: list[tuple[np.ndarray, int, int, memoryview]] = []  # (chunk copy, lo, hi, dst)
        assembled: list[tuple[Tiling, list, tuple, tuple, np.ndarray]] = []
        boxes: list[tuple[Tiling, tuple, tuple, np.ndarray]] = []
        for name, offsets, shape, out_buffer in requests:
            tiling = self.tiling(name)
            offsets, shape = check_box(name, tiling.global_shape, offsets, shape)
            itemsize = itemsize_of(tiling.dtype)
            out = box_view(name, out_buffer, box_bytes(shape, itemsize), offsets, shape)
            if not out.nbytes:
                continue
            arr = np.frombuffer(out, dtype=numpy_dtype_of(tiling.dtype)).reshape(shape)
            boxes.append((tiling, offsets, shape, arr))
            rest = []
            for group in tiling.overlapping(offsets, shape):
                piece = preferred(group[2], prefer_rank)[0]
                if not plan_direct_reads(piece, group[1], offsets, shape, itemsize, out, work,
                                         cut):
                    rest.append(group)
            if rest:
                assembled.append((tiling, rest, offsets, shape, arr))
        try:
            self._read_chunks(work)
        except CorruptChunkError:
            # Read everything again part by part, each damaged part from its next replica
            # (what was read before is simply read again).
            for tiling, offsets, shape, arr in boxes:
                self._fill_box(tiling, tiling.overlapping(offsets, shape), offsets, shape, arr,
                               prefer_rank)
            return
        for chunk_copy, lo, hi, dst in cut:
            dst[:] = memoryview(chunk_copy)[lo:hi]
        for tiling, groups, offsets, shape, arr in assembled:
            self._fill_box(tiling, groups, offsets, shape, arr, prefer_rank)

    def _fill_box(self, tiling: Tiling, groups: list, offsets: tuple[int, ...],
                  shape: tuple[int, ...], result: np.ndarray, prefer_rank: int | None) -> None:
        """Copy into ``result`` (an array of the box's shape) the parts of the box that
        ``groups`` (``Tiling.overlapping`` entries) hold, reading only the chunks that hold
        them. A damaged piece falls back to its replicas; nothing of a damaged chunk
        reaches ``result``."""
        np_dtype = numpy_dtype_of(tiling.dtype)
        for (piece_off, _), (lo, box_shape), pieces in groups:
            dst = tuple(slice(a - b, a - b + n) for a, b, n in zip(lo, offsets, box_shape))
            local = tuple(a - b for a, b in zip(lo, piece_off))
            result[dst] = self._read_box_from_replicas(preferred(pieces, prefer_rank), local,
                                                       box_shape, np_dtype)

    def _read_box_from_replicas(self, group: tuple[TensorPiece, ...], local_off: tuple[int, ...],
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
        starts, run_bytes = byte_runs(piece.shape, local_off, box_shape, itemsize)
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
        self._read_chunks([(piece, memoryview(buf), [piece.chunks[j] for j in needed], 0)])
        arr = buf.view(np_dtype).reshape(piece.shape)
        return arr[tuple(slice(o, o + n) for o, n in zip(local_off, box_shape))]

    def close(self) -> None:
        """Stop the read threads and close the files. Idempotent."""
        with self._lock:
            fds, self._fds = self._fds, {}
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> StepReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
