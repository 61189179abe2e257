"""The committer thread finishes one staged snapshot at a time; the notifier thread
tells the daemon about it.

For each snapshot handed over by the training thread the committer waits for the
copy, checksums GPU-copied chunks, seals the slot and unlocks it; ``on_commit``
(called there) hands the record to a ``CommitNotifier``, whose thread sends the
Commit RPC. So the next snapshot waits for the seal only, never for the daemon:
a daemon that is dead, hung or being reconnected to (seconds) delays nothing but
its own notifications. Neither thread runs a collective. A committer exception
is recorded and re-raised by the next ``raise_error()`` (called from
``Checkpointer.step``/``wait``/``close``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ckpt.errors import CkptError

log = logging.getLogger("ckpt.hook")


@dataclass(frozen=True)
class CommitRecord:
    step: int
    slot: int
    seq: int
    copy_s: float  # from the start of the copy until its bytes were in the slot
    commit_s: float  # from the start of the copy until sealed
    segment: str = ""  # name of the segment the slot is in


class Committer:
    """One background thread; ``submit`` hands over a snapshot, ``wait_idle`` waits for it."""

    def __init__(self, finish: Callable[[Any], int], on_commit: Callable[[CommitRecord], None],
                 timeout_s: float) -> None:
        self._finish = finish
        self._on_commit = on_commit
        self._timeout_s = timeout_s
        self._cond = threading.Condition()
        self._pending: Any = None
        self._busy = False
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ckpt-committer", daemon=True)
        self._thread.start()

    def submit(self, pending: Any) -> None:
        with self._cond:
            if self._closed:
                raise CkptError("the Checkpointer is closed")
            assert self._pending is None and not self._busy, "one snapshot at a time"
            self._pending = pending
            self._busy = True
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """True when no snapshot is in flight (re-raises a recorded error)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        self.raise_error()
        return True

    def raise_error(self) -> None:
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise CkptError(f"the snapshot committer failed: {error}") from error

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None and self._closed:
                    return
                pending = self._pending
            try:
                seq = self._finish(pending)
                now = time.perf_counter()
                copy_s = (pending.copy_done_s or now) - pending.started_s
                self._on_commit(CommitRecord(pending.step, pending.slot, seq, copy_s,
                                             now - pending.started_s))
            except BaseException as exc:  # recorded, re-raised on the training thread
                log.error("ckpt: committing step %s failed: %s", pending.step, exc)
                with self._cond:
                    self._error = exc
            finally:
                with self._cond:
                    self._pending = None
                    self._busy = False
                    self._cond.notify_all()

    def close(self, timeout_s: float) -> None:
        """Stop the thread once it has finished what it holds. Waits past ``timeout_s``
        (with a warning) while a copy still writes into the slot: the caller unmaps the
        segment next, and a copy always ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            step = self._pending.step if self._pending is not None else None
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("ckpt: the snapshot of step %s is still being finished after %g s; "
                        "waiting for its copy to end before the segment is closed", step,
                        timeout_s)
            self._thread.join()


class CommitNotifier:
    """One background thread that sends ``send(record)`` for sealed snapshots.

    ``post`` never blocks. A record not sent yet is replaced by a newer one (the daemon
    only needs the newest sealed slot), except a record of a step for which
    ``keep(step)`` is true (a persist step: the daemon schedules its persist at that
    Commit); at most ``MAX_KEPT`` of those wait, oldest dropped first. Records are sent
    in the order posted. ``send`` must not raise for daemon trouble (``DaemonLink.commit``
    does not); anything it raises is logged.
    """

    MAX_KEPT = 2  # as many persist steps as the two slots can hold pinned

    def __init__(self, send: Callable[[CommitRecord], None],
                 keep: Callable[[int], bool] = lambda step: False) -> None:
        self._send = send
        self._keep = keep
        self._cond = threading.Condition()
        self._queue: list[CommitRecord] = []
        self._sending = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ckpt-commit-notifier",
                                        daemon=True)
        self._thread.start()

    def post(self, record: CommitRecord) -> None:
        with self._cond:
            if self._closed:
                return
            queue = [r for r in self._queue if self._keep(r.step)]
            if len(queue) > self.MAX_KEPT - (1 if self._keep(record.step) else 0):
                log.info("ckpt: the daemon is slow to take Commits; the one of step %d is "
                         "not sent (a newer snapshot replaces it)", queue[0].step)
                queue.pop(0)
            queue.append(record)
            self._queue = queue
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """True once every posted record has been sent (waits at most ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._sending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                record = self._queue.pop(0)
                self._sending = True
            try:
                self._send(record)
            except BaseException as exc:  # the record is lost; the next one may get through
                log.warning("ckpt: telling the daemon about step %d failed: %s", record.step, exc)
            finally:
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()

    def close(self, timeout_s: float) -> bool:
        """Send what is posted (waiting at most ``timeout_s``), then stop; True when all
        was sent. A thread stuck in a call to a hung daemon is left behind (it is a
        daemon thread, and the RPC has its own deadline)."""
        flushed = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        if flushed:
            self._thread.join(timeout_s)
        return flushed
