"""Damaged checkpoints on disk: verify names the damage, restore falls back, no bad byte is loaded."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import child_env, kill_daemons_under, run_worker, worker_args

from ckpt.cli.demo_model import SyntheticTokens, TinyConfig, make_training
from ckpt.control.client import DaemonClient
from ckpt.format import StepReader
from ckpt.storage import list_steps

STEPS = 20


def _damage(step_dir: Path, how: str) -> str:
    """Damage one persisted step; return the file name that restore/verify must mention."""
    data = sorted(step_dir.glob("rank-*.data"))[0]
    if how == "truncated":
        size = data.stat().st_size
        with open(data, "r+b") as f:
            f.truncate(size // 2)
        return data.name
    if how == "flipped_byte":
        with open(data, "r+b") as f:
            f.seek(data.stat().st_size // 3)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x40]))
        return data.name
    if how == "missing_manifest":
        (step_dir / "manifest.json").unlink()
        return "manifest.json"
    if how == "foreign":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
        (step_dir / "weights.bin").write_bytes(os.urandom(4096))
        (step_dir / "notes.txt").write_text("not a ckpt checkpoint\n")
        return "manifest.json"
    raise ValueError(how)


@pytest.fixture(scope="module")
def persisted(tmp_path_factory):
    """A run of 20 steps persisted every 5 steps (keep all), its memory tier released."""
    run_dir = tmp_path_factory.mktemp("persisted")
    # Paced steps: each persist is done before the next persist step is committed (a newer
    # persist step supersedes one still queued, and this fixture needs steps 15 and 20).
    args = worker_args(run_dir, STEPS, ckpt=True, persist_every=5, keep=0, step_sleep_s=0.05)
    run_worker(args)
    with DaemonClient(str(run_dir / "daemon.sock"), timeout_s=30) as client:
        client.release(run_dir.name)
        pid = client.status().pid
    os.kill(pid, 9)
    steps = [s.step for s in list_steps(run_dir / "checkpoints") if s.complete]
    assert steps[-2:] == [15, STEPS - 1], steps
    yield run_dir
    kill_daemons_under(run_dir)


@pytest.mark.parametrize("how", ["truncated", "flipped_byte", "missing_manifest", "foreign"])
def test_restore_skips_a_damaged_step_and_verify_names_it(persisted, tmp_path, how, caplog):
    run_dir = tmp_path / persisted.name
    shutil.copytree(persisted / "checkpoints", run_dir / "checkpoints")
    newest = run_dir / "checkpoints" / f"step-{STEPS - 1:08d}"
    culprit = _damage(newest, how)

    verify = subprocess.run([sys.executable, "-m", "ckpt.cli.main", "verify", str(newest)],
                            capture_output=True, text=True, env=child_env())
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert culprit in verify.stdout + verify.stderr
    if how == "flipped_byte":
        assert "chunk" in (verify.stdout + verify.stderr)

    cfg = TinyConfig()
    model, optimizer, scheduler = make_training(cfg, seed=0, total_steps=STEPS)
    data = SyntheticTokens(cfg)
    import ckpt

    with caplog.at_level(logging.INFO, logger="ckpt"):
        cp = ckpt.Checkpointer(model, optimizer, scheduler=scheduler, dir=run_dir / "checkpoints",
                               extra={"data": data}, daemon_socket=run_dir / "daemon.sock",
                               job=run_dir.name, persist_every=0, start_daemon=False)
        start = cp.restore()
        cp.close()
    assert start == 16, "restore must fall back to the previous valid step (15)"
    assert culprit in caplog.text, f"restore did not say what was wrong:\n{caplog.text[-2000:]}"

    # What was loaded is exactly step 15 as stored: no damaged (or other) bytes.
    reader = StepReader(run_dir / "checkpoints" / f"step-{15:08d}")
    for name, param in model.state_dict().items():
        stored = reader.read_slice(f"model/{name}", [0] * param.dim(), list(param.shape))
        assert np.array_equal(np.asarray(stored).view(np.uint8).reshape(-1),
                              param.detach().contiguous().view(torch.uint8).reshape(-1).numpy()), name
    assert data.position == 16
