"""Checkpointer with a real node daemon (started by ensure_daemon, SIGKILLed mid-run)."""

from __future__ import annotations

import os
import signal
import logging
import time

import torch

from harness import clean_up_job

from ckpt.hook.checkpointer import Checkpointer
from ckpt.storage.fs import list_steps


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))


def _train(model, opt, cp, steps):
    for s in steps:
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        cp.step(s)


def test_training_survives_daemon_death_and_close_persists(tmp_path, caplog):
    job = f"dmn{os.getpid()}-{time.monotonic_ns() % 10**9}"
    sock = tmp_path / "daemon.sock"
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    cp = Checkpointer(model, opt, dir=tmp_path / "ckpt", job=job, daemon_socket=sock,
                      persist_every=0, daemon_retry_s=0.2)
    daemon_pid = None
    try:
        assert cp.restore() == 0
        daemon_pid = int((tmp_path / "daemon.pid").read_text().split()[0])
        _train(model, opt, cp, range(3))
        assert cp.wait(30) and cp.stats.daemon_errors == 0
        os.kill(daemon_pid, signal.SIGKILL)
        with caplog.at_level(logging.WARNING, logger="ckpt"):
            _train(model, opt, cp, range(3, 6))  # keeps training, sealing into shm
            assert cp.wait(30)
        assert sum("daemon is unavailable" in r.getMessage() for r in caplog.records) == 1
        assert cp.stats.snapshots_taken == 6 and cp.stats.last_committed_step == 5
        cp.close()  # the daemon may be back (ensure_daemon) or not: step 5 is on disk either way
        assert [s.step for s in list_steps(tmp_path / "ckpt") if s.complete] == [5]

        model2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))
        opt2 = torch.optim.AdamW(model2.parameters())
        with Checkpointer(model2, opt2, dir=tmp_path / "ckpt", job=job, daemon_socket=sock,
                          persist_every=0) as cp2:
            assert cp2.restore() == 6
            for a, b in zip(model.parameters(), model2.parameters()):
                assert torch.equal(a, b)
    finally:
        cp.close()
        clean_up_job(tmp_path, job)
