"""Where a process sits in a pipeline, as the Checkpointer's CheckFree restore tier sees it.

A pipeline of ``num_stages`` processes (pipeline stages ``0 .. num_stages - 1``): stage 0
runs the embedding, the last stage the final norm and head, and the stages in between
run transformer blocks of one structure. In the library's numbering
(:mod:`ckpt.recovery.checkfree.schedule`) the block stages are body stages ``1 .. S``
with ``S = num_stages - 2`` (the same numbers), and the first and last pipeline stages
together are stage 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ckpt.errors import ConfigError
from ckpt.recovery.checkfree.optim import DEFAULT_LR_SCALE
from ckpt.recovery.checkfree.rule import DEFAULT_EPS

MIN_PIPELINE_STAGES = 3  # embedding, at least one block stage, head


@dataclass(frozen=True, kw_only=True)
class PipelinePosition:
    """This process's pipeline stage, for ``Checkpointer(pipeline=...)``.

    With it, the Checkpointer records each step's gradient norm (measured in the
    optimizer's step pre-hook, i.e. after the caller's gradient clipping) in the snapshot,
    and ``restore()`` rebuilds a block stage that no tier holds from its neighbours
    (CheckFree) when every other stage holds a common step.
    """

    stage: int
    """This process's pipeline stage, 0 (embedding) .. num_stages - 1 (head)."""
    num_stages: int
    """Processes in the pipeline, embedding and head stages included (>= 3)."""
    stage_ranks: tuple[int, ...] | None = None
    """Rank, in the Checkpointer's process group, of each stage; None: stage i is rank i."""
    checkfree_plus: bool = False
    """The job trains with the CheckFree+ swapped order: the first and last block stage
    can then be rebuilt as a copy of their swap partner (needs >= 4 block stages)."""
    lr_scale: float = DEFAULT_LR_SCALE
    """A rebuilt stage's learning rate is its neighbour's times this."""
    eps: float = DEFAULT_EPS
    """The rule's epsilon: weights are ``norm + eps``."""
    replica_every: int = 0
    """Every this many steps the embedding and head stages send their weights to their block
    neighbour (stage 1, stage num_stages - 2), which keeps the copy in its own snapshots, so
    a lost embedding/head stage is rebuilt from it (the paper's replication, a small cost).
    0: no replicas (a lost embedding/head stage must restore from a checkpoint)."""

    def __post_init__(self) -> None:
        for name in ("stage", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"PipelinePosition.{name} must be an int, got {value!r}")
        if self.num_stages < MIN_PIPELINE_STAGES:
            raise ConfigError(f"PipelinePosition.num_stages must be >= {MIN_PIPELINE_STAGES} "
                              f"(embedding, block stages, head), got {self.num_stages}")
        if not 0 <= self.stage < self.num_stages:
            raise ConfigError(f"PipelinePosition.stage must be in [0, {self.num_stages}), "
                              f"got {self.stage}")
        if self.stage_ranks is not None:
            ranks = tuple(self.stage_ranks)
            if len(ranks) != self.num_stages or len(set(ranks)) != len(ranks) or \
                    any(not isinstance(r, int) or r < 0 for r in ranks):
                raise ConfigError(f"PipelinePosition.stage_ranks must be {self.num_stages} distinct "
                                  f"ranks >= 0, one per stage, got {self.stage_ranks!r}")
            object.__setattr__(self, "stage_ranks", ranks)
        if self.checkfree_plus and self.num_block_stages < 4:
            raise ConfigError(f"CheckFree+ needs >= 4 block stages (num_stages >= 6), got "
                              f"num_stages={self.num_stages}")
        if not isinstance(self.replica_every, int) or isinstance(self.replica_every, bool) \
                or self.replica_every < 0:
            raise ConfigError(f"PipelinePosition.replica_every must be an int >= 0 (0: no "
                              f"replicas), got {self.replica_every!r}")
        for name in ("lr_scale", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"PipelinePosition.{name} must be a finite number > 0, "
                                  f"got {value!r}")

    @property
    def num_block_stages(self) -> int:
        """S, the number of body stages of the CheckFree rule."""
        return self.num_stages - 2

    def is_block_stage(self, stage: int) -> bool:
        return 0 < stage < self.num_stages - 1

    def replica_holder(self, stage: int) -> int:
        """The block stage that keeps the replica of embedding/head stage ``stage``."""
        return 1 if stage == 0 else self.num_stages - 2

    def rank_of(self, stage: int) -> int:
        return stage if self.stage_ranks is None else self.stage_ranks[stage]

    def stage_of_rank(self, rank: int) -> int | None:
        if self.stage_ranks is None:
            return rank if 0 <= rank < self.num_stages else None
        return self.stage_ranks.index(rank) if rank in self.stage_ranks else None
