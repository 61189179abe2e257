"""A snapshot reuses the previous one's bookkeeping only while the same tensors hold it.

Every test here runs with the collector's self-check on: each snapshot collected from a
template is collected the full way too, and any difference in meta bytes or source
tensors raises. On top of that, each change to the state that a template cannot stand
for must make the next snapshot take the full path, and the one after it use a new
template.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ckpt.errors import ConfigError
from ckpt.hook.collect import SnapshotCollector
from test_checkpointer import make_cp  # noqa: F401 - the Checkpointer factory fixture

HEADER = {"job": "j", "rank": 0, "world_size": 1}
SRC = str(Path(__file__).resolve().parents[2] / "src")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 2)
        self.unused = torch.nn.Linear(4, 4)  # never gets a gradient: no optimizer state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x)))


def trained(optimizer_cls=torch.optim.AdamW, **kw):
    torch.manual_seed(0)
    model = Net()
    optimizer = optimizer_cls(model.parameters(), lr=torch.tensor(0.01), **kw) \
        if optimizer_cls is torch.optim.AdamW else optimizer_cls(model.parameters(), lr=0.01, **kw)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.9)
    train(model, optimizer, scheduler)
    return model, optimizer, scheduler


def train(model, optimizer, scheduler=None) -> None:
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    if scheduler is not None:
        scheduler.step()


def collector(model, optimizer, scheduler=None, extras=None) -> SnapshotCollector:
    c = SnapshotCollector(model, optimizer, scheduler, extras or {}, chunk_bytes=1 << 20)
    c.check = True
    return c


def collect_twice(c: SnapshotCollector, step: int) -> tuple[bool, bool]:
    """Whether snapshots ``step`` and ``step + 1`` came from a template."""
    return c.collect(step, HEADER).from_template, c.collect(step + 1, HEADER).from_template


def test_an_unchanged_state_is_collected_from_the_template_after_the_first_snapshot():
    model, optimizer, scheduler = trained()
    c = collector(model, optimizer, scheduler, {"ema": torch.nn.Linear(2, 2)})
    assert not c.collect(0, HEADER).from_template
    for step in range(1, 5):
        train(model, optimizer, scheduler)  # values change, tensors stay: the template holds
        assert c.collect(step, HEADER).from_template
    assert c.template_snapshots == 4
    assert c._template.model_tree is not None  # checked without calling state_dict()


class WithExtraState(Net):
    def get_extra_state(self):
        return {"calls": 3}

    def set_extra_state(self, state) -> None:
        pass


class CustomSave(Net):
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)


@pytest.mark.parametrize("net", [CustomSave], ids=lambda c: c.__name__)
def test_a_model_with_its_own_state_dict_code_is_checked_by_calling_state_dict(net):
    torch.manual_seed(0)
    model = net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    train(model, optimizer)
    c = collector(model, optimizer)
    assert collect_twice(c, 0) == (False, True)
    assert c._template.model_tree is None
    replace_buffer(model, optimizer)
    assert collect_twice(c, 2) == (False, True)


def test_a_model_with_extra_state_gets_no_template():
    torch.manual_seed(0)
    model = WithExtraState()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    train(model, optimizer)
    c = collector(model, optimizer)
    assert collect_twice(c, 0) == (False, False)  # non-tensor model state: the full path


def swap_parameter(model, optimizer):
    """Parameter surgery: a new Parameter in the model and the optimizer, state moved."""
    old, new = model.body.weight, torch.nn.Parameter(torch.zeros(4, 4))
    model.body.weight = new
    group = optimizer.param_groups[0]
    group["params"] = [new if p is old else p for p in group["params"]]
    optimizer.state[new] = optimizer.state.pop(old)


def reassign_data(model, optimizer):
    model.body.weight.data = torch.ones(4, 4)


def reinterpret_dtype(model, optimizer):
    moment = optimizer.state[model.body.weight]["exp_avg"]
    moment.data = moment.data.view(torch.int32)  # same object, same memory, another dtype


def replace_moment(model, optimizer):
    optimizer.state[model.body.weight]["exp_avg"] = torch.zeros(4, 4)


def resize_moment(model, optimizer):
    optimizer.state[model.body.weight]["exp_avg"].resize_(2, 2)


def register_buffer(model, optimizer):
    model.body.register_buffer("calls", torch.zeros(1))


def add_module(model, optimizer):
    model.extra = torch.nn.Linear(1, 1)


def replace_buffer(model, optimizer):
    model.norm.running_mean = torch.zeros(4)


def unused_gets_state(model, optimizer):
    model.unused(torch.randn(2, 4)).sum().backward()
    optimizer.step()


def add_param_group(model, optimizer):
    model.extra = torch.nn.Linear(1, 1)
    optimizer.add_param_group({"params": list(model.extra.parameters()), "lr": 0.1})


def reorder_group_params(model, optimizer):
    params = optimizer.param_groups[0]["params"]
    params[0], params[1] = params[1], params[0]


def load_optimizer_state(model, optimizer):
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # new tensors


def rename_parameter(model, optimizer):
    params = model.body._parameters  # the same Parameter object under another name
    params["weight2"] = params.pop("weight")


def make_buffer_non_persistent(model, optimizer):
    model.norm.register_buffer("running_mean", model.norm.running_mean, persistent=False)


def share_a_module(model, optimizer):
    model.alias = model.body  # state_dict() now lists its tensors twice


def replace_a_child_keeping_its_parameters(model, optimizer):
    norm = torch.nn.BatchNorm1d(4)  # same names and parameters, other buffer objects
    norm.weight, norm.bias = model.norm.weight, model.norm.bias
    model.norm = norm


def add_state_dict_post_hook(model, optimizer):
    model.head.register_state_dict_post_hook(lambda module, sd, prefix, local_metadata: None)


def add_state_dict_pre_hook(model, optimizer):
    model.head.register_state_dict_pre_hook(lambda module, prefix, keep_vars: None)


CHANGES = [swap_parameter, reassign_data, reinterpret_dtype, replace_moment, resize_moment,
           register_buffer, add_module, replace_buffer, unused_gets_state, add_param_group,
           reorder_group_params, load_optimizer_state, rename_parameter,
           make_buffer_non_persistent, share_a_module, replace_a_child_keeping_its_parameters,
           add_state_dict_post_hook, add_state_dict_pre_hook]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_a_change_the_template_cannot_stand_for_takes_the_full_path_once(change):
    model, optimizer, scheduler = trained()
    c = collector(model, optimizer, scheduler)
    assert collect_twice(c, 0) == (False, True)
    change(model, optimizer)
    assert collect_twice(c, 2) == (False, True)


def test_a_parameter_the_optimizer_does_not_know_is_still_refused():
    model, optimizer, scheduler = trained()
    c = collector(model, optimizer, scheduler)
    assert collect_twice(c, 0) == (False, True)
    model.body.weight = torch.nn.Parameter(torch.zeros(4, 4))  # the optimizer keeps the old one
    with pytest.raises(ConfigError, match="not in model.named_parameters"):
        c.collect(2, HEADER)


def test_a_scalar_in_the_optimizer_state_is_compared_by_value():
    model, optimizer, _ = trained(torch.optim.SGD, momentum=0.9)
    for state in optimizer.state.values():
        state["note"] = "a"
    c = collector(model, optimizer)
    assert collect_twice(c, 0) == (False, True)
    next(iter(optimizer.state.values()))["note"] = "b"
    assert collect_twice(c, 2) == (False, True)


def test_state_that_changes_every_step_stops_paying_for_templates():
    model, optimizer, _ = trained()
    c = collector(model, optimizer)
    built = []
    for step in range(40):
        for state in optimizer.state.values():
            state["calls"] = step  # an int kept by a third-party optimizer
        c.collect(step, HEADER)
        built.append(c._template is not None)
    assert c.template_snapshots == 0
    assert sum(built) < 8, built  # two tries, then one every 16 full snapshots


def test_a_checkpointer_takes_its_snapshots_from_the_template(make_cp):
    model, optimizer, scheduler = trained()
    cp = make_cp(model, optimizer, scheduler=scheduler)
    for step in range(5):
        train(model, optimizer, scheduler)
        cp.step(step)
    assert cp.wait()
    assert cp._collector.template_snapshots >= 3


_FSDP_WORKER = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    from torch.distributed.fsdp import fully_shard
    from ckpt.hook.collect import SnapshotCollector
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    def train():
        model(torch.randn(6, 5)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    train()
    c = SnapshotCollector(model, optimizer, None, {}, chunk_bytes=1 << 20)
    c.check = True  # every template snapshot is compared with the full path
    header = {"job": "j", "rank": rank, "world_size": 2}
    used = []
    for step in range(3):
        used.append(c.collect(step, header).from_template)
        train()
    weight = model[0].weight
    optimizer.state[weight]["exp_avg"] = torch.zeros_like(optimizer.state[weight]["exp_avg"])
    for step in range(3, 5):
        used.append(c.collect(step, header).from_template)
    print(json.dumps({"used": used, "tree": c._template.model_tree is not None,
                      "sharded": [list(t.spec.global_shape) != list(t.spec.shape)
                                  for t in c.plan.layout.tensors
                                  if t.spec.name == "model/0.weight"]}))
    dist.destroy_process_group()
""")


def test_fsdp2_shards_are_collected_from_the_template_too(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _FSDP_WORKER, str(r), str(tmp_path / "s")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        got = json.loads(out.strip().splitlines()[-1])
        # A replaced moment (a new DTensor) takes the full path once.
        assert got["used"] == [False, True, True, False, True]
        assert got["tree"]  # FSDP2's state-dict pre-hook is one the module tree stands for
        assert got["sharded"] == [True]
