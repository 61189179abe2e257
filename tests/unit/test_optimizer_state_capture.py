"""Snapshotting only reads the optimizer; restore leaves exactly the snapshot's state.

DCP's get_state_dict initialises an empty optimizer with a hidden zero-lr
``optimizer.step()``; these tests pin that ckpt neither does that when it
snapshots (training is unchanged, hooks see only the user's steps) nor needs it
to restore (a parameter without state in the snapshot has none afterwards).
"""

from __future__ import annotations

import pytest
import torch

from test_checkpointer import make_cp  # noqa: F401 - the Checkpointer factory fixture


class WithUnusedHead(torch.nn.Module):
    """A pooler that the task never uses: it never gets a gradient, so no Adam state."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.pooler = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "adam": lambda params: torch.optim.Adam(params, lr=0.1),
}


def batch(step: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1000 + step))


def train_step(model, optimizer, step: int, *, skip_optimizer_step: bool = False) -> None:
    model(batch(step)).pow(2).mean().backward()
    if not skip_optimizer_step:  # as GradScaler does when the gradients hold inf
        optimizer.step()
    optimizer.zero_grad()


def count_optimizer_steps(optimizer) -> list[int]:
    calls: list[int] = []
    optimizer.register_step_pre_hook(lambda *_: calls.append(1))
    return calls


def assert_same_training_state(m1, o1, m2, o2) -> None:
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for pid, entries in s1["state"].items():
        assert entries.keys() == s2["state"][pid].keys(), pid
        for key, value in entries.items():
            other = s2["state"][pid][key]
            assert type(value) is type(other), (pid, key)
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and value.device == other.device, (pid, key)
                assert torch.equal(value, other), (pid, key)
            else:
                assert value == other, (pid, key)


@pytest.mark.parametrize("skip_first_step", [False, True], ids=["every_step", "skipped_first"])
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_snapshotting_never_calls_optimizer_step(make_cp, kind, skip_first_step):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = OPTIMIZERS[kind](model.parameters())
    cp = make_cp(model, opt)
    calls = count_optimizer_steps(opt)
    taken = 0
    for s in range(5):
        skip = skip_first_step and s == 0
        train_step(model, opt, s, skip_optimizer_step=skip)
        taken += not skip
        cp.step(s)
        assert len(calls) == taken, f"after cp.step({s})"
        assert all(p.grad is None for p in model.parameters())
    assert cp.wait(30)
    assert len(calls) == taken


def test_snapshot_before_any_optimizer_step_creates_no_optimizer_state(make_cp):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    cp = make_cp(model, opt)
    train_step(model, opt, 0, skip_optimizer_step=True)
    cp.step(0)
    assert cp.wait(30)
    assert not opt.state
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def _adam_run(make_cp, *, with_ckpt: bool):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    cp = make_cp(model, opt) if with_ckpt else None
    for s in range(4):
        train_step(model, opt, s, skip_optimizer_step=s == 0)
        if cp is not None:
            cp.step(s)
    if cp is not None:
        cp.close()
    return model, opt


def test_skipped_first_optimizer_step_trains_bit_identically_with_and_without_ckpt(make_cp):
    reference = _adam_run(make_cp, with_ckpt=False)
    checkpointed = _adam_run(make_cp, with_ckpt=True)
    assert_same_training_state(*reference, *checkpointed)
    assert reference[1].state[reference[0].weight]["step"].item() == 3.0


def _unused_head(seed: int):
    torch.manual_seed(seed)
    model = WithUnusedHead()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _unused_head_trained(make_cp, steps: int):
    """A model with an unused pooler, trained and snapshotted for ``steps`` steps."""
    model, opt = _unused_head(seed=0)
    cp = make_cp(model, opt)
    for s in range(steps):
        train_step(model, opt, s)
        cp.step(s)
    cp.close()
    return model, opt


def test_model_with_an_unused_parameter_resumes_bit_exactly(make_cp):
    model, opt = _unused_head_trained(make_cp, steps=3)
    assert {p for p in opt.state} == {model.body.weight, model.body.bias}

    model2, opt2 = _unused_head(seed=7)
    cp2 = make_cp(model2, opt2)
    assert cp2.restore() == 3
    assert_same_training_state(model, opt, model2, opt2)
    assert model2.pooler.weight not in opt2.state and model2.pooler.bias not in opt2.state

    for s in range(3, 6):  # the resumed run goes on exactly like the uninterrupted one
        train_step(model, opt, s)
        train_step(model2, opt2, s)
        cp2.step(s)
    assert_same_training_state(model, opt, model2, opt2)


def test_snapshot_before_the_first_optimizer_step_restores_to_an_optimizer_without_state(make_cp):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    cp = make_cp(model, opt)
    train_step(model, opt, 0, skip_optimizer_step=True)
    cp.step(0)
    cp.close()

    torch.manual_seed(0)
    model2 = torch.nn.Linear(8, 8)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    calls = count_optimizer_steps(opt2)
    cp2 = make_cp(model2, opt2)
    assert cp2.restore() == 1
    assert not opt2.state
    assert calls == []
    assert_same_training_state(model, opt, model2, opt2)


def test_restore_drops_optimizer_state_that_the_snapshot_lacks(make_cp):
    model, opt = _unused_head_trained(make_cp, steps=2)

    model2, opt2 = _unused_head(seed=7)
    # A live optimizer with state for every parameter, the pooler included.
    model2.pooler(batch(99)).sum().backward()
    train_step(model2, opt2, 99)
    assert len(opt2.state) == 4
    cp2 = make_cp(model2, opt2)
    assert cp2.restore() == 2
    assert_same_training_state(model, opt, model2, opt2)
    assert model2.pooler.weight not in opt2.state


def test_parameter_names_are_worked_out_once_and_again_when_a_parameter_is_replaced():
    from ckpt.hook.state import parameter_fqns

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    first = parameter_fqns(model)
    assert parameter_fqns(model) is first  # every snapshot asks: cached
    model[1].weight = torch.nn.Parameter(torch.zeros(4, 4))
    names = parameter_fqns(model)
    assert names is not first and names[id(model[1].weight)] == "1.weight"
