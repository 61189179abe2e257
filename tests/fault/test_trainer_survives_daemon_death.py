"""SIGKILL the node daemon mid-run: training goes on, snapshots resume, nothing persisted is lost."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import psutil
from harness import child_env, load_npz, run_worker, worker_args

from ckpt.cli.demo_model import compare_arrays
from ckpt.storage import list_steps

STEPS = 80
PERSIST_EVERY = 5


def _daemon_pids(run_dir) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "ckpt.daemon.server" in cmdline and str(run_dir / "daemon.sock") in cmdline:
            pids.append(proc.pid)
    return pids


def test_training_continues_and_snapshots_resume_after_daemon_sigkill(run_dir):
    run_worker(worker_args(run_dir / "ref", STEPS, ckpt=False, out=run_dir / "ref.npz"))

    args = worker_args(run_dir, STEPS, ckpt=True, out=run_dir / "final.npz",
                       persist_every=PERSIST_EVERY, step_sleep_s=0.05, keep=0,
                       daemon_retry_s=0.5)
    proc = subprocess.Popen([sys.executable, "-m", "ckpt.cli.demo_worker", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    killed_pid, persisted_before, steps_after_kill = None, [], 0
    assert proc.stdout is not None
    for line in proc.stdout:
        rec = json.loads(line)
        if rec["event"] != "step":
            continue
        if killed_pid is None and rec["step"] >= 20:
            pids = _daemon_pids(run_dir)
            assert len(pids) == 1, f"expected one daemon for this test, found {pids}"
            persisted_before = [s.step for s in list_steps(run_dir / "checkpoints") if s.complete]
            killed_pid = pids[0]
            psutil.Process(killed_pid).send_signal(signal.SIGKILL)
        elif killed_pid is not None:
            steps_after_kill += 1
    returncode = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert returncode == 0, stderr[-4000:]
    assert steps_after_kill >= STEPS - 22, "training stalled after the daemon died"

    # Warned, once.
    warnings = [l for l in stderr.splitlines() if "daemon" in l.lower() and "warn" in l.lower()]
    assert len(warnings) == 1, f"expected one warning about the daemon, got:\n{stderr[-3000:]}"

    # A daemon is back (started again by the trainer) and snapshots went on being persisted.
    assert persisted_before, "nothing had been persisted before the kill: the test proves nothing"
    steps_on_disk = [s.step for s in list_steps(run_dir / "checkpoints") if s.complete]
    assert max(steps_on_disk) == STEPS - 1, f"close() did not persist the final step: {steps_on_disk}"
    assert any(s > max(persisted_before) + PERSIST_EVERY for s in steps_on_disk[:-1]), \
        f"no periodic persist after the daemon died (on disk: {steps_on_disk})"
    # Nothing persisted before the kill was lost (keep=0: retention deletes nothing).
    assert set(persisted_before) <= set(steps_on_disk)
    from ckpt.format import verify

    for info in list_steps(run_dir / "checkpoints"):
        if info.complete:
            report = verify(info.path)
            assert report.ok, f"{info.path}: {report}"

    diffs = compare_arrays(load_npz(run_dir / "ref.npz"), load_npz(run_dir / "final.npz"))
    assert diffs == [], f"run with a daemon death differs from the uninterrupted one in {diffs[:10]}"
