"""CheckFree and CheckFree+: rebuild a lost pipeline stage from its neighbours (arXiv 2506.15461).

The method as plain functions on modules, state dicts and optimizers, independent of how
the pipeline is run (one process or one per stage):

- :func:`plan_recovery` says which lost stage is rebuilt from which stages, or refuses;
- :func:`rebuild_stage` is the rule (gradient-weighted average of the two neighbours),
  :func:`copy_stage` the CheckFree+ rebuild of an edge stage;
- :class:`GradNormTracker` records each stage's post-clipping gradient norm per step;
- :func:`reset_optimizer` gives the rebuilt stage a fresh optimizer at ``lr * lr_scale``;
- :func:`microbatch_stage_order` is the CheckFree+ swapped execution order;
- :func:`extract_embedding_replica` / :func:`install_embedding_replica` keep stage 0
  (embedding, final norm, head) recoverable.

Stage 0 holds the embedding/head; stages 1..S are the body stages (see ``schedule``).
"""

from ckpt.recovery.checkfree.gradnorm import (
    DEFAULT_MAX_NORM,
    GradNormTracker,
    clip_and_measure,
    gradient_norm,
)
from ckpt.recovery.checkfree.optim import DEFAULT_LR_SCALE, reset_optimizer
from ckpt.recovery.checkfree.position import PipelinePosition
from ckpt.recovery.checkfree.plan import RecoveryPlan, StageRebuild, execute_rebuild, plan_recovery
from ckpt.recovery.checkfree.replica import (
    embedding_replica_holders,
    extract_embedding_replica,
    install_embedding_replica,
)
from ckpt.recovery.checkfree.rule import DEFAULT_EPS, copy_stage, neighbour_weights, rebuild_stage
from ckpt.recovery.checkfree.schedule import (
    edge_stand_in,
    is_swapped_microbatch,
    microbatch_stage_order,
    swap_partner,
)

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_LR_SCALE",
    "DEFAULT_MAX_NORM",
    "GradNormTracker",
    "PipelinePosition",
    "RecoveryPlan",
    "StageRebuild",
    "clip_and_measure",
    "copy_stage",
    "edge_stand_in",
    "embedding_replica_holders",
    "execute_rebuild",
    "extract_embedding_replica",
    "gradient_norm",
    "install_embedding_replica",
    "is_swapped_microbatch",
    "microbatch_stage_order",
    "neighbour_weights",
    "plan_recovery",
    "rebuild_stage",
    "reset_optimizer",
    "swap_partner",
]
