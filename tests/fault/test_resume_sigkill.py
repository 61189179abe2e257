"""A trainer SIGKILLed at random instants resumes bit-exactly (single process).

The reference is plain PyTorch with no ckpt at all, so the test also shows
that checkpointing does not perturb training.
"""

from __future__ import annotations

import random

from harness import load_npz, run_worker, worker_args

from ckpt.cli.demo_model import compare_arrays

STEPS = 60
PERSIST_EVERY = 5


def test_resume_is_bit_exact_after_ten_sigkills(run_dir):
    rng = random.Random(1234)
    ref = run_worker(worker_args(run_dir / "ref", STEPS, ckpt=False, out=run_dir / "ref.npz"))
    assert ref.steps() == list(range(STEPS))

    # Ten kills: six from outside at a random instant after a random step, two by the
    # trainer itself right after cp.step() started the copy (so it dies mid-copy), two
    # just after a persist step was committed (the daemon is persisting as it dies).
    plan = ["external"] * 6 + ["copy"] * 2 + ["persist"] * 2
    rng.shuffle(plan)
    args = worker_args(run_dir, STEPS, ckpt=True, out=run_dir / "final.npz",
                       persist_every=PERSIST_EVERY, step_sleep_s=0.01)
    progress, kills, lost = -1, 0, []  # progress: the last step a trainer reported done
    for attempt, kind in enumerate(plan):
        target = min(STEPS - 3, progress + rng.randint(2, 6))
        if kind == "external":
            log = run_worker(args, attempt=attempt, kill_after_step=target, rng=rng)
        else:
            if kind == "persist":
                target = min(STEPS - 3, (target // PERSIST_EVERY + 1) * PERSIST_EVERY)
            phase = "copy" if kind == "copy" else "step"
            step = target if kind == "copy" else target + 1
            log = run_worker([*args, "--kill", f"{attempt}:{step}:{phase}"], attempt=attempt)
        assert log.returncode == -9, f"attempt {attempt} ({kind}) was not killed: {log.records[-3:]}"
        kills += 1
        start = log.start()
        # A step may finish (and its snapshot commit) in the instant between its
        # cp.step() and the progress line the kill cut off: hence + 2.
        assert start <= progress + 2, "resumed past the last completed step"
        lost.append(max(0, progress + 1 - start))
        progress = max([start - 1, *log.steps()])

    final = run_worker(args, attempt=len(plan))
    assert final.returncode == 0
    assert final.steps()[-1] == STEPS - 1
    assert kills >= 10
    # Each restart redoes at most the step that was in flight and its predecessor
    # (whose copy may not have been committed yet when the kill landed).
    assert max(lost) <= 2, f"steps redone per restart: {lost}"

    diffs = compare_arrays(load_npz(run_dir / "ref.npz"), load_npz(run_dir / "final.npz"))
    assert diffs == [], f"resumed run differs from the uninterrupted one in {diffs[:10]}"
