"""Checkpointer on a CUDA model: the snapshot holds what the compute stream had produced
when cp.step() was called, with no host synchronisation anywhere in the loop.

Run on a GPU machine: `pytest -m gpu tests/gpu`. Skipped (by tests/conftest.py) where no
CUDA device is usable.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ckpt._C_cuda")

from harness import clean_up_job  # noqa: E402

from ckpt.hook.checkpointer import Checkpointer  # noqa: E402

pytestmark = pytest.mark.gpu


def make(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def snapshot_of(model, optimizer) -> list[torch.Tensor]:
    """Clones on the compute stream: ordered after everything queued so far."""
    out = [p.detach().clone() for p in model.parameters()]
    for state in optimizer.state.values():
        out += [v.clone() for v in state.values() if torch.is_tensor(v)]
    return out


def test_snapshots_wait_for_the_compute_stream_and_restore_bit_exactly(tmp_path) -> None:
    job = f"gpu{os.getpid()}"
    model, opt = make(0)
    cp = Checkpointer(model, opt, dir=tmp_path / "ckpt", job=job, every=1, persist_every=0,
                      daemon_socket=tmp_path / "daemon.sock", start_daemon=False)
    try:
        assert cp.restore() == 0
        x = torch.randn(64, 1024, device="cuda")
        expected: list[torch.Tensor] = []
        for s in range(6):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            # Late work on the compute stream that changes the state cp.step(s) must capture:
            # a copy that does not wait for this stream would read the values before it.
            torch.cuda._sleep(20_000_000)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.0001)
            cp.step(s)
            expected = snapshot_of(model, opt)
            if s == 0:
                assert cp.ready(120)
        assert cp.wait(60)
    finally:
        cp.close()

    model2, opt2 = make(1)
    cp2 = Checkpointer(model2, opt2, dir=tmp_path / "ckpt", job=job, persist_every=0,
                       daemon_socket=tmp_path / "daemon.sock", start_daemon=False)
    try:
        assert cp2.restore() == 6
        assert cp2.last_restore.tier == "memory"
        got = snapshot_of(model2, opt2)
        assert len(got) == len(expected)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert a.device == b.device and torch.equal(a, b), f"tensor {i} differs"
    finally:
        cp2.close()
        clean_up_job(tmp_path, job)
