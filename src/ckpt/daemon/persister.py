"""Background persistence of sealed slots to disk, through ``ckpt.format``.

One worker thread takes requests ``(job, step, ranks)`` from a queue. The slots holding
``step`` are pinned (read lock, seq re-checked) from the moment the request is made (the
daemon pins them at Commit), so a persist that waits behind a slow one still finds its step;
the worker copies each into a private, pre-faulted staging buffer (made while idle for every
segment with a persist_dir, kept per (job, rank); pyarrow and zstd are loaded then too),
unpins, and hands the copies to
``ckpt.format`` (one step dir for the ranks of the job on this node; the multi-writer path
when the job has ranks elsewhere). A supersedable request (a persist_every step of a job
whose ranks are all on this node) that arrives while another persist is being written
replaces the job's supersedable request still queued, which is then skipped with a warning
(the disk cannot keep up with persist_every), so no more than one slot per segment waits
pinned behind a write. While the worker is not writing (idle, or preparing a buffer) a
queued request is about to start and is never superseded: the next one queues behind it. A job with ranks on other nodes never skips:
every node must persist the same steps, or none of them completes (a third persist step
cannot queue up while two wait: with both slots pinned the trainer skips snapshots). A failure (full disk, bad
dir, a slot overwritten before it could be read) is recorded on the segments, logged, and
returned to whoever waits; it never stops the worker or the daemon.

Contract: ``submit`` never blocks; the returned Future resolves to a PersistOutcome.
``close(timeout_s)`` stops the worker after the request in progress.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import logging
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ckpt.control.client import PersistOutcome
from ckpt.daemon.registry import SegmentEntry, SegmentRegistry

log = logging.getLogger("ckpt.daemon")

_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
_PAGE_BYTES = 4096
_DATA_OFFSET_AT = 40  # payload header (§3): u64 data_offset at byte 40
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # fault all pages in at mmap time (Linux)


def complete_disk_steps(persist_dir: str) -> list[int]:
    """Steps under ``persist_dir`` that are complete (renamed into place with a manifest)."""
    if not persist_dir:
        return []
    try:
        names = list(Path(persist_dir).iterdir())
    except OSError:
        return []
    steps = []
    for p in names:
        m = _STEP_DIR_RE.match(p.name)
        if m and (p / "manifest.json").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


@dataclass(frozen=True)
class PersistTask:
    """Persist ``step`` of ``ranks`` of ``job``.

    ``held``: (entry, slot, slot_info) of slots the submitter already pinned (read lock),
    so that the trainer cannot overwrite them while the task waits in the queue; the
    persister unpins each once it has staged it (or drops the task). ``supersedable``: a
    newer supersedable task of the same job replaces this one while it is still queued
    (only for jobs whose ranks are all on this node; see the module docstring).
    """

    job: str
    step: int
    ranks: tuple[int, ...]
    held: tuple = field(default=(), compare=False)
    supersedable: bool = False


def write_step(persist_dir: str, step: int, world_size: int,
               payloads: dict[int, tuple[memoryview, int]], keep: int,
               progress: Callable[[int, int], None] | None = None) -> None:
    """Write ``payloads`` ({rank: (view, payload_crc)}) of ``step`` with ckpt.format (§4).

    All ranks here: one ``persist_payloads`` call. Some ranks on other nodes: write ours
    into the shared staging dir; whichever writer completes the set commits the step.
    """
    from ckpt import format as fmt  # lazy: the daemon starts without pyarrow/zstd loaded

    keep_k = keep if keep > 0 else None
    if len(payloads) == world_size:
        fmt.persist_payloads(persist_dir, step, world_size,
                             {r: v for r, (v, _) in payloads.items()}, keep=keep_k,
                             progress=progress)
        return
    from ckpt.storage.fs import FsStorage

    staging = FsStorage(persist_dir).begin_step(step)
    total = sum(len(v) for v, _ in payloads.values())
    base = 0
    replicas = fmt.ReplicaIndex()  # a tensor several local ranks hold is written once
    for rank, (view, crc) in sorted(payloads.items()):
        def rank_progress(done: int, _total: int, base: int = base) -> None:
            if progress is not None:
                progress(base + done, total)

        fmt.write_rank(staging, rank, world_size, view, expected_crc=crc,
                       progress=rank_progress, replicas=replicas)
        base += len(view)
    fmt.finish_if_complete(staging, world_size, keep=keep_k)


class SlotPersister:
    """The daemon's persist queue and its worker thread."""

    IDLE_POLL_S = 0.5  # when idle, how often staging buffers of new segments are prepared

    def __init__(self, registry: SegmentRegistry) -> None:
        self._registry = registry
        self._queue: queue.Queue = queue.Queue()
        self._pending: collections.Counter = collections.Counter()  # job -> queued tasks
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failures: collections.deque = collections.deque(maxlen=20)
        self.skipped: collections.deque = collections.deque(maxlen=20)
        self._queued_supersedable: dict[str, tuple[PersistTask, Future]] = {}
        self._dropped: set[int] = set()  # id() of superseded tasks still in the queue
        self._held_left: dict[int, tuple] = {}  # id(task) -> pins not yet released
        self._progress: dict[str, tuple[int, int, int]] = {}  # job -> (step, done, total)
        self._writing: PersistTask | None = None  # the task the worker is persisting now
        self._buffers: dict[tuple[str, int], "mmap.mmap"] = {}  # (job, rank) -> staging buffer
        self._warmed = False  # _warm_up_writer has run
        from ckpt import _C

        self._engine = _C.CopyEngine(1)
        self._thread = threading.Thread(target=self._run, name="ckpt-persister", daemon=True)
        self._thread.start()

    def queued(self, job: str) -> int:
        with self._lock:
            return self._pending[job]

    def progress(self, job: str) -> tuple[int, int, int] | None:
        """(step, bytes_done, bytes_total) of the persist of ``job`` being written now."""
        with self._lock:
            return self._progress.get(job)

    def _report(self, job: str, step: int, done: int, total: int) -> None:
        with self._lock:
            self._progress[job] = (step, done, total)

    def submit(self, task: PersistTask) -> Future:
        """Queue ``task``. A supersedable task that arrives while a persist is being written
        replaces the job's supersedable task still queued (not started): that one is
        dropped, its pins released and its Future resolved as skipped, so that at most one
        task per job waits pinned behind a write (with both of a segment's slots pinned,
        the trainer would have to skip snapshots). With no write in progress the queued
        task starts as soon as the worker wakes, so it is kept and ``task`` queues behind."""
        fut: Future = Future()
        superseded = None
        with self._lock:
            self._pending[task.job] += 1
            if task.supersedable:
                if self._writing is not None:
                    superseded = self._queued_supersedable.pop(task.job, None)
                    if superseded is not None:
                        # In the same critical section as the pop: the worker, taking it
                        # off the queue, must see it dropped.
                        self._dropped.add(id(superseded[0]))
                self._queued_supersedable[task.job] = (task, fut)
        if superseded is not None:
            old, old_fut = superseded
            self._release(old)
            message = (f"persist of job {old.job!r} step {old.step} skipped: step {task.step} "
                       f"was committed while it waited behind a persist still writing; "
                       f"persist_every is shorter than one persist takes")
            log.warning("%s", message)
            self.skipped.append(message)
            old_fut.set_result(PersistOutcome(old.step, False, message))
        self._queue.put((task, fut))
        return fut

    def _release(self, task: PersistTask) -> None:
        """Unpin every slot ``task`` still holds (idempotent per task)."""
        with self._lock:
            held, self._held_left[id(task)] = self._held_left.get(id(task), task.held), ()
        for entry, slot, _ in held:
            self._registry.unpin(entry, slot)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop after the request in progress; queued requests fail with 'daemon stopping'."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.IDLE_POLL_S)
            except queue.Empty:
                self._prepare_buffers()
                self._warm_up_writer()
                continue
            if item is None:
                break
            task, fut = item
            with self._lock:
                if self._queued_supersedable.get(task.job, (None,))[0] is task:
                    del self._queued_supersedable[task.job]
                dropped = id(task) in self._dropped
                self._dropped.discard(id(task))
            outcome = None
            try:
                if dropped:
                    pass  # superseded: submit() released it and resolved its Future
                elif self._stop.is_set():
                    outcome = PersistOutcome(task.step, False, "daemon stopping")
                else:
                    with self._lock:
                        self._writing = task
                    outcome = self._persist(task)
            except BaseException as e:  # noqa: BLE001 - the worker must survive anything
                outcome = PersistOutcome(task.step, False, f"internal error: {e!r}")
                log.exception("persist of %s step %d", task.job, task.step)
            finally:
                if not dropped:
                    self._release(task)
                with self._lock:
                    self._writing = None
                    self._progress.pop(task.job, None)
                    self._held_left.pop(id(task), None)
                    self._pending[task.job] -= 1
                    if self._pending[task.job] <= 0:
                        del self._pending[task.job]
            if outcome is not None and not fut.done():
                fut.set_result(outcome)
        # Drain: nobody waits forever on a request the worker will never run.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and id(item[0]) not in self._dropped:
                self._release(item[0])
                item[1].set_result(PersistOutcome(item[0].step, False, "daemon stopping"))

    def _persist(self, task: PersistTask) -> PersistOutcome:
        self._drop_unused_buffers()
        entries: list[SegmentEntry] = []
        try:
            found = [self._registry.find_step(task.job, r, task.step) for r in task.ranks]
        except Exception as e:  # noqa: BLE001 - StepNotFoundError and friends
            return self._fail(task, [], f"persist of job {task.job!r} step {task.step}: {e}")
        held = {entry.rank: (entry, slot, info) for entry, slot, info in task.held}
        found = [held.get(f[0].rank, f) for f in found]
        entries = [f[0] for f in found]
        config = entries[0].config
        if not config.persist_dir:
            return self._fail(task, entries, f"job {task.job!r} has no persist_dir; Register "
                                             f"with persist_dir to persist")
        # Already written: the newest persisted step of every rank here (its step dir may
        # still wait for other nodes' ranks), or a complete step dir. An older step than
        # the newest persisted one is written again unless it is on disk.
        if all(e.last_persisted_step == task.step for e in entries) \
                or task.step in complete_disk_steps(config.persist_dir):
            return PersistOutcome(task.step, True, "")
        t0 = time.monotonic()
        try:
            payloads = {}
            for entry, slot, info in found:
                # Pinned (since Commit, or now) only until the memcpy into a private buffer
                # is done: the trainer can write both slots again while compression and
                # disk writes run.
                if entry.rank in held:
                    view = self._stage(task.job, entry.rank, entry.segment.slot_address(slot),
                                       info["payload_bytes"])
                else:
                    with self._registry.read_pinned(entry, slot, task.step, info["seq"]):
                        view = self._stage(task.job, entry.rank,
                                           entry.segment.slot_address(slot),
                                           info["payload_bytes"])
                payloads[entry.rank] = (view, info["payload_crc"])
            self._release(task)
            t_staged = time.monotonic()
            total = sum(len(v) for v, _ in payloads.values())
            self._report(task.job, task.step, 0, total)
            write_step(config.persist_dir, task.step, config.world_size, payloads, config.keep,
                       progress=lambda done, _t: self._report(task.job, task.step, done, total))
        except Exception as e:  # noqa: BLE001 - full disk, bad dir, overwritten slot
            return self._fail(task, entries, f"persist of job {task.job!r} step {task.step} "
                                             f"to {config.persist_dir} failed: "
                                             f"{type(e).__name__}: {e}")
        for entry in entries:
            entry.last_persisted_step = max(entry.last_persisted_step, task.step)
            self._registry.save_sidecar(entry)
        if len(payloads) == config.world_size and config.keep > 0 \
                and task.step not in complete_disk_steps(config.persist_dir):
            return self._fail(task, entries, f"persist of job {task.job!r} step {task.step} "
                                             f"was written and then removed by retention: "
                                             f"keep={config.keep} keeps the newest steps, "
                                             f"which are all later than {task.step}")
        t1 = time.monotonic()
        log.info("persisted job %s step %d ranks %s in %.3f s (staging %.3f s, writing %.3f s)",
                 task.job, task.step, list(task.ranks), t1 - t0, t_staged - t0, t1 - t_staged)
        return PersistOutcome(task.step, True, "")

    def _stage(self, job: str, rank: int, addr: int, nbytes: int) -> memoryview:
        """Copy ``nbytes`` at ``addr`` into this rank's reusable private buffer (native, GIL
        released) and return the copy.

        The copy is placed so that its tensor data starts on a page boundary: the writer
        then hands raw chunks to O_DIRECT without copying them again.
        """
        pad = 0
        if nbytes >= _DATA_OFFSET_AT + 8:
            data_offset = int.from_bytes(ctypes.string_at(addr + _DATA_OFFSET_AT, 8), "little")
            if data_offset <= nbytes:  # else read_payload reports the bad header
                pad = -data_offset % _PAGE_BYTES
        buf = self._buffer(job, rank, nbytes + pad)
        view = memoryview(buf)[pad:pad + nbytes]
        if nbytes:
            dst = ctypes.addressof(ctypes.c_char.from_buffer(buf)) + pad
            self._engine.submit([(addr, dst, nbytes)], 64 << 20, 0).wait(None)
        return view

    def _buffer(self, job: str, rank: int, nbytes: int) -> "mmap.mmap":
        """This rank's staging buffer of at least ``nbytes``, its pages already faulted in.

        Faulting 1 GiB of fresh anonymous memory on first touch costs ~0.5-1 s here, so
        buffers are made once per (job, rank) and kept, and made ahead, while idle
        (``_prepare_buffers``), for segments that have a persist_dir.
        """
        buf = self._buffers.get((job, rank))
        if buf is None or len(buf) < nbytes:
            if buf is not None:
                del self._buffers[(job, rank)]
                buf.close()
            size = -(-max(nbytes, 1) // _PAGE_BYTES) * _PAGE_BYTES
            buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
            self._buffers[(job, rank)] = buf
        return buf

    def _prepare_buffers(self) -> None:
        """While idle: free buffers of released segments; make one missing buffer for a
        segment that will be persisted (persist_dir set), sized for a full slot."""
        try:
            self._drop_unused_buffers()
            for e in self._registry.entries():
                if e.released or not e.config.persist_dir:
                    continue
                need = e.slot_bytes + _PAGE_BYTES  # room for the alignment pad of _stage
                buf = self._buffers.get((e.job, e.rank))
                if buf is None or len(buf) < need:
                    self._buffer(e.job, e.rank, need)
                    return  # one per idle tick: a request never waits long behind this
        except Exception:  # noqa: BLE001 - only an optimisation; persist allocates if needed
            log.exception("preparing staging buffers")

    def _warm_up_writer(self) -> None:
        """While idle, once a segment will be persisted: load ``ckpt.format`` (pyarrow,
        zstandard) and run its Parquet writer and zstd once on nothing, so the first persist
        of the daemon does not pay for them. bench/persist_daemon.py, 1.13 GiB, 2-core VM:
        the first persist wrote in 0.55 s and the later ones in 0.31-0.36 s; warmed, the
        first takes 0.42-0.45 s (the rest of that gap is not explained yet)."""
        if self._warmed or not any(e.config.persist_dir and not e.released
                                   for e in self._registry.entries()):
            return
        self._warmed = True
        try:
            from ckpt.format.metadata import build_table_bytes
            from ckpt.format.writer import warm_up_encoder

            build_table_bytes([], None, {})
            warm_up_encoder()
        except Exception:  # noqa: BLE001 - only an optimisation; the persist imports them too
            log.exception("warming up the persist writer")

    def _drop_unused_buffers(self) -> None:
        """Free the staging buffers of segments the daemon no longer holds (released jobs)."""
        held = {(e.job, e.rank) for e in self._registry.entries()}
        for key in [k for k in self._buffers if k not in held]:
            self._buffers.pop(key).close()

    def _fail(self, task: PersistTask, entries: list[SegmentEntry], message: str
              ) -> PersistOutcome:
        log.error("%s", message)
        self.failures.append(message)
        for entry in entries:
            entry.errors.append(message)
        return PersistOutcome(task.step, False, message)
