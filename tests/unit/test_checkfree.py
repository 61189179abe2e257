"""CheckFree / CheckFree+ as a library (ckpt.recovery.checkfree): the rule, the norms, the
optimizer reset, the swap order, the planner's refusals, the embedding replica, and a toy
pipeline that recovers from a destroyed stage."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch
from torch import nn

from ckpt.errors import CkptError, ConfigError, StageRebuildError
from ckpt.recovery.checkfree import (
    GradNormTracker,
    clip_and_measure,
    copy_stage,
    edge_stand_in,
    embedding_replica_holders,
    execute_rebuild,
    extract_embedding_replica,
    install_embedding_replica,
    microbatch_stage_order,
    neighbour_weights,
    plan_recovery,
    rebuild_stage,
    reset_optimizer,
    swap_partner,
)


def _formula(
    prev: torch.Tensor, nxt: torch.Tensor, prev_norm: float, next_norm: float, eps: float
) -> torch.Tensor:
    """The rule written out in float64, independently of the implementation."""
    a = next_norm + eps
    b = prev_norm + eps
    return (a * nxt.double() + b * prev.double()) / (a + b)


def _random_state(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {
        "block.up.weight": torch.randn(8, 4, generator=gen).to(dtype),
        "block.up.bias": torch.randn(8, generator=gen).to(dtype),
        "block.norm.weight": (1 + 0.1 * torch.randn(4, generator=gen)).to(dtype),
    }


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norms", [(0.3, 0.9), (1.0, 1.0), (0.0, 0.5), (2.5, 0.01)])
def test_rebuild_matches_the_formula_on_random_tensors(dtype, norms):
    gen = torch.Generator().manual_seed(7)
    prev, nxt = _random_state(gen, dtype), _random_state(gen, dtype)
    out = rebuild_stage(prev, nxt, norms[0], norms[1])
    assert list(out) == list(prev)
    for key in prev:
        assert out[key].dtype == dtype
        expected = _formula(prev[key], nxt[key], *norms, eps=1e-4)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out[key].double(), expected, rtol=tol, atol=tol)


def test_neighbour_with_the_larger_gradient_norm_weighs_more():
    prev = {"w": torch.zeros(3)}
    nxt = {"w": torch.ones(3)}
    out = rebuild_stage(prev, nxt, prev_grad_norm=1.0, next_grad_norm=3.0)
    # a = |g_next| + eps multiplies the *next* stage's weights.
    assert out["w"][0].item() == pytest.approx(3.0001 / 4.0002, rel=1e-6)
    assert neighbour_weights(1.0, 3.0) == pytest.approx((1.0001 / 4.0002, 3.0001 / 4.0002))


def test_zero_norms_give_the_plain_average():
    gen = torch.Generator().manual_seed(1)
    prev, nxt = _random_state(gen), _random_state(gen)
    out = rebuild_stage(prev, nxt, 0.0, 0.0)
    for key in prev:
        torch.testing.assert_close(out[key], (prev[key] + nxt[key]) / 2)


def test_eps_sets_the_weights_when_one_norm_is_zero():
    prev, nxt = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    # next's norm is 0, prev's 1: next keeps only eps of weight.
    assert rebuild_stage(prev, nxt, 1.0, 0.0)["w"][0].item() == pytest.approx(1e-4 / (1 + 2e-4), rel=1e-4)
    assert rebuild_stage(prev, nxt, 1.0, 0.0, eps=0.5)["w"][0].item() == pytest.approx(0.5 / 2.0)


def test_identical_neighbours_are_given_back():
    gen = torch.Generator().manual_seed(2)
    state = _random_state(gen)
    out = rebuild_stage(state, copy.deepcopy(state), 0.7, 0.2)
    for key in state:
        torch.testing.assert_close(out[key], state[key], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tensors_are_averaged_in_float32_and_cast_back(dtype):
    gen = torch.Generator().manual_seed(3)
    prev, nxt = _random_state(gen, dtype), _random_state(gen, dtype)
    out = rebuild_stage(prev, nxt, 0.4, 0.75)
    for key in prev:
        assert out[key].dtype == dtype
        expected = _formula(prev[key], nxt[key], 0.4, 0.75, 1e-4).float().to(dtype)
        # One rounding to the low-precision dtype at most (float32 vs float64 compute can
        # straddle a rounding boundary), never the drift of averaging in bf16/fp16.
        one_rounding = 2**-7 if dtype == torch.bfloat16 else 2**-10
        torch.testing.assert_close(out[key], expected, rtol=one_rounding, atol=0)


def test_integer_and_bool_buffers_are_copied_from_the_heavier_neighbour():
    prev = {"w": torch.zeros(2), "count": torch.tensor(10), "mask": torch.tensor([True, False])}
    nxt = {"w": torch.ones(2), "count": torch.tensor(20), "mask": torch.tensor([False, True])}
    heavier_prev = rebuild_stage(prev, nxt, 2.0, 1.0)
    assert heavier_prev["count"].item() == 10 and heavier_prev["count"].dtype == torch.int64
    assert heavier_prev["mask"].tolist() == [True, False]
    heavier_next = rebuild_stage(prev, nxt, 1.0, 2.0)
    assert heavier_next["count"].item() == 20 and heavier_next["mask"].tolist() == [False, True]
    tie = rebuild_stage(prev, nxt, 1.0, 1.0)
    assert tie["count"].item() == 20  # the next stage on a tie


def test_every_entry_of_a_module_state_dict_is_rebuilt_including_norms_and_buffers():
    def block():
        return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))

    torch.manual_seed(0)
    prev, nxt = block(), block()
    with torch.no_grad():
        for m in (prev, nxt):
            m[1].weight.uniform_(0.5, 1.5)
            m[2].running_mean.normal_()
            m[2].running_var.uniform_(0.5, 2.0)
            m[2].num_batches_tracked.fill_(5)
    out = rebuild_stage(prev.state_dict(), nxt.state_dict(), 0.2, 0.6)
    assert set(out) == set(prev.state_dict())
    for key, value in prev.state_dict().items():
        if value.is_floating_point():
            expected = _formula(value, nxt.state_dict()[key], 0.2, 0.6, 1e-4)
            torch.testing.assert_close(out[key].double(), expected, rtol=1e-6, atol=1e-7)
    # No renormalisation: the averaged LayerNorm weight is the average, not rescaled.
    assert not torch.allclose(out["1.weight"], torch.ones(4))
    rebuilt = block()
    rebuilt.load_state_dict(out)


def test_rebuild_leaves_its_inputs_alone_and_returns_new_tensors():
    gen = torch.Generator().manual_seed(4)
    prev, nxt = _random_state(gen), _random_state(gen)
    before = copy.deepcopy((prev, nxt))
    out = rebuild_stage(prev, nxt, 0.0, 0.0)
    for key in prev:
        assert torch.equal(prev[key], before[0][key]) and torch.equal(nxt[key], before[1][key])
    equal = rebuild_stage(prev, prev, 0.0, 0.0)
    for key in prev:
        assert equal[key].data_ptr() != prev[key].data_ptr()
        assert out[key].data_ptr() not in (prev[key].data_ptr(), nxt[key].data_ptr())


def test_neighbours_with_different_keys_are_refused_naming_the_key():
    prev = {"a": torch.zeros(2), "extra.bias": torch.zeros(2)}
    nxt = {"a": torch.zeros(2)}
    with pytest.raises(StageRebuildError, match=r"extra\.bias.*restore this stage from a checkpoint"):
        rebuild_stage(prev, nxt, 1.0, 1.0)


def test_neighbours_with_different_shapes_are_refused_naming_the_key():
    prev = {"a": torch.zeros(2), "up.weight": torch.zeros(8, 4)}
    nxt = {"a": torch.zeros(2), "up.weight": torch.zeros(4, 8)}
    with pytest.raises(StageRebuildError, match=r"'up\.weight'.*\(8, 4\).*\(4, 8\)"):
        rebuild_stage(prev, nxt, 1.0, 1.0)


def test_neighbours_with_different_dtypes_are_refused_naming_the_key():
    prev = {"norm.weight": torch.zeros(4)}
    nxt = {"norm.weight": torch.zeros(4, dtype=torch.bfloat16)}
    with pytest.raises(StageRebuildError, match=r"'norm\.weight'.*float32.*bfloat16"):
        rebuild_stage(prev, nxt, 1.0, 1.0)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_a_negative_or_non_finite_gradient_norm_is_refused(bad):
    state = {"w": torch.zeros(1)}
    with pytest.raises(StageRebuildError, match="next_grad_norm"):
        rebuild_stage(state, state, 1.0, bad)


def test_eps_must_be_positive():
    state = {"w": torch.zeros(1)}
    with pytest.raises(ConfigError, match="eps"):
        rebuild_stage(state, state, 0.0, 0.0, eps=0.0)


def test_errors_are_ckpt_errors_and_value_errors():
    assert issubclass(StageRebuildError, CkptError) and issubclass(StageRebuildError, ValueError)


def test_copy_stage_clones_every_tensor():
    state = {"w": torch.arange(3.0), "n": torch.tensor(4)}
    out = copy_stage(state)
    state["w"].add_(1)
    assert out["w"].tolist() == [0.0, 1.0, 2.0] and out["n"].item() == 4


# ---------------------------------------------------------------- gradient norms


def _params_with_grads(*grads: list[float]) -> list[nn.Parameter]:
    params = []
    for g in grads:
        p = nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g)
        params.append(p)
    return params


def test_recorded_norm_is_the_norm_after_clipping_and_at_most_max_norm():
    params = _params_with_grads([3.0, 4.0], [12.0])  # total norm 13
    tracker = GradNormTracker(max_norm=1.0)
    recorded = tracker.clip_and_record(2, params, step=9)
    recomputed = torch.cat([p.grad for p in params]).double().norm().item()
    assert recorded <= 1.0
    assert recorded == pytest.approx(recomputed, rel=1e-6)
    assert recorded == pytest.approx(1.0, rel=1e-5)  # clipped, not the pre-clip 13
    assert tracker.norm(2) == recorded and tracker.step_of(2) == 9


def test_a_norm_below_max_norm_is_recorded_unclipped():
    params = _params_with_grads([0.3, 0.4])
    assert clip_and_measure(params, max_norm=1.0) == pytest.approx(0.5)
    assert params[0].grad.tolist() == pytest.approx([0.3, 0.4])


def test_parameters_without_gradients_count_as_zero_and_none_means_no_clipping():
    params = _params_with_grads([6.0, 8.0]) + [nn.Parameter(torch.ones(3))]
    assert clip_and_measure(params, max_norm=None) == pytest.approx(10.0)
    assert clip_and_measure([nn.Parameter(torch.ones(2))]) == 0.0


def test_tracker_keeps_the_last_finite_norm_when_a_step_overflows():
    tracker = GradNormTracker()
    tracker.record(1, 0.25, step=3)
    tracker.clip_and_record(1, _params_with_grads([math.inf, 1.0]), step=4)
    assert tracker.norm(1) == 0.25 and tracker.step_of(1) == 3


def test_tracker_state_dict_round_trips_through_json():
    tracker = GradNormTracker(max_norm=0.5)
    tracker.record(0, 0.1, step=1)
    tracker.record(3, 0.4)
    restored = GradNormTracker()
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.max_norm == 0.5
    assert restored.norm(0) == 0.1 and restored.norm(3) == 0.4
    assert restored.step_of(0) == 1 and restored.step_of(3) is None
    assert 2 not in restored


def test_a_stage_without_a_recorded_norm_is_a_key_error_naming_it():
    with pytest.raises(KeyError, match="stage 5"):
        GradNormTracker().norm(5)


def test_max_norm_must_be_positive():
    with pytest.raises(ConfigError, match="max_norm"):
        GradNormTracker(max_norm=0.0)


# ---------------------------------------------------------------- optimizer reset


def _two_group_adamw(model: nn.Linear) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [
            {"params": [model.weight], "weight_decay": 0.1},
            {"params": [model.bias], "weight_decay": 0.0, "lr": 5e-3, "betas": (0.8, 0.95)},
        ],
        lr=1e-2,
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(5, 4, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_reset_adamw_behaves_exactly_like_a_fresh_optimizer_at_the_scaled_lr():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = _two_group_adamw(model)
    _train(model, opt, 5, seed=1)
    twin = copy.deepcopy(model)
    fresh = torch.optim.AdamW(
        [
            {"params": [twin.weight], "weight_decay": 0.1, "lr": 1.1e-2},
            {"params": [twin.bias], "weight_decay": 0.0, "lr": 1.1 * 5e-3, "betas": (0.8, 0.95)},
        ]
    )
    reset_optimizer(opt)
    _train(model, opt, 3, seed=2)
    _train(twin, fresh, 3, seed=2)
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)


def test_reset_zeroes_the_moments_and_restarts_the_step_count():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = _two_group_adamw(model)
    _train(model, opt, 4, seed=1)
    assert opt.state[model.weight]["step"].item() == 4
    reset_optimizer(opt)
    assert len(opt.state) == 0
    model(torch.ones(1, 4)).sum().backward()
    grad = model.weight.grad.clone()
    opt.step()
    state = opt.state[model.weight]
    assert state["step"].item() == 1
    torch.testing.assert_close(state["exp_avg"], 0.1 * grad)  # (1 - beta1) * g from zero
    torch.testing.assert_close(state["exp_avg_sq"], 0.001 * grad * grad)


def test_reset_scales_every_group_and_keeps_the_other_options():
    model = nn.Linear(4, 3)
    opt = _two_group_adamw(model)
    reset_optimizer(opt, lr_scale=1.5)
    weight_group, bias_group = opt.param_groups
    assert weight_group["lr"] == pytest.approx(1.5e-2) and bias_group["lr"] == pytest.approx(7.5e-3)
    assert weight_group["weight_decay"] == 0.1 and bias_group["weight_decay"] == 0.0
    assert weight_group["betas"] == (0.9, 0.999) and bias_group["betas"] == (0.8, 0.95)
    assert weight_group["params"] == [model.weight] and bias_group["params"] == [model.bias]


def test_resetting_twice_does_not_compound_the_scale():
    model = nn.Linear(4, 3)
    opt = _two_group_adamw(model)
    reset_optimizer(opt)
    reset_optimizer(opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.1e-2)
    # The scale in force travels with the optimizer's state_dict.
    other = _two_group_adamw(nn.Linear(4, 3))
    other.load_state_dict(opt.state_dict())
    reset_optimizer(other, lr_scale=1.2)
    assert other.param_groups[0]["lr"] == pytest.approx(1.2e-2)


def test_reset_with_its_scheduler_keeps_the_scale_and_the_schedule_position():
    model = nn.Linear(4, 3)
    opt = _two_group_adamw(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch))
    for _ in range(3):
        _train(model, opt, 1, seed=0)
        sched.step()
    reset_optimizer(opt, scheduler=sched)
    assert sched.last_epoch == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(1.1e-2 / 4)
    _train(model, opt, 1, seed=0)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.1e-2 / 5)
    assert opt.param_groups[1]["lr"] == pytest.approx(1.1 * 5e-3 / 5)
    assert sched.get_last_lr()[0] == pytest.approx(1.1e-2 / 5)


def test_reset_adagrad_restores_the_state_its_constructor_creates():
    model = nn.Linear(4, 3)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.5)
    _train(model, opt, 2, seed=0)
    reset_optimizer(opt)
    assert torch.equal(opt.state[model.weight]["sum"], torch.full_like(model.weight, 0.5))
    assert opt.state[model.weight]["step"].item() == 0


def test_reset_rejects_a_non_positive_scale():
    with pytest.raises(ConfigError, match="lr_scale"):
        reset_optimizer(_two_group_adamw(nn.Linear(4, 3)), lr_scale=0.0)


# ---------------------------------------------------------------- CheckFree+ order

# Written out by hand. S = 6 is the reference code's hard-coded case: on odd
# micro-batches positions 1..6 run stages 2, 1, 3, 4, 6, 5.
SWAPPED_ORDER = {
    4: (0, 2, 1, 4, 3),
    5: (0, 2, 1, 3, 5, 4),
    6: (0, 2, 1, 3, 4, 6, 5),
    8: (0, 2, 1, 3, 4, 5, 6, 8, 7),
}


@pytest.mark.parametrize("num_stages", sorted(SWAPPED_ORDER))
def test_odd_microbatches_swap_stages_1_2_and_the_last_two(num_stages):
    in_order = tuple(range(num_stages + 1))
    for microbatch in range(6):
        expected = SWAPPED_ORDER[num_stages] if microbatch % 2 else in_order
        assert microbatch_stage_order(num_stages, microbatch) == expected
        assert microbatch_stage_order(num_stages, microbatch, checkfree_plus=False) == in_order


@pytest.mark.parametrize("num_stages", sorted(SWAPPED_ORDER))
def test_edge_stages_stand_in_for_each_other_with_their_swap_partner(num_stages):
    last = num_stages
    assert edge_stand_in(num_stages, 1) == 2 and edge_stand_in(num_stages, last) == last - 1
    assert swap_partner(num_stages, 1) == 2 and swap_partner(num_stages, 2) == 1
    assert swap_partner(num_stages, last) == last - 1 and swap_partner(num_stages, last - 1) == last
    assert swap_partner(num_stages, 0) is None
    if num_stages >= 6:
        assert swap_partner(num_stages, 3) is None
    with pytest.raises(ConfigError, match="not an edge stage"):
        edge_stand_in(num_stages, 2 if num_stages > 4 else 0)


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_checkfree_plus_needs_at_least_four_stages(num_stages):
    with pytest.raises(ConfigError, match="S >= 4"):
        microbatch_stage_order(num_stages, 1)
    assert microbatch_stage_order(num_stages, 1, checkfree_plus=False) == tuple(range(num_stages + 1))


# ---------------------------------------------------------------- planner


def test_a_middle_stage_is_averaged_from_its_two_neighbours():
    plan = plan_recovery(6, [3])
    (rebuild,) = plan.rebuilds
    assert (rebuild.stage, rebuild.method, rebuild.sources) == (3, "average", (2, 4))
    assert "average of stages 2 and 4" in rebuild.describe()


def test_two_stages_that_are_not_adjacent_are_both_rebuilt():
    plan = plan_recovery(6, [4, 2])
    assert [(r.stage, r.sources) for r in plan.rebuilds] == [(2, (1, 3)), (4, (3, 5))]


@pytest.mark.parametrize("edge", [1, 6])
def test_an_edge_stage_without_checkfree_plus_is_refused(edge):
    advice = rf"stage {edge} is an edge stage.*restore stage {edge} from a checkpoint, or enable CheckFree\+"
    with pytest.raises(StageRebuildError, match=advice):
        plan_recovery(6, [edge])


@pytest.mark.parametrize(("num_stages", "edge", "partner"), [(4, 1, 2), (4, 4, 3), (6, 1, 2), (6, 6, 5)])
def test_an_edge_stage_with_checkfree_plus_is_a_copy_of_its_swap_partner(num_stages, edge, partner):
    rebuild = plan_recovery(num_stages, [edge], checkfree_plus=True).for_stage(edge)
    assert (rebuild.method, rebuild.sources) == ("copy", (partner,))


def test_two_adjacent_stages_lost_together_are_refused():
    advice = r"stages 3 and 4 were lost together.*restore one of them from a checkpoint"
    with pytest.raises(StageRebuildError, match=advice):
        plan_recovery(6, [3, 4])
    with pytest.raises(StageRebuildError, match="stages 1 and 2 were lost together"):
        plan_recovery(6, [1, 2], checkfree_plus=True)


def test_a_neighbour_that_is_not_available_is_refused():
    advice = r"stage 4 is not available.*bring stage 4 back first, or restore stage 3 from a checkpoint"
    with pytest.raises(StageRebuildError, match=advice):
        plan_recovery(6, [3], available=[0, 1, 2, 5, 6])


def test_every_problem_is_reported_at_once():
    with pytest.raises(StageRebuildError) as info:
        plan_recovery(8, [1, 4, 5])
    message = str(info.value)
    assert "stage 1 is an edge stage" in message and "stages 4 and 5 were lost together" in message


def test_stage_zero_is_restored_from_a_replica_only_under_checkfree_plus():
    advice = r"stage 0 .*restore stage 0 from a checkpoint, or enable CheckFree\+"
    with pytest.raises(StageRebuildError, match=advice):
        plan_recovery(6, [0])
    assert plan_recovery(6, [0], checkfree_plus=True).for_stage(0).sources == (1,)
    # Stage 1's holder is gone with its replica: stage 6's holder has the other one.
    plan = plan_recovery(6, [0, 1], checkfree_plus=True)
    assert plan.for_stage(0).sources == (6,) and plan.for_stage(1).sources == (2,)
    with pytest.raises(StageRebuildError, match="replicas are kept by the holders of stages 1 and 6"):
        plan_recovery(6, [0, 1, 6], checkfree_plus=True)


def test_copy_swap_partners_reproduces_the_reference_codes_inner_rebuilds():
    plan = plan_recovery(6, [2, 5], checkfree_plus=True, copy_swap_partners=True)
    assert [(r.method, r.sources) for r in plan.rebuilds] == [("copy", (1,)), ("copy", (6,))]
    plan = plan_recovery(6, [2, 5], checkfree_plus=True)
    assert [(r.method, r.sources) for r in plan.rebuilds] == [("average", (1, 3)), ("average", (4, 6))]


def test_stages_out_of_range_are_config_errors():
    with pytest.raises(ConfigError, match="0..6"):
        plan_recovery(6, [7])
    with pytest.raises(ConfigError, match="num_stages"):
        plan_recovery(0, [])


def test_execute_rebuild_needs_both_neighbours_norms():
    states = {2: {"w": torch.zeros(1)}, 4: {"w": torch.ones(1)}}
    rebuild = plan_recovery(6, [3]).for_stage(3)
    tracker = GradNormTracker()
    tracker.record(2, 0.5)
    with pytest.raises(StageRebuildError, match="no gradient norm"):
        execute_rebuild(rebuild, states, tracker)
    tracker.record(4, 1.5)
    out = execute_rebuild(rebuild, states, tracker)
    assert out["w"].item() == pytest.approx(1.5001 / 2.0002, rel=1e-6)


# ---------------------------------------------------------------- embedding replica


class _EmbedHead(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)


def test_replicas_are_kept_by_the_holders_of_the_first_and_last_body_stage():
    assert embedding_replica_holders(6) == (1, 6)
    assert embedding_replica_holders(4) == (1, 4)
    assert embedding_replica_holders(1) == (1,)


def test_embedding_replica_round_trip_restores_stage_zero_bit_exactly():
    torch.manual_seed(0)
    stage0 = _EmbedHead()
    replica = extract_embedding_replica(stage0.state_dict())
    expected = copy.deepcopy(stage0.state_dict())
    with torch.no_grad():
        stage0.embed.weight.add_(1.0)  # later training does not change the replica
    torch.manual_seed(1)
    rebuilt = _EmbedHead()
    install_embedding_replica(rebuilt, replica)
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_partial_replica_must_be_declared_partial():
    torch.manual_seed(0)
    replica = extract_embedding_replica(_EmbedHead().state_dict(), prefixes=("embed.", "head."))
    assert set(replica) == {"embed.weight", "head.weight"}
    with pytest.raises(StageRebuildError, match="norm.weight"):
        install_embedding_replica(_EmbedHead(), replica)
    target = _EmbedHead()
    install_embedding_replica(target, replica, require_complete=False)
    assert torch.equal(target.embed.weight, replica["embed.weight"])


def test_a_replica_of_another_shape_is_refused_naming_the_key():
    replica = extract_embedding_replica(_EmbedHead(vocab=11).state_dict())
    with pytest.raises(StageRebuildError, match=r"'embed\.weight'"):
        install_embedding_replica(_EmbedHead(vocab=12), replica)


# ---------------------------------------------------------------- end to end


_DIM, _IN, _OUT = 32, 16, 8


class _Block(nn.Module):
    """A pre-norm residual MLP block: the body stages are identical in structure."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(_DIM)
        self.up = nn.Linear(_DIM, 2 * _DIM)
        self.down = nn.Linear(2 * _DIM, _DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class _Stage0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(_IN, _DIM)
        self.norm = nn.LayerNorm(_DIM)
        self.head = nn.Linear(_DIM, _OUT)


class _ToyPipeline:
    """S body stages plus stage 0, one optimizer and one clip per stage, run in one process
    with the order microbatch_stage_order gives (two micro-batches per step)."""

    MICROBATCHES = 2

    def __init__(self, num_stages: int, checkfree_plus: bool, steps: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.num_stages, self.checkfree_plus = num_stages, checkfree_plus
        self.stages: list[nn.Module] = [_Stage0()] + [_Block() for _ in range(num_stages)]
        self.optimizers = [torch.optim.AdamW(s.parameters(), lr=1e-2) for s in self.stages]
        self.tracker = GradNormTracker(max_norm=1.0)
        gen = torch.Generator().manual_seed(seed + 10)
        teacher = torch.randn(_IN, _OUT, generator=gen)
        self.inputs = torch.randn(steps, self.MICROBATCHES, 32, _IN, generator=gen)
        self.targets = torch.tanh(self.inputs @ teacher) * 2

    def loss(self, step: int, microbatch: int) -> torch.Tensor:
        order = microbatch_stage_order(self.num_stages, microbatch, self.checkfree_plus)
        h = self.stages[0].embed(self.inputs[step, microbatch])
        for position in range(1, self.num_stages + 1):
            h = self.stages[order[position]](h)
        out = self.stages[0].head(self.stages[0].norm(h))
        return nn.functional.mse_loss(out, self.targets[step, microbatch])

    def train(self, first: int, last: int) -> list[float]:
        losses = []
        for step in range(first, last):
            total = 0.0
            for microbatch in range(self.MICROBATCHES):
                loss = self.loss(step, microbatch) / self.MICROBATCHES
                loss.backward()
                total += loss.item()
            for index, stage in enumerate(self.stages):
                self.tracker.clip_and_record(index, stage.parameters(), step)
            for opt in self.optimizers:
                opt.step()
                opt.zero_grad()
            losses.append(total)
        return losses

    def destroy_and_rebuild(self, lost: int) -> tuple[float, str]:
        """Overwrite stage ``lost`` with noise, rebuild it; (loss with the noise, plan line)."""
        with torch.no_grad():
            for p in self.stages[lost].parameters():
                p.normal_()
            destroyed = sum(self.loss(0, mb).item() for mb in range(self.MICROBATCHES)) / self.MICROBATCHES
        rebuild = plan_recovery(self.num_stages, [lost], checkfree_plus=self.checkfree_plus).for_stage(lost)
        sources = {s: self.stages[s].state_dict() for s in rebuild.sources}
        self.stages[lost].load_state_dict(execute_rebuild(rebuild, sources, self.tracker))
        reset_optimizer(self.optimizers[lost])
        return destroyed, rebuild.describe()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Measured on this toy (S=4, seeds 0-5, lost stage 2 or 3 averaged, or stage 1 copied under
# CheckFree+; 200 steps before the failure): the first loss after the rebuild is 0.07-0.22x
# the loss with the destroyed stage and 0.10-0.28x the untrained loss; over the last 30 of
# the 100 steps after it, the gap to the unfailed run is -0.003..0.052 (leaving the
# destroyed stage in place instead: 0.37-0.53), while the unfailed run sits at 0.015-0.03x
# its untrained loss. The test runs seed 0; the bounds leave a margin over all of these.
_STEPS_BEFORE, _STEPS_AFTER = 200, 100
_FINAL_GAP_BOUND = 0.12


@pytest.mark.parametrize(
    ("checkfree_plus", "lost", "method"),
    [(False, 2, "average of stages 1 and 3"), (True, 1, "copy of its CheckFree+ swap partner, stage 2")],
    ids=["middle-stage-averaged", "edge-stage-copied-under-checkfree-plus"],
)
def test_training_returns_to_the_unfailed_loss_after_a_stage_is_rebuilt(
    one_thread, checkfree_plus, lost, method
):
    pipeline = _ToyPipeline(num_stages=4, checkfree_plus=checkfree_plus, steps=_STEPS_BEFORE + _STEPS_AFTER)
    before = pipeline.train(0, _STEPS_BEFORE)
    untrained_loss = before[0]
    unfailed = copy.deepcopy(pipeline)
    unfailed_after = unfailed.train(_STEPS_BEFORE, _STEPS_BEFORE + _STEPS_AFTER)

    destroyed_loss, description = pipeline.destroy_and_rebuild(lost)
    assert method in description
    rebuilt_after = pipeline.train(_STEPS_BEFORE, _STEPS_BEFORE + _STEPS_AFTER)

    assert all(math.isfinite(x) for x in rebuilt_after)
    # The rebuilt stage keeps most of what was learned: far below both noise and no training.
    assert rebuilt_after[0] < 0.4 * destroyed_loss
    assert rebuilt_after[0] < 0.4 * untrained_loss
    # ... and training closes the gap to the unfailed run within _STEPS_AFTER steps.
    final_gap = statistics.mean(rebuilt_after[-30:]) - statistics.mean(unfailed_after[-30:])
    assert final_gap < _FINAL_GAP_BOUND, (final_gap, rebuilt_after[::10], unfailed_after[::10])
    # The unfailed run did not just stall: the comparison is against a run still learning.
    assert statistics.mean(unfailed_after[-30:]) < 0.15 * untrained_loss
