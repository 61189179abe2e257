"""Where a snapshot can be restored from: a sealed slot in memory, or a step on disk
(written with this job's layout, or read onto it by box: ``ReshardSource``).

Both tiers give the same view: the snapshot ``meta`` (INTERNALS §3: tensor
entries and the state skeleton), ``verify()`` that raises CorruptChunkError or
CorruptCheckpointError naming the chunk, and ``tensor_bytes(i)``, the raw bytes
of tensor ``i`` as a CPU uint8 tensor. Nothing is trusted before ``verify()``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckpt.control.paths import parse_segment_name, shm_file
from ckpt.errors import (CkptError, CorruptCheckpointError, CorruptChunkError,
                         ShardingMismatchError, SlotBusyError)
from ckpt.procs import pid_alive

SEGMENT_HEADER_BYTES = 4096


def break_dead_lock(segment: Any, slot: int) -> bool:
    """Break slot's lock when its owner process is gone (INTERNALS §2). True if broken."""
    owner = segment.lock_owner(slot)
    if owner is None:
        return False
    _, pid = owner
    if pid == os.getpid() or pid_alive(pid):
        return False
    return segment.break_lock(slot, pid)  # kept if another process took it since


def segment_names(job: str, rank: int | None, shm_dir: Path = Path("/dev/shm")
                  ) -> list[tuple[int, str]]:
    """(generation, name) of this user's segments of (job, rank), newest generation first
    (rank None: of every rank of the job)."""
    uid = os.getuid()
    found = []
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return []
    for entry in entries:
        parsed = parse_segment_name(entry)
        if parsed and parsed.uid == uid and parsed.job == job and rank in (None, parsed.rank):
            found.append((parsed.generation, parsed.name))
    return sorted(found, reverse=True)


@dataclass(frozen=True)
class MemoryCandidate:
    segment_name: str
    slot: int
    step: int
    seq: int
    payload_bytes: int
    payload_crc: int
    rank: int
    world_size: int      # as the meta records it (the payload's seal covers the meta)


def memory_candidates(job: str, rank: int | None) -> list[MemoryCandidate]:
    """Sealed slots of (job, rank) in shared memory whose header area verifies, newest first
    (rank None: every rank's slots of the job on this node)."""
    from ckpt import _C
    from ckpt.snapshot.layout import check_payload_seal, read_meta_head

    out: list[MemoryCandidate] = []
    for _, name in segment_names(job, rank):
        seg_rank = parse_segment_name(name).rank  # type: ignore[union-attr]
        try:
            seg = _C.Segment.open(name, populate=False)
        except Exception:  # damaged or foreign: the daemon reports those
            continue
        try:
            for slot in (0, 1):
                info = seg.slot_info(slot)
                if info["state"] != "SEALED":
                    continue
                view = seg.slot_view(slot)[:info["payload_bytes"]]
                try:
                    check_payload_seal(view, info["payload_crc"])
                    head = read_meta_head(view)
                except CkptError:
                    continue
                world_size = head.get("world_size")
                if head.get("rank") != seg_rank or not isinstance(world_size, int):
                    continue  # a meta its trainer does not write: skipped like a bad seal
                out.append(MemoryCandidate(name, slot, info["step"], info["seq"],
                                           info["payload_bytes"], info["payload_crc"],
                                           seg_rank, world_size))
        finally:
            seg.close()
    return sorted(out, key=lambda c: (c.step, c.seq), reverse=True)


class MemorySource:
    """A sealed slot, read-locked from ``open`` until ``close``."""

    tier = "memory"
    reshards = False
    restores_rng = True

    def __init__(self, candidate: MemoryCandidate, engine: Any) -> None:
        from ckpt import _C
        from ckpt.snapshot.layout import read_payload

        self.candidate = candidate
        self.engine = engine
        self.where = f"shared memory {shm_file(candidate.segment_name)} slot {candidate.slot}"
        self._seg = _C.Segment.open(candidate.segment_name, populate=False)
        self._locked = False
        try:
            self._locked = self._seg.try_lock(candidate.slot, os.getpid(), "read") or (
                break_dead_lock(self._seg, candidate.slot)
                and self._seg.try_lock(candidate.slot, os.getpid(), "read"))
            if not self._locked:
                owner = self._seg.lock_owner(candidate.slot)
                # Another reader (the daemon persisting this very slot) excludes writers
                # just as our lock would, and the only writer of (job, rank) is this
                # restoring trainer: reading alongside it is safe.
                if owner is not None and owner[0] != "read":
                    raise SlotBusyError(f"{self.where} is locked by {owner}")
            info = self._seg.slot_info(candidate.slot)
            if info["state"] != "SEALED" or info["seq"] != candidate.seq:
                raise CorruptCheckpointError(f"{self.where} was rewritten (seq {info['seq']}, "
                                             f"state {info['state']}) since it was listed")
            self._view = self._seg.slot_view(candidate.slot)[:candidate.payload_bytes]
            self.layout, self.meta, self._crcs = read_payload(self._view, candidate.payload_crc)
            self._meta_bytes = int.from_bytes(bytes(self._view[16:24]), "little")
            self._data_addr = (self._seg.slot_address(candidate.slot)
                               + self.layout.data_offset(self._meta_bytes))
            self._data_file_offset = self._data_addr - self._seg.base_address
        except BaseException:
            self.close()
            raise
        self.step = int(self.meta["step"])
        self.verified = False

    def load_verified(self, dst_addrs: dict[int, int]) -> None:
        """Read tensor ``i`` into ``dst_addrs[i]`` and checksum every chunk as it lands
        (native, all workers); checksum the other tensors in place. A chunk whose crc does
        not match is zeroed in its destination before CorruptChunkError (naming the first
        bad chunk) is raised: no damaged byte is left in a live tensor, as on the disk tier.

        The copied tensors are read with pread() from the segment's file, not through the
        mapping: a fresh mapping would fault in every page (4 KiB each: shmem gets no huge
        pages by default) and unmapping them later holds the process's mmap lock for ~35 ms
        per GiB, which stalls whatever maps memory or starts a thread meanwhile."""
        layout = self.layout
        actual = np.zeros(max(layout.num_chunks, 1), dtype=np.uint32)
        tickets = [self._submit_run(copy, run, dst_addrs, actual)
                   for copy, run in _runs_by_kind(layout, dst_addrs)]
        for t in tickets:
            t.wait(None)
        self._zero_bad_chunks(actual, dst_addrs)
        self._raise_if_bad(actual)
        self.verified = True

    def _submit_run(self, copy: bool, run: list[int], dst_addrs: dict[int, int],
                    actual: np.ndarray) -> Any:
        """One engine batch for consecutive tensors: the engine numbers chunks job by job
        as the layout does, so the batch's crcs land at the run's first chunk."""
        tensors = self.layout.tensors
        out = actual.ctypes.data + 4 * tensors[run[0]].first_chunk
        base = self._data_addr
        if copy:
            start = self._data_file_offset
            jobs = [(start + tensors[i].data_offset, dst_addrs[i], tensors[i].spec.nbytes)
                    for i in run]
            return self.engine.read_file(self._seg.fileno(), jobs, self.layout.chunk_bytes, out)
        jobs = [(base + tensors[i].data_offset, tensors[i].spec.nbytes) for i in run]
        return self.engine.crc_chunks(jobs, self.layout.chunk_bytes, out)

    def _zero_bad_chunks(self, actual: np.ndarray, dst_addrs: dict[int, int]) -> None:
        import ctypes

        layout = self.layout
        bad = set(np.nonzero(actual[:layout.num_chunks] != self._crcs)[0].tolist())
        if not bad:
            return
        for i, p in enumerate(layout.tensors):
            if i not in dst_addrs:
                continue
            for c in range(p.num_chunks):
                if p.first_chunk + c in bad:
                    start = c * layout.chunk_bytes
                    ctypes.memset(dst_addrs[i] + start, 0,
                                  min(layout.chunk_bytes, p.spec.nbytes - start))

    def verify(self) -> None:
        """Checksum every chunk (native, GIL released) against the crc array."""
        self.load_verified({})

    def _raise_if_bad(self, actual: np.ndarray) -> None:
        layout = self.layout
        bad = np.nonzero(actual[:layout.num_chunks] != self._crcs)[0]
        if bad.size:
            k = int(bad[0])
            p = next(p for p in layout.tensors if p.first_chunk <= k < p.first_chunk + p.num_chunks)
            raise CorruptChunkError(
                f"{self.where} (step {self.step}): tensor {p.spec.name!r} chunk "
                f"{k - p.first_chunk} (payload chunk {k}) has crc32c {int(actual[k]):#010x}, "
                f"recorded {int(self._crcs[k]):#010x}; {bad.size} damaged chunk(s) in all")

    def bad_chunks(self, ranges: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
        """Checksum chunks ``[lo, hi)`` of tensor ``i`` for each ``(i, lo, hi)`` in place (one
        engine batch); ``(i, chunk, actual crc, recorded crc)`` of each that does not match."""
        chunk_bytes = self.layout.chunk_bytes
        jobs, recorded = [], []
        for i, lo, hi in ranges:
            p = self.layout.tensors[i]
            start = lo * chunk_bytes
            jobs.append((self.tensor_addr(i) + start, min(hi * chunk_bytes, p.spec.nbytes) - start))
            recorded.append(self._crcs[p.first_chunk + lo:p.first_chunk + hi])
        if not jobs:
            return []
        expected = np.concatenate(recorded)
        actual = np.zeros(max(expected.size, 1), dtype=np.uint32)
        self.engine.crc_chunks(jobs, chunk_bytes, actual.ctypes.data).wait(None)
        where = np.concatenate([np.full(hi - lo, i) for i, lo, hi in ranges])
        chunk = np.concatenate([np.arange(lo, hi) for _, lo, hi in ranges])
        return [(int(where[k]), int(chunk[k]), int(actual[k]), int(expected[k]))
                for k in np.nonzero(actual[:expected.size] != expected)[0]]

    def chunk_crcs(self, i: int, lo: int, hi: int) -> np.ndarray:
        """The recorded crc32c of chunks ``[lo, hi)`` of tensor ``i``."""
        first = self.layout.tensors[i].first_chunk
        return self._crcs[first + lo:first + hi]

    def tensor_addr(self, i: int) -> int:
        return self._data_addr + self.layout.tensors[i].data_offset

    def tensor_bytes(self, i: int) -> torch.Tensor:
        p = self.layout.tensors[i]
        if not p.spec.nbytes:
            return torch.empty(0, dtype=torch.uint8)
        start = self.layout.data_offset(self._meta_bytes) + p.data_offset
        return torch.frombuffer(self._view[start:start + p.spec.nbytes], dtype=torch.uint8)

    def close(self) -> None:
        if self._seg is None:
            return
        self._view = None
        if self._locked:
            self._seg.unlock(self.candidate.slot, os.getpid())
            self._locked = False
        seg, self._seg = self._seg, None
        # Unmapping a GiB of faulted-in pages takes 30-50 ms: off the restore's critical
        # path (the native close releases the GIL; the slot is already unlocked).
        threading.Thread(target=seg.close, name="ckpt-unmap", daemon=True).start()


def _runs_by_kind(layout: Any, dst_addrs: dict[int, int]) -> list[tuple[bool, list[int]]]:
    """The non-empty tensors in layout order, cut into maximal runs of the same kind:
    (True, indices) to copy into ``dst_addrs`` and checksum, (False, indices) to checksum
    in place. Empty tensors have no chunks, so a run's chunks stay consecutive."""
    runs: list[tuple[bool, list[int]]] = []
    for i, p in enumerate(layout.tensors):
        if not p.spec.nbytes:
            continue
        copy = i in dst_addrs
        if runs and runs[-1][0] == copy:
            runs[-1][1].append(i)
        else:
            runs.append((copy, [i]))
    return runs


class BufferedSource:
    """What the sources that fill live tensors from elsewhere share (disk, and memory read
    by box): host buffers, one arena, for the tensors not loaded straight into live memory.
    A subclass sets ``meta`` and ``where`` and implements ``load_verified``."""

    reshards = False      # True: entries are retargeted to the live layout before a load
    restores_rng = True   # False: this rank did not exist in the step; its RNG stays as is
    meta: dict[str, Any]
    where: str

    _ALIGN_BYTES = 4096

    def __init__(self) -> None:
        self.verified = False
        self._buffers: list[torch.Tensor | None] = []

    def load_verified(self, dst_addrs: dict[int, int]) -> None:
        raise NotImplementedError

    def verify(self) -> None:
        """Read every chunk this rank needs (crc32c checked before this returns) into one
        host arena; CorruptChunkError names the first damaged chunk."""
        self.load_verified({})

    def _arena_buffers(self, dst_addrs: dict[int, int]) -> list[torch.Tensor | None]:
        """A host buffer per tensor entry not in ``dst_addrs`` (None for those: they are
        filled in live memory), slices of one fresh arena. They are kept for
        ``tensor_bytes`` once the load succeeded; until then no buffer of an earlier load
        is served."""
        sizes = [int(e["nbytes"]) for e in self.meta["tensors"]]
        offsets, total = [], 0
        for i, n in enumerate(sizes):
            offsets.append(total)
            if i not in dst_addrs:
                total += -(-n // self._ALIGN_BYTES) * self._ALIGN_BYTES
        arena = self._arena(total)
        buffers: list[torch.Tensor | None] = []
        for i, (n, off) in enumerate(zip(sizes, offsets)):
            if i in dst_addrs:
                buffers.append(None)
            elif n:
                buffers.append(torch.frombuffer(arena, dtype=torch.uint8, count=n, offset=off))
            else:
                buffers.append(torch.empty(0, dtype=torch.uint8))
        self._buffers = []
        return buffers

    def _outputs(self, dst_addrs: dict[int, int]) -> tuple[list[torch.Tensor | None], list[Any]]:
        """(buffers, outs): ``_arena_buffers``, and a writable ``out`` per tensor entry,
        the live memory at ``dst_addrs[i]`` or its arena buffer; None for empty tensors."""
        import ctypes

        buffers = self._arena_buffers(dst_addrs)
        outs: list[Any] = []
        for i, (e, buf) in enumerate(zip(self.meta["tensors"], buffers)):
            n = int(e["nbytes"])
            if not n:
                outs.append(None)
            elif buf is None:
                outs.append((ctypes.c_ubyte * n).from_address(dst_addrs[i]))
            else:
                outs.append(buf.numpy())
        return buffers, outs

    def _loaded(self, buffers: list[torch.Tensor | None]) -> None:
        self._buffers = buffers
        self.verified = True

    @staticmethod
    def _arena(nbytes: int) -> Any:
        """Private anonymous memory for ``nbytes``, backed by huge pages where the kernel
        allows: the kernel then faults in 2 MiB pages while it reads, not 4 KiB ones)."""
        import mmap

        arena = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                arena.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass  # THP disabled: 4 KiB pages work too
        return arena

    def _buffer(self, i: int) -> torch.Tensor:
        buf = self._buffers[i] if i < len(self._buffers) else None
        if buf is None:
            raise CkptError(f"{self.where}: tensor {i} was not read into this source (call "
                            f"verify() first; load_verified() reads its targets elsewhere)")
        return buf

    def tensor_addr(self, i: int) -> int:
        return self._buffer(i).data_ptr()

    def tensor_bytes(self, i: int) -> torch.Tensor:
        return self._buffer(i)

    def close(self) -> None:
        self._buffers = []


class _DiskSourceBase(BufferedSource):
    """What both disk sources share: the step's reader."""

    tier = "disk"

    def __init__(self, step_path: Path) -> None:
        from ckpt.format import StepReader

        super().__init__()
        self.where = f"disk {step_path}"
        self._reader = StepReader(step_path)

    def close(self) -> None:
        super().close()
        self._reader.close()


class DiskSource(_DiskSourceBase):
    """One rank of a complete step on disk, written by a job of this world size; ``verify``
    reads (and crc-checks) every chunk. ShardingMismatchError when the step has another
    world size (``ReshardSource`` reads it)."""

    def __init__(self, step_path: Path, rank: int, world_size: int) -> None:
        super().__init__(step_path)
        if self._reader.world_size != world_size:
            self._reader.close()
            raise ShardingMismatchError(
                f"{step_path} was written by {self._reader.world_size} ranks, this job has "
                f"{world_size}")
        self.rank = rank
        self.meta = dict(self._reader.meta(rank))
        self.meta["state"] = self._reader.state_skeleton(rank)
        # The table is the source of truth on disk (pieces in payload order).
        self.meta["tensors"] = [
            {"name": p.name, "dtype": p.dtype, "shape": list(p.shape),
             "global_shape": list(p.global_shape), "offsets": list(p.offsets),
             "nbytes": p.raw_bytes}
            for p in self._reader.tensors() if p.rank == rank]
        self.step = int(self.meta["step"])

    def load_verified(self, dst_addrs: dict[int, int]) -> None:
        """Like ``MemorySource.load_verified``: read tensor ``i`` straight into the host
        memory at ``dst_addrs[i]`` (``nbytes`` writable bytes), every other tensor into an
        arena for ``tensor_bytes``; every chunk's crc32c is checked before this returns.
        On CorruptChunkError the damaged chunks' bytes are zeroed wherever they landed;
        what was written holds verified bytes of this step. ``tensor_bytes(i)`` is not
        available for the tensors of ``dst_addrs``."""
        buffers, outs = self._outputs(dst_addrs)
        requests = [(e["name"], out) for e, out in zip(self.meta["tensors"], outs)
                    if out is not None]
        self._reader.read_tensors_into(self.rank, requests)
        self._loaded(buffers)


def is_sharded_state(name: str) -> bool:
    """Model and optimizer tensors are one global tensor across ranks (read by box when
    resharding); the rest (RNG, scheduler, extras) is per rank."""
    return name.startswith(("model/", "optim/"))


def reshard_entry(name: str, dtype: str, global_shape: tuple[int, ...], shape: tuple[int, ...],
                  offsets: tuple[int, ...], nbytes: int) -> dict[str, Any]:
    """A stored tensor's meta entry for a source that reads by box: a model/optimizer
    tensor is described whole until ``retarget_entries`` (so that the optimizer state is
    shaped by the live parameters, not by the stored shards); per-rank state as stored."""
    from ckpt.format.boxes import box_bytes
    from ckpt.snapshot.layout import itemsize_of

    if is_sharded_state(name):
        shape, offsets = global_shape, (0,) * len(global_shape)
        nbytes = box_bytes(global_shape, itemsize_of(dtype))
    return {"name": name, "dtype": dtype, "global_shape": list(global_shape),
            "shape": list(shape), "offsets": list(offsets), "nbytes": nbytes}


def retarget_entries(entries: list[dict[str, Any]], live: dict[str, Any]) -> None:
    """Give every model/optimizer entry the box of its live tensor (a TensorGeometry)
    where the dtype and global shape agree; others stay as stored, for the loader's
    check to name what differs."""
    for e in entries:
        g = live.get(e["name"])
        if (g is None or not is_sharded_state(e["name"]) or g.dtype_name != e["dtype"]
                or list(g.global_shape) != e["global_shape"]):
            continue
        e["shape"], e["offsets"], e["nbytes"] = list(g.shape), list(g.offsets), g.nbytes


class ReshardSource(_DiskSourceBase):
    """A complete step on disk read onto this job's layout: another world size, or another
    sharding of the same tensors (DDP <-> FSDP2, another mesh). ``retarget`` gives each
    model/optimizer entry the live tensor's box; ``load_verified`` assembles each box from
    whichever ranks' pieces hold it (``StepReader.read_boxes_into``), reading only the
    chunks that hold its bytes.

    What is per rank (optimizer scalars, scheduler, extras, RNG) comes from one stored
    rank, ``source_rank``: this rank where it existed, else this rank modulo the stored
    world size. RNG states are restored only on ranks that existed (``restores_rng``)."""

    reshards = True

    def __init__(self, step_path: Path, rank: int, world_size: int) -> None:
        super().__init__(step_path)
        stored_world = self._reader.world_size
        self.source_rank = rank % stored_world
        self.restores_rng = rank < stored_world
        self.where = (f"disk {step_path} (written by {stored_world} rank(s), read onto "
                      f"{world_size} by box)")
        self.meta = dict(self._reader.meta(self.source_rank))
        self.meta["state"] = self._reader.state_skeleton(self.source_rank)
        self.meta["tensors"] = [
            reshard_entry(p.name, p.dtype, p.global_shape, p.shape, p.offsets, p.raw_bytes)
            for p in self._reader.rank_pieces(self.source_rank)]
        self.step = int(self.meta["step"])

    def retarget(self, live: dict[str, Any]) -> None:
        retarget_entries(self.meta["tensors"], live)

    def load_verified(self, dst_addrs: dict[int, int]) -> None:
        """As ``DiskSource.load_verified``, each model/optimizer tensor's box assembled from
        the ranks that hold it; per-rank tensors from ``source_rank``. Every chunk's crc32c
        is checked before this returns; nothing of a damaged chunk is left anywhere."""
        buffers, outs = self._outputs(dst_addrs)
        boxes, own = [], []
        for e, out in zip(self.meta["tensors"], outs):
            if out is None:
                continue
            if is_sharded_state(e["name"]):
                boxes.append((e["name"], e["offsets"], e["shape"], out))
            else:
                own.append((e["name"], out))
        self._reader.read_boxes_into(boxes, prefer_rank=self.source_rank)
        self._reader.read_tensors_into(self.source_rank, own)
        self._loaded(buffers)
