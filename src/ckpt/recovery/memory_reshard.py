"""Restore from this node's shared memory onto another layout: the sealed slots of one
step, one per rank that wrote it, read box by box (``MemoryReshardSource``).

On one node every rank's segment is local. A job relaunched there on fewer or more
ranks, or with another sharding, so resumes from its newest snapshot instead of its
last persisted step. Across nodes a rank lacks the others' segments; that step is then
read from disk (``ReshardSource``), or from peers once the REFT tier holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckpt.errors import CorruptCheckpointError, CorruptChunkError
from ckpt.format.boxes import Box, Tiling, byte_runs, check_box, preferred, tiling_of
from ckpt.format.metadata import PieceGeometry
from ckpt.recovery.sources import (BufferedSource, MemoryCandidate, MemorySource,
                                   is_sharded_state, reshard_entry, retarget_entries)
from ckpt.snapshot.layout import itemsize_of


def complete_groups(candidates: list[MemoryCandidate]) -> dict[int, dict[int, MemoryCandidate]]:
    """The steps this node holds whole in memory: for each, a sealed slot of every rank
    ``0 .. world_size - 1`` of the job that wrote it, by rank. ``candidates`` are every
    rank's of one job, newest first (``memory_candidates(job, None)``); of two slots of
    one rank and step, the first listed is taken. Every rank of a job lists the same
    segments, so each picks the same slots."""
    sets: dict[tuple[int, int], dict[int, MemoryCandidate]] = {}
    for c in candidates:
        sets.setdefault((c.step, c.world_size), {}).setdefault(c.rank, c)
    groups: dict[int, dict[int, MemoryCandidate]] = {}
    for (step, world_size), by_rank in sorted(sets.items(), reverse=True):
        if step not in groups and world_size > 0 and set(by_rank) == set(range(world_size)):
            groups[step] = dict(sorted(by_rank.items()))
    return groups


@dataclass(frozen=True)
class SlotPiece(PieceGeometry):
    """One stored tensor of one rank's slot."""

    index: int  # its position in the rank's payload


@dataclass
class _Part:
    """The part ``hit`` of one destination box that one group of replicas holds."""

    replicas: tuple[SlotPiece, ...]  # in read order
    hit: Box
    box: Box                         # the destination's offsets and shape
    dst_addr: int
    choice: int = 0                  # which replica is read
    runs: tuple[np.ndarray, np.ndarray, int] | None = field(default=None, repr=False)

    @property
    def piece(self) -> SlotPiece:
        return self.replicas[self.choice]

    def plan(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(byte starts in the piece, byte starts in the destination, run bytes): the
        hit's elements in C order, in runs contiguous in both."""
        p, (hit_off, hit_shape), (box_off, box_shape) = self.piece, self.hit, self.box
        itemsize = itemsize_of(p.dtype)
        src, src_run = byte_runs(p.shape, _minus(hit_off, p.offsets), hit_shape, itemsize)
        dst, dst_run = byte_runs(box_shape, _minus(hit_off, box_off), hit_shape, itemsize)
        run = min(src_run, dst_run)  # both are suffix products of the hit's shape
        src = (src[:, None] + np.arange(src_run // run, dtype=np.int64) * run).ravel()
        dst = (dst[:, None] + np.arange(dst_run // run, dtype=np.int64) * run).ravel()
        self.runs = (src, dst, run)
        return self.runs

    def chunk_span(self, chunk_bytes: int) -> tuple[int, int]:
        """The chunks ``[lo, hi)`` of the piece that hold the bytes this part reads."""
        src, _, run = self.runs if self.runs is not None else self.plan()
        return int(src.min()) // chunk_bytes, (int(src.max()) + run - 1) // chunk_bytes + 1


@dataclass
class _Checked:
    """The chunks ``[lo, hi)`` of one slot tensor that were checksummed, and the damaged
    ones among them: chunk -> (crc32c found, crc32c recorded)."""

    lo: int
    hi: int
    bad: dict[int, tuple[int, int]]


def _minus(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x - y for x, y in zip(a, b))


class MemoryReshardSource(BufferedSource):
    """A step held in this node's shared memory by every rank that wrote it, read onto this
    job's layout. Each slot stays read-locked from ``__init__`` to ``close``.

    Like ``ReshardSource`` on disk: model/optimizer entries are described whole until
    ``retarget``; ``load_verified`` assembles each live box from whichever slots hold
    its parts. Per-rank state (optimizer scalars, scheduler, extras, RNG) comes from
    ``source_rank``, this rank where it existed, else this rank modulo the stored world
    size; RNG only on ranks that existed (``restores_rng``). The chunks a box needs are
    checked against their crc32c before any byte is copied; a damaged part is read from
    a replica where there is one (DDP), else CorruptChunkError names the slot and chunk."""

    tier = "memory"
    reshards = True

    def __init__(self, group: dict[int, MemoryCandidate], rank: int, world_size: int,
                 engine: Any) -> None:
        super().__init__()
        self.engine = engine
        self._slots: list[MemorySource] = []
        try:
            for r in sorted(group):
                self._slots.append(MemorySource(group[r], engine))
            self._check_group()
        except BaseException:
            self.close()
            raise
        stored_world = len(self._slots)
        self.step = self._slots[0].step
        self.source_rank = rank % stored_world
        self.restores_rng = rank < stored_world
        self.where = (f"shared memory: step {self.step} in the slots of {stored_world} "
                      f"rank(s) (read onto {world_size} by box)")
        own = self._slots[self.source_rank]
        self.meta = dict(own.meta)
        self.meta["tensors"] = [
            reshard_entry(s.name, s.dtype, s.global_shape, s.shape, s.offsets, s.nbytes)
            for s in (p.spec for p in own.layout.tensors)]
        self._own_index = {p.spec.name: j for j, p in enumerate(own.layout.tensors)}
        self._pieces: dict[str, list[SlotPiece]] = {}
        for r, slot in enumerate(self._slots):
            for j, p in enumerate(slot.layout.tensors):
                s = p.spec
                if is_sharded_state(s.name):
                    self._pieces.setdefault(s.name, []).append(
                        SlotPiece(s.name, r, s.dtype, s.global_shape, s.offsets, s.shape, j))
        self._tilings: dict[str, Tiling] = {}

    def _check_group(self) -> None:
        steps = {s.step for s in self._slots}
        worlds = {int(s.meta.get("world_size", -1)) for s in self._slots}
        ranks = [int(s.meta.get("rank", -1)) for s in self._slots]
        if len(steps) != 1 or worlds != {len(self._slots)} or ranks != list(range(len(ranks))):
            raise CorruptCheckpointError(
                f"the slots {[s.where for s in self._slots]} do not hold one step of one job "
                f"(steps {sorted(steps)}, world sizes {sorted(worlds)}, ranks {ranks})")

    def retarget(self, live: dict[str, Any]) -> None:
        retarget_entries(self.meta["tensors"], live)

    def _tiling(self, name: str) -> Tiling:
        if name not in self._tilings:
            self._tilings[name] = tiling_of(name, self._pieces.get(name, []), self.where)
        return self._tilings[name]

    def load_verified(self, dst_addrs: dict[int, int]) -> None:
        """Fill tensor ``i`` at ``dst_addrs[i]``, every other one into an arena for
        ``tensor_bytes``: each model/optimizer box from the slots that hold it, per-rank
        tensors from ``source_rank``'s slot. Every chunk read is checked first, so no
        damaged byte reaches any buffer."""
        buffers = self._arena_buffers(dst_addrs)
        parts: list[_Part] = []
        for i, e in enumerate(self.meta["tensors"]):
            if not e["nbytes"]:
                continue
            dst = dst_addrs[i] if i in dst_addrs else buffers[i].data_ptr()  # type: ignore[union-attr]
            if is_sharded_state(e["name"]):
                tiling = self._tiling(e["name"])
                box = check_box(e["name"], tiling.global_shape, e["offsets"], e["shape"])
                parts += [_Part(preferred(pieces, self.source_rank), hit, box, dst)
                          for _, hit, pieces in tiling.overlapping(*box)]
            else:  # per-rank state: source_rank's tensor, whole
                j = self._own_index[e["name"]]
                s = self._slots[self.source_rank].layout.tensors[j].spec
                piece = SlotPiece(s.name, self.source_rank, s.dtype, s.global_shape, s.offsets,
                                  s.shape, j)
                parts.append(_Part((piece,), (s.offsets, s.shape), (s.offsets, s.shape), dst))
        fused, slow = self._fuse(parts)
        self._choose_verified_replicas(slow)
        self._copy(slow)
        damaged = self._verified_copy(fused)
        if damaged:  # read those parts again, each damaged piece from its next replica
            for part in damaged:
                part.choice, part.runs = 0, None
            self._choose_verified_replicas(damaged)
            self._copy(damaged)
        self._loaded(buffers)

    def _copy(self, parts: list[_Part]) -> None:
        """Copy each part's runs from its chosen (checked) replica: one engine batch."""
        jobs = []
        for part in parts:
            src, dst, run = part.runs if part.runs is not None else part.plan()
            base = self._slots[part.piece.rank].tensor_addr(part.piece.index)
            jobs += [(base + s, part.dst_addr + d, run)
                     for s, d in zip(src.tolist(), dst.tolist())]
        if jobs:
            self.engine.submit(jobs, self._slots[0].layout.chunk_bytes, 0).wait(None)

    def _fuse(self, parts: list[_Part]) -> tuple[list[tuple[_Part, tuple, np.ndarray]],
                                                 list[_Part]]:
        """Split off what ``verified_copy`` can check and copy in one pass: the whole
        stored chunks of a part that is one run (a whole piece, an FSDP shard's slice of
        one). Returns (fused: (part, job, its chunks' recorded crcs), the rest to check,
        then copy: other parts, and the cut chunks at a fused run's two ends)."""
        chunk_bytes = {slot.layout.chunk_bytes for slot in self._slots}
        if len(chunk_bytes) != 1:
            return [], parts
        (cb,) = chunk_bytes
        fused, slow = [], []
        for part in parts:
            src, dst, run = part.runs if part.runs is not None else part.plan()
            p = part.piece
            slot = self._slots[p.rank]
            start, end = int(src[0]), int(src[0]) + run
            lo = -(-start // cb) * cb
            hi = end if end == slot.layout.tensors[p.index].spec.nbytes else end // cb * cb
            if src.size != 1 or hi <= lo:
                slow.append(part)
                continue
            base, out = slot.tensor_addr(p.index), part.dst_addr + int(dst[0]) - start
            fused.append((part, (base + lo, out + lo, hi - lo),
                          slot.chunk_crcs(p.index, lo // cb, -(-hi // cb))))
            for a, b in ((start, lo), (hi, end)):  # the cut chunks' bytes, if any
                if b > a:
                    edge = _Part(part.replicas, part.hit, part.box, part.dst_addr)
                    edge.runs = (np.array([a]), np.array([a - start + int(dst[0])]), b - a)
                    slow.append(edge)
        return fused, slow

    def _verified_copy(self, fused: list[tuple[_Part, tuple, np.ndarray]]) -> list[_Part]:
        """Check and copy the fused runs chunk by chunk (a damaged chunk is not copied);
        returns the parts that met a damaged chunk."""
        if not fused:
            return []
        expected = np.concatenate([crcs for _, _, crcs in fused]).astype("<u4")
        actual = np.zeros(expected.size, dtype=np.uint32)
        self.engine.verified_copy([job for _, job, _ in fused],
                                  self._slots[0].layout.chunk_bytes, expected.ctypes.data,
                                  actual.ctypes.data).wait(None)
        bad = np.nonzero(actual != expected)[0]
        if not bad.size:
            return []
        ends = np.cumsum([crcs.size for _, _, crcs in fused])
        return [fused[int(k)][0] for k in sorted(set(np.searchsorted(ends, bad, "right")))]

    def _choose_verified_replicas(self, parts: list[_Part]) -> None:
        """Checksum the chunks each part reads from its chosen replica; move a part whose
        chunks are damaged to its next replica. CorruptChunkError when one has none left."""
        checked: dict[tuple[int, int], _Checked] = {}  # by (rank, tensor index)
        while True:
            need: dict[tuple[int, int], tuple[int, int]] = {}
            for part in parts:
                p = part.piece
                key = (p.rank, p.index)
                lo, hi = part.chunk_span(self._slots[p.rank].layout.chunk_bytes)
                c = checked.get(key)
                if c is not None and c.lo <= lo and hi <= c.hi:
                    continue
                if c is not None:
                    lo, hi = min(lo, c.lo), max(hi, c.hi)
                n = need.get(key)
                need[key] = (min(lo, n[0]), max(hi, n[1])) if n else (lo, hi)
            if not need:
                break
            for rank in sorted({r for r, _ in need}):
                ranges = [(j, lo, hi) for (r, j), (lo, hi) in need.items() if r == rank]
                bad = self._slots[rank].bad_chunks(ranges)
                for j, lo, hi in ranges:
                    checked[(rank, j)] = _Checked(lo, hi, {c: (actual, recorded)
                                                           for k, c, actual, recorded in bad
                                                           if k == j})
            for part in parts:
                self._skip_damaged(part, checked)

    def _skip_damaged(self, part: _Part, checked: dict[tuple[int, int], _Checked]) -> None:
        while True:
            p = part.piece
            c = checked.get((p.rank, p.index))
            lo, hi = part.chunk_span(self._slots[p.rank].layout.chunk_bytes)
            hits = [k for k in (c.bad if c else ()) if lo <= k < hi]
            if not hits:
                return  # clean, or its span is checked in the next round
            if part.choice + 1 == len(part.replicas):
                chunk = min(hits)
                actual, recorded = c.bad[chunk]  # type: ignore[union-attr]
                tried = [q.rank for q in part.replicas]
                raise CorruptChunkError(
                    f"{self._slots[p.rank].where} (step {self.step}): tensor {p.name!r} chunk "
                    f"{chunk} has crc32c {actual:#010x}, recorded {recorded:#010x}"
                    + (f"; its replicas on ranks {tried[:-1]} are damaged too"
                       if len(tried) > 1 else ""))
            part.choice += 1
            part.runs = None

    def close(self) -> None:
        super().close()
        for slot in self._slots:
            slot.close()
        self._slots = []
