"""``Checkpointer``: snapshot every training step into shared memory, restore bit-exactly.

Who calls what, in which order (every rank of a job, on its training thread)::

    cp = Checkpointer(model, optimizer, scheduler=sched, dir="runs/x", extra={...})
    start = cp.restore()              # 0 on a fresh run, else the step after the snapshot
    for step in range(start, n):
        ...; optimizer.step()         # pre-hook: waits for the copy of the previous snapshot
        cp.step(step)                 # returns at once; the copy overlaps fwd/bwd of step+1
    cp.close()                        # waits, asks for a persist of the newest step

``step()`` only blocks when the previous snapshot has not been sealed yet (the
copy itself is waited for by the optimizer's step pre-hook, the one blocking
point of the lazy copy), and up to ``segment_wait_s`` when a new shared-memory
segment is needed (the first step; the rest of its creation runs in the
background). It never waits for the daemon: Commit RPCs (and reconnects) run on
a notifier thread of their own. Not thread-safe: call it from the training thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from ckpt.config import DEFAULT_CHUNK_BYTES, CheckpointerConfig
from ckpt.errors import CkptError, ConfigError
from ckpt.hook.committer import CommitNotifier, CommitRecord, Committer
from ckpt.hook.daemon_link import DaemonLink
from ckpt.hook.gc_pause import collection_paused
from ckpt.hook.segments import OwnGenerations, SegmentRequest
from ckpt.hook.collect import SnapshotCollector
from ckpt.hook.state import check_extras
from ckpt.recovery.checkfree.gradnorm import gradient_norm
from ckpt.recovery.checkfree.position import PipelinePosition
from ckpt.recovery.restore import RestoreOutcome
from ckpt.recovery.stage_rebuild import PIPELINE_STATE_KEY
from ckpt.snapshot.layout import StateJson, slot_bytes_for
from ckpt.snapshot.stager import PendingSnapshot, SlotStager, SlotTooSmallError

log = logging.getLogger("ckpt.hook")


@dataclass(frozen=True)
class CheckpointerStats:
    """Counters since construction; times in seconds."""

    snapshots_taken: int = 0       # sealed into memory
    snapshots_skipped: int = 0     # a reader (persist) held the slot, or the segment was still
                                   # being created: never waited for
    last_step_call_s: float = 0.0  # wall time of the last step() call
    max_step_call_s: float = 0.0
    last_stall_s: float = 0.0      # last time the optimizer pre-hook blocked for a copy
    max_stall_s: float = 0.0
    total_stall_s: float = 0.0
    last_copy_s: float = 0.0       # copy time of the last sealed snapshot
    last_commit_s: float = 0.0     # from start of copy to sealed
    last_committed_step: int = -1
    daemon_errors: int = 0


@dataclass(frozen=True)
class _SkippedSnapshot:
    """A step() that found no segment: what close() needs to snapshot it faithfully."""

    step: int
    state_changes: int  # Checkpointer._state_changes at that step
    plan: Any
    meta: dict
    sources: list  # eager copies, and the live parameters and optimizer state


def _rank_and_world(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class Checkpointer:
    """Snapshots model, optimizer, scheduler, extras and RNG state every ``every`` steps."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any = None, *, dir: str | os.PathLike[str] = "checkpoints",
                 every: int = 1, persist_every: int = 100, keep: int = 3,
                 extra: Mapping[str, Any] | None = None, job: str | None = None,
                 daemon_socket: str | os.PathLike[str] | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, copy_threads: int = 1,
                 process_group: Any = None, start_daemon: bool = True,
                 pipeline: PipelinePosition | None = None, **options: Any) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got "
                              f"{type(optimizer).__name__}")
        if scheduler is not None and not callable(getattr(scheduler, "state_dict", None)):
            raise ConfigError("scheduler must have state_dict() and load_state_dict()")
        if pipeline is not None and not isinstance(pipeline, PipelinePosition):
            raise ConfigError(f"pipeline must be a ckpt.PipelinePosition, got "
                              f"{type(pipeline).__name__}")
        self.config = CheckpointerConfig(
            dir=Path(dir), every=every, persist_every=persist_every, keep=keep, job=job or "",
            daemon_socket=Path(daemon_socket) if daemon_socket else None,
            chunk_bytes=chunk_bytes, copy_threads=copy_threads, start_daemon=start_daemon,
            **options)
        from ckpt import _C

        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.extras = check_extras(extra)
        self.process_group = process_group
        self.rank, self.world_size = _rank_and_world(process_group)
        self.pipeline = pipeline
        if pipeline is not None and max(map(pipeline.rank_of, range(pipeline.num_stages))) \
                >= self.world_size:
            raise ConfigError(f"PipelinePosition has {pipeline.num_stages} stages on ranks "
                              f"{[pipeline.rank_of(s) for s in range(pipeline.num_stages)]}, "
                              f"but the process group has {self.world_size} rank(s); initialise "
                              f"torch.distributed (one rank per stage) before the Checkpointer")
        if pipeline is not None and pipeline.rank_of(pipeline.stage) != self.rank:
            raise ConfigError(f"PipelinePosition says stage {pipeline.stage} is rank "
                              f"{pipeline.rank_of(pipeline.stage)}, but this process is rank "
                              f"{self.rank} of its group (world size {self.world_size})")
        self._grad_norm: float | None = None  # this stage's last post-clipping gradient norm
        self._replicas: dict[str, dict] = {}  # embedding/head replicas this stage keeps
        self.last_restore: RestoreOutcome | None = None
        self.engine = _C.CopyEngine(self.config.copy_threads, self.config.copy_nice)
        self.link = DaemonLink(self.config, self.rank, self.world_size)
        self._segment: Any = None
        self._segment_from_daemon = False
        self._segment_lock = threading.Lock()  # closing it vs the notifier reading a slot
        self._old_generations = OwnGenerations()
        self._stager: SlotStager | None = None
        self._switch_to: str | None = None
        self._plan = None
        self._collector = SnapshotCollector(model, optimizer, scheduler, self.extras,
                                            self.config.chunk_bytes)
        self._pending: PendingSnapshot | None = None  # copy not yet waited for by the pre-hook
        self._segment_request: SegmentRequest | None = None  # a segment being made off-thread
        self._skips_without_segment = 0
        self._unsnapshotted: _SkippedSnapshot | None = None  # the last step without segment
        self._state_changes = 0  # optimizer steps and state loads so far
        self._stats = CheckpointerStats()
        self._stats_lock = threading.Lock()
        self._closed = False
        self._saved_threads = 0  # torch's intra-op threads while yield_cores lent some away
        self._module_hook: Any = None
        self._committer = Committer(self._finish, self._on_commit, self.config.wait_timeout_s)
        every = self.config.persist_every
        self._notifier = CommitNotifier(self._tell_daemon,
                                        keep=lambda step: bool(every) and step % every == 0)
        self._hooks = [
            optimizer.register_step_pre_hook(lambda *_: self._before_optimizer_step()),
            optimizer.register_load_state_dict_pre_hook(lambda *_: self._before_state_change()),
            model.register_load_state_dict_pre_hook(lambda *_: self._before_state_change()),
        ]

    # -- public API -------------------------------------------------------------------------

    @property
    def stats(self) -> CheckpointerStats:
        with self._stats_lock:
            return replace(self._stats, daemon_errors=self.link.errors)

    def restore(self) -> int:
        """Load the newest snapshot every rank holds; 0 on a fresh run, else its step + 1.

        Collective when torch.distributed is initialised (every rank must call it).
        """
        self._check_open()
        self.wait(self.config.wait_timeout_s)
        from ckpt.recovery.restore import RestoreTarget, restore

        if self.config.start_daemon:
            try:
                self.link._connect()  # the embedded default: a daemon for this node
            except CkptError as exc:
                log.warning("ckpt: restore goes on without a daemon: %s", exc)
        with collection_paused():  # it builds the same kind of per-tensor objects as step()
            outcome = restore(RestoreTarget(
                self.model, self.optimizer, self.scheduler, self.extras, self.config.job,
                self.config.dir, self.rank, self.world_size, self.process_group, self.engine,
                self.pipeline))
        self.last_restore = outcome
        if outcome is None:
            return 0
        self._grad_norm = (outcome.pipeline_state or {}).get("grad_norm")
        self._replicas = dict((outcome.pipeline_state or {}).get("replicas") or {})
        return outcome.step + 1

    def step(self, step: int) -> None:
        """Snapshot the state after ``optimizer.step()`` of ``step``; returns at once.

        Call it after the optimizer step of every training step. Until the copy is
        done, nothing may mutate parameters or optimizer state except through
        ``optimizer.step()``/``load_state_dict`` (they wait). Every other tensor (model
        buffers such as BatchNorm statistics, a tensor lr, scheduler and extras' tensors)
        is copied before return.
        """
        t0 = time.perf_counter()
        self._check_open()
        if not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be an int >= 0, got {step!r}")
        self._committer.raise_error()
        if self.pipeline is not None and self.pipeline.replica_every \
                and step % self.pipeline.replica_every == 0:
            self._replicate(step)
        if step % self.config.every:
            return
        with collection_paused():  # the state tree dies with this call: see gc_pause
            self._take(step)
        elapsed = time.perf_counter() - t0
        with self._stats_lock:
            self._stats = replace(self._stats, last_step_call_s=elapsed,
                                  max_step_call_s=max(self._stats.max_step_call_s, elapsed))

    def ready(self, timeout_s: float | None = None) -> bool:
        """Whether the next ``step()`` can be snapshotted: its segment exists, or the one
        being created (asked for by an earlier ``step()``) is done within ``timeout_s``.
        False before the first ``step()``, which is when the state's size is known."""
        req = self._segment_request
        if req is None:
            return self._segment is not None
        return req.wait(timeout_s) and req.error is None

    def _take(self, step: int) -> None:
        """Begin the snapshot of ``step`` (the live state), or count it as skipped."""
        self._wait_sealed(step)
        meta, sources = self._collect(step)
        self._start(step, meta, sources)

    def _wait_sealed(self, step: int) -> None:
        """The previous snapshot is copied and sealed (never: told to the daemon)."""
        self._wait_copy()
        if not self._committer.wait_idle(self.config.wait_timeout_s):
            raise CkptError(f"the snapshot before step {step} was not sealed within "
                            f"{self.config.wait_timeout_s} s")

    def _collect(self, step: int) -> tuple[dict, list[torch.Tensor]]:
        """(meta, sources) of the live state; updates the cached plan."""
        top = None
        if self.pipeline is not None:
            top = {PIPELINE_STATE_KEY: {"stage": self.pipeline.stage,
                                        "num_stages": self.pipeline.num_stages,
                                        "grad_norm": self._grad_norm,
                                        "replicas": self._replicas}}
        got = self._collector.collect(step, {"job": self.config.job, "rank": self.rank,
                                             "world_size": self.world_size}, top)
        self._plan = got.plan
        return got.meta, got.sources

    def _start(self, step: int, meta: dict, sources: list[torch.Tensor]) -> None:
        pending = self._begin(step, meta, sources)
        if pending is None:
            with self._stats_lock:
                self._stats = replace(self._stats,
                                      snapshots_skipped=self._stats.snapshots_skipped + 1)
        else:
            self._pending = pending
            self._committer.submit(pending)
            self._yield_cores(pending)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until the last snapshot is sealed; True when it is (or none was taken).

        Within the same ``timeout_s``, and for at most ``daemon_timeout_s``, it also waits
        until the daemon has been told (or the attempt failed), so ``stats.daemon_errors``
        and the logs are current; a daemon that does not answer does not make it return
        False. Re-raises an error of the committer thread.
        """
        timeout_s = self.config.wait_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        sealed = self._committer.wait_idle(timeout_s)
        self._notifier.flush(min(self.config.daemon_timeout_s,
                                 max(0.0, deadline - time.monotonic())))
        return sealed

    def close(self) -> None:
        """Seal the last snapshot, persist the newest step (daemon, else in-process). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._committer.wait_idle(self.config.wait_timeout_s)
            self._snapshot_skipped_last()
            # The daemon must know the newest commit before it is asked to persist it.
            self._notifier.flush(self.config.daemon_timeout_s)
            self._persist_newest()
        finally:
            if self._segment_request is not None:
                self._segment_request.abandon()
                self._segment_request = None
            for h in self._hooks:
                h.remove()
            if self._module_hook is not None:
                self._module_hook.remove()
            self._take_cores_back(force=True)
            self._committer.close(self.config.wait_timeout_s)
            self._notifier.close(self.config.daemon_timeout_s)
            if self._stager is not None:
                self._stager.close()
            with self._segment_lock:
                if self._segment is not None:
                    self._segment.close()
                    self._segment = None
            self.link.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CkptError("this Checkpointer is closed; create a new one")

    def _slot_bytes_needed(self, meta: dict) -> int:
        import json

        state = meta["state"]
        state_bytes = len(state) if isinstance(state, StateJson) else \
            len(json.dumps(state, separators=(",", ":")))
        meta_estimate = state_bytes + \
            256 * len(self._plan.layout.tensors) + 1024
        data = int(self._plan.layout.data_bytes * self.config.slot_headroom)
        return slot_bytes_for(self._plan.layout, meta_estimate) + (data - self._plan.layout.data_bytes)

    def _poll_segment(self, need: int, wait_s: float | None = None) -> None:
        """Start a background request for a segment of ``need``-byte slots (waited for up to
        ``wait_s``, default ``segment_wait_s``), or look at the running one (``wait_s``,
        default 0); a segment that has arrived replaces the current one."""
        req = self._segment_request
        if req is not None and req.slot_bytes < need:
            req.abandon()  # the state grew past what it asks for
            req = None
        if req is None:
            req = self._segment_request = SegmentRequest(
                self.link, self.config.job, self.rank, need,
                page_lock=any(run.device != "cpu" for run in self._plan.runs))
            wait_s = self.config.segment_wait_s if wait_s is None else wait_s
        try:
            seg = req.result(wait_s or 0.0)
        except BaseException:
            self._segment_request = None
            raise
        if seg is None:
            return
        self._segment_request = None
        self._drop_segment()
        if req.from_daemon:
            self._old_generations.forget()
        self._segment, self._segment_from_daemon = seg, req.from_daemon
        self._stager = SlotStager(seg, self.engine, page_locked=req.page_locked)
        self._switch_to = None
        if self._skips_without_segment:
            log.info("ckpt: segment %s is ready; snapshots start again (%d step(s) were not "
                     "snapshotted while it was created)", seg.name, self._skips_without_segment)
            self._skips_without_segment = 0

    def _drop_segment(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._segment is not None:
            if not self._segment_from_daemon:
                self._old_generations.replaced(self._segment.name)
            with self._segment_lock:
                self._segment.close()
                self._segment = None

    def _begin(self, step: int, meta: dict, sources: list) -> PendingSnapshot | None:
        if self._switch_to is not None:
            if self._segment is not None and self._segment.name != self._switch_to:
                # The daemon (restarted) wants another segment: this one serves meanwhile.
                self._poll_segment(self._slot_bytes_needed(meta), wait_s=0.0)
            else:
                self._switch_to = None
        if self._segment is None:
            self._poll_segment(self._slot_bytes_needed(meta))
            if self._segment is None:
                return self._skip_without_segment(step, meta, sources)
        try:
            pending = self._stager.begin(step, self._plan, sources, meta)
        except SlotTooSmallError:
            need = max(self._slot_bytes_needed(meta), self._segment.slot_bytes + 4096)
            log.info("ckpt: the state outgrew the segment; registering %d-byte slots", need)
            self._drop_segment()
            self._poll_segment(need)
            if self._segment is None:
                return self._skip_without_segment(step, meta, sources)
            pending = self._stager.begin(step, self._plan, sources, meta)
        if pending is None:
            log.info("ckpt: skipped the snapshot of step %d: a reader holds the slot", step)
        else:
            self._unsnapshotted = None
        return pending

    def _skip_without_segment(self, step: int, meta: dict, sources: list) -> None:
        # Kept for close(): the skeleton and the eager copies are this step's, and the live
        # parameters and optimizer state stay so until the next optimizer step or load.
        self._unsnapshotted = _SkippedSnapshot(step, self._state_changes, self._plan, meta,
                                               sources)
        self._skips_without_segment += 1
        if self._skips_without_segment == 1:
            log.info("ckpt: the %.2f GB shared-memory segment is being created in the background; "
                     "step %d and the steps until it is ready are not snapshotted",
                     2 * self._segment_request.slot_bytes / 1e9, step)
        return None

    def _snapshot_skipped_last(self) -> None:
        """close(): the last step() found no segment yet; snapshot it now from what it kept
        (its skeleton, RNG states and eager copies: RNG draws, buffer updates and extras'
        changes since do not leak in) if its parameters and optimizer state are still live
        (no optimizer step or state load since)."""
        skipped = self._unsnapshotted
        if skipped is None:
            return
        step = skipped.step
        if skipped.state_changes != self._state_changes:
            log.warning("ckpt: step %d was not snapshotted (its segment was still being created) "
                        "and the optimizer has stepped since; close() cannot save it", step)
            return
        try:
            if self._segment_request is not None:
                self._segment_request.wait(self.config.wait_timeout_s)
            self._wait_sealed(step)
            self._plan = skipped.plan
            self._start(step, skipped.meta, skipped.sources)
            self._committer.wait_idle(self.config.wait_timeout_s)
        except Exception as exc:  # close() still persists what it has
            log.warning("ckpt: could not snapshot step %d at close(): %s", step, exc)

    def _yield_cores(self, pending: PendingSnapshot) -> None:
        threads = torch.get_num_threads()
        if not self.config.yield_cores or pending.cuda_tickets or threads <= 1:
            return
        self._saved_threads = threads
        torch.set_num_threads(max(1, threads - self.config.copy_threads))
        if self._module_hook is None:
            self._module_hook = torch.nn.modules.module.register_module_forward_pre_hook(
                lambda *_: self._take_cores_back())

    def _take_cores_back(self, force: bool = False) -> None:
        """On the training thread: once the copy is done, torch gets its threads back."""
        if self._saved_threads and (force or self._pending is None
                                    or all(t.done() for t in self._pending.cpu_tickets)):
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = 0

    def _replicate(self, step: int) -> None:
        """Embedding/head stages send their weights to their replica holders (blocking p2p,
        on the training thread, at the same step on every stage)."""
        from ckpt.recovery.stage_rebuild import exchange_replicas

        # New tensors: a snapshot still copying holds references to the old ones.
        received = exchange_replicas(self.pipeline, self.model, self.process_group, step)
        self._replicas.update(received)

    def _before_optimizer_step(self) -> None:
        self._before_state_change()
        if self.pipeline is not None:
            # The gradients the optimizer is about to apply: after the caller's clipping.
            self._grad_norm = gradient_norm(self.model.parameters())

    def _before_state_change(self) -> None:
        """Optimizer step or load_state_dict: the state is about to change."""
        self._wait_copy()
        self._state_changes += 1

    def _wait_copy(self) -> None:
        """The only blocking point of the lazy copy (optimizer.step / load_state_dict)."""
        self._take_cores_back(force=True)
        pending = self._pending
        if pending is None:
            return
        t0 = time.perf_counter()
        if pending.cuda_tickets:
            # GPU: the compute stream waits for the D2H on the device; the host goes on.
            pending.make_stream_wait()
        for t in pending.cpu_tickets:
            if not t.wait(self.config.wait_timeout_s):
                raise CkptError(f"the snapshot copy of step {pending.step} did not finish "
                                f"within {self.config.wait_timeout_s} s")
        self._pending = None
        stall = time.perf_counter() - t0
        with self._stats_lock:
            s = self._stats
            self._stats = replace(s, last_stall_s=stall, max_stall_s=max(s.max_stall_s, stall),
                                  total_stall_s=s.total_stall_s + stall)

    def _finish(self, pending: PendingSnapshot) -> int:
        return self._stager.finish(pending, self.config.wait_timeout_s)

    def _on_commit(self, record: CommitRecord) -> None:
        with self._stats_lock:
            s = self._stats
            self._stats = replace(s, snapshots_taken=s.snapshots_taken + 1,
                                  last_copy_s=record.copy_s, last_commit_s=record.commit_s,
                                  last_committed_step=record.step)
        seg = self._segment
        if seg is not None and not self._segment_from_daemon:
            self._old_generations.unlink_all_but(seg.name)  # the new one holds a snapshot now
        # Never waits: the daemon may be dead or hung.
        self._notifier.post(replace(record, segment=seg.name if seg is not None else ""))

    def _still_sealed(self, record: CommitRecord) -> bool:
        """Whether ``record``'s slot still holds its snapshot (not overwritten since)."""
        with self._segment_lock:
            seg = self._segment
            if seg is None or seg.name != record.segment:
                return False
            info = seg.slot_info(record.slot)
        return info["state"] == "SEALED" and info["seq"] == record.seq

    def _tell_daemon(self, record: CommitRecord) -> None:
        """On the notifier thread: Commit (reconnecting and re-registering when due). A
        slow daemon may get a Commit only once the trainer has overwritten its slot: not
        sent then (a newer one follows), and the daemon's refusal of one that went stale
        in flight is no failure of the daemon."""
        if not self._still_sealed(record):
            return
        switch = self.link.commit(record.slot, record.step, record.seq,
                                  stale=lambda: not self._still_sealed(record))
        if switch is not None and self._segment is not None and switch != self._segment.name:
            self._switch_to = switch

    def _persist_newest(self) -> None:
        step = self._stats.last_committed_step
        if step < 0:
            return
        if self.link.connected or self.config.start_daemon:
            from ckpt.progress import byte_progress, progress_shown

            if progress_shown():
                with byte_progress(f"persist step {step} (daemon)") as bar:
                    done, error = self.link.persist(step, self.config.persist_timeout_s, bar)
            else:
                done, error = self.link.persist(step, self.config.persist_timeout_s)
            if done:
                return
            log.warning("ckpt: the daemon did not persist step %d (%s); persisting in-process",
                        step, error)
        self._persist_in_process(step)

    def _persist_in_process(self, step: int) -> None:
        from ckpt import format as fmt
        from ckpt.progress import byte_progress

        seg = self._segment
        committed = seg.committed() if seg is not None else None
        if committed is None or committed[1] != step:
            log.warning("ckpt: step %d is no longer the committed snapshot; not persisted", step)
            return
        slot = committed[0]
        if not seg.try_lock(slot, os.getpid(), "read"):
            raise CkptError(f"cannot read-lock slot {slot} of {seg.name} to persist step {step}")
        try:
            info = seg.slot_info(slot)
            view = seg.slot_view(slot)[:info["payload_bytes"]]
            with byte_progress(f"persist step {step}") as progress:
                if self.world_size == 1:
                    fmt.persist_payloads(self.config.dir, step, 1, {0: view},
                                         keep=self.config.keep or None, progress=progress)
                else:
                    from ckpt.storage.fs import FsStorage

                    staging = FsStorage(self.config.dir).begin_step(step)
                    fmt.write_rank(staging, self.rank, self.world_size, view,
                                   expected_crc=info["payload_crc"], progress=progress)
                    fmt.finish_if_complete(staging, self.world_size,
                                           keep=self.config.keep or None)
        finally:
            seg.unlock(slot, os.getpid())
