"""Which lost stage is rebuilt from which neighbours, or why it cannot be.

Stages are numbered as in :mod:`ckpt.recovery.checkfree.schedule`: 0 is the
embedding/head stage, 1..S the body stages, 1 and S the edge stages.

=============================  ======================================================
lost stage                     rebuilt by
=============================  ======================================================
inner (2..S-1)                 ``average`` of stages i-1 and i+1 (the CheckFree rule)
edge (1 or S), CheckFree+      ``copy`` of its swap partner (stage 2, or stage S-1)
0, CheckFree+                  ``replica`` held by the holder of stage 1 or of stage S
edge or 0, plain CheckFree     refused: restore it from a checkpoint
=============================  ======================================================

A rebuild also needs its sources: a source that is lost too (two adjacent stages lost
together) or not available (its holder has not come back) is refused. Every problem is
reported in one :class:`StageRebuildError`, each with what to do.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ckpt.errors import StageRebuildError
from ckpt.recovery.checkfree.gradnorm import GradNormTracker
from ckpt.recovery.checkfree.replica import embedding_replica_holders
from ckpt.recovery.checkfree.rule import DEFAULT_EPS, copy_stage, rebuild_stage
from ckpt.recovery.checkfree.schedule import MIN_STAGES_CHECKFREE_PLUS, check_num_stages, check_stage

RebuildMethod = Literal["average", "copy", "replica"]


@dataclass(frozen=True)
class StageRebuild:
    """How one lost stage is rebuilt.

    ``average``: ``sources == (i-1, i+1)``, weighted by their gradient norms
    (:func:`rebuild_stage`). ``copy``: ``sources == (partner,)`` (:func:`copy_stage`).
    ``replica``: ``sources == (holder,)``, the stage whose holder keeps the copy of stage 0
    (:func:`install_embedding_replica`). Every rebuilt stage then gets a fresh optimizer
    (:func:`reset_optimizer`).
    """

    stage: int
    method: RebuildMethod
    sources: tuple[int, ...]

    def describe(self) -> str:
        """One line for a log: which stage, how, from where."""
        if self.method == "average":
            prev, nxt = self.sources
            return f"stage {self.stage}: gradient-weighted average of stages {prev} and {nxt}"
        if self.method == "copy":
            return f"stage {self.stage}: copy of its CheckFree+ swap partner, stage {self.sources[0]}"
        return f"stage {self.stage}: embedding/head replica kept by the holder of stage {self.sources[0]}"


@dataclass(frozen=True)
class RecoveryPlan:
    """The rebuild of every lost stage, in increasing stage order."""

    num_stages: int
    checkfree_plus: bool
    rebuilds: tuple[StageRebuild, ...]

    @property
    def lost(self) -> tuple[int, ...]:
        return tuple(r.stage for r in self.rebuilds)

    def for_stage(self, stage: int) -> StageRebuild:
        for rebuild in self.rebuilds:
            if rebuild.stage == stage:
                return rebuild
        raise KeyError(f"stage {stage} is not lost in this plan (lost: {list(self.lost)})")


def plan_recovery(
    num_stages: int,
    lost: Iterable[int],
    *,
    checkfree_plus: bool = False,
    available: Collection[int] | None = None,
    copy_swap_partners: bool = False,
) -> RecoveryPlan:
    """Plan the rebuild of the ``lost`` stages of a pipeline of ``num_stages`` body stages.

    ``available``: the stages whose holders are up and can send their weights (default:
    every stage not lost). ``copy_swap_partners``: under CheckFree+, also rebuild stages
    2 and S-1 by copying their swap partner (1 and S) instead of averaging their
    neighbours, as the reference code does; off by default (the paper's rule averages
    every inner stage). Raises StageRebuildError listing every stage that cannot be rebuilt,
    ConfigError for arguments out of range.
    """
    check_num_stages(num_stages, checkfree_plus)
    lost_set = set()
    for stage in lost:
        check_stage(num_stages, stage)
        lost_set.add(stage)
    if available is None:
        up = set(range(num_stages + 1)) - lost_set
    else:
        for stage in available:
            check_stage(num_stages, stage)
        up = set(available) - lost_set
    rebuilds, problems = [], []
    for stage in sorted(lost_set):
        rebuild, problem = _plan_one(num_stages, stage, checkfree_plus, copy_swap_partners, lost_set, up)
        if problem is None:
            rebuilds.append(rebuild)
        else:
            problems.append(problem)
    if problems:
        raise StageRebuildError(
            f"CheckFree cannot rebuild every lost stage (S={num_stages} body stages, lost "
            f"{sorted(lost_set)}, CheckFree+ {'on' if checkfree_plus else 'off'}):\n- "
            + "\n- ".join(problems)
        )
    return RecoveryPlan(num_stages, checkfree_plus, tuple(rebuilds))


def _plan_one(
    num_stages: int, stage: int, plus: bool, copy_partners: bool, lost: set[int], up: set[int]
) -> tuple[StageRebuild | None, str | None]:
    last = num_stages
    if stage == 0:
        holders = embedding_replica_holders(num_stages)
        if not plus:
            return None, (
                "stage 0 (embedding, final norm, head) has no neighbour of its structure and, without "
                "CheckFree+, no replica: restore stage 0 from a checkpoint, or enable CheckFree+ (which "
                f"keeps copies of it with the holders of stages {_join(holders)})"
            )
        usable = [h for h in holders if h in up]
        if not usable:
            why = _why_missing(holders, lost)
            return None, (
                f"stage 0's replicas are kept by the holders of stages {_join(holders)}, and {why}: "
                "restore stage 0 from a checkpoint, or bring a replica holder back first"
            )
        return StageRebuild(0, "replica", (usable[0],)), None
    if stage in (1, last):
        if num_stages == 1:
            return None, (
                "stage 1 is the only body stage: it has no neighbour of its structure to be rebuilt "
                "from; restore stage 1 from a checkpoint"
            )
        if not plus:
            other = 2 if stage == 1 else last - 1
            if num_stages >= MIN_STAGES_CHECKFREE_PLUS:
                alternative = f", or enable CheckFree+ so that stage {other} learns to stand in for it"
            else:
                alternative = f" (CheckFree+ would need S >= {MIN_STAGES_CHECKFREE_PLUS} body stages)"
            return None, (
                f"stage {stage} is an edge stage: its other neighbour is stage 0 (embedding/head), "
                f"which cannot be averaged with stage {other}: restore stage {stage} from a checkpoint"
                + alternative
            )
        partner = 2 if stage == 1 else last - 1
        return _needs(stage, "copy", (partner,), lost, up)
    if plus and copy_partners and stage in (2, last - 1):
        partner = 1 if stage == 2 else last
        return _needs(stage, "copy", (partner,), lost, up)
    return _needs(stage, "average", (stage - 1, stage + 1), lost, up)


def _needs(
    stage: int, method: RebuildMethod, sources: tuple[int, ...], lost: set[int], up: set[int]
) -> tuple[StageRebuild | None, str | None]:
    gone = [s for s in sources if s in lost]
    if gone:
        return None, (
            f"stages {stage} and {gone[0]} were lost together, and stage {stage} is rebuilt from "
            f"stage{'s' if len(sources) > 1 else ''} {_join(sources)}: CheckFree cannot rebuild two "
            f"adjacent stages; restore one of them from a checkpoint, then rebuild the other"
        )
    absent = [s for s in sources if s not in up]
    if absent:
        return None, (
            f"stage {stage} is rebuilt from stage{'s' if len(sources) > 1 else ''} {_join(sources)}, but "
            f"stage {absent[0]} is not available (its holder is not up): bring stage {absent[0]} "
            f"back first, or restore stage {stage} from a checkpoint"
        )
    return StageRebuild(stage, method, sources), None


def _why_missing(stages: tuple[int, ...], lost: set[int]) -> str:
    return ", ".join(f"stage {s} is {'lost too' if s in lost else 'not available'}" for s in stages)


def _join(stages: Iterable[int]) -> str:
    return " and ".join(str(s) for s in stages)


def execute_rebuild(
    rebuild: StageRebuild,
    source_states: Mapping[int, Mapping[str, Any]],
    grad_norms: Mapping[int, float] | GradNormTracker | None = None,
    eps: float = DEFAULT_EPS,
) -> dict[str, Any]:
    """The rebuilt stage's state dict, from what the sources' holders sent.

    ``source_states[s]`` is the state dict of source stage ``s`` (for a ``replica``
    rebuild: the stage-0 replica its holder keeps). ``grad_norms`` (a mapping or a
    :class:`GradNormTracker`) gives the sources' last post-clipping gradient norms; only
    ``average`` needs it. Load the result with ``module.load_state_dict``, then call
    :func:`reset_optimizer` (or :func:`install_embedding_replica` for stage 0).
    """
    missing = [s for s in rebuild.sources if s not in source_states]
    if missing:
        raise StageRebuildError(
            f"{rebuild.describe()} needs the state of stage {missing[0]}, which was not given"
        )
    if rebuild.method != "average":
        return copy_stage(source_states[rebuild.sources[0]])
    if grad_norms is None:
        raise StageRebuildError(
            f"{rebuild.describe()} needs both neighbours' gradient norms; pass grad_norms"
        )
    prev, nxt = rebuild.sources
    lookup = grad_norms.norm if isinstance(grad_norms, GradNormTracker) else grad_norms.__getitem__
    try:
        prev_norm, next_norm = lookup(prev), lookup(nxt)
    except KeyError as err:
        raise StageRebuildError(f"{rebuild.describe()}: no gradient norm for a neighbour ({err})") from None
    return rebuild_stage(source_states[prev], source_states[nxt], prev_norm, next_norm, eps)
