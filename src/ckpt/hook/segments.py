"""Getting a segment to write snapshots into: from the daemon, else by name.

The daemon creates segments (so they outlive the trainer); ``SegmentRequest`` does
it off the training thread. When no daemon can
be reached the trainer opens the newest generation of its (job, rank) segment
by its deterministic name (INTERNALS §2), or creates the next generation
itself; a daemon started later adopts it by scanning /dev/shm.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ckpt.control.paths import segment_name
from ckpt.errors import CkptError, SegmentError
from ckpt.hook.daemon_link import DaemonLink
from ckpt.recovery.sources import break_dead_lock, segment_names

log = logging.getLogger("ckpt.hook")


def _open(name: str) -> Any:
    from ckpt import _C

    seg = _C.Segment.open(name)
    for slot in (0, 1):
        if break_dead_lock(seg, slot):  # a trainer killed mid-copy left its write lock
            log.warning("ckpt: broke the lock of slot %d of %s held by a dead process", slot, name)
    return seg


def acquire_segment(link: DaemonLink, job: str, rank: int, slot_bytes: int) -> tuple[Any, bool]:
    """(an open ``_C.Segment`` of (job, rank) whose slots hold ``slot_bytes``, whether the
    daemon granted it). One not granted was opened or created by name: no daemon manages
    it, so the trainer unlinks it once a newer generation supersedes it."""
    try:
        grant = link.register(slot_bytes)
        seg = _open(grant.name)
        if seg.slot_bytes < slot_bytes:
            seg.close()
            raise SegmentError(f"the daemon granted {grant.name} with {grant.slot_bytes}-byte "
                               f"slots, {slot_bytes} were asked for")
        return seg, True
    except SegmentError:
        raise
    except CkptError as exc:
        log.warning("ckpt: no daemon (%s); using the segment of job %s rank %d directly",
                    exc, job, rank)
    from ckpt import _C

    existing = segment_names(job, rank)
    if existing:
        generation, name = existing[0]
        try:
            seg = _open(name)
            if seg.slot_bytes >= slot_bytes:
                return seg, False
            seg.close()
        except Exception as exc:  # damaged: leave it for inspection, write a new generation
            log.warning("ckpt: cannot open %s (%s); creating a new generation", name, exc)
        generation += 1
    else:
        generation = 0
    slot_bytes = -(-slot_bytes // 4096) * 4096
    return _C.Segment.create(segment_name(job, rank, generation), slot_bytes), False


class OwnGenerations:
    """Segment generations of ours that no daemon manages (``acquire_segment`` opened or
    created them by name) and that a newer generation replaced: unlinked once the newer
    one holds a sealed snapshot, since they hold only older steps. Thread-safe: the
    training thread adds, the committer thread unlinks."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._lock = threading.Lock()

    def replaced(self, name: str) -> None:
        with self._lock:
            self._names.append(name)

    def forget(self) -> None:
        """A daemon (started since) grants segments now: it may have adopted them."""
        with self._lock:
            self._names.clear()

    def unlink_all_but(self, current: str) -> None:
        from ckpt import _C

        with self._lock:
            names, self._names = self._names, []
        for name in names:
            if name != current:
                _C.Segment.unlink(name)
                log.info("ckpt: unlinked %s: %s holds newer snapshots", name, current)


class SegmentRequest:
    """``acquire_segment`` on a thread of its own: creating a big segment takes seconds
    (the daemon reserves and pre-faults both slots), and training must not wait for it.
    With ``page_lock`` (CUDA state) the segment is also page-locked there, which takes
    about as long again; ``page_locked`` is then whether that worked (None: not asked).
    ``from_daemon``: whether the daemon granted the segment (see ``acquire_segment``)."""

    def __init__(self, link: DaemonLink, job: str, rank: int, slot_bytes: int,
                 page_lock: bool = False) -> None:
        self.slot_bytes = slot_bytes
        self.page_locked: bool | None = None
        self.from_daemon = False
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._segment: Any = None
        self._error: BaseException | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._run,
                                        args=(link, job, rank, slot_bytes, page_lock),
                                        name=f"ckpt-segment-r{rank}", daemon=True)
        self._thread.start()

    def _run(self, link: DaemonLink, job: str, rank: int, slot_bytes: int, lock: bool) -> None:
        from ckpt.snapshot.stager import page_lock

        seg = None
        try:
            seg, self.from_daemon = acquire_segment(link, job, rank, slot_bytes)
            if lock:
                self.page_locked = page_lock(seg)
        except BaseException as exc:  # handed to the training thread by result()
            if seg is not None:
                seg.close()
            seg, self._error = None, exc
        with self._lock:
            self._segment = seg
            if self._abandoned and seg is not None:
                self._discard()
        self._done.set()

    def _discard(self) -> None:
        """Unlock (if locked) and close the segment nobody will take; under ``_lock``."""
        from ckpt.snapshot.stager import page_unlock

        if self.page_locked:
            page_unlock(self._segment)
        self._segment.close()
        self._segment = None

    def wait(self, timeout_s: float | None) -> bool:
        """True once the request has ended (with a segment or an error)."""
        return self._done.wait(timeout_s)

    @property
    def error(self) -> BaseException | None:
        """Why the request failed, once it has."""
        return self._error

    def result(self, timeout_s: float | None) -> Any:
        """The open segment, or None while it is still being made; re-raises its error."""
        if not self._done.wait(timeout_s):
            return None
        if self._error is not None:
            raise self._error
        return self._segment

    def abandon(self) -> None:
        """Nobody will take the segment: close it now or when it arrives."""
        with self._lock:
            self._abandoned = True
            if self._segment is not None:
                self._discard()
