"""ckpt.Checkpointer: snapshot into shared memory, restore bit-exactly, fall back, refuse."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import pytest
import torch

from harness import clean_up_job

from ckpt import _C
from ckpt.errors import ConfigError, LayoutMismatchError
from ckpt.hook.checkpointer import Checkpointer
from ckpt.recovery.sources import segment_names
from ckpt.snapshot.layout import read_payload


class Counter:
    """An ``extra``: any object with state_dict/load_state_dict."""

    def __init__(self) -> None:
        self.seen = 0
        self.order = [3, 1, 2]

    def state_dict(self):
        return {"seen": self.seen, "order": list(self.order), "blob": np.arange(4)}

    def load_state_dict(self, sd):
        self.seen, self.order = sd["seen"], sd["order"]


def make_model(width: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.BatchNorm1d(width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 2))


def make_optim(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    return torch.optim.AdamW([{"params": params[:2], "lr": 1e-2},
                              {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}])


def train(model, optimizer, scheduler=None, extra=None, cp=None, steps=range(3)):
    for s in steps:
        x = torch.randn(8, 8) + random.random() + float(np.random.rand())
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        if extra is not None:
            extra.seen += 1
        if cp is not None:
            cp.step(s)


@pytest.fixture
def make_cp(tmp_path, request):
    """Checkpointer factory with a job, dir and socket unique to the test; cleans up shm."""
    job = f"t{os.getpid()}-{abs(hash(request.node.name)) % 10**8}"
    made: list[Checkpointer] = []

    def make(model, optimizer, **kw):
        kw.setdefault("dir", tmp_path / "ckpt")
        kw.setdefault("job", job)
        kw.setdefault("daemon_socket", tmp_path / "daemon.sock")
        kw.setdefault("start_daemon", False)
        kw.setdefault("persist_every", 0)
        cp = Checkpointer(model, optimizer, **kw)
        made.append(cp)
        return cp

    make.job = job
    yield make
    for cp in made:
        try:
            cp.close()
        except Exception:
            pass
    clean_up_job(tmp_path, job)


def assert_same_state(m1, o1, m2, o2):
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for p in s1["state"]:
        for k, v in s1["state"][p].items():
            assert torch.equal(v, s2["state"][p][k]), (p, k)


def test_fresh_run_restores_zero_and_leaves_optimizer_state_empty(make_cp):
    model = make_model()
    opt = make_optim(model)
    cp = make_cp(model, opt)
    assert cp.restore() == 0
    assert not opt.state  # no zero-lr warm-up step on a fresh run: training is unchanged


def test_restore_is_bit_exact_into_fresh_objects(make_cp):
    model, extra = make_model(), Counter()
    opt = make_optim(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    cp = make_cp(model, opt, scheduler=sched, extra={"counter": extra})
    random.seed(1), np.random.seed(1)
    train(model, opt, sched, extra, cp, steps=range(5))
    assert cp.wait(30)
    expected_draws = (random.random(), np.random.rand(3).tolist(), torch.rand(4))
    cp.close()

    model2, extra2 = make_model(seed=7), Counter()
    opt2 = make_optim(model2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    cp2 = make_cp(model2, opt2, scheduler=sched2, extra={"counter": extra2})
    assert cp2.restore() == 5
    assert_same_state(model, opt, model2, opt2)
    assert sched2.state_dict() == sched.state_dict()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert (extra2.seen, extra2.order) == (5, [3, 1, 2])
    assert random.random() == expected_draws[0]
    assert np.random.rand(3).tolist() == expected_draws[1]
    assert torch.equal(torch.rand(4), expected_draws[2])


def test_training_after_restore_matches_uninterrupted_training(make_cp):
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    model = make_model()
    opt = make_optim(model)
    cp = make_cp(model, opt)
    cp.restore()
    train(model, opt, cp=cp, steps=range(3))
    cp.close()
    train(model, opt, steps=range(3, 6))  # the reference continues without a break

    model2 = make_model(seed=5)
    opt2 = make_optim(model2)
    cp2 = make_cp(model2, opt2)
    start = cp2.restore()
    assert start == 3
    train(model2, opt2, steps=range(start, 6))
    assert_same_state(model, opt, model2, opt2)


def test_snapshot_is_skipped_when_the_persister_holds_the_slot(make_cp):
    model = make_model()
    opt = make_optim(model)
    cp = make_cp(model, opt)
    train(model, opt, cp=cp, steps=range(1))
    assert cp.wait(30)
    seg = _C.Segment.open(segment_names(make_cp.job, 0)[0][1])
    target = 1 - seg.committed()[0]
    reader_pid = os.getppid()  # a live process other than us, as a persister would be
    assert seg.try_lock(target, reader_pid, "read")
    try:
        train(model, opt, cp=cp, steps=range(1, 2))
        assert cp.wait(30)
        assert cp.stats.snapshots_skipped == 1 and cp.stats.snapshots_taken == 1
        assert seg.committed()[1] == 0
    finally:
        seg.unlock(target, reader_pid)
    train(model, opt, cp=cp, steps=range(2, 3))
    assert cp.wait(30)
    assert seg.committed()[1] == 2 and cp.stats.snapshots_taken == 2
    seg.close()


def test_restore_falls_back_to_disk_when_a_memory_chunk_is_corrupt(make_cp, caplog):
    model = make_model()
    opt = make_optim(model)
    cp = make_cp(model, opt, chunk_bytes=4096)
    train(model, opt, cp=cp, steps=range(2))
    cp.close()  # persists step 1 in-process (no daemon)
    seg = _C.Segment.open(segment_names(make_cp.job, 0)[0][1])
    slot = seg.committed()[0]
    view = seg.slot_view(slot)
    layout, meta, _ = read_payload(view[:seg.slot_info(slot)["payload_bytes"]])
    meta_bytes = int.from_bytes(bytes(view[16:24]), "little")
    victim = next(p for p in layout.tensors if p.spec.name == "model/0.weight")
    pos = layout.data_offset(meta_bytes) + victim.data_offset + 7
    view[pos] = view[pos] ^ 0x01
    seg.close()

    model2 = make_model(seed=3)
    opt2 = make_optim(model2)
    cp2 = make_cp(model2, opt2)
    with caplog.at_level(logging.INFO, logger="ckpt.restore"):
        assert cp2.restore() == 2
    text = caplog.text
    assert "'model/0.weight' chunk 0" in text and "memory" in text
    assert "from disk" in text
    assert_same_state(model, opt, model2, opt2)


def test_restore_refuses_a_layout_mismatch_naming_the_tensor(make_cp):
    model = make_model(width=16)
    opt = make_optim(model)
    cp = make_cp(model, opt)
    train(model, opt, cp=cp, steps=range(1))
    cp.close()
    wider = make_model(width=32)
    cp2 = make_cp(wider, make_optim(wider))
    with pytest.raises(LayoutMismatchError, match=r"'model/0.weight' has global shape \[16, 8\]"):
        cp2.restore()


def test_bad_arguments_are_refused_clearly(tmp_path):
    model = make_model()
    with pytest.raises(ConfigError, match="every must be an int >= 1"):
        Checkpointer(model, make_optim(model), dir=tmp_path, every=0)
    with pytest.raises(ConfigError, match="extra"):
        Checkpointer(model, make_optim(model), dir=tmp_path, extra={"x": object()})
    with pytest.raises(ConfigError, match="job id"):
        Checkpointer(model, make_optim(model), dir=tmp_path, job="bad/job")
    with pytest.raises(ConfigError, match=r"copy_nice must be an int in \[0, 19\]"):
        Checkpointer(model, make_optim(model), dir=tmp_path, copy_nice=20)
    with pytest.raises(ConfigError, match=r"segment_wait_s must be a number >= 0"):
        Checkpointer(model, make_optim(model), dir=tmp_path, segment_wait_s=-1)
    from ckpt import PipelinePosition

    with pytest.raises(ConfigError, match="initialise torch.distributed"):
        Checkpointer(model, make_optim(model), dir=tmp_path,
                     pipeline=PipelinePosition(stage=0, num_stages=3))
    with pytest.raises(ConfigError, match="pipeline must be a ckpt.PipelinePosition"):
        Checkpointer(model, make_optim(model), dir=tmp_path, pipeline=3)
