"""``restore``: load the newest step every rank has, from the fastest tier that verifies.

Order of work (every rank calls it, in the same order, on the training thread):

1. list local candidates: sealed slots in shared memory whose header verifies, and
   complete steps on disk;
2. with torch.distributed initialised, agree on the steps every rank has
   (``all_gather`` of a fixed-size int64 tensor; no pickle);
3. newest first: try memory, then disk (each verified chunk by chunk before a byte
   reaches a live tensor); ``all_reduce(MIN)`` of the success flag, so that either
   every rank loaded this step or all move on to the previous one. A step written with
   another world size or sharding is read box by box onto this job's layout: from
   memory where this node holds the slots of every rank that wrote it
   (``MemoryReshardSource``), else from disk (``ReshardSource``);
4. set what is not a tensor (optimizer hyperparameters, scheduler, extras, RNG);
5. with a pipeline position and no step loadable everywhere: the CheckFree tier
   (:mod:`ckpt.recovery.stage_rebuild`) rebuilds the stages that lack a step the others
   hold from their neighbours.

Returns a :class:`RestoreOutcome`, or None when no rank has any snapshot.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ckpt.errors import (CkptError, CorruptCheckpointError, LayoutMismatchError,
                         ShardingMismatchError, StepNotFoundError)
from ckpt.hook.state import (apply_optimizer_scalars, fit_optimizer_state, model_state_dict,
                             optimizer_state, set_rng_state)
from ckpt.recovery.checkfree.position import PipelinePosition
from ckpt.recovery.memory_reshard import MemoryReshardSource, complete_groups
from ckpt.recovery.sources import (DiskSource, MemoryCandidate, MemorySource, ReshardSource,
                                   is_sharded_state, memory_candidates)
from ckpt.recovery.stage_rebuild import PIPELINE_STATE_KEY, choose_rebuild, exchange_and_rebuild
from ckpt.snapshot.geometry import geometries
from ckpt.snapshot.tree import dtype_from_name, flatten, unflatten

log = logging.getLogger("ckpt.restore")
MAX_AGREED_STEPS = 64


@dataclass
class RestoreTarget:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    extras: Mapping[str, Any]
    job: str
    dir: Path
    rank: int
    world_size: int
    process_group: Any
    engine: Any
    pipeline: PipelinePosition | None = None


@dataclass(frozen=True)
class RestoreOutcome:
    """What ``restore`` loaded on this rank."""

    step: int
    tier: str                         # "memory", "disk" or "checkfree"
    where: str                        # the source, or the rebuild's description
    pipeline_state: dict | None = None  # the snapshot's PIPELINE_STATE_KEY entry, if any


def _dist_active(group: Any) -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _collective_device(group: Any) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_steps(local_steps: list[int], group: Any) -> list[list[int]]:
    """The (newest ``MAX_AGREED_STEPS``) steps each rank of ``group`` holds, by rank.

    ``all_gather`` of a fixed-size int64 tensor (no pickle); without a group, this rank's.
    """
    mine = sorted(set(local_steps), reverse=True)[:MAX_AGREED_STEPS]
    if not _dist_active(group):
        return [mine]
    import torch.distributed as dist

    device = _collective_device(group)
    t = torch.full((MAX_AGREED_STEPS,), -1, dtype=torch.int64)
    t[:len(mine)] = torch.tensor(mine, dtype=torch.int64)
    t = t.to(device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [[int(v) for v in o.cpu().tolist() if v >= 0] for o in out]


def agree_on_steps(local_steps: list[int], group: Any) -> list[int]:
    """Steps (newest first) that every rank of ``group`` holds; local steps without a group."""
    return _common(gather_steps(local_steps, group))


def _common(steps_by_rank: list[list[int]]) -> list[int]:
    common = set(steps_by_rank[0])
    for steps in steps_by_rank[1:]:
        common &= set(steps)
    return sorted(common, reverse=True)


def all_succeeded(ok: bool, group: Any) -> bool:
    if not _dist_active(group):
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _disk_steps(directory: Path) -> dict[int, Path]:
    from ckpt.storage.fs import list_steps

    try:
        infos = list_steps(directory)
    except FileNotFoundError:
        return {}
    complete = {s.step: s.path for s in infos if s.complete}
    newest = max(complete, default=-1)
    for s in infos:
        if s.problem is not None:
            log.warning("ckpt: skipping %s: %s", s.path, s.problem)
        elif not s.complete and not s.staging and s.step > newest:
            log.warning("ckpt: skipping %s: it has no manifest.json (a persist that was "
                        "interrupted, or damage); `ckpt verify %s` tells more", s.path, s.path)
    return complete


class _Loader:
    """Copies a verified source into the live state of one target."""

    def __init__(self, target: RestoreTarget) -> None:
        self.target = target
        # model_state_dict: DCP's naming, kept for the model, so the first step() after the
        # restore does not work it out again.
        self._model_tensors, _ = flatten({"model": model_state_dict(target.model)})
        # The live optimizer tensors are read in check(), after the state is fitted.

    def _read_live(self) -> None:
        self.live_optim = optimizer_state(self.target.model, self.target.optimizer)
        optim_tensors, _ = flatten({"optim": self.live_optim})
        tensors = self._model_tensors + optim_tensors
        self.live_tensors = dict(tensors)  # name -> live tensor (plain or DTensor)
        self.live = {g.name: g for g in geometries(tensors)}

    def check(self, source: Any) -> None:
        """Shape the optimizer's state like the snapshot's (each source may hold another
        step, with state for other parameters), then check that every tensor fits.

        ShardingMismatchError when names, dtypes and global shapes agree but the local
        boxes do not (another world size or sharding): a ``ReshardSource`` reads that."""
        meta, where = source.meta, source.where
        fit_optimizer_state(self.target.model, self.target.optimizer, meta, where)
        self._read_live()
        if source.reshards:
            source.retarget(self.live)
        stored = {e["name"]: e for e in meta["tensors"] if is_sharded_state(e["name"])}
        for name, g in self.live.items():
            e = stored.get(name)
            if e is None:
                raise LayoutMismatchError(f"{where}: the snapshot has no tensor {name!r}, which "
                                          f"the model/optimizer has; was the model changed?")
            for what, have, want in (("dtype", g.dtype_name, e["dtype"]),
                                     ("global shape", list(g.global_shape), e["global_shape"])):
                if have != want:
                    raise LayoutMismatchError(
                        f"{where}: tensor {name!r} has {what} {want} in the snapshot but {have} "
                        f"in the model/optimizer; restore into the same model and dtypes "
                        f"(the world size and sharding may differ)")
            if list(g.shape) != e["shape"] or list(g.offsets) != e["offsets"]:
                raise ShardingMismatchError(
                    f"{where}: tensor {name!r} is the box at {e['offsets']} of shape "
                    f"{e['shape']} in the snapshot, at {list(g.offsets)} of shape "
                    f"{list(g.shape)} here (another world size or sharding)")
            # Same dtype and shape but another size: the snapshot contradicts itself. The
            # tiers copy nbytes into the live tensor's memory, so this must never pass.
            if e["nbytes"] != g.nbytes:
                raise CorruptCheckpointError(
                    f"{where}: tensor {name!r} records {e['nbytes']} bytes, but {e['dtype']} of "
                    f"shape {e['shape']} holds {g.nbytes}; the snapshot is damaged; "
                    f"restore uses an older step")
        extra = sorted(set(stored) - set(self.live))
        if extra:
            raise LayoutMismatchError(f"{where}: the snapshot has tensors the model/optimizer "
                                      f"lacks: {extra[:5]}{'...' if len(extra) > 5 else ''}")

    def load_tensors(self, source: Any) -> list[Any]:
        """Copy every model/optim tensor into the live tensors; return the tensor list for
        unflatten (None for live tensors, fresh CPU tensors for rng/scheduler/extra).

        Both tiers copy straight into the live tensors and checksum in the same pass
        (memory: crc32c computed while storing; disk: read into the tensor, then checked),
        and zero a chunk whose crc does not match before raising. If a chunk is damaged the
        tier raises, the live tensors hold checked bytes of this step plus zeroes, and
        the next tier or an older step overwrites them all; if none loads, restore()
        raises and the model must not be trained from.
        """
        entries = source.meta["tensors"]
        dsts: dict[int, int] = {}
        for i, e in enumerate(entries):
            live = self.live.get(e["name"])
            if live is not None and e["nbytes"] and e["nbytes"] == live.nbytes \
                    and live.local.device.type == "cpu" and live.local.is_contiguous():
                dsts[i] = live.local.data_ptr()
        source.load_verified(dsts)
        out: list[Any] = []
        for i, e in enumerate(entries):
            live = self.live.get(e["name"])
            dtype = dtype_from_name(e["dtype"])
            if live is None:
                raw = source.tensor_bytes(i)
                out.append(raw.clone().view(dtype).reshape(e["shape"]) if raw.numel()
                           else torch.empty(e["shape"], dtype=dtype))
                continue
            out.append(None)  # replaced in apply() by the live (DTensor or plain) tensor
            if e["nbytes"] and i not in dsts:  # CUDA or non-contiguous: bytes are verified
                with torch.no_grad():
                    live.local.copy_(source.tensor_bytes(i).view(dtype).reshape(live.local.shape))
        return out

    def apply(self, source: Any, tensors: list[Any]) -> dict[str, Any]:
        """Set the non-tensor state; returns the snapshot's state tree."""
        target = self.target
        live_by_index = [self.live_tensors[e["name"]] if tensors[i] is None else tensors[i]
                         for i, e in enumerate(source.meta["tensors"])]
        state = unflatten(source.meta["state"], live_by_index)
        apply_optimizer_scalars(target.optimizer, self.live_optim, state["optim"])
        if target.scheduler is not None and state.get("scheduler") is not None:
            target.scheduler.load_state_dict(state["scheduler"])
        for name, obj in target.extras.items():
            if name not in state["extra"]:
                raise LayoutMismatchError(f"the snapshot has no extra {name!r} (it holds "
                                          f"{sorted(state['extra'])})")
            obj.load_state_dict(state["extra"][name])
        if source.restores_rng:
            set_rng_state(state["rng"])
        else:
            log.warning("ckpt: rank %d did not exist in the %d-rank snapshot; its RNG states "
                        "stay as this process set them (the rest comes from rank %d)",
                        target.rank, source.meta.get("world_size", 0), source.source_rank)
        return state


@dataclass(frozen=True)
class StepSources:
    """Where this rank can find one step: its own sealed slots, the slots of every rank
    that wrote it when this node holds them all, and the step's directory on disk."""

    own: list[MemoryCandidate]
    group: dict[int, MemoryCandidate] | None
    disk: Path | None


def _open(tier: str, what: Any, target: RestoreTarget, engine: Any) -> Any:
    if tier == "memory":
        return MemorySource(what, engine)
    if tier == "memory by box":
        return MemoryReshardSource(what, target.rank, target.world_size, engine)
    if tier == "disk":
        return DiskSource(what, target.rank, target.world_size)
    return ReshardSource(what, target.rank, target.world_size)


def _try_sources(loader: _Loader, step: int, where: StepSources, target: RestoreTarget,
                 engine: Any) -> tuple[Any, list[Any]] | None:
    """Load ``step`` from memory, else disk; returns (source, tensors) or None.

    Memory is this rank's own slot, then (outside pipeline jobs) the slots of every rank
    that wrote the step, read by box (``MemoryReshardSource``): that reads a step of
    another layout, and a DDP replica where this rank's own copy is damaged. A step on
    disk of another layout (ShardingMismatchError) is read by box (``ReshardSource``).
    A pipeline job refuses another layout."""
    group = where.group if target.pipeline is None else None
    attempts: list[Any] = ([("memory", c) for c in where.own]
                           + ([("memory by box", group)] if group else [])
                           + ([("disk", where.disk)] if where.disk else []))
    while attempts:
        tier, what = attempts.pop(0)
        source = None
        try:
            source = _open(tier, what, target, engine)
            if source.step != step:
                raise CkptError(f"{source.where} holds step {source.step}, expected {step}")
            loader.check(source)
            tensors = loader.load_tensors(source)
            log.info("ckpt: rank %d restored step %d from %s", target.rank, step, source.where)
            return source, tensors
        except ShardingMismatchError as exc:
            if source is not None:
                source.close()
            if target.pipeline is not None:
                raise LayoutMismatchError(
                    f"{exc}; a pipeline job restores onto the layout that wrote it (CheckFree "
                    f"needs each stage's own state): relaunch with the same world size and "
                    f"stage assignment") from None
            if tier == "disk":
                log.info("ckpt: rank %d: %s; reading it by box", target.rank, exc)
                attempts.insert(0, ("disk by box", what))
            elif group:
                log.info("ckpt: rank %d: %s; reading the step by box from the slots of "
                         "every rank", target.rank, exc)
            else:
                log.warning("ckpt: rank %d passes over %s: %s; this node does not hold "
                            "every rank's slot of step %d, so the disk tier reads it onto "
                            "this layout", target.rank, tier, exc, step)
        except LayoutMismatchError:
            if source is not None:
                source.close()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one source: try the next
            # Sources are validated when opened, so the typed errors above are the rule;
            # anything else (a MemoryError, a bug meeting strange input) must not stop the
            # fall-back either: the next source overwrites every live tensor.
            log.warning("ckpt: rank %d could not restore step %d from %s: %s%s; trying the "
                        "next tier or an older step", target.rank, step, tier,
                        "" if isinstance(exc, CkptError) else f"{type(exc).__name__}: ", exc)
            if source is not None:
                source.close()
    return None


def restore(target: RestoreTarget) -> RestoreOutcome | None:
    """Restore the newest step every rank holds; None when there is nothing to restore.

    Raises LayoutMismatchError when a snapshot does not fit the model, and
    StepNotFoundError when snapshots exist but none loads on every rank (and, with a
    pipeline position, CheckFree cannot complete one either).
    """
    every_rank = memory_candidates(target.job, None)
    mem_by_step: dict[int, list] = {}
    for c in every_rank:
        if c.rank == target.rank:
            mem_by_step.setdefault(c.step, []).append(c)
    groups = complete_groups(every_rank) if target.pipeline is None else {}
    disk = _disk_steps(target.dir)
    sources = {s: StepSources(mem_by_step.get(s, []), groups.get(s), disk.get(s))
               for s in set(mem_by_step) | set(groups) | set(disk)}
    steps_by_rank = gather_steps(list(sources), target.process_group)
    steps = _common(steps_by_rank)
    if not any(steps_by_rank) or (not steps and target.pipeline is None):
        return None
    loader = _Loader(target)
    # Training is not running yet: restore copies and checksums with every core.
    from ckpt import _C

    with _C.CopyEngine(os.cpu_count() or 1) as engine:
        outcome = _restore_agreed(target, loader, steps, sources, engine)
        if outcome is not None:
            return outcome
        if target.pipeline is not None:
            outcome = _restore_by_rebuild(target, loader, steps_by_rank, sources, engine)
            if outcome is not None:
                return outcome
    raise StepNotFoundError(
        f"snapshots of steps {steps[:8]} exist for job {target.job!r} but none could be "
        f"loaded on every rank (see the warnings above for each tier's reason); move "
        f"{target.dir} aside to start fresh")


def _tier_of(source: Any) -> str:
    return source.tier


def _restore_agreed(target: RestoreTarget, loader: _Loader, steps: list[int],
                    sources: dict[int, StepSources], engine: Any) -> RestoreOutcome | None:
    for step in steps:
        loaded = _try_sources(loader, step, sources[step], target, engine)
        ok = all_succeeded(loaded is not None, target.process_group)
        if not ok:
            if loaded is not None:
                loaded[0].close()
            log.warning("ckpt: step %d is not loadable on every rank; trying an older one", step)
            continue
        return _apply(loader, *loaded, step)
    return None


def _apply(loader: _Loader, source: Any, tensors: list[Any], step: int) -> RestoreOutcome:
    try:
        state = loader.apply(source, tensors)
    finally:
        source.close()
    return RestoreOutcome(step, _tier_of(source), source.where, state.get(PIPELINE_STATE_KEY))


def _restore_by_rebuild(target: RestoreTarget, loader: _Loader, steps_by_rank: list[list[int]],
                        sources: dict[int, StepSources], engine: Any) -> RestoreOutcome | None:
    """The CheckFree tier: survivors load a step, the stages lacking it are rebuilt."""
    position = target.pipeline
    assert position is not None
    tried: set[int] = set()
    while True:
        remaining = [[s for s in steps if s not in tried] for steps in steps_by_rank]
        choice, reasons = choose_rebuild(position, remaining)
        for reason in reasons:
            log.warning("ckpt: CheckFree cannot use %s", reason)
        if choice is None:
            return None
        tried.add(choice.step)
        lost = target.rank in choice.lost_ranks
        loaded = None if lost else _try_sources(loader, choice.step, sources[choice.step],
                                                target, engine)
        if not all_succeeded(lost or loaded is not None, target.process_group):
            if loaded is not None:
                loaded[0].close()
            log.warning("ckpt: step %d is not loadable on every surviving stage; trying an "
                        "older one", choice.step)
            continue
        own = None if lost else _apply(loader, *loaded, choice.step)
        mine = (own.pipeline_state or {}) if own is not None else {}
        report = exchange_and_rebuild(position, choice, model=target.model,
                                      optimizer=target.optimizer, scheduler=target.scheduler,
                                      extras=target.extras, group=target.process_group,
                                      my_grad_norm=mine.get("grad_norm"),
                                      my_replicas=mine.get("replicas"))
        if own is not None:
            return own
        assert report is not None
        norms = ", ".join(f"stage {s}: {n:.4g}" for s, n in report.grad_norms.items())
        older = (f" (weights of step {report.weights_step})"
                 if report.weights_step != choice.step else "")
        log.warning("ckpt: rank %d (pipeline stage %d) had no snapshot of step %d; rebuilt by "
                    "CheckFree as %s%s%s; fresh optimizer at the neighbour's learning rate x %g",
                    target.rank, position.stage, choice.step, report.description,
                    f" (gradient norms {norms})" if norms else "", older, position.lr_scale)
        return RestoreOutcome(choice.step, "checkfree", report.description, None)
