"""The Checkpointer's last restore tier: a pipeline stage whose snapshot is gone is rebuilt
from its neighbours (CheckFree) by real gloo ranks under torchrun.

Five stage processes train a few steps and snapshot into shared memory; then the
memory of one stage is removed (its node is lost) and a new set of processes restores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import child_env

from ckpt import _C
from ckpt.recovery.sources import segment_names

WORKER = str(Path(__file__).with_name("checkfree_tier_worker.py"))
STEPS = 6
EPS = 1e-4


def _launch(run_dir: Path, phase: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=5",
           "--max-restarts=0", "--monitor-interval=0.2", WORKER, "--phase", phase,
           "--dir", str(run_dir / "ckpt"), "--job", run_dir.name, "--out", str(out),
           "--steps", str(STEPS), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=child_env())


def _records(out: Path) -> dict[int, dict]:
    return {r: json.loads((out / f"rank-{r}.json").read_text()) for r in range(5)}


def _lose_memory_of(job: str, rank: int) -> None:
    names = segment_names(job, rank)
    assert names, f"rank {rank} left no segment"
    for _, name in names:
        _C.Segment.unlink(name)


def _train(run_dir: Path, *extra: str) -> tuple[Path, dict[int, dict]]:
    res = _launch(run_dir, "train", run_dir / "train", *extra)
    assert res.returncode == 0, res.stderr[-4000:]
    return run_dir, _records(run_dir / "train")


@pytest.fixture
def trained(run_dir):
    return _train(run_dir)


def test_a_lost_middle_stage_is_the_gradient_weighted_average_of_its_neighbours(trained):
    run_dir, before = trained
    _lose_memory_of(run_dir.name, 2)
    res = _launch(run_dir, "restore", run_dir / "restore")
    assert res.returncode == 0, res.stderr[-4000:]
    after = _records(run_dir / "restore")

    for rank in (0, 1, 3, 4):  # survivors: their own snapshot, bit for bit
        assert after[rank]["tier"] == "memory" and after[rank]["start"] == STEPS
        assert after[rank]["state"] == before[rank]["state"]
    rebuilt = after[2]
    assert rebuilt["tier"] == "checkfree" and rebuilt["start"] == STEPS
    assert "average of stages 1 and 3" in rebuilt["where"]
    a = before[3]["grad_norm"] + EPS  # weight of the next stage
    b = before[1]["grad_norm"] + EPS
    assert before[1]["grad_norm"] != pytest.approx(before[3]["grad_norm"], rel=0.05)
    for key, value in rebuilt["state"].items():
        want = (a * torch.tensor(before[3]["state"][key], dtype=torch.float32)
                + b * torch.tensor(before[1]["state"][key], dtype=torch.float32)) / (a + b)
        torch.testing.assert_close(torch.tensor(value), want, rtol=1e-6, atol=1e-7)
    # A fresh optimizer at the neighbour's learning rate x 1.1, at the job's schedule position,
    # with the job-wide extras (data position) of its neighbour.
    assert rebuilt["optimizer_state"] == 0
    assert rebuilt["lr"] == pytest.approx(before[1]["lr"] * 1.1, rel=1e-9)
    assert rebuilt["last_epoch"] == before[1]["last_epoch"] == STEPS
    assert rebuilt["base_lrs"] == [pytest.approx(1e-2 * 1.1)]
    assert rebuilt["pos"] == STEPS
    assert "rebuilt by CheckFree as stage 2: gradient-weighted average of stages 1 and 3" in res.stderr


@pytest.mark.parametrize(("lost", "reason"), [
    (1, "stage 1 is an edge stage"),
    (0, "pipeline stage 0 (embedding/head) lacks it"),
])
def test_a_stage_checkfree_cannot_rebuild_fails_the_restore_on_every_rank(trained, lost, reason):
    run_dir, _ = trained
    _lose_memory_of(run_dir.name, lost)
    res = _launch(run_dir, "restore", run_dir / "restore")
    assert res.returncode == 0, res.stderr[-4000:]
    after = _records(run_dir / "restore")
    for rank in range(5):
        assert after[rank].get("error", "").startswith("StepNotFoundError"), after[rank]
    assert reason in res.stderr


@pytest.mark.parametrize(("lost", "holder"), [(0, 1), (4, 3)])
def test_a_lost_embedding_or_head_stage_is_its_replica_from_its_block_neighbour(run_dir, lost, holder):
    """With replica_every=4, stages 0 and 4 send their weights to stages 1 and 3 at steps 0
    and 4; those keep them in their snapshots, and a lost end stage comes back from there."""
    run_dir, before = _train(run_dir, "--replica-every", "4")
    _lose_memory_of(run_dir.name, lost)
    res = _launch(run_dir, "restore", run_dir / "restore", "--replica-every", "4")
    assert res.returncode == 0, res.stderr[-4000:]
    after = _records(run_dir / "restore")
    for rank in set(range(5)) - {lost}:
        assert after[rank]["tier"] == "memory" and after[rank]["state"] == before[rank]["state"]
    rebuilt = after[lost]
    assert rebuilt["tier"] == "checkfree" and rebuilt["start"] == STEPS
    assert f"replica kept by the holder of stage {holder}" in rebuilt["where"]
    assert before[lost]["replicated"]["step"] == 4
    assert rebuilt["state"] == before[lost]["replicated"]["state"]  # bit for bit, from step 4
    assert rebuilt["state"] != before[lost]["state"]                # (not the step-5 weights)
    assert rebuilt["optimizer_state"] == 0 and rebuilt["pos"] == STEPS
    assert "(weights of step 4)" in res.stderr
