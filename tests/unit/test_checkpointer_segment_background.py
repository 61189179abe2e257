"""The node segment is created in the background: a slow creation never blocks step().

A big state takes seconds to get its segment (the daemon reserves and pre-faults two
slots; 3 GB took 5.6 s in bench/snapshot_stall.py). The daemon is made slow for
real here: SIGSTOP freezes it inside the trainer's Register call, SIGCONT lets it answer.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import contextmanager

import pytest
import torch

from harness import clean_up_job

from ckpt.hook.checkpointer import Checkpointer
from ckpt.storage.fs import list_steps


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))


def _train_step(model, opt):
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()


@contextmanager
def _frozen(pid: int):
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _checkpointer(tmp_path, model, opt, **options):
    job = f"seg{os.getpid()}-{time.monotonic_ns() % 10**9}"
    cp = Checkpointer(model, opt, dir=tmp_path / "ckpt", job=job,
                      daemon_socket=tmp_path / "daemon.sock", persist_every=0, **options)
    assert cp.restore() == 0  # starts the node daemon
    pid = int((tmp_path / "daemon.pid").read_text().split()[0])
    return cp, job, pid


def test_step_returns_while_the_segment_is_created_and_snapshots_start_once_it_exists(
        tmp_path, caplog):
    torch.manual_seed(1)
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    cp, job, pid = _checkpointer(tmp_path, model, opt, segment_wait_s=0.2)
    try:
        with _frozen(pid), caplog.at_level(logging.INFO, logger="ckpt"):
            for s in range(3):
                _train_step(model, opt)
                t0 = time.monotonic()
                cp.step(s)
                assert time.monotonic() - t0 < 2.0  # waited segment_wait_s at most, once
            assert not cp.ready(0.1)
        assert cp.stats.snapshots_taken == 0 and cp.stats.snapshots_skipped == 3
        assert sum("being created" in r.getMessage() for r in caplog.records) == 1
        assert cp.ready(30)  # the daemon answered: the segment is there
        _train_step(model, opt)
        cp.step(3)
        assert cp.wait(30)
        assert cp.stats.snapshots_taken == 1 and cp.stats.last_committed_step == 3
        cp.close()
        assert [s.step for s in list_steps(tmp_path / "ckpt") if s.complete] == [3]
    finally:
        cp.close()
        clean_up_job(tmp_path, job)  # SIGKILLs the daemon, unlinks the segments


@pytest.fixture
def step0_skipped(tmp_path):
    """Trained one step; its step(0) found the daemon frozen, so it was not snapshotted."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    cp, job, pid = _checkpointer(tmp_path, model, opt, segment_wait_s=0.0)
    try:
        with _frozen(pid):
            _train_step(model, opt)
            cp.step(0)
            assert cp.stats.snapshots_skipped == 1
        yield model, opt, cp, job
    finally:
        cp.close()
        clean_up_job(tmp_path, job)  # SIGKILLs the daemon, unlinks the segments


def test_close_snapshots_and_persists_the_last_step_that_had_no_segment_yet(tmp_path,
                                                                           step0_skipped):
    model, _, cp, job = step0_skipped
    cp.close()  # waits for the segment, snapshots step 0, persists it
    assert cp.stats.last_committed_step == 0
    assert [s.step for s in list_steps(tmp_path / "ckpt") if s.complete] == [0]

    model2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))
    opt2 = torch.optim.AdamW(model2.parameters())
    with Checkpointer(model2, opt2, dir=tmp_path / "ckpt", job=job,
                      daemon_socket=tmp_path / "daemon.sock", persist_every=0) as cp2:
        assert cp2.restore() == 1
        for a, b in zip(model.parameters(), model2.parameters()):
            assert torch.equal(a, b)


def test_close_does_not_label_a_later_state_with_a_skipped_step(tmp_path, step0_skipped,
                                                               caplog):
    """The optimizer stepped after the skipped step(0): what the model holds now is not
    step 0's state, so close() must not save it as step 0."""
    model, opt, cp, _ = step0_skipped
    _train_step(model, opt)  # no step() after it
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        cp.close()
    assert cp.stats.snapshots_taken == 0
    assert not [s for s in list_steps(tmp_path / "ckpt") if s.complete]
    assert any("optimizer has stepped since" in r.getMessage() for r in caplog.records)
