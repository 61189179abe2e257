"""The lazy copy: step() returns before the copy ends; optimizer.step() waits for it."""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from ckpt import _C
from ckpt.hook.checkpointer import Checkpointer
from ckpt.recovery.sources import segment_names


def big_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 4 x 1024 x 2048 float32 = 32 MiB of parameters; with AdamW state ~100 MiB.
    return torch.nn.Sequential(*[torch.nn.Linear(2048, 1024, bias=False) if i % 2 == 0
                                 else torch.nn.Linear(1024, 2048, bias=False) for i in range(4)])


@pytest.fixture
def cp_factory(tmp_path):
    job = f"lazy{os.getpid()}-{time.monotonic_ns() % 10**9}"
    made = []

    def make(model, opt):
        cp = Checkpointer(model, opt, dir=tmp_path / "ckpt", job=job, start_daemon=False,
                          daemon_socket=tmp_path / "d.sock", persist_every=0)
        made.append(cp)
        return cp

    yield make
    for cp in made:
        cp.wait(60)
        cp._closed = True  # no persist needed here: just release hooks and threads
        cp._committer.close(10)
        for h in cp._hooks:
            h.remove()
    for _, name in segment_names(job, 0):
        _C.Segment.unlink(name)


def one_step(model, opt):
    model(torch.randn(4, 2048)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)


def test_step_returns_well_before_the_copy_of_100mb_ends(cp_factory):
    torch.set_num_threads(1)
    model = big_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cp = cp_factory(model, opt)
    call_s, copy_s = [], []
    for s in range(7):
        one_step(model, opt)
        t0 = time.perf_counter()
        cp.step(s)
        call_s.append(time.perf_counter() - t0)
        assert cp.wait(60)
        copy_s.append(cp.stats.last_copy_s)
    # The first call creates the segment; later calls only plan (cached) and submit.
    # Medians: a shared 2-core machine has outliers in both.
    assert statistics.median(call_s[1:]) < 0.5 * statistics.median(copy_s[1:]), (call_s, copy_s)


def test_optimizer_step_waits_for_the_copy_so_the_snapshot_is_of_step_s(cp_factory, tmp_path):
    torch.set_num_threads(1)
    model = big_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-1)
    cp = cp_factory(model, opt)
    one_step(model, opt)
    cp.step(0)
    cp.wait(60)
    one_step(model, opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_opt = {k: v.clone() for k, v in opt.state[next(iter(model.parameters()))].items()}
    cp.step(1)
    # Mutate right away (momentum and weight decay change every parameter even with zero
    # grads): the pre-hook must hold this until the copy of step 1 is done.
    opt.step()
    assert cp.stats.last_stall_s > 0
    assert cp.wait(60)

    model2 = big_model()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-1)
    cp2 = cp_factory(model2, opt2)
    assert cp2.restore() == 2
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k
    for k, v in opt2.state[next(iter(model2.parameters()))].items():
        assert torch.equal(v, expected_opt[k]), k


def test_yield_cores_lends_torch_threads_to_the_copy_and_takes_them_back(tmp_path):
    """During the copy torch runs with one thread fewer; the optimizer step gets them back."""
    import os as _os

    from ckpt.hook.checkpointer import Checkpointer as _Checkpointer

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = torch.nn.Linear(256, 256)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cp = _Checkpointer(model, opt, dir=tmp_path / "ck", job=f"yield{_os.getpid()}",
                           start_daemon=False, persist_every=0, yield_cores=True)
        try:
            model(torch.randn(4, 256)).sum().backward()
            opt.step()
            cp.step(0)
            assert torch.get_num_threads() == 1, "the copy's core was not lent"
            opt.step()  # the pre-hook waits for the copy and restores the threads
            assert torch.get_num_threads() == 2
            cp.wait(30)
        finally:
            cp.close()
            from harness import clean_up_job

            clean_up_job(tmp_path, f"yield{_os.getpid()}")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
