"""Two gloo ranks under torchrun, SIGKILLed ten times, resume bit-exactly (DDP and FSDP2).

torchrun's elastic agent does what it does in production: when a worker dies
it stops the others and restarts the whole group, up to ``--max-restarts``.
Each incarnation kills one of its ranks at a planned, randomly drawn step and
phase; the last one runs to the end. The reference is the same launch with no
ckpt and no kills.
"""

from __future__ import annotations

import random

import pytest
from harness import load_npz, records_of, run_torchrun, worker_args

from ckpt.cli.demo_model import compare_arrays

STEPS = 40
KILLS = 10


def _kill_plan(seed: int) -> str:
    rng = random.Random(seed)
    items, step = [], 1
    for attempt in range(KILLS):
        step = min(STEPS - 2, step + rng.randint(1, 3))
        phase = rng.choice(["copy", "step"])
        items.append(f"{attempt}:{step}:{phase}:{rng.randint(0, 1)}")
    return ",".join(items)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_resume_bit_exact_after_ten_sigkills(run_dir, parallel):
    ref = run_torchrun(worker_args(run_dir / "ref", STEPS, ckpt=False, out=run_dir / "ref.npz",
                                   parallel=parallel))
    assert ref.returncode == 0, ref.stderr[-4000:]

    args = worker_args(run_dir, STEPS, ckpt=True, out=run_dir / "final.npz", parallel=parallel,
                       persist_every=4, kill=_kill_plan(seed=7 if parallel == "ddp" else 8))
    run = run_torchrun(args, max_restarts=KILLS)
    assert run.returncode == 0, run.stderr[-6000:]

    records = records_of(run.stdout)
    restores = [r for r in records if r["event"] == "restored" and r["rank"] == 0]
    assert len(restores) == KILLS + 1, f"expected {KILLS} restarts, saw {len(restores) - 1}"
    starts = [r["start"] for r in restores]
    assert starts[0] == 0 and all(s > 0 for s in starts[1:]), f"restored at {starts}"
    # Both ranks of an incarnation resume at the same step: ranks never mix steps.
    by_attempt: dict[int, set[int]] = {}
    for r in records:
        if r["event"] == "restored":
            by_attempt.setdefault(r["attempt"], set()).add(r["start"])
    assert all(len(s) == 1 for s in by_attempt.values()), by_attempt

    diffs = compare_arrays(load_npz(run_dir / "ref.npz"), load_npz(run_dir / "final.npz"))
    assert diffs == [], f"{parallel}: resumed run differs in {diffs[:10]}"
