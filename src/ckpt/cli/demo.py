"""``ckpt demo``: train, SIGKILL the trainer mid-run, resume, and prove nothing was lost.

Runs the tiny transformer of :mod:`ckpt.cli.demo_model` twice in child
processes: once uninterrupted (plain PyTorch, no ckpt), once with
``ckpt.Checkpointer`` and the embedded daemon, SIGKILLed at a random instant
and restarted. Prints how many steps the kill cost and whether the final
parameters, optimizer state and RNG states equal the uninterrupted run's bit
for bit. Exit status 0 only if they do.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Incarnation:
    """What one trainer process reported before it ended."""

    start: int = -1
    last_step: int = -1
    killed: bool = False
    stats: dict = field(default_factory=dict)


def _worker_cmd(workdir: Path, args: argparse.Namespace, *, ckpt: bool, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "ckpt.cli.demo_worker", "--dir", str(workdir / "checkpoints"),
           "--steps", str(args.steps), "--seed", str(args.seed), "--out", str(out),
           "--persist-every", str(args.persist_every), "--step-sleep-s", str(args.step_sleep_s)]
    if ckpt:
        cmd += ["--ckpt", "--socket", str(workdir / "daemon.sock"), "--job", args.job]
    return cmd


def _run_incarnation(cmd: list[str], kill_after_step: int | None, rng: random.Random) -> Incarnation:
    """Run one trainer; SIGKILL it a random instant after it reports ``kill_after_step``."""
    inc = Incarnation()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_child_env())
    assert proc.stdout is not None
    for line in proc.stdout:
        rec = json.loads(line)
        if rec["event"] == "restored":
            inc.start = rec["start"]
        elif rec["event"] == "step":
            inc.last_step = rec["step"]
            if kill_after_step is not None and rec["step"] >= kill_after_step:
                time.sleep(rng.uniform(0.0, 0.02))  # land anywhere inside the next step
                proc.send_signal(signal.SIGKILL)
                inc.killed = True
                break
        elif rec["event"] == "stats":
            inc.stats = rec
    proc.stdout.close()
    code = proc.wait(timeout=300)
    if not inc.killed and code != 0:
        raise RuntimeError(f"demo trainer exited with status {code}: run `{' '.join(cmd)}` to see why")
    return inc


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("CKPT_LOG_LEVEL", "WARNING")  # the table is the demo's output
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _clean_up(socket_path: Path, job: str) -> None:
    """Release the demo job's shared memory and stop the demo's daemon."""
    try:
        from ckpt.control.client import DaemonClient

        with DaemonClient(str(socket_path), timeout_s=5) as client:
            client.release(job)
            os.kill(client.status().pid, signal.SIGTERM)
    except Exception:  # the demo is over; a daemon that is already gone is fine
        pass
    from ckpt import _C
    from ckpt.recovery.sources import segment_names

    for _, name in segment_names(job, 0):  # whatever the daemon could not release
        _C.Segment.unlink(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ckpt demo", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--persist-every", type=int, default=10)
    p.add_argument("--step-sleep-s", type=float, default=0.02,
                   help="pause per step so the kill lands mid-run (default 0.02)")
    p.add_argument("--workdir", default=None, help="keep files here (default: a temp dir, removed)")
    args = p.parse_args(argv)
    args.job = f"demo-{os.getpid()}"
    if args.steps < 10:
        p.error("--steps must be at least 10 so the kill lands mid-run")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ckpt-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed + int(time.time()))
    try:
        return _demo(workdir, args, rng)
    finally:
        _clean_up(workdir / "daemon.sock", args.job)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _demo(workdir: Path, args: argparse.Namespace, rng: random.Random) -> int:
    import numpy as np

    from ckpt.cli.demo_model import compare_arrays

    print(f"ckpt demo: tiny transformer, {args.steps} steps, work dir {workdir}", flush=True)
    t0 = time.perf_counter()
    ref = _run_incarnation(_worker_cmd(workdir, args, ckpt=False, out=workdir / "ref.npz"), None, rng)
    t_ref = time.perf_counter() - t0

    kill_at = rng.randint(args.steps // 3, 2 * args.steps // 3)
    cmd = _worker_cmd(workdir, args, ckpt=True, out=workdir / "resumed.npz")
    t0 = time.perf_counter()
    first = _run_incarnation(cmd, kill_at, rng)
    second = _run_incarnation(cmd, None, rng)
    t_ckpt = time.perf_counter() - t0

    expected = dict(np.load(workdir / "ref.npz", allow_pickle=False))
    actual = dict(np.load(workdir / "resumed.npz", allow_pickle=False))
    diffs = compare_arrays(expected, actual)
    # Steps whose work was done before the kill but had to be redone after it.
    lost = max(0, first.last_step + 1 - second.start)

    rows = [
        ("uninterrupted (no ckpt)", f"{ref.last_step + 1}", "-", "-", "-", "reference", f"{t_ref:.1f}"),
        ("ckpt, SIGKILL + restart", f"{second.last_step + 1}", f"{first.last_step + 1}",
         f"{second.start}", f"{lost}",
         "bit-identical" if not diffs else f"{len(diffs)} differ", f"{t_ckpt:.1f}"),
    ]
    header = ("run", "steps", "killed during", "resumed at", "steps lost", "final state", "wall s")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"compared {len(expected)} arrays: parameters, AdamW moments and steps, learning rate, "
          f"RNG states (torch, python, numpy)")
    if diffs:
        print("differences: " + ", ".join(diffs[:10]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
