"""The committer thread: finishes one staged snapshot at a time.

For each snapshot handed over by the training thread it waits for the copy,
checksums GPU-copied chunks, seals the slot, unlocks it and tells the daemon.
It never runs a collective. An exception is recorded and re-raised by the next
``raise_error()`` (called from ``Checkpointer.step``/``wait``/``close``).
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
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
