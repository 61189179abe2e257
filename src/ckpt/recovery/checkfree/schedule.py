"""CheckFree+ out-of-order micro-batches: the edge stages' neighbours learn to stand in.

Stage numbering (as in the paper and its reference code): stage 0 holds the embedding,
the final norm and the head; stages 1..S are the S body stages (e.g. transformer
blocks), run in order 1, 2, ..., S between the embedding and the head. Stage 1 and stage
S are the *edge* stages: their other neighbour is stage 0, whose weights have a different
structure, so the averaging rule cannot rebuild them.

CheckFree+ runs every odd micro-batch of a step (index 1, 3, ... counted from 0 within
the step) with stages 1 and 2 swapped and stages S-1 and S swapped, so that stage 2 also
learns stage 1's job and stage S-1 stage S's. A lost edge stage is then rebuilt by
copying its swap partner. The reference code hard-codes S = 6 (positions 1..6 run
2, 1, 3, 4, 6, 5 on odd micro-batches); any S >= 4 works (for S < 4 the two pairs overlap).
"""

from __future__ import annotations

from ckpt.errors import ConfigError

MIN_STAGES_CHECKFREE_PLUS = 4


def check_num_stages(num_stages: int, checkfree_plus: bool) -> None:
    """ConfigError unless ``num_stages`` body stages can run (CheckFree+ needs S >= 4)."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ConfigError(
            f"num_stages is the number of body stages (stage 0 not counted), >= 1; found {num_stages!r}"
        )
    if checkfree_plus and num_stages < MIN_STAGES_CHECKFREE_PLUS:
        raise ConfigError(
            f"CheckFree+ swaps stages 1<->2 and S-1<->S, which needs S >= {MIN_STAGES_CHECKFREE_PLUS} "
            f"body stages so that the two pairs are distinct; found S={num_stages}. Use more stages "
            "or plain CheckFree (whose edge stages must then be restored from a checkpoint)"
        )


def check_stage(num_stages: int, stage: int) -> None:
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= num_stages:
        raise ConfigError(
            f"stage must be in 0..{num_stages} (0 = embedding/head, 1..{num_stages} = body); found {stage!r}"
        )


def swap_partner(num_stages: int, stage: int) -> int | None:
    """The stage that ``stage`` trades places with on odd micro-batches under CheckFree+,
    or None for stages that never move (stage 0 and stages 3..S-2)."""
    check_num_stages(num_stages, checkfree_plus=True)
    check_stage(num_stages, stage)
    pairs = {1: 2, 2: 1, num_stages - 1: num_stages, num_stages: num_stages - 1}
    return pairs.get(stage)


def edge_stand_in(num_stages: int, stage: int) -> int:
    """The stage whose copy replaces a lost edge stage under CheckFree+: stage 2 for
    stage 1, stage S-1 for stage S. ConfigError for a stage that is not an edge stage."""
    check_num_stages(num_stages, checkfree_plus=True)
    check_stage(num_stages, stage)
    if stage not in (1, num_stages):
        raise ConfigError(
            f"stage {stage} is not an edge stage (the edge stages of S={num_stages} are 1 and {num_stages}); "
            "an inner stage is rebuilt by averaging its neighbours, stage 0 from an embedding replica"
        )
    return 2 if stage == 1 else num_stages - 1


def is_swapped_microbatch(microbatch: int) -> bool:
    """True for the micro-batches CheckFree+ runs out of order: the odd ones within a step."""
    if isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 0:
        raise ConfigError(
            f"microbatch is the index of a micro-batch within its step, >= 0; found {microbatch!r}"
        )
    return microbatch % 2 == 1


def microbatch_stage_order(num_stages: int, microbatch: int, checkfree_plus: bool = True) -> tuple[int, ...]:
    """Which stage's weights run at each pipeline position for this micro-batch.

    Returns ``order`` of length S + 1: ``order[p]`` is the stage that computes position
    ``p``. Position 0 is always stage 0's embedding (its head runs after position S,
    also on stage 0). Without CheckFree+, and on even micro-batches, this is
    ``(0, 1, ..., S)``; on odd micro-batches under CheckFree+ the entries for 1 and 2
    and for S-1 and S are exchanged. With one micro-batch per step nothing is ever
    swapped: CheckFree+ needs at least two.
    """
    check_num_stages(num_stages, checkfree_plus)
    swapped = is_swapped_microbatch(microbatch)
    order = list(range(num_stages + 1))
    if checkfree_plus and swapped:
        order[1], order[2] = order[2], order[1]
        order[num_stages - 1], order[num_stages] = order[num_stages], order[num_stages - 1]
    return tuple(order)
