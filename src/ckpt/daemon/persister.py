"""Background persistence of sealed slots to disk, through ``ckpt.format``.

One worker thread takes requests ``(job, step, ranks)`` from a queue. For each it pins the
slots holding ``step`` of every requested rank (read lock, seq re-checked), hands the payload
views to ``ckpt.format`` (one step dir for the ranks of the job on this node; the
multi-writer path when the job has ranks elsewhere), then unpins. A failure (full disk, bad
dir, a slot overwritten before it could be read) is recorded on the segments, logged, and
returned to whoever waits; it never stops the worker or the daemon.

Contract: ``submit`` never blocks; the returned Future resolves to a PersistOutcome.
``close(timeout_s)`` stops the worker after the request in progress.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ckpt.control.client import PersistOutcome
from ckpt.daemon.registry import SegmentEntry, SegmentRegistry

log = logging.getLogger("ckpt.daemon")

_STEP_DIR_RE = re.compile(r"^step-(\d+)$")


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
    job: str
    step: int
    ranks: tuple[int, ...]


def write_step(persist_dir: str, step: int, world_size: int,
               payloads: dict[int, tuple[memoryview, int]], keep: int) -> None:
    """Write ``payloads`` ({rank: (view, payload_crc)}) of ``step`` with ckpt.format (§4).

    All ranks here: one ``persist_payloads`` call. Some ranks on other nodes: write ours
    into the shared staging dir; whichever writer completes the set commits the step.
    """
    from ckpt import format as fmt  # lazy: the daemon starts without pyarrow/zstd loaded

    keep_k = keep if keep > 0 else None
    if len(payloads) == world_size:
        fmt.persist_payloads(persist_dir, step, world_size,
                             {r: v for r, (v, _) in payloads.items()}, keep=keep_k)
        return
    from ckpt.storage.fs import FsStorage

    staging = FsStorage(persist_dir).begin_step(step)
    for rank, (view, crc) in sorted(payloads.items()):
        fmt.write_rank(staging, rank, world_size, view, expected_crc=crc)
    fmt.finish_if_complete(staging, world_size, keep=keep_k)


class SlotPersister:
    """The daemon's persist queue and its worker thread."""

    def __init__(self, registry: SegmentRegistry) -> None:
        self._registry = registry
        self._queue: queue.Queue = queue.Queue()
        self._pending: collections.Counter = collections.Counter()  # job -> queued tasks
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failures: collections.deque = collections.deque(maxlen=20)
        self._thread = threading.Thread(target=self._run, name="ckpt-persister", daemon=True)
        self._thread.start()

    def queued(self, job: str) -> int:
        with self._lock:
            return self._pending[job]

    def submit(self, task: PersistTask) -> Future:
        fut: Future = Future()
        with self._lock:
            self._pending[task.job] += 1
        self._queue.put((task, fut))
        return fut

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop after the request in progress; queued requests fail with 'daemon stopping'."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            task, fut = item
            try:
                if self._stop.is_set():
                    outcome = PersistOutcome(task.step, False, "daemon stopping")
                else:
                    outcome = self._persist(task)
            except BaseException as e:  # noqa: BLE001 - the worker must survive anything
                outcome = PersistOutcome(task.step, False, f"internal error: {e!r}")
                log.exception("persist of %s step %d", task.job, task.step)
            finally:
                with self._lock:
                    self._pending[task.job] -= 1
                    if self._pending[task.job] <= 0:
                        del self._pending[task.job]
            fut.set_result(outcome)
        # Drain: nobody waits forever on a request the worker will never run.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].set_result(PersistOutcome(item[0].step, False, "daemon stopping"))

    def _persist(self, task: PersistTask) -> PersistOutcome:
        entries: list[SegmentEntry] = []
        try:
            found = [self._registry.find_step(task.job, r, task.step) for r in task.ranks]
        except Exception as e:  # noqa: BLE001 - StepNotFoundError and friends
            return self._fail(task, [], f"persist of job {task.job!r} step {task.step}: {e}")
        entries = [f[0] for f in found]
        if all(e.last_persisted_step >= task.step for e in entries):
            return PersistOutcome(task.step, True, "")
        config = entries[0].config
        if not config.persist_dir:
            return self._fail(task, entries, f"job {task.job!r} has no persist_dir; Register "
                                             f"with persist_dir to persist")
        t0 = time.monotonic()
        try:
            with contextlib.ExitStack() as stack:
                payloads = {}
                for entry, slot, info in found:
                    stack.enter_context(self._registry.read_pinned(entry, slot, task.step,
                                                                   info["seq"]))
                    view = entry.segment.slot_view(slot)
                    payloads[entry.rank] = (view[:info["payload_bytes"]], info["payload_crc"])
                try:
                    write_step(config.persist_dir, task.step, config.world_size, payloads,
                               config.keep)
                finally:
                    for v, _ in payloads.values():
                        v.release()
        except Exception as e:  # noqa: BLE001 - full disk, bad dir, overwritten slot
            return self._fail(task, entries, f"persist of job {task.job!r} step {task.step} "
                                             f"to {config.persist_dir} failed: "
                                             f"{type(e).__name__}: {e}")
        for entry in entries:
            entry.last_persisted_step = max(entry.last_persisted_step, task.step)
            self._registry.save_sidecar(entry)
        log.info("persisted job %s step %d ranks %s in %.3f s", task.job, task.step,
                 list(task.ranks), time.monotonic() - t0)
        return PersistOutcome(task.step, True, "")

    def _fail(self, task: PersistTask, entries: list[SegmentEntry], message: str
              ) -> PersistOutcome:
        log.error("%s", message)
        self.failures.append(message)
        for entry in entries:
            entry.errors.append(message)
        return PersistOutcome(task.step, False, message)
