"""The trainer's link to the node daemon, tolerant of the daemon's death.

Training never waits for, nor fails because of, the daemon: a failed call is
logged once (a warning), later calls return at once until ``retry_s`` has
passed, and then the link reconnects (starting a daemon when allowed) and
re-registers, so snapshots reach the daemon again. The segment outlives both
processes, so snapshots sealed while the daemon was away are not lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ckpt.config import CheckpointerConfig
from ckpt.errors import CkptError, DaemonUnavailableError

log = logging.getLogger("ckpt.hook")

# The daemon creates and pre-faults a new segment (2 slots) inside Register. Measured on the
# 2-core CI VM: 2.7 GB in 8.7 s (0.31 GB/s, first touch of guest memory); the deadline
# assumes half that speed, so a big state is not mistaken for a dead daemon (which would
# make the trainer create a second segment of the same size).
SEGMENT_CREATE_BYTES_PER_S = 150e6


def register_timeout_s(daemon_timeout_s: float, slot_bytes: int) -> float:
    """Deadline of a Register that may create a segment of two ``slot_bytes`` slots."""
    return daemon_timeout_s + 2 * slot_bytes / SEGMENT_CREATE_BYTES_PER_S


def local_world_size(world_size: int) -> int:
    """How many ranks of a job of ``world_size`` run on this node, for Register: torchrun's
    ``LOCAL_WORLD_SIZE`` when the job is torchrun's whole world, 1 for one process, else 0
    (not known: the daemon then persists what the ranks registered so far hold)."""
    if world_size == 1:
        return 1
    try:
        if int(os.environ.get("WORLD_SIZE", "0")) == world_size:
            local = int(os.environ["LOCAL_WORLD_SIZE"])
            return local if 0 < local <= world_size else 0
    except (KeyError, ValueError):
        pass
    return 0


@dataclass(frozen=True)
class SegmentGrant:
    """Which segment to write, as the daemon (or the fallback) decided."""

    name: str
    slot_bytes: int
    from_daemon: bool


class DaemonLink:
    """Register / Commit / Persist against the daemon; thread-safe."""

    def __init__(self, cfg: CheckpointerConfig, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self._client: Any = None
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._warned = False
        self._ever_connected = False
        self._slot_bytes = 0  # what we registered last (re-registered after a reconnect)
        self.errors = 0

    # -- connection -------------------------------------------------------------------------

    def _connect(self, force: bool = False) -> Any:
        """The client; a failed daemon is retried after ``daemon_retry_s`` (at once if
        ``force``), and started again when ``start_daemon`` allows."""
        if self._client is not None:
            return self._client
        if not force and self._down_since is not None \
                and time.monotonic() - self._down_since < self.cfg.daemon_retry_s:
            raise DaemonUnavailableError("the ckpt daemon was unreachable moments ago")
        try:
            if self.cfg.start_daemon:
                from ckpt.daemon.spawn import ensure_daemon

                self._client = ensure_daemon(self.cfg.daemon_socket,
                                             timeout_s=max(self.cfg.daemon_timeout_s, 10.0),
                                             client_timeout_s=self.cfg.daemon_timeout_s)
            else:
                from ckpt.control.client import DaemonClient
                from ckpt.control.paths import default_socket_path

                client = DaemonClient(self.cfg.daemon_socket or default_socket_path(),
                                      timeout_s=self.cfg.daemon_timeout_s)
                if not client.ping(timeout_s=min(1.0, self.cfg.daemon_timeout_s)):
                    client.close()
                    raise DaemonUnavailableError(
                        f"no ckpt daemon answers on {client.address} and start_daemon=False")
                self._client = client
        except CkptError as exc:
            self._mark_down(exc)
            raise
        if self._down_since is not None:
            log.info("ckpt daemon is back; snapshots reach it again")
        self._down_since = None
        self._ever_connected = True
        return self._client

    def _mark_down(self, exc: BaseException) -> None:
        self.errors += 1
        self._down_since = time.monotonic()
        if self._client is not None:
            self._client.close()
            self._client = None
        if not self._warned and (self.cfg.start_daemon or self._ever_connected):
            self._warned = True  # once per Checkpointer: a flapping daemon must not flood logs
            log.warning("ckpt: the snapshot daemon is unavailable (%s); training goes on and "
                        "snapshots stay in shared memory; retrying every %g s", exc,
                        self.cfg.daemon_retry_s)
        else:
            log.debug("ckpt daemon call failed: %s", exc)

    @property
    def connected(self) -> bool:
        return self._client is not None

    # -- RPCs ---------------------------------------------------------------------------------

    def _register_locked(self, slot_bytes: int) -> SegmentGrant:
        client = self._connect()
        try:
            reg = client.register(self.cfg.job, self.rank, self.world_size, os.getpid(), slot_bytes,
                                  persist_dir=str(self.cfg.dir.absolute()),
                                  persist_every=self.cfg.persist_every, keep=self.cfg.keep,
                                  chunk_bytes=self.cfg.chunk_bytes,
                                  local_world_size=local_world_size(self.world_size),
                                  timeout_s=register_timeout_s(self.cfg.daemon_timeout_s,
                                                               slot_bytes))
        except DaemonUnavailableError as exc:
            self._mark_down(exc)
            raise
        self._slot_bytes = slot_bytes
        return SegmentGrant(reg.segment_name, reg.slot_bytes, True)

    def register(self, slot_bytes: int) -> SegmentGrant:
        """A segment with slots of at least ``slot_bytes`` from the daemon.

        Raises DaemonUnavailableError when no daemon can be reached (the caller
        then manages a segment itself, see ``ckpt.hook.segments``).
        """
        with self._lock:
            return self._register_locked(slot_bytes)

    def commit(self, slot: int, step: int, seq: int,
               stale: Callable[[], bool] = lambda: False) -> str | None:
        """Tell the daemon about a sealed slot. Never raises for daemon trouble.

        Returns the segment name the daemon now wants us to write when a reconnect
        re-registered us into another segment, else None. ``stale()``: whether the slot
        has been overwritten since; a refusal is then expected (the daemon checks the
        slot header) and the link stays up.
        """
        with self._lock:
            reconnected = self._client is None
            try:
                client = self._connect()
                grant = None
                if reconnected and self._slot_bytes:
                    grant = self._register_locked(self._slot_bytes)
                client.commit(self.cfg.job, self.rank, slot, step, seq)
                return grant.name if grant is not None else None
            except DaemonUnavailableError as exc:
                if self._client is not None:
                    self._mark_down(exc)
                return None
            except CkptError as exc:
                if self._client is not None and stale():
                    log.debug("ckpt: the daemon refused the Commit of step %d, whose slot was "
                              "overwritten while it was on its way: %s", step, exc)
                    return None
                # The daemon answered but refused (e.g. it does not know this segment after
                # a restart): register again next time.
                self._mark_down(exc)
                return None

    def persist(self, step: int, timeout_s: float,
                progress: Callable[[int, int], None] | None = None) -> tuple[bool, str]:
        """Ask the daemon to persist this rank's ``step`` and wait; (done, error text).
        ``progress(done_bytes, total_bytes)`` is called while the daemon writes."""
        with self._lock:
            try:
                client = self._connect(force=True)  # the final persist is worth a retry
                out = client.persist(self.cfg.job, rank=self.rank, step=step, wait=True,
                                     timeout_s=timeout_s, progress=progress)
            except CkptError as exc:
                return False, str(exc)
            return out.done and not out.error, out.error

    def latest(self) -> Any | None:
        with self._lock:
            try:
                return self._connect().latest(self.cfg.job, self.rank)
            except CkptError:
                return None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
