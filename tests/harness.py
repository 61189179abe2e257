"""Shared helpers for tests that start real trainer processes.

Trainers are ``python -m ckpt.cli.demo_worker`` (see its docstring for the
JSON lines it prints and the fault plans it takes), run either directly or
under torchrun. Kills are real SIGKILLs, sent by the harness or by the trainer
to itself at a planned point.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

SRC = str(Path(__file__).resolve().parents[1] / "src")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def worker_args(run_dir: Path, steps: int, *, ckpt: bool, out: Path | None = None, **opts) -> list[str]:
    args = ["--dir", str(run_dir / "checkpoints"), "--steps", str(steps)]
    if out is not None:
        args += ["--out", str(out)]
    if ckpt:
        args += ["--ckpt", "--socket", str(run_dir / "daemon.sock"), "--job", run_dir.name]
    for key, value in opts.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@dataclass
class RunLog:
    """What a trainer incarnation printed, and how it ended."""

    returncode: int
    records: list[dict] = field(default_factory=list)

    def steps(self) -> list[int]:
        return [r["step"] for r in self.records if r["event"] == "step"]

    def start(self) -> int:
        return next(r["start"] for r in self.records if r["event"] == "restored")


def run_worker(args: list[str], *, attempt: int = 0, kill_after_step: int | None = None,
               rng: random.Random | None = None, max_delay_s: float = 0.05,
               timeout_s: float = 300) -> RunLog:
    """Run one single-process trainer; optionally SIGKILL it at a random instant after a step."""
    proc = subprocess.Popen([sys.executable, "-m", "ckpt.cli.demo_worker", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(CKPT_ATTEMPT=str(attempt)))
    log = RunLog(returncode=0)
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    for line in proc.stdout:
        rec = json.loads(line)
        log.records.append(rec)
        if kill_after_step is not None and rec["event"] == "step" and rec["step"] >= kill_after_step:
            time.sleep((rng or random).uniform(0, max_delay_s))
            proc.send_signal(signal.SIGKILL)
            kill_after_step = None  # read on: lines written before the kill landed still count
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"trainer ran past {timeout_s} s")
    proc.stdout.close()
    log.returncode = proc.wait(timeout=timeout_s)
    stderr = proc.stderr.read() if proc.stderr else ""
    if kill_after_step is None and log.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"trainer failed with {log.returncode}:\n{stderr[-4000:]}")
    log.stderr = stderr  # type: ignore[attr-defined]
    return log


def run_torchrun(args: list[str], *, nproc: int = 2, max_restarts: int = 0,
                 timeout_s: float = 240) -> subprocess.CompletedProcess:
    """Launch the trainer the way torchrun launches it (elastic agent, restarts on failure).

    A launch still running after ``timeout_s`` (below pytest's 300 s, so its output is
    kept) is SIGKILLed with all its workers, and the test fails with the output's tail.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2",
           "-m", "ckpt.cli.demo_worker", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun did not finish within {timeout_s} s; killed it and its "
                             f"workers.\nstdout tail:\n{out[-3000:]}\nstderr tail:\n{err[-6000:]}"
                             ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def flip_byte(path: Path, offset: int, mask: int = 0x40) -> None:
    """Damage one byte of the file ``path`` in place (XOR with ``mask``)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (workers of a hung launcher must not linger)."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def records_of(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        # torchrun may prefix lines with "[rank]:" when --tee is used; we do not use it.
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def kill_daemons_under(path: Path) -> None:
    """SIGKILL every process whose command line mentions ``path`` (daemons a test started)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if str(path) in cmdline and proc.pid != os.getpid():
            try:
                proc.kill()
            except psutil.Error:
                pass


def shm_names() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("ckpt-")}
    except FileNotFoundError:
        return set()


def clean_up_job(run_dir: Path, job: str, rank: int = 0) -> None:
    """After an in-process Checkpointer test: SIGKILL the daemon it started under
    ``run_dir`` (pid file beside the socket) and unlink the job's segments."""
    from ckpt import _C
    from ckpt.recovery.sources import segment_names

    pid_file = run_dir / "daemon.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    for _, name in segment_names(job, rank):
        _C.Segment.unlink(name)
