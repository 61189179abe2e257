"""``DaemonCore``: the daemon's decisions, behind the gRPC servicer.

Holds the segment registry, the persister and the watcher, and implements each RPC as a
method with plain Python arguments and results (``ckpt.control.servicer`` only converts
messages). Errors are ckpt errors; the servicer maps them to gRPC status codes.

Persistence rule: a commit of step ``s`` with ``s % persist_every == 0`` marks ``s``
pending for its job; it is queued once every rank of the job registered here has sealed
``s`` (so the ranks of one job on this node go into one step dir). Step numbers, not
commit counts, decide, so daemons on different nodes pick the same steps. Several steps
may be pending at once (a fast rank may commit ``s + persist_every`` before a slow one
seals ``s``); each is queued when complete, oldest first, and one that a rank has moved
past without sealing it (its slot was overwritten, or the snapshot skipped) is dropped
with an error in Status, since no local copy of that rank's ``s`` is left.

Thread-safety: every method may be called from any gRPC worker thread.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Iterator

import ckpt
from ckpt.control.client import PersistOutcome
from ckpt.daemon.persister import PersistTask, SlotPersister, complete_disk_steps
from ckpt.daemon.registry import JobConfig, SegmentEntry, SegmentRegistry, is_sealed
from ckpt.daemon.watch import TrainerWatch
from ckpt.procs import pid_alive
from ckpt.errors import ConfigError, SegmentError, StepNotFoundError

log = logging.getLogger("ckpt.daemon")

FETCH_CHUNK_BYTES = 1 << 20
DEFAULT_PERSIST_WAIT_S = 300.0


class DaemonCore:
    """Segments, commits, persistence and reclaim of one node's daemon."""

    def __init__(self, state_dir: Path, socket_path: str = "",
                 reclaim_orphans_after_s: float | None = None,
                 watch_interval_s: float = 1.0) -> None:
        if reclaim_orphans_after_s is not None and reclaim_orphans_after_s < 0:
            raise ConfigError(f"--reclaim-orphans-after-s must be >= 0, got "
                              f"{reclaim_orphans_after_s}")
        self.socket_path = socket_path
        self.registry = SegmentRegistry(state_dir)
        self.persister = SlotPersister(self.registry)
        self.watch = TrainerWatch(self, reclaim_orphans_after_s, watch_interval_s)
        self._lock = threading.RLock()
        self._pending_steps: dict[str, set[int]] = {}  # job -> steps waiting for local ranks
        self._handled_step: dict[str, int] = {}  # job -> newest step queued or dropped
        self._told_unregistered: set[str] = set()  # jobs whose missing ranks were reported
        self._started_s = time.monotonic()
        self.problems: collections.deque = collections.deque(maxlen=20)

    def start(self) -> None:
        """Adopt this uid's segments, run one watch pass, start the watcher."""
        adopted = self.registry.adopt_existing()
        if adopted:
            log.info("adopted %d segment(s)", len(adopted))
        self.watch.tick()
        self.watch.start()

    def close(self) -> None:
        """Stop background work and unmap segments; the segments stay in /dev/shm."""
        self.watch.close()
        self.persister.close()
        self.registry.close_all()

    # -- RPCs -------------------------------------------------------------------------------

    def register(self, job: str, rank: int, world_size: int, pid: int, slot_bytes: int,
                 persist_dir: str, persist_every: int, keep: int,
                 chunk_bytes: int, local_world_size: int = 0) -> tuple[SegmentEntry, bool]:
        if world_size <= 0:
            raise ConfigError(f"world_size must be > 0, got {world_size}")
        if persist_every < 0 or keep < 0:
            raise ConfigError(f"persist_every and keep must be >= 0, got {persist_every}, "
                              f"{keep}")
        if persist_dir:
            persist_dir = str(Path(persist_dir).absolute())
        if not 0 <= local_world_size <= world_size:
            raise ConfigError(f"local_world_size must be in 0..world_size ({world_size}), got "
                              f"{local_world_size}")
        config = JobConfig(world_size=world_size, persist_dir=persist_dir,
                           persist_every=persist_every, keep=keep, chunk_bytes=chunk_bytes,
                           local_world_size=local_world_size)
        entry, existed = self.registry.register(job, rank, pid, slot_bytes, config)
        log.info("register job %s rank %d pid %d -> %s (existed=%s)", job, rank, pid,
                 entry.name, existed)
        return entry, existed

    def commit(self, job: str, rank: int, slot: int, step: int, seq: int) -> bool:
        """Check the trainer's seal of ``slot`` and record it. Returns persist_scheduled."""
        if slot not in (0, 1):
            raise ConfigError(f"slot must be 0 or 1, got {slot}")
        entry = self.registry.current(job, rank)
        info = entry.segment.slot_info(slot)
        if not is_sealed(info) or info["step"] != step or info["seq"] != seq:
            raise SegmentError(
                f"Commit of job {job!r} rank {rank} slot {slot} step {step} seq {seq} does "
                f"not match the slot header of {entry.name} (state {info['state']}, step "
                f"{info['step']}, seq {info['seq']}); seal the slot before Commit")
        return self.on_commit(entry, slot, step, seq)

    def on_commit(self, entry: SegmentEntry, slot: int, step: int, seq: int) -> bool:
        """Record a commit (from Commit or the watcher); schedule persistence."""
        with self._lock:
            if entry.last_commit is not None and seq <= entry.last_commit[2]:
                # Already recorded: the watcher may see a seal before its Commit arrives.
                # The Commit gets the answer the first recording got.
                return seq == entry.last_commit[2] and entry.last_commit_scheduled
            entry.last_commit = (slot, step, seq)
            cfg = entry.config
            if (cfg.persist_dir and cfg.persist_every > 0 and step % cfg.persist_every == 0
                    and step > entry.last_persisted_step
                    and step > self._handled_step.get(entry.job, -1)):
                self._pending_steps.setdefault(entry.job, set()).add(step)
            entry.last_commit_scheduled = self._schedule_pending(entry.job)
            return entry.last_commit_scheduled

    def _schedule_pending(self, job: str) -> bool:
        """Queue every pending step of ``job`` that all its local ranks have sealed, oldest
        first; drop the ones a rank has moved past without sealing. True if one was queued."""
        steps = self._pending_steps.get(job)
        if not steps:
            return False
        entries = self.registry.job_entries(job)
        ranks = tuple(e.rank for e in entries)
        expected = max(e.config.local_world_size for e in entries)
        if len(ranks) < expected:
            # A rank of this node has not registered yet: it must be in the step. Said once
            # per job when a second persist step is already waiting (a healthy start has
            # every rank registered well before that), so that a node that never gets all
            # its ranks here is not silent.
            if len(steps) > 1 and job not in self._told_unregistered:
                self._told_unregistered.add(job)
                message = (f"persists of job {job!r} wait until all {expected} ranks of this "
                           f"node (LOCAL_WORLD_SIZE) have registered; {len(ranks)} have "
                           f"({list(ranks)}). Run one daemon per node: ranks that use another "
                           f"daemon are never counted here")
                self._problem(logging.WARNING, message)
            return False
        # Skipping a step when the disk falls behind is safe only when no other node must
        # persist the same step for it to complete.
        all_local = len(ranks) == entries[0].config.world_size
        scheduled = False
        for step in sorted(steps):
            holds = [any(i["step"] == step for _, i in e.sealed_slots()) for e in entries]
            if all(holds):
                steps.discard(step)
                self._handled_step[job] = max(step, self._handled_step.get(job, -1))
                self.persister.submit(PersistTask(job, step, ranks,
                                                  held=self._pin_step(job, step, ranks),
                                                  supersedable=all_local))
                scheduled = True
                continue
            gone = [e.rank for e, has in zip(entries, holds) if not has
                    and e.last_commit is not None and e.last_commit[1] > step]
            if gone:
                steps.discard(step)
                self._handled_step[job] = max(step, self._handled_step.get(job, -1))
                message = (f"persist of job {job!r} step {step} dropped: rank(s) {gone} "
                           f"committed a later step and no longer hold step {step}, so this "
                           f"node cannot write it (the ranks were more than one snapshot "
                           f"apart); a later persist step is written instead")
                self._problem(logging.ERROR, message)
        if not steps:
            del self._pending_steps[job]
        return scheduled

    def _problem(self, level: int, message: str) -> None:
        """Log ``message`` and keep it for Status."""
        log.log(level, "%s", message)
        self.problems.append(message)

    def _pin_step(self, job: str, step: int, ranks: tuple[int, ...]) -> tuple:
        """Pin the slot holding ``step`` of each rank now, so that the trainer's next
        snapshots cannot overwrite it while the persist waits in the queue (the trainer
        writes its other slot, or skips a snapshot if both are pinned).

        Returns (entry, slot, slot_info) per pinned rank. A rank whose slot cannot be
        pinned (the trainer is rewriting it already) is left out: the persister tries it
        again when it gets to the task, and reports a failure if it is gone.
        """
        held = []
        for rank in ranks:
            try:
                entry, slot, info = self.registry.find_step(job, rank, step)
                held.append((entry, slot, self.registry.pin(entry, slot, step, info["seq"])))
            except (SegmentError, StepNotFoundError) as e:
                log.warning("persist of job %s step %d: rank %d not pinned: %s", job, step,
                            rank, e)
        return tuple(held)

    def latest(self, job: str, rank: int) -> tuple[list[tuple[SegmentEntry, int, dict]],
                                                   list[int], str]:
        """(sealed slots newest first, complete disk steps, persist_dir)."""
        gens = self.registry.generations(job, rank)
        slots = [(e, s, i) for e in gens for s, i in e.sealed_slots()]
        slots.sort(key=lambda t: (t[2]["step"], t[0].generation, t[2]["seq"]), reverse=True)
        persist_dir = gens[-1].config.persist_dir
        return slots, complete_disk_steps(persist_dir), persist_dir

    def fetch(self, job: str, rank: int, step: int) -> Iterator[tuple[int, bytes, int, int, int]]:
        """Yield (offset, bytes, total_bytes, payload_crc, seq) chunks of a sealed payload.

        The slot's read lock is held from the first chunk until the stream ends or is
        cancelled (the generator's ``finally``), so the trainer cannot overwrite it mid-way.
        """
        entry, slot, info = self.registry.find_step(job, rank, step)
        with self.registry.read_pinned(entry, slot, step, info["seq"]) as info:
            total = info["payload_bytes"]
            view = entry.segment.slot_view(slot)
            try:
                if total == 0:
                    yield 0, b"", 0, info["payload_crc"], info["seq"]
                for off in range(0, total, FETCH_CHUNK_BYTES):
                    end = min(off + FETCH_CHUNK_BYTES, total)
                    yield off, bytes(view[off:end]), total, info["payload_crc"], info["seq"]
            finally:
                view.release()

    def persist(self, job: str, rank: int | None, step: int, wait: bool,
                timeout_s: float) -> PersistOutcome:
        """Persist ``step`` (-1: newest possible) of ``rank`` (None: every local rank)."""
        entries = self.registry.job_entries(job)
        if not entries:
            raise StepNotFoundError(f"the daemon holds no segment of job {job!r}")
        sealed = {e.rank: {i["step"] for ee in self.registry.generations(job, e.rank)
                           for _, i in ee.sealed_slots()} for e in entries}
        if rank is None:
            common = set.intersection(*sealed.values())
            if step < 0:
                if not common:
                    raise StepNotFoundError(f"job {job!r}: no step is sealed by every rank held "
                                            f"here ({sorted(sealed)})")
                step = max(common)
            elif step not in common:
                raise StepNotFoundError(f"job {job!r}: step {step} is not sealed by every rank "
                                        f"held here")
        else:
            if rank not in sealed:
                raise StepNotFoundError(f"the daemon holds no segment of job {job!r} rank {rank}")
            if step < 0:
                if not sealed[rank]:
                    raise StepNotFoundError(f"job {job!r} rank {rank} has no sealed step")
                step = max(sealed[rank])
            elif step not in sealed[rank]:
                raise StepNotFoundError(f"job {job!r} rank {rank}: step {step} is not sealed")
        ranks = tuple(r for r in sorted(sealed) if step in sealed[r])
        fut = self.persister.submit(PersistTask(job, step, ranks,
                                                held=self._pin_step(job, step, ranks)))
        if not wait:
            return PersistOutcome(step, False, "")
        wait_s = timeout_s if timeout_s > 0 else DEFAULT_PERSIST_WAIT_S
        try:
            return fut.result(timeout=wait_s)
        except FutureTimeout:
            return PersistOutcome(step, False, f"persist of step {step} still running after "
                                               f"{wait_s} s")

    def release(self, job: str) -> tuple[list[str], list[str]]:
        """Mark ``job`` finished; unlink each segment whose newest commit is persisted (or
        that can never be: no persist_dir, no commit), persist and defer the others."""
        with self._lock:
            entries = [e for e in self.registry.entries() if e.job == job]
            if not entries:
                raise StepNotFoundError(f"the daemon holds no segment of job {job!r}")
            unlinked, pending = [], []
            for e in entries:
                e.released = True
                self.registry.save_sidecar(e)
                if self._releasable(e):
                    self.registry.remove(e, unlink=True)
                    unlinked.append(e.name)
                else:
                    pending.append(e.name)
            self._pending_steps.pop(job, None)
            self._handled_step.pop(job, None)
            self._told_unregistered.discard(job)
        if pending:
            try:
                self.persist(job, None, -1, wait=False, timeout_s=0)
            except StepNotFoundError as e:
                self.problems.append(f"release of {job!r}: {e}")
        return unlinked, pending

    @staticmethod
    def _releasable(e: SegmentEntry) -> bool:
        newest = e.newest_commit_step()
        return not e.config.persist_dir or newest is None or e.last_persisted_step >= newest

    # -- watcher hooks ----------------------------------------------------------------------

    def reclaim(self, entry: SegmentEntry, reason: str, dead_for_s: float, now: float) -> None:
        """Unlink an orphaned segment, unless its owner came back (re-registered) or a
        reader holds it since the watcher decided."""
        with self._lock:
            if not self.registry.remove_orphan(entry, dead_for_s, now):
                return
            log.warning("reclaimed orphaned segment %s: %s", entry.name, reason)
            self.problems.append(f"reclaimed {entry.name}: {reason}")

    def drop_superseded_and_released(self) -> None:
        """Unlink old generations once a newer one has a commit, released segments once
        their newest commit is persisted, and the segments of ranks a relaunched job no
        longer has once nothing needs them (``_left_behind``)."""
        with self._lock:
            by_key: dict[tuple[str, int], list[SegmentEntry]] = {}
            for e in self.registry.entries():
                by_key.setdefault((e.job, e.rank), []).append(e)
            for gens in by_key.values():
                gens.sort(key=lambda e: e.generation)
                newest_committed = next((g for g in reversed(gens)
                                         if g.segment.committed() is not None), None)
                for g in gens:
                    if self.registry.has_pins(g):
                        continue
                    if newest_committed is not None and g.generation < newest_committed.generation:
                        self.registry.remove(g, unlink=True)
                    elif g.released and self._releasable(g):
                        self.registry.remove(g, unlink=True)
                    elif self._left_behind(g):
                        log.info("unlinked %s: job %r now runs on %d rank(s), and disk holds "
                                 "step %d or newer", g.name, g.job,
                                 self.registry.registered_world_size(g.job),
                                 g.newest_commit_step())
                        self.registry.remove(g, unlink=True)

    def _left_behind(self, e: SegmentEntry) -> bool:
        """A segment of a rank at or above the world size of its job's newest Register (a
        job relaunched on fewer ranks; a restore has read it, by box, before that
        Register), once disk holds a step at least as new as its newest commit: its own
        persisted one, or one the job persisted since. A restore then loads that newer
        step; it would need these slots only if that step were damaged too."""
        world = self.registry.registered_world_size(e.job)
        if world is None or e.rank < world:
            return False
        newest = e.newest_commit_step()
        if newest is None or e.last_persisted_step >= newest:
            return True
        persisted = max((j.last_persisted_step for j in self.registry.job_entries(e.job)),
                        default=-1)
        return persisted >= newest

    # -- Status -----------------------------------------------------------------------------

    def _persist_progress(self, job: str) -> dict:
        now = self.persister.progress(job)
        step, done, total = now if now is not None else (-1, 0, 0)
        return dict(persist_step=step, persist_done_bytes=done, persist_total_bytes=total)

    def status(self) -> dict:
        segments = []
        for e in sorted(self.registry.entries(), key=lambda e: (e.job, e.rank, e.generation)):
            slots = [dict(slot=s, step=i["step"], seq=i["seq"], segment_name=e.name,
                          payload_bytes=i["payload_bytes"], payload_crc=i["payload_crc"],
                          generation=e.generation) for s, i in e.sealed_slots()]
            segments.append(dict(
                job=e.job, rank=e.rank, world_size=e.config.world_size,
                generation=e.generation, segment_name=e.name, owner_pid=e.owner_pid,
                owner_alive=pid_alive(e.owner_pid), slots=slots, size_bytes=e.size_bytes,
                slot_bytes=e.slot_bytes, last_persisted_step=e.last_persisted_step,
                persist_queue=self.persister.queued(e.job), errors=list(e.errors),
                persist_dir=e.config.persist_dir, adopted=e.adopted, released=e.released,
                **self._persist_progress(e.job)))
        errors = (list(self.registry.problems) + list(self.problems)
                  + list(self.persister.failures) + list(self.persister.skipped))
        if self.watch.last_error is not None:
            errors.append(f"watcher: {self.watch.last_error!r}")
        return dict(pid=os.getpid(), version=ckpt.__version__,
                    uptime_s=time.monotonic() - self._started_s, segments=segments,
                    errors=errors, socket_path=str(self.socket_path))
