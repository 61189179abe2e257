"""The daemon's watcher: notices dead trainers and acts only on explicit rules.

Every ``interval_s`` it walks the segments and, for each:

- records whether the owner (the pid that last registered it) is alive (psutil);
- breaks a slot lock whose holder pid is dead (INTERNALS §2: whoever checked the pid is
  dead may break it) — a trainer killed while writing must not block the next one;
- picks up commits the daemon was not told about (the trainer seals slots itself, so it
  keeps committing while the daemon is down or a Commit RPC is lost);
- asks the core to drop superseded generations and released, persisted segments;
- reclaims an *orphaned* segment only when ``reclaim_orphans_after_s`` is set AND its
  owner has been dead that long AND its newest commit is persisted. Never by default:
  a restore may still need it.

The thread records its exception and keeps running; ``close()`` is idempotent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from ckpt.procs import pid_alive

if TYPE_CHECKING:  # pragma: no cover
    from ckpt.daemon.service import DaemonCore


log = logging.getLogger("ckpt.daemon")


class TrainerWatch:
    """Background thread running :meth:`tick` every ``interval_s``."""

    def __init__(self, core: "DaemonCore", reclaim_orphans_after_s: float | None,
                 interval_s: float = 1.0) -> None:
        self._core = core
        self._reclaim_after_s = reclaim_orphans_after_s
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._pid = os.getpid()
        self.last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ckpt-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - record, report in Status, keep watching
                self.last_error = e
                log.exception("watch tick failed")

    def tick(self) -> None:
        """One pass over every segment (also called once at start-up)."""
        now = time.monotonic()
        core = self._core
        for entry in core.registry.entries():
            seg = entry.segment
            alive = pid_alive(entry.owner_pid)
            if alive:
                entry.owner_dead_since_s = None
            elif entry.owner_dead_since_s is None:
                entry.owner_dead_since_s = now
                log.info("trainer pid %d of %s is not running", entry.owner_pid, entry.name)
            self._break_dead_locks(entry)
            c = seg.committed()
            if c is not None and (entry.last_commit is None or c[2] > entry.last_commit[2]):
                core.on_commit(entry, int(c[0]), int(c[1]), int(c[2]))
            if self._is_reclaimable(entry, now):
                core.reclaim(entry, f"owner pid {entry.owner_pid} dead for more than "
                                    f"{self._reclaim_after_s} s and newest commit persisted",
                             self._reclaim_after_s, now)
        core.drop_superseded_and_released()

    def _break_dead_locks(self, entry) -> None:
        for slot in (0, 1):
            owner = entry.segment.lock_owner(slot)
            if owner is None:
                continue
            mode, pid = owner
            if pid == self._pid or pid_alive(pid):
                continue
            if not entry.segment.break_lock(slot, pid):
                continue  # someone broke it first and a live process holds it now
            message = (f"broke the {mode} lock of slot {slot} of {entry.name} held by dead "
                       f"pid {pid}")
            log.warning("%s", message)
            entry.errors.append(message)

    def _is_reclaimable(self, entry, now: float) -> bool:
        if self._reclaim_after_s is None or entry.owner_dead_since_s is None:
            return False
        if now - entry.owner_dead_since_s < self._reclaim_after_s:
            return False
        newest = entry.newest_commit_step()
        return newest is None or entry.last_persisted_step >= newest
