"""Which step the CheckFree restore tier completes, and the pipeline position it trusts."""

from __future__ import annotations

import pytest
import torch

from ckpt import PipelinePosition
from ckpt.errors import ConfigError, StageRebuildError
from ckpt.recovery.stage_rebuild import choose_rebuild, state_fingerprint


def _position(num_stages: int = 5, **kw) -> PipelinePosition:
    return PipelinePosition(stage=0, num_stages=num_stages, **kw)


def test_the_newest_step_all_survivors_hold_is_chosen_when_a_block_stage_has_nothing():
    steps = [[9, 8, 7], [9, 8], [], [9, 8, 7], [8, 7]]  # rank 4 (head) lacks 9
    choice, reasons = choose_rebuild(_position(), steps)
    assert (choice.step, choice.lost_ranks) == (8, (2,))
    assert choice.plan.for_stage(2).sources == (1, 3)
    assert len(reasons) == 1 and "pipeline stage 4 (embedding/head) lacks it" in reasons[0]


def test_a_step_every_rank_holds_is_left_to_the_exact_tiers():
    choice, _ = choose_rebuild(_position(), [[5, 4], [5, 4], [5], [5, 4], [5, 4]])
    assert (choice.step, choice.lost_ranks) == (4, (2,))


def test_an_edge_block_stage_needs_checkfree_plus():
    steps = [[3], [], [3], [3], [3], [3], [3]]
    choice, reasons = choose_rebuild(_position(7), steps)
    assert choice is None and "stage 1 is an edge stage" in reasons[0]
    choice, _ = choose_rebuild(_position(7, checkfree_plus=True), steps)
    assert choice.plan.for_stage(1).method == "copy" and choice.plan.for_stage(1).sources == (2,)


def test_two_adjacent_lost_stages_are_refused_with_the_reason():
    choice, reasons = choose_rebuild(_position(6), [[3], [3], [], [], [3], [3]])
    assert choice is None and "lost together" in reasons[0]


def test_stage_ranks_map_stages_to_ranks_of_the_group():
    position = PipelinePosition(stage=2, num_stages=5, stage_ranks=(4, 0, 2, 1, 3))
    assert position.rank_of(2) == 2 and position.stage_of_rank(4) == 0
    steps = [[1], [1], [], [1], [1]]  # rank 2 is stage 2; its neighbours are ranks 0 and 1
    choice, _ = choose_rebuild(position, steps)
    assert choice.lost_ranks == (2,) and choice.plan.for_stage(2).sources == (1, 3)
    with pytest.raises(StageRebuildError, match="outside the process group"):
        choose_rebuild(position, steps[:3])


@pytest.mark.parametrize(("kw", "match"), [
    (dict(stage=0, num_stages=2), "num_stages must be >= 3"),
    (dict(stage=5, num_stages=5), r"stage must be in \[0, 5\)"),
    (dict(stage=0, num_stages=5, checkfree_plus=True), "CheckFree\\+ needs >= 4 block stages"),
    (dict(stage=0, num_stages=3, stage_ranks=(0, 0, 1)), "distinct"),
    (dict(stage=0, num_stages=3, lr_scale=0.0), "lr_scale must be a finite number > 0"),
])
def test_bad_positions_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        PipelinePosition(**kw)


def test_fingerprint_sees_keys_dtypes_and_shapes_but_not_values():
    a = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    assert state_fingerprint(a) == state_fingerprint({"w": torch.ones(2, 3), "b": torch.ones(3)})
    assert state_fingerprint(a) != state_fingerprint({"w": torch.zeros(3, 2), "b": torch.zeros(3)})
    assert state_fingerprint(a) != state_fingerprint({"w": torch.zeros(2, 3, dtype=torch.float64),
                                                      "b": torch.zeros(3)})
    assert state_fingerprint(a) != state_fingerprint({"W": torch.zeros(2, 3), "b": torch.zeros(3)})


def test_with_replicas_an_embedding_or_head_stage_comes_from_its_block_neighbour():
    position = _position(5, replica_every=10)
    choice, _ = choose_rebuild(position, [[], [7], [7], [7], []])
    assert [(r.stage, r.method, r.sources) for r in choice.plan.rebuilds] == \
        [(0, "replica", (1,)), (4, "replica", (3,))]
    choice, _ = choose_rebuild(position, [[7], [7], [], [7], [7]])  # blocks still averaged
    assert choice.plan.for_stage(2).method == "average"


def test_an_end_stage_lost_with_its_replica_holder_is_refused():
    choice, reasons = choose_rebuild(_position(5, replica_every=10), [[], [], [7], [7], [7]])
    assert choice is None and "which keeps its replica, were lost together" in reasons[0]


def test_replica_every_must_be_a_non_negative_int():
    with pytest.raises(ConfigError, match="replica_every must be an int >= 0"):
        _position(5, replica_every=-1)
