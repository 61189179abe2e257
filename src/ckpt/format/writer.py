"""Persist snapshot payloads as a checkpoint step (docs/INTERNALS.md §4).

Who calls what:

* one process holding every rank's payload: ``persist_payloads(dir, step,
  world_size, {rank: view}, keep=K)`` does the whole commit;
* one writer per rank (many processes, maybe many hosts on NFS): each calls
  ``write_rank(FsStorage(dir).begin_step(step), rank, world_size, view)``
  and then ``finish_if_complete(staging, world_size)``; whichever sees all
  ranks done commits the step, the others get None.

Chunks are the payload's chunks: each chunk's crc from the payload is checked
against its bytes before they are written (bytes that do not match are never
persisted), compressed as an independent zstd frame in a small thread pool
(zstandard releases the GIL), stored raw when compression does not shrink it,
and written sequentially; files are fsynced before the rank's done marker.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zstandard

from ckpt import _C
from ckpt.errors import ConfigError, CorruptChunkError
from ckpt.format.metadata import build_manifest, build_table_bytes
from ckpt.format.replicas import ReplicaIndex
from ckpt.snapshot.layout import PayloadLayout, read_payload
from ckpt.storage.fs import (FsStorage, _write_synced, full_error, is_full_error,
                             parse_step_dirname)

ProgressFn = Callable[[int, int], None]  # (raw bytes done, raw bytes total)
DEFAULT_ZSTD_LEVEL = 1


def data_filename(rank: int) -> str:
    return "rank-%05d.data" % rank


def table_filename(rank: int) -> str:
    return "rank-%05d.parquet" % rank


class _ChunkEncoder:
    """Checks a chunk's crc and compresses it; one zstd compressor per thread.

    A chunk whose first 64 KiB do not shrink by at least 10 % is stored raw
    without compressing the rest. zstd level 1 runs at ~0.4 GB/s per core on
    float32 weights and saves them only ~8 %, while a local disk writes
    0.5-1.3 GB/s: compressing such data would make persist 2-3x slower to save
    a few percent. Data that does compress (zeros, masks, int state) still is.
    """

    SAMPLE_BYTES = 64 << 10
    SAMPLE_MAX_RATIO = 0.90

    def __init__(self, level: int) -> None:
        self._level = level
        self._local = threading.local()

    def __call__(self, raw: memoryview, crc: int, where: str) -> tuple[memoryview | bytes, bool]:
        actual = _C.crc32c(raw)
        if actual != crc:
            raise CorruptChunkError(
                f"{where}: crc32c of the snapshot bytes is {actual:#010x}, the payload recorded "
                f"{crc:#010x}; refusing to persist damaged bytes (the snapshot in memory is bad)")
        comp = getattr(self._local, "comp", None)
        if comp is None:
            comp = self._local.comp = zstandard.ZstdCompressor(level=self._level)
        if len(raw) > 2 * self.SAMPLE_BYTES:
            sample = comp.compress(raw[:self.SAMPLE_BYTES])
            if len(sample) > self.SAMPLE_MAX_RATIO * self.SAMPLE_BYTES:
                return raw, False
        frame = comp.compress(raw)
        return (frame, True) if len(frame) < len(raw) else (raw, False)


def warm_up_encoder(level: int = DEFAULT_ZSTD_LEVEL) -> None:
    """Create a zstd compressor and compress a sample once (the first costs the most)."""
    zstandard.ZstdCompressor(level=level).compress(bytes(_ChunkEncoder.SAMPLE_BYTES))


class _SyncedFile:
    """Sequential writer of one data file; a full disk raises StorageFullError naming it.

    Where the filesystem allows it, writes go through O_DIRECT, handed to a writer
    thread so the disk works while the next chunk is encoded (buffered writes
    followed by one fsync would first fill the page cache and then wait for the
    disk: CPU time and disk time would add up). A piece that starts on a 4 KiB
    boundary in memory while the file offset is on one too is written straight
    from the caller's memory (no copy); ``write`` callers keep their data alive
    and unchanged until ``close()`` returns. Other bytes are gathered in
    page-aligned 16 MiB blocks. The last block is padded to 4 KiB and the file
    truncated to its true size. Elsewhere (tmpfs) writes are buffered.
    ``close()`` fsyncs; it is idempotent.
    """

    BLOCK_BYTES = 16 << 20
    ALIGN_BYTES = 4096
    MAX_DIRECT_BYTES = 16 << 20  # one O_DIRECT write (a bigger piece is split)
    MAX_QUEUED = 4               # writes handed to the writer thread and not yet done

    def __init__(self, path: Path, expected_bytes: int, direct: bool = True,
                 display_path: Path | None = None) -> None:
        self.path = path
        self._display = display_path or path  # the name errors give (not the temporary one)
        self.logical_bytes = 0  # bytes accepted: the offset the next write lands at
        self._disk_bytes = 0    # bytes the kernel accepted
        self._expected = expected_bytes
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self._direct = direct and hasattr(os, "O_DIRECT") and expected_bytes >= self.BLOCK_BYTES
        if self._direct:
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False
        self._direct_fd = self._direct  # O_DIRECT still set on the file (see _raw_write)
        if not self._direct:
            self._fd = os.open(path, flags, 0o644)
            return
        self._blocks = [mmap.mmap(-1, self.BLOCK_BYTES) for _ in range(3)]
        # (write, block index or None for a write straight from the caller's memory), FIFO
        self._queued: deque[tuple[Future, int | None]] = deque()
        self._current = 0
        self._fill = 0
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-persist-io")

    def _raw_write(self, data: memoryview) -> None:
        view = data
        try:
            while view:
                try:
                    n = os.write(self._fd, view)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not self._direct_fd:
                        raise
                    # Near a file-size limit (or a full disk) the kernel cuts an O_DIRECT
                    # write to an unaligned length and fails it with EINVAL; a short write
                    # leaves the offset unaligned, with the same result next time. The rest
                    # goes through the page cache, which writes it or reports the real
                    # cause (EFBIG, ENOSPC).
                    self._stop_direct()
                    continue
                self._disk_bytes += n
                view = view[n:]
        except OSError as exc:
            if is_full_error(exc):
                needed = max(len(view), self._expected - self._disk_bytes)
                raise full_error(exc, self._display, self._disk_bytes, needed) from None
            raise

    def _queue_write(self, data: memoryview, block: int | None) -> None:
        self._queued.append((self._io.submit(self._raw_write, data), block))
        while len(self._queued) > self.MAX_QUEUED:
            self._queued.popleft()[0].result()

    def _submit_current(self, nbytes: int) -> None:
        i = self._current
        self._queue_write(memoryview(self._blocks[i])[:nbytes], i)
        self._current = (i + 1) % len(self._blocks)
        self._fill = 0
        # the next block must be on disk before it is refilled (writes finish in order)
        while any(b == self._current for _, b in self._queued):
            self._queued.popleft()[0].result()

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if not self._direct:
            self._raw_write(view)
            self.logical_bytes += len(view)
            return
        while view:
            # logical_bytes - fill is block-aligned: with an empty block the file offset is
            # aligned, and an aligned piece of memory can go to the disk as it is.
            if self._fill == 0 and len(view) >= self.ALIGN_BYTES and \
                    _address(view) % self.ALIGN_BYTES == 0:
                n = min(len(view) - len(view) % self.ALIGN_BYTES, self.MAX_DIRECT_BYTES)
                self._queue_write(view[:n], None)
                self.logical_bytes += n
                view = view[n:]
                continue
            n = min(len(view), self.BLOCK_BYTES - self._fill)
            self._blocks[self._current][self._fill:self._fill + n] = view[:n]
            self._fill += n
            self.logical_bytes += n
            view = view[n:]
            if self._fill == self.BLOCK_BYTES:
                self._submit_current(self.BLOCK_BYTES)

    def close(self, sync: bool = True) -> None:
        if self._fd < 0:
            return
        fd = self._fd
        try:
            if self._direct:
                try:
                    if self._fill and sync:
                        padded = -(-self._fill // self.ALIGN_BYTES) * self.ALIGN_BYTES
                        self._blocks[self._current][self._fill:padded] = bytes(padded - self._fill)
                        self._submit_current(padded)
                    for fut, _ in self._queued:
                        if sync or fut.exception() is None:
                            fut.result()
                finally:
                    self._io.shutdown(wait=True)
                if sync:
                    os.ftruncate(fd, self.logical_bytes)
            if sync:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    if is_full_error(exc):
                        raise full_error(exc, self._display, self._disk_bytes,
                                         max(0, self._expected - self._disk_bytes)) from None
                    raise
        finally:
            self._fd = -1
            os.close(fd)


    def _stop_direct(self) -> None:
        """Clear O_DIRECT on the file (writer thread only; writes stay in order)."""
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct_fd = False


def _address(view: memoryview) -> int:
    """Address of the first byte of a (possibly read-only) contiguous byte view."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


def _check_meta(meta: dict[str, Any], rank: int, world_size: int, step: int | None) -> None:
    for key, want in (("rank", rank), ("world_size", world_size), ("step", step)):
        if want is not None and meta.get(key) != want:
            raise ConfigError(f"payload meta has {key}={meta.get(key)!r} but it is being "
                              f"written as {key}={want}; pass the payload of the right rank/step")


def _write_chunks(out: _SyncedFile, view: memoryview, layout: PayloadLayout,
                  data_offset: int, crcs: Any, level: int, threads: int,
                  progress: ProgressFn | None, where: str,
                  reuse: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Encode chunks in a pool, write them in order; returns one row dict per tensor.

    The window of chunks in flight spans tensors, so a model of many tensors of
    one chunk each is encoded as much in parallel as one big tensor. Tensor ``ti`` in
    ``reuse`` is not written: its row is ``reuse[ti]`` (chunks of another rank's file).
    """
    encoder = _ChunkEncoder(level)
    total = layout.data_bytes
    done = 0
    chunks: list[list[tuple[int, int, str, int]]] = [[] for _ in layout.tensors]
    pending: deque[tuple[int, int, int, Future]] = deque()
    window = max(2, 2 * threads)

    def drain_one() -> None:
        nonlocal done
        ti, crc, raw_bytes, fut = pending.popleft()
        data, compressed = fut.result()
        chunks[ti].append((out.logical_bytes, len(data), "zstd" if compressed else "none", crc))
        out.write(data)
        done += raw_bytes
        if progress is not None:
            progress(done, total)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckpt-persist") as pool:
        for ti, t in enumerate(layout.tensors):
            if ti in reuse:
                done += t.spec.nbytes
                continue
            for j in range(t.num_chunks):
                start, n = t.chunk_range(j, layout.chunk_bytes)
                crc = int(crcs[t.first_chunk + j])
                raw = view[data_offset + start:data_offset + start + n]
                fut = pool.submit(encoder, raw, crc, f"{where}: tensor {t.spec.name!r} chunk {j}")
                pending.append((ti, crc, n, fut))
                if len(pending) >= window:
                    drain_one()
        while pending:
            drain_one()
    rows = []
    for ti, (t, cs) in enumerate(zip(layout.tensors, chunks)):
        if ti in reuse:
            rows.append(dict(reuse[ti]))
            continue
        spec = t.spec
        codecs = [c[2] for c in cs]
        rows.append({
            "name": spec.name, "dtype": spec.dtype, "global_shape": list(spec.global_shape),
            "offsets": list(spec.offsets), "shape": list(spec.shape),
            "byte_offset": cs[0][0] if cs else 0, "stored_bytes": sum(c[1] for c in cs),
            "raw_bytes": spec.nbytes, "compression": "zstd" if "zstd" in codecs else "none",
            "first_chunk": t.first_chunk, "chunk_raw_bytes": layout.chunk_bytes,
            "chunk_stored_offsets": [c[0] for c in cs], "chunk_stored_bytes": [c[1] for c in cs],
            "chunk_compression": codecs, "chunk_crc32c": [c[3] for c in cs], "file": None,
        })
    return rows


def write_rank(step_dir_staging: str | os.PathLike[str], rank: int, world_size: int,
               payload_view: memoryview, *, level: int = DEFAULT_ZSTD_LEVEL, threads: int = 2,
               progress: ProgressFn | None = None, expected_crc: int | None = None,
               replicas: ReplicaIndex | None = None) -> list[Path]:
    """Write one rank's payload into a staging step dir, fsync it, and mark the rank done.

    ``replicas``: shared by the calls that write the ranks of one step in this process;
    a tensor identical to one already written there is recorded as a pointer to it
    instead of being written again (``ckpt.format.replicas``).

    ``payload_view`` is a sealed slot's payload (§3), held (read-locked) by the
    caller until this returns. ``expected_crc`` is the slot header's
    payload_crc, checked when given. Returns [data file, Parquet file].
    On any failure this rank's files are removed and the error is raised
    (StorageFullError on a full disk, CorruptChunkError on a bad chunk).
    """
    staging = Path(step_dir_staging)
    step = parse_step_dirname(staging.name)
    if step is None or staging.parent.name != ".staging":
        raise ConfigError(f"{staging} is not a staging step dir (DIR/.staging/step-XXXXXXXX); "
                          f"get one from FsStorage(DIR).begin_step(step)")
    _check_world_size(world_size)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world_size {world_size}")
    if level < -7 or level > 22:
        raise ConfigError(f"zstd level must be in [-7, 22], got {level}")
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    layout, meta, crcs = read_payload(payload_view, expected_crc)
    _check_meta(meta, rank, world_size, step)
    data_path = staging / data_filename(rank)
    table_path = staging / table_filename(rank)
    # Written under private names and renamed into place: a second writer of the same
    # rank (a retried persist) replaces whole files and never truncates ours.
    suffix = f".tmp-{os.getpid()}-{threading.get_ident()}"
    data_tmp = data_path.with_name(data_path.name + suffix)
    table_tmp = table_path.with_name(table_path.name + suffix)
    data_offset = layout.data_offset(_meta_bytes(payload_view))
    keys, raws, reuse = [], [], {}
    if replicas is not None:
        for ti, t in enumerate(layout.tensors):
            raw = payload_view[data_offset + t.data_offset:data_offset + t.data_offset
                               + t.spec.nbytes]
            keys.append(ReplicaIndex.key(
                t.spec, layout.chunk_bytes, crcs[t.first_chunk:t.first_chunk + t.num_chunks]))
            raws.append(raw)
            row = replicas.find(keys[-1], raw) if t.spec.nbytes else None
            if row is not None:
                reuse[ti] = row
    out = _SyncedFile(data_tmp, layout.data_bytes, display_path=data_path)
    try:
        try:
            rows = _write_chunks(out, payload_view, layout, data_offset, crcs, level, threads,
                                 progress, str(data_path), reuse)
        except BaseException:
            out.close(sync=False)
            raise
        out.close(sync=True)
        for row in rows:
            row["rank"] = rank
            row["file"] = row["file"] or data_path.name
        table_meta = {k: v for k, v in meta.items() if k not in ("state", "tensors")}
        table_meta["zstd_level"] = level
        blob = build_table_bytes(rows, meta.get("state"), table_meta)
        _write_synced(table_tmp, blob, os.O_TRUNC)
        os.rename(data_tmp, data_path)
        os.rename(table_tmp, table_path)
        if replicas is not None:
            for key, row, raw in zip(keys, rows, raws):
                replicas.add(key, row, raw)
        FsStorage(staging.parent.parent).mark_rank_done(step, rank, {
            "rank": rank, "world_size": world_size, "step": step,
            "meta": table_path.name, "meta_crc32c": _C.crc32c(blob),
            "data": data_path.name, "data_bytes": out.logical_bytes,
        })
    except BaseException:
        for p in (data_tmp, table_tmp):
            p.unlink(missing_ok=True)
        raise
    return [data_path, table_path]


def _check_world_size(world_size: int) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ConfigError(f"world_size must be an integer >= 1, got {world_size!r}")


def _meta_bytes(view: memoryview) -> int:
    return int.from_bytes(view[16:24], "little")


def finish_if_complete(step_dir_staging: str | os.PathLike[str], world_size: int,
                       keep: int | None = None) -> Path | None:
    """Commit the step if every rank is done; returns its final path, else None.

    Safe to call from every writer: one takes ``manifest.lock`` and commits. The
    committer then applies retention (``keep``) and removes stale staging dirs.
    """
    staging = Path(step_dir_staging)
    step = parse_step_dirname(staging.name)
    if step is None:
        raise ConfigError(f"{staging} is not a step dir (step-XXXXXXXX)")
    _check_world_size(world_size)
    storage = FsStorage(staging.parent.parent)
    markers = storage.done_markers(step)
    if set(markers) != set(range(world_size)):
        if (storage.step_dir(step) / "manifest.json").exists():
            return storage.step_dir(step)
        return None
    for rank, info in markers.items():
        if info.get("world_size") != world_size:
            raise ConfigError(f"rank {rank} wrote step {step} with world_size "
                              f"{info.get('world_size')}, expected {world_size}")
    final = storage.commit_step(step, build_manifest(step, world_size, markers))
    if final is not None and keep is not None:
        storage.keep_newest(keep)
        storage.clean_stale_staging()
    return final


def persist_payloads(root: str | os.PathLike[str], step: int, world_size: int,
                     payloads: dict[int, memoryview], *, keep: int | None = None,
                     level: int = DEFAULT_ZSTD_LEVEL, threads: int = 2,
                     progress: ProgressFn | None = None) -> Path:
    """Persist every rank's payload of ``step`` held by this process and commit the step.

    ``payloads`` must hold all ``world_size`` ranks. On failure the staging dir
    is removed, nothing becomes visible, and earlier steps are untouched.
    """
    _check_world_size(world_size)
    if set(payloads) != set(range(world_size)):
        raise ConfigError(f"persist_payloads needs the payloads of ranks 0..{world_size - 1}, got "
                          f"{sorted(payloads)}; use write_rank + finish_if_complete for one rank")
    storage = FsStorage(root)
    if storage.step_is_complete(step):
        return storage.step_dir(step)  # already persisted (e.g. again on close())
    staging = storage.begin_step(step)
    # For the progress only; write_rank parses (and checks) each payload itself. A payload
    # of 100k tensors takes ~0.1 s to parse, so once here, not once per use.
    data_bytes = {rank: read_payload(v)[0].data_bytes for rank, v in payloads.items()}
    total = sum(data_bytes.values())
    base = 0

    def rank_progress(done_bytes: int, _total: int) -> None:
        if progress is not None:
            progress(base + done_bytes, total)

    replicas = ReplicaIndex()
    try:
        for rank in sorted(payloads):
            write_rank(staging, rank, world_size, payloads[rank], level=level, threads=threads,
                       progress=rank_progress, replicas=replicas)
            base += data_bytes[rank]
        final = finish_if_complete(staging, world_size, keep=keep)
    except BaseException:
        storage.abort_step(step)
        raise
    if final is None:
        raise ConfigError(f"step {step} was not committed: another process holds its manifest.lock")
    return final
