"""Stage one snapshot into a slot of a shared-memory segment (INTERNALS §2-3).

``SlotStager.begin`` runs on the training thread and returns at once: it takes
the write lock of the slot that is not committed (or reports the snapshot as
skipped when a reader holds it), writes header and meta, and starts the copies
(CPU tensors: ``CopyEngine`` with the crc fused in; CUDA tensors: a D2H copy on a
side stream into the page-locked segment). ``SlotStager.finish`` runs on the
committer thread: it waits for the copies, computes the crcs of GPU-copied
chunks, writes nothing but the seal, and unlocks. Neither runs a collective.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt.errors import CkptError, ConfigError, SegmentError
from ckpt.snapshot.geometry import TensorGeometry
from ckpt.snapshot.layout import PayloadLayout, TensorSpec, payload_crc, plan_layout, \
    write_header_and_meta

log = logging.getLogger("ckpt.snapshot")


class SlotTooSmallError(SegmentError):
    """The payload does not fit in the segment's slots (register a bigger segment)."""


@dataclass(frozen=True)
class CopyRun:
    """Consecutive tensors on one device kind: copied by one engine call."""

    device: str  # "cpu" or "cuda:<i>"
    first: int  # index of its first tensor in the layout
    end: int
    first_chunk: int


@dataclass(frozen=True)
class SnapshotPlan:
    """The layout of a payload for one tensor signature; cached across steps."""

    signature: tuple
    layout: PayloadLayout
    runs: tuple[CopyRun, ...]

    @functools.cached_property
    def run_jobs(self) -> tuple[tuple[list[int], list[int], list[int]], ...]:
        """Per run: the indices of its non-empty tensors, their data offsets and sizes."""
        tables = []
        for run in self.runs:
            placed = [(i, self.layout.tensors[i]) for i in range(run.first, run.end)
                      if self.layout.tensors[i].spec.nbytes]
            tables.append(([i for i, _ in placed], [p.data_offset for _, p in placed],
                           [p.spec.nbytes for _, p in placed]))
        return tuple(tables)


def signature_of(geoms: list[TensorGeometry]) -> tuple:
    """What a cached plan depends on: equal signatures give the same layout and runs."""
    return tuple([(name, local.dtype, local.shape, global_shape, offsets, local.device)
                  for name, local, global_shape, offsets in geoms])


def plan_snapshot(geoms: list[TensorGeometry], chunk_bytes: int) -> SnapshotPlan:
    specs = [TensorSpec(g.name, g.dtype_name, g.shape, g.global_shape, g.offsets, g.nbytes)
             for g in geoms]
    layout = plan_layout(specs, chunk_bytes)
    runs: list[CopyRun] = []
    for i, (g, p) in enumerate(zip(geoms, layout.tensors)):
        device = "cpu" if g.local.device.type == "cpu" else str(g.local.device)
        if g.local.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"tensor {g.name!r} is on {g.local.device}; ckpt snapshots CPU and "
                              f"CUDA tensors")
        if runs and runs[-1].device == device:
            runs[-1] = CopyRun(device, runs[-1].first, i + 1, runs[-1].first_chunk)
        else:
            runs.append(CopyRun(device, i, i + 1, p.first_chunk))
    return SnapshotPlan(signature_of(geoms), layout, tuple(runs))


@dataclass
class PendingSnapshot:
    """A snapshot whose copy is running; owned by the stager until finished."""

    step: int
    slot: int
    plan: SnapshotPlan
    meta_bytes: int
    sources: list[torch.Tensor]  # kept alive until the copy is done
    cpu_tickets: list[Any] = field(default_factory=list)
    cuda_tickets: list[Any] = field(default_factory=list)
    started_s: float = field(default_factory=time.perf_counter)
    copy_done_s: float | None = None

    @property
    def payload_bytes(self) -> int:
        return self.plan.layout.payload_bytes(self.meta_bytes)

    def copy_done(self) -> bool:
        return all(t.done() for t in self.cpu_tickets) and all(t.done() for t in self.cuda_tickets)

    def wait_copy(self, timeout_s: float) -> None:
        """Host-wait for every copy; raises CkptError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for t in [*self.cpu_tickets, *self.cuda_tickets]:
            if not t.wait(max(0.0, deadline - time.monotonic())):
                raise CkptError(f"the copy of step {self.step} did not finish within "
                                f"{timeout_s:g} s (slot {self.slot}); the machine may be "
                                f"overloaded, or raise wait_timeout_s")
        if self.copy_done_s is None:
            self.copy_done_s = time.perf_counter()

    def drain(self) -> None:
        """Wait, without a limit, until no copy writes into the slot any more.

        Called before the slot is unlocked (or its segment unmapped) after ``wait_copy``
        failed: a copy always ends, and one still running writes into memory that would
        then belong to the next writer, or to nobody (a segfault). Errors of the copies are
        not raised here; the caller reports the first one."""
        for t in [*self.cpu_tickets, *self.cuda_tickets]:
            try:
                t.wait(None)
            except Exception:  # done, with an error: it writes no more
                pass

    def wait_copy_then_drain(self, timeout_s: float) -> None:
        """``wait_copy``; when it raises, ``drain`` before re-raising (with a warning when
        the copy is merely late)."""
        try:
            self.wait_copy(timeout_s)
        except BaseException as exc:
            if not self.copy_done():
                log.warning("ckpt: %s; waiting for it to end before slot %d is released",
                            exc, self.slot)
            self.drain()
            raise

    def make_stream_wait(self) -> None:
        """The current CUDA stream of each copied device waits for its D2H copies; the
        host does not."""
        for t in self.cuda_tickets:
            t.make_stream_wait(torch.cuda.current_stream(t.device).cuda_stream)


def page_lock(segment: Any) -> bool:
    """Page-lock the whole mapping for CUDA (once per segment), so D2H copies into it are
    DMA at full speed. Takes about as long as touching every page: seconds for big states.
    False (with a warning) when CUDA refuses: copies then work from pageable memory, slower."""
    from ckpt.errors import NativeError

    try:
        from ckpt import _C_cuda

        _C_cuda.host_register(segment.base_address, segment.size_bytes)
        return True
    except (ImportError, NativeError) as exc:
        log.warning("ckpt: cannot page-lock %s (%d bytes) for CUDA copies (%s); device-to-host "
                    "copies into it will be slower. Raise the locked-memory limit (ulimit -l) "
                    "or free host memory", segment.name, segment.size_bytes, exc)
        return False


def page_unlock(segment: Any) -> None:
    from ckpt import _C_cuda

    _C_cuda.host_unregister(segment.base_address)


class SlotStager:
    """Writes snapshots into ``segment``'s slots. One writer thread calls ``begin``;
    one committer thread calls ``finish``/``abandon`` on what it returned."""

    def __init__(self, segment: Any, engine: Any, pid: int | None = None,
                 page_locked: bool | None = None) -> None:
        """``page_locked``: the result of ``page_lock(segment)`` when it was already tried
        (off the training thread, by ``SegmentRequest``), None when not; a locked segment
        is unlocked on close."""
        self.segment = segment
        self.engine = engine
        self.pid = os.getpid() if pid is None else pid
        self._cuda: dict[int, tuple[Any, torch.cuda.Stream]] = {}
        self._page_locked = page_locked

    def _cuda_copier(self, device: torch.device) -> tuple[Any, "torch.cuda.Stream"]:
        from ckpt import _C_cuda

        index = device.index if device.index is not None else torch.cuda.current_device()
        if self._page_locked is None:  # normally tried when the segment arrived
            self._page_locked = page_lock(self.segment)
        if index not in self._cuda:
            self._cuda[index] = (_C_cuda.CudaCopier(index), torch.cuda.Stream(device=index))
        return self._cuda[index]

    def close(self) -> None:
        if self._page_locked:
            page_unlock(self.segment)
            self._page_locked = False

    def target_slot(self) -> int:
        committed = self.segment.committed()
        return 0 if committed is None else 1 - committed[0]

    def _lock_a_slot(self) -> int | None:
        """Write-lock the slot to write into; None when both are held by readers.

        Normally the slot that is not committed. When a reader (the daemon persisting
        it, a Fetch) holds that one, the committed slot is overwritten instead: the
        read-locked slot is SEALED, so a valid snapshot exists at every instant, and
        no snapshot is skipped because a persist is running.
        """
        first = self.target_slot()
        for slot in (first, 1 - first):
            if self.segment.try_lock(slot, self.pid, "write"):
                if slot != first and self.segment.slot_info(first)["state"] != "SEALED":
                    self.segment.unlock(slot, self.pid)  # would leave no valid slot
                    return None
                return slot
        return None

    def begin(self, step: int, plan: SnapshotPlan, sources: list[torch.Tensor],
              meta: dict[str, Any]) -> PendingSnapshot | None:
        """Start the snapshot of ``step``; None when the slot is held by a reader (skipped).

        ``sources[i]`` is the tensor whose bytes go to ``plan.layout.tensors[i]``
        (contiguous; it and everything in it must not change until the copy is done).
        Raises SlotTooSmallError when the payload does not fit a slot.
        """
        slot = self._lock_a_slot()
        if slot is None:
            return None
        try:
            self.segment.mark_writing(slot)
            view = self.segment.slot_view(slot)
            try:
                meta_bytes = write_header_and_meta(view, plan.layout, meta)
            except ConfigError as exc:
                raise SlotTooSmallError(str(exc)) from None
            pending = PendingSnapshot(step, slot, plan, meta_bytes, sources)
            try:
                self._start_copies(pending)
            except BaseException:
                # Copies that did start write into the slot: they end before it is unlocked.
                pending.drain()
                raise
            return pending
        except BaseException:
            self.segment.unlock(slot, self.pid)
            raise

    def _start_copies(self, pending: PendingSnapshot) -> None:
        layout = pending.plan.layout
        base = self.segment.slot_address(pending.slot)
        data_base = base + layout.data_offset(pending.meta_bytes)
        crc_base = base + layout.crc_offset(pending.meta_bytes)
        sources = pending.sources
        for run, (indices, offsets, sizes) in zip(pending.plan.runs, pending.plan.run_jobs):
            if not indices:
                continue
            jobs = list(zip([sources[i].data_ptr() for i in indices],
                            [data_base + offset for offset in offsets], sizes))
            if run.device == "cpu":
                pending.cpu_tickets.append(self.engine.submit(
                    jobs, layout.chunk_bytes, crc_base + 4 * run.first_chunk))
            else:
                device = torch.device(run.device)
                copier, side = self._cuda_copier(device)
                wait_stream = torch.cuda.current_stream(device).cuda_stream
                # The chunk crcs are computed on the GPU before the copy (cuda_crc.cu).
                pending.cuda_tickets.append(copier.d2h(jobs, side.cuda_stream, wait_stream,
                                                       layout.chunk_bytes,
                                                       crc_base + 4 * run.first_chunk))

    def finish(self, pending: PendingSnapshot, timeout_s: float) -> int:
        """Wait for the copies (and the chunk crcs they write), seal and unlock. Returns the seq.

        A copy late by more than ``timeout_s`` raises CkptError, but only once it has ended:
        the slot is never unlocked while a copy writes into it."""
        try:
            pending.wait_copy_then_drain(timeout_s)
            layout = pending.plan.layout
            pending.sources = []
            view = self.segment.slot_view(pending.slot)
            crc = payload_crc(view, layout)
            return self.segment.seal(pending.slot, pending.step, pending.payload_bytes, crc)
        finally:
            self.segment.unlock(pending.slot, self.pid)

    def abandon(self, pending: PendingSnapshot, timeout_s: float) -> None:
        """Give up a snapshot (the slot stays WRITING, i.e. invalid) after its copy stops."""
        try:
            pending.wait_copy_then_drain(timeout_s)
        finally:
            pending.sources = []
            self.segment.unlock(pending.slot, self.pid)
