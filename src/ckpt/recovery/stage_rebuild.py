"""The last restore tier: rebuild lost pipeline stages from their neighbours (CheckFree).

``restore()`` gets here when the Checkpointer knows its pipeline position and no step is
held and loadable on every rank. Every rank of the pipeline runs it, in the same order, on
the training thread:

1. :func:`choose_rebuild` (pure, on the step lists every rank gathered): the newest step
   that every rank holds except some block stages, which ``plan_recovery`` can rebuild
   from stages that hold it;
2. the survivors load that step from their own tiers (``restore`` does this, and agrees
   on success with an ``all_reduce``);
3. :func:`exchange_and_rebuild`: each source sends the lost stage a header (step, a
   fingerprint of its state dict's keys/dtypes/shapes, its last gradient norm) and, from
   the first source, the job-wide non-tensor state (scheduler position, learning rates,
   extras) as JSON; every rank then agrees the headers are acceptable (``all_reduce``)
   before any tensor moves; then the model tensors follow, point to point on the
   Checkpointer's process group (gloo or NCCL), in the receiver's key order. No pickle.
4. the lost stage applies the rule (``execute_rebuild``), loads the result, and gets a
   fresh optimizer at the neighbour's learning rate × ``lr_scale``.

Senders only send and receivers only receive (a source is never lost), each in
increasing stage order, so the blocking point-to-point calls cannot deadlock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ckpt.errors import StageRebuildError
from ckpt.recovery.checkfree.optim import SCALE_KEY, reset_optimizer
from ckpt.recovery.checkfree.plan import RecoveryPlan, StageRebuild, execute_rebuild, plan_recovery
from ckpt.recovery.checkfree.position import PipelinePosition
from ckpt.snapshot.tree import dtype_from_name, flatten, unflatten

log = logging.getLogger("ckpt.restore")

_MAGIC = 0x636B70746366  # "ckptcf"
# magic, step, fingerprint, tensor count (-1: no such state), aux JSON bytes, aux tensor
# count, step of the weights sent (a replica's may be older)
_HEADER_WORDS = 7
_TREE_MAGIC = 0x636B70747472  # "ckpttr"
# Snapshot state entry: {"stage", "num_stages", "grad_norm", "replicas"}; replicas (on the
# holders of the embedding/head replicas): {"<stage>": {"step": s, "state": {key: tensor}}}.
PIPELINE_STATE_KEY = "pipeline"


@dataclass(frozen=True)
class RebuildChoice:
    step: int
    plan: RecoveryPlan
    lost_ranks: tuple[int, ...]


def choose_rebuild(position: PipelinePosition, steps_by_rank: Sequence[Sequence[int]]
                   ) -> tuple[RebuildChoice | None, list[str]]:
    """The newest step CheckFree can complete, and why each newer one could not be.

    ``steps_by_rank[r]``: the steps rank r holds. A step every rank holds is skipped (the
    exact tiers had it). Deterministic: every rank computes the same answer.
    """
    ranks = [position.rank_of(s) for s in range(position.num_stages)]
    if max(ranks) >= len(steps_by_rank):
        raise StageRebuildError(f"PipelinePosition.stage_ranks {ranks} names ranks outside the "
                                f"process group of {len(steps_by_rank)} ranks")
    held = [set(steps_by_rank[r]) for r in ranks]
    reasons: list[str] = []
    for step in sorted(set().union(*held), reverse=True):
        lost = [s for s in range(position.num_stages) if step not in held[s]]
        if not lost:
            continue
        ends, problem = _plan_ends(position, lost)
        if problem:
            reasons.append(f"step {step}: {problem}")
            continue
        blocks = [s for s in lost if position.is_block_stage(s)]
        try:
            plan = plan_recovery(position.num_block_stages, blocks,
                                 checkfree_plus=position.checkfree_plus) if blocks else None
        except StageRebuildError as exc:
            reasons.append(f"step {step}: {exc}")
            continue
        rebuilds = sorted((plan.rebuilds if plan else ()) + ends, key=lambda r: r.stage)
        plan = RecoveryPlan(position.num_block_stages, position.checkfree_plus, tuple(rebuilds))
        return RebuildChoice(step, plan, tuple(ranks[s] for s in lost)), reasons
    return None, reasons


def _plan_ends(position: PipelinePosition, lost: list[int]
               ) -> tuple[tuple[StageRebuild, ...], str | None]:
    """Rebuilds of the lost embedding/head stages from their replicas, or why not."""
    ends = []
    for stage in lost:
        if position.is_block_stage(stage):
            continue
        if not position.replica_every:
            return (), (f"pipeline stage {stage} (embedding/head) lacks it, and without replicas "
                        f"(PipelinePosition.replica_every) CheckFree rebuilds only block stages; "
                        f"persist those stages (persist_every) so that they restore from disk")
        holder = position.replica_holder(stage)
        if holder in lost:
            return (), (f"pipeline stage {stage} (embedding/head) and stage {holder}, which keeps "
                        f"its replica, were lost together; restore one of them from a checkpoint")
        ends.append(StageRebuild(stage, "replica", (holder,)))
    return tuple(ends), None


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> int:
    """A signed 63-bit hash of the state dict's keys, dtypes and shapes (not its values)."""
    desc = [[k, str(v.dtype), list(v.shape)] for k, v in state.items()]
    digest = hashlib.blake2b(json.dumps(desc).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def job_state_of(optimizer: torch.optim.Optimizer, scheduler: Any,
                 extras: Mapping[str, Any]) -> dict[str, Any]:
    """What a rebuilt stage takes from a neighbour: its place in the schedule, its learning
    rates with its own CheckFree scale divided out, and the extras (data position...)."""
    return {
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "lrs": [float(g["lr"]) / float(g.get(SCALE_KEY, 1.0)) for g in optimizer.param_groups],
        "extra": {name: obj.state_dict() for name, obj in extras.items()},
    }


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or hasattr(value, "to_local"):
            raise StageRebuildError(f"the CheckFree tier sends plain tensors; state entry {key!r} "
                                    f"is a {type(value).__name__} (sharded stages are not "
                                    f"supported: restore them from a checkpoint)")
    return state


class _Wire:
    """Point-to-point on the Checkpointer's group, with ranks given in that group."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if dist.get_backend(group) == "nccl" else torch.device("cpu"))

    def _global(self, rank: int) -> int:
        return rank if self.group is None else self.dist.get_global_rank(self.group, rank)

    def send(self, tensor: torch.Tensor, rank: int) -> None:
        try:
            self.dist.send(tensor.detach().contiguous().to(self.device), self._global(rank),
                           group=self.group)
        except RuntimeError as exc:  # a dead peer: the backend's timeout or a reset
            raise self._peer_lost("send to", rank, exc) from exc

    def recv(self, like: torch.Tensor | tuple[torch.dtype, Sequence[int]], rank: int) -> torch.Tensor:
        if isinstance(like, torch.Tensor):
            buf = torch.empty(like.shape, dtype=like.dtype, device=self.device)
        else:
            buf = torch.empty(list(like[1]), dtype=like[0], device=self.device)
        try:
            self.dist.recv(buf, self._global(rank), group=self.group)
        except RuntimeError as exc:
            raise self._peer_lost("receive from", rank, exc) from exc
        return buf

    @staticmethod
    def _peer_lost(what: str, rank: int, exc: BaseException) -> StageRebuildError:
        return StageRebuildError(f"CheckFree could not {what} rank {rank} of the process group "
                                 f"({type(exc).__name__}: {str(exc)[:200]}); the peer died or "
                                 f"hung during the rebuild: restart the job (torchrun restarts "
                                 f"every worker) and restore again")

    def all_ok(self, ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


def _send_tree(wire: _Wire, obj: Any, rank: int) -> None:
    """A tree of tensors and JSON values, no pickle: header, JSON skeleton, tensors."""
    blob, tensors = _pack_aux(obj)
    wire.send(torch.tensor([_TREE_MAGIC, len(blob)], dtype=torch.int64), rank)
    wire.send(torch.frombuffer(bytearray(blob), dtype=torch.uint8), rank)
    for t in tensors:
        wire.send(t, rank)


def _recv_tree(wire: _Wire, rank: int) -> Any:
    magic, nbytes = wire.recv((torch.int64, [2]), rank).cpu().tolist()
    if magic != _TREE_MAGIC:
        raise StageRebuildError(f"rank {rank} sent a foreign message while replicating "
                                f"(magic {magic:#x}); are all stages running the same ckpt?")
    desc = json.loads(bytes(wire.recv((torch.uint8, [nbytes]), rank).cpu().numpy()).decode())
    tensors = [wire.recv((dtype_from_name(d), shape), rank).cpu() for d, shape in desc["tensors"]]
    return unflatten(desc["skeleton"], tensors)


def exchange_replicas(position: PipelinePosition, model: torch.nn.Module, group: Any,
                      step: int) -> dict[str, dict[str, Any]]:
    """The embedding/head stages send their weights to their replica holders (blocking,
    point to point; every stage calls it at the same step). Returns what this rank received:
    ``{"<stage>": {"step": step, "state": {key: CPU tensor}}}`` (empty on other ranks)."""
    wire = _Wire(group)
    me, last = position.stage, position.num_stages - 1
    if me in (0, last):
        _send_tree(wire, _model_state(model), position.rank_of(position.replica_holder(me)))
    received = {}
    for end in (0, last):
        if position.replica_holder(end) == me:
            received[str(end)] = {"step": step,
                                  "state": _recv_tree(wire, position.rank_of(end))}
    return received


@dataclass
class _Incoming:
    header: list[int]
    grad_norm: float
    aux: dict[str, Any] | None


def _pack_aux(job_state: Mapping[str, Any]) -> tuple[bytes, list[torch.Tensor]]:
    tensors, skeleton = flatten(dict(job_state))
    specs = [[str(t.dtype).removeprefix("torch."), list(t.shape)] for _, t in tensors]
    blob = json.dumps({"skeleton": skeleton, "tensors": specs}, separators=(",", ":")).encode()
    return blob, [t for _, t in tensors]


def _send_to(wire: _Wire, target_rank: int, step: int, state: Mapping[str, torch.Tensor] | None,
             grad_norm: float | None, job_state: Mapping[str, Any] | None,
             state_step: int) -> list[torch.Tensor]:
    """Header, gradient norm and job-state JSON to ``target_rank``; returns the job state's
    tensors, which follow the model tensors once every rank agreed on the headers."""
    blob, aux_tensors = _pack_aux(job_state) if job_state is not None else (b"", [])
    header = torch.tensor([_MAGIC, step, state_fingerprint(state) if state is not None else 0,
                           len(state) if state is not None else -1, len(blob),
                           len(aux_tensors), state_step], dtype=torch.int64)
    wire.send(header, target_rank)
    wire.send(torch.tensor([math.nan if grad_norm is None else grad_norm], dtype=torch.float64),
              target_rank)
    if blob:
        wire.send(torch.frombuffer(bytearray(blob), dtype=torch.uint8), target_rank)
    return aux_tensors


def _recv_from(wire: _Wire, source_rank: int) -> _Incoming:
    header = wire.recv((torch.int64, [_HEADER_WORDS]), source_rank).cpu().tolist()
    norm = float(wire.recv((torch.float64, [1]), source_rank).cpu()[0])
    aux = None
    if header[4] > 0:
        raw = wire.recv((torch.uint8, [header[4]]), source_rank).cpu()
        aux = json.loads(bytes(raw.numpy()).decode())
    return _Incoming(header, norm, aux)


def _check_incoming(rebuild: StageRebuild, position: PipelinePosition, step: int,
                    mine: Mapping[str, torch.Tensor], got: Mapping[int, _Incoming]) -> list[str]:
    problems = []
    fingerprint = state_fingerprint(mine)
    for stage, inc in got.items():
        magic, their_step, their_fp, count = inc.header[:4]
        if magic != _MAGIC or their_step != step:
            problems.append(f"stage {stage} (rank {position.rank_of(stage)}) sent step "
                            f"{their_step} (expected {step}) or a foreign header")
        elif count < 0:
            problems.append(f"stage {stage}'s snapshot of step {step} holds no replica of stage "
                            f"{rebuild.stage} (written before the first replication, or without "
                            f"PipelinePosition.replica_every)")
        elif their_fp != fingerprint or count != len(mine):
            problems.append(f"stage {stage}'s state dict ({count} entries) differs in keys, dtypes "
                            f"or shapes from stage {rebuild.stage}'s ({len(mine)}): CheckFree "
                            f"rebuilds a stage only from neighbours of the same structure")
        elif rebuild.method == "average" and not (math.isfinite(inc.grad_norm) and inc.grad_norm >= 0):
            problems.append(f"stage {stage}'s snapshot of step {step} records no gradient norm "
                            f"(written without Checkpointer(pipeline=...)?): the rule needs it")
    return problems


@dataclass(frozen=True)
class RebuildReport:
    stage: int
    step: int
    description: str
    grad_norms: dict[int, float]
    weights_step: int  # the step of the weights the stage got (a replica's may be older)


def exchange_and_rebuild(position: PipelinePosition, choice: RebuildChoice, *,
                         model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         scheduler: Any, extras: Mapping[str, Any], group: Any,
                         my_grad_norm: float | None,
                         my_replicas: Mapping[str, Any] | None = None) -> RebuildReport | None:
    """Run steps 3-4 of the module docstring on this rank; the report on a rebuilt rank.

    A survivor must already hold ``choice.step``'s state in its live objects. Raises
    StageRebuildError on every rank when a header does not check out or a rebuild fails.
    """
    wire = _Wire(group)
    me = position.stage
    rebuilds = choice.plan.rebuilds
    mine_rebuild = next((r for r in rebuilds if r.stage == me), None)
    state = _model_state(model)
    # -- headers ---------------------------------------------------------------------------
    outgoing: dict[int, list] = {}
    incoming: dict[int, _Incoming] = {}
    sent_states: dict[int, Mapping[str, torch.Tensor]] = {}
    for r in rebuilds:
        if me in r.sources:
            job = job_state_of(optimizer, scheduler, extras) if me == r.sources[0] else None
            send_state, state_step = state, choice.step
            if r.method == "replica":
                replica = (my_replicas or {}).get(str(r.stage))
                send_state = replica["state"] if replica else None
                state_step = int(replica["step"]) if replica else -1
            outgoing[r.stage] = _send_to(wire, position.rank_of(r.stage), choice.step, send_state,
                                         my_grad_norm, job, state_step)
            if send_state is not None:
                sent_states[r.stage] = send_state
    problems: list[str] = []
    if mine_rebuild is not None:
        for source in mine_rebuild.sources:
            incoming[source] = _recv_from(wire, position.rank_of(source))
        problems = _check_incoming(mine_rebuild, position, choice.step, state, incoming)
    if not wire.all_ok(not problems):
        if problems:
            raise StageRebuildError(f"cannot rebuild pipeline stage {me} at step {choice.step}: "
                                    + "; ".join(problems))
        raise StageRebuildError(f"CheckFree could not rebuild the lost stages "
                                f"{list(choice.plan.lost)} at step {choice.step}; their ranks "
                                f"{list(choice.lost_ranks)} log why")
    # -- tensors ---------------------------------------------------------------------------
    for target_stage, aux_tensors in outgoing.items():
        for value in list(sent_states[target_stage].values()) + aux_tensors:
            wire.send(value, position.rank_of(target_stage))
    report, error = None, None
    if mine_rebuild is not None:
        try:
            report = _rebuild_here(wire, position, mine_rebuild, choice.step, state, incoming,
                                   model, optimizer, scheduler, extras)
        except Exception as exc:  # reported on every rank below
            error = exc
    if not wire.all_ok(error is None):
        if error is not None:
            raise StageRebuildError(f"rebuilding pipeline stage {me} failed: {error}") from error
        raise StageRebuildError(f"CheckFree failed on a lost stage's rank "
                                f"({list(choice.lost_ranks)}); see its log")
    return report


def _rebuild_here(wire: _Wire, position: PipelinePosition, rebuild: StageRebuild, step: int,
                  mine: Mapping[str, torch.Tensor], incoming: Mapping[int, _Incoming],
                  model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                  extras: Mapping[str, Any]) -> RebuildReport:
    states: dict[int, dict[str, torch.Tensor]] = {}
    aux: dict[str, Any] | None = None
    for source in rebuild.sources:
        rank = position.rank_of(source)
        states[source] = {k: wire.recv(v, rank).to(v.device) for k, v in mine.items()}
        inc = incoming[source]
        if inc.aux is not None:
            tensors = [wire.recv((dtype_from_name(d), shape), rank).cpu()
                       for d, shape in inc.aux["tensors"]]
            aux = unflatten(inc.aux["skeleton"], tensors)
    norms = {s: incoming[s].grad_norm for s in rebuild.sources}
    rebuilt = execute_rebuild(rebuild, states, norms, position.eps)
    model.load_state_dict(rebuilt)
    if aux is not None:
        _apply_job_state(aux, optimizer, scheduler, extras)
    reset_optimizer(optimizer, lr_scale=position.lr_scale, scheduler=scheduler)
    return RebuildReport(rebuild.stage, step, rebuild.describe(),
                         norms if rebuild.method == "average" else {},
                         min(incoming[s].header[6] for s in rebuild.sources))


def _apply_job_state(aux: Mapping[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                     extras: Mapping[str, Any]) -> None:
    if scheduler is not None and aux.get("scheduler") is not None:
        own_base = list(getattr(scheduler, "base_lrs", []))
        scheduler.load_state_dict(aux["scheduler"])
        if own_base:  # the neighbour's may carry its own CheckFree scale
            scheduler.base_lrs = own_base
    lrs = aux.get("lrs") or []
    if len(lrs) == len(optimizer.param_groups):
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr if not isinstance(group["lr"], torch.Tensor) else group["lr"].fill_(lr)
            group.pop(SCALE_KEY, None)  # lr is unscaled now: reset_optimizer scales it once
    else:
        log.warning("ckpt: the neighbour has %d optimizer param groups, this stage %d: the "
                    "rebuilt stage keeps its own learning rates", len(lrs), len(optimizer.param_groups))
    for name, obj in extras.items():
        if name in aux.get("extra", {}):
            obj.load_state_dict(aux["extra"][name])
        else:
            log.warning("ckpt: the neighbour's snapshot has no extra %r; the rebuilt stage keeps "
                        "its own", name)
