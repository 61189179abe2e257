"""What does a snapshot of every step cost the training loop? ckpt vs DCP async_save vs torch.save.

One run, one model, one optimizer state (>= 1 GiB: an MLP + AdamW), modes side by side:

- ``none``            plain training, the baseline;
- ``ckpt``            ckpt.Checkpointer, a snapshot of every step into daemon memory;
- ``dcp_async``       torch.distributed.checkpoint.async_save every step, default settings;
- ``dcp_async_shm``   the same with DefaultStager(shared memory, async staging), if torch has it;
- ``torch_save``      torch.save of the state dict every step (+ fsync).

Per mode: mean step time, throughput relative to ``none`` and the blocking stall per
snapshot (time the training thread spends inside the checkpoint call and waiting for
it before the optimizer may run). The physical floor on a CPU: one core must copy the
whole state once per step, measured here as ``t_copy``; floor = 1 - t_copy / (cores x
step time). Then: persist throughput vs ``dd oflag=direct`` on the same disk, run just
before and just after the persist (the better of the two is the reference), and restore
from daemon memory, from disk and with ``dcp.load`` (medians of 3 each, the page cache
dropped before each disk read). Prints a table and a JSON line.

With ``--device cuda`` the model, inputs and AdamW state live on the GPU and a step
ends when the compute stream has run it. The copy is DMA there, so instead of the
CPU floor: ckpt's throughput against the 0.97 target, and ckpt's device-to-host GB/s
(per snapshot, from ``cp.stats.last_copy_s``) against a pinned copy of the whole
state measured in the same run (non-blocking copies on a side stream into one
page-locked tensor, best of 3).

    python bench/snapshot_stall.py [--state-gib 1.1] [--steps 8] [--workdir DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
JOB = f"bench-{os.getpid()}"  # a fresh job: never restore what an earlier run left in /dev/shm
sys.path.insert(0, str(ROOT / "src"))

import ckpt  # noqa: E402
from ckpt import _C  # noqa: E402


TARGET_GPU_THROUGHPUT = 0.97  # the target on a GPU, where the copy is DMA
# Rows per step. On a GPU the state's D2H copy (4 GiB: ~0.09 s at PCIe Gen5's ~50 GB/s) must
# fit in fwd+bwd, ~6 x rows FLOP per parameter: 8192 rows make a 4 GiB state's step ~0.3 s at
# an H200's ~60 fp32 TFLOP/s (an estimate; the run prints step time and pinned copy time).
DEFAULT_BATCH = {"cpu": 32, "cuda": 8192}


def build(state_gib: float, device: str, batch: int, width: int = 4096):
    """An MLP whose parameters + AdamW moments take ``state_gib`` GiB, one step already taken."""
    per_layer_bytes = 12 * width * (width + 1)  # fp32 weight + bias, exp_avg, exp_avg_sq
    layers = max(1, round(state_gib * (1 << 30) / per_layer_bytes))
    torch.manual_seed(0)
    with torch.device(device):
        model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU())
                                for _ in range(layers)])
        x = torch.randn(batch, width)
        y = torch.randn(batch, width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step(model, optimizer, x, y)
    return model, optimizer, x, y


def wait_compute(device: torch.device | str) -> None:
    """On a GPU, wait until the compute stream has run what was queued (a step boundary).

    The compute stream only: a device-wide ``torch.cuda.synchronize()`` would also wait
    for ckpt's side-stream D2H copy and DCP's staging stream, which are meant to overlap
    the next step. ckpt's copy still counts: the optimizer step waits for it on the device.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.current_stream().synchronize()


def step(model, optimizer, x, y) -> None:
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    wait_compute(x.device)


def state_tensors(model, optimizer) -> list[torch.Tensor]:
    out = [p.detach() for p in model.parameters()]
    for s in optimizer.state.values():
        out += [v for v in s.values() if torch.is_tensor(v)]
    return out


def copy_jobs(tensors: list[torch.Tensor], dst_addr: int) -> list[tuple[int, int, int]]:
    """Copy-engine jobs that lay ``tensors`` out back to back from ``dst_addr``."""
    jobs, off = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        jobs.append((t.data_ptr(), dst_addr + off, n))
        off += n
    return jobs


def measure_copy_s(tensors: list[torch.Tensor]) -> tuple[float, int]:
    """One core copying the whole state into pre-faulted memory (the physical floor's cost)."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    dst = torch.empty(total, dtype=torch.uint8)
    dst.fill_(1)  # pre-fault
    engine = _C.CopyEngine(1)
    best = float("inf")
    for _ in range(3):
        jobs = copy_jobs(tensors, dst.data_ptr())
        t0 = time.perf_counter()
        engine.submit(jobs, 4 << 20, 0).wait(60)
        best = min(best, time.perf_counter() - t0)
    return best, total


def measure_pinned_d2h_s(tensors: list[torch.Tensor]) -> tuple[float, int]:
    """The CUDA state copied device-to-host into one pre-allocated page-locked tensor
    (non-blocking copies on a side stream, best of 3): the bandwidth ckpt's D2H is held to."""
    sources = [t.reshape(-1).view(torch.uint8) for t in tensors if t.is_cuda]
    total = sum(t.numel() for t in sources)
    dst = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.cuda.stream(side):
            off = 0
            for t in sources:
                dst[off:off + t.numel()].copy_(t, non_blocking=True)
                off += t.numel()
        side.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, total


class PreHookTimer:
    """Times what runs between two optimizer pre-hooks: the ones a checkpointer registers."""

    def __init__(self, optimizer) -> None:
        self.total_s = 0.0
        self._t0 = 0.0
        self._first = optimizer.register_step_pre_hook(lambda *a: self._start())

    def _start(self) -> None:
        self._t0 = time.perf_counter()

    def arm_end(self, optimizer) -> None:
        self._last = optimizer.register_step_pre_hook(lambda *a: self._stop())

    def _stop(self) -> None:
        self.total_s += time.perf_counter() - self._t0

    def remove(self) -> None:
        self._first.remove()
        if hasattr(self, "_last"):
            self._last.remove()


def run_none(model, optimizer, x, y, steps: int) -> list[float]:
    """Per-step wall times of plain training."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(model, optimizer, x, y)
        times.append(time.perf_counter() - t0)
    return times


class CkptRun:
    """ckpt.Checkpointer taking a snapshot of every step; per-step times and stalls.

    The stall of a snapshot is what the training thread spends in ``cp.step()`` plus
    what ckpt's optimizer pre-hook waits for the copy (timed by hooks registered just
    before and after ckpt's own).
    """

    def __init__(self, model, optimizer, workdir: Path, **options) -> None:
        self.model, self.optimizer = model, optimizer
        self.timer = PreHookTimer(optimizer)
        self.cp = ckpt.Checkpointer(model, optimizer, dir=workdir / "ckpt", every=1,
                                    persist_every=0, daemon_socket=workdir / "daemon.sock",
                                    job=JOB, **options)
        self.timer.arm_end(optimizer)
        self.cp.restore()
        self.next_step = 0
        # Per sealed snapshot, from cp.stats: start of the copy to its end, and to the seal.
        self.copy_s: list[float] = []
        self.commit_s: list[float] = []
        self._last_recorded_step = -1

    def _record_snapshot(self) -> None:
        stats = self.cp.stats
        if stats.last_committed_step > self._last_recorded_step:
            self._last_recorded_step = stats.last_committed_step
            self.copy_s.append(stats.last_copy_s)
            self.commit_s.append(stats.last_commit_s)

    def first_snapshot(self, x, y) -> dict:
        """The first step asks the daemon for the segment (created in the background):
        how long that step() call took, and how long until snapshots could start."""
        step(self.model, self.optimizer, x, y)
        t0 = time.perf_counter()
        self.cp.step(self.next_step)
        call_s = time.perf_counter() - t0
        self.next_step += 1
        if not self.cp.ready(600):
            raise RuntimeError("the daemon did not create the segment within 600 s")
        return {"first_step_call_s": call_s, "segment_ready_s": time.perf_counter() - t0}

    def run(self, x, y, steps: int) -> tuple[list[float], list[float]]:
        times, stalls = [], []
        for _ in range(steps):
            self.timer.total_s = 0.0
            t0 = time.perf_counter()
            step(self.model, self.optimizer, x, y)
            t1 = time.perf_counter()
            self.cp.step(self.next_step)
            t2 = time.perf_counter()
            self.next_step += 1
            times.append(t2 - t0)
            stalls.append((t2 - t1) + self.timer.total_s)
            self._record_snapshot()  # step() sealed the previous snapshot before it began this one
        # The last copy is still in flight. As in a longer run, the next training step
        # overlaps it and its optimizer pre-hook waits for what is left: that wait is the
        # last snapshot's stall, and the step counts as a ckpt step (no snapshot of its own).
        self.timer.total_s = 0.0
        t0 = time.perf_counter()
        step(self.model, self.optimizer, x, y)
        times.append(time.perf_counter() - t0)
        stalls[-1] += self.timer.total_s
        self.cp.wait(120)  # sealed before the block ends
        self._record_snapshot()
        return times, stalls

    def remove_timer(self) -> None:
        self.timer.remove()


def interleaved(model, optimizer, x, y, workdir: Path, steps: int, rounds: int,
                options: dict) -> tuple[dict, dict, CkptRun]:
    """none and ckpt in alternating blocks, so machine drift hits both alike. The CkptRun
    holds the copy and commit times of the snapshots sealed in the timed blocks."""
    run = CkptRun(model, optimizer, workdir, **options)
    first = run.first_snapshot(x, y)
    run.run(x, y, 2)  # warm-up: first copies into the new segment
    run.copy_s.clear()
    run.commit_s.clear()
    none_t: list[float] = []
    ckpt_t: list[float] = []
    ckpt_stall: list[float] = []
    none_rounds: list[float] = []  # per round: the median step, so each round gives one paired loss
    ckpt_rounds: list[float] = []
    for _ in range(rounds):
        t = run_none(model, optimizer, x, y, steps)
        none_t += t
        none_rounds.append(statistics.median(t))
        t, st = run.run(x, y, steps)
        ckpt_t += t
        ckpt_rounds.append(statistics.median(t))
        ckpt_stall += st
    run.remove_timer()
    none = {"step_s": statistics.median(none_t), "step_s_mean": statistics.mean(none_t),
            "stall_s": 0.0, "round_step_s": none_rounds}
    ck = {"step_s": statistics.median(ckpt_t), "step_s_mean": statistics.mean(ckpt_t),
          "stall_s": statistics.mean(ckpt_stall), "stall_s_median": statistics.median(ckpt_stall),
          "stall_s_max": max(ckpt_stall), "round_step_s": ckpt_rounds, **first}
    return none, ck, run


def aa_control(model, optimizer, x, y, steps: int, rounds: int) -> list[tuple[float, float]]:
    """The A/A control: rounds of two plain-training blocks, (median step of A, of B). Fed
    to the per-round loss formula, they show how far one round's ratio moves on this
    machine when nothing differs between the blocks."""
    out = []
    for _ in range(rounds):
        a = statistics.median(run_none(model, optimizer, x, y, steps))
        b = statistics.median(run_none(model, optimizer, x, y, steps))
        out.append((a, b))
    return out


def run_dcp_async(model, optimizer, x, y, steps: int, workdir: Path, stager=None) -> dict:
    stall = 0.0
    pending_upload = None
    pending_staging = None
    t0 = time.perf_counter()
    for s in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        t1 = time.perf_counter()
        if pending_staging is not None:  # state must be staged before the optimizer mutates it
            pending_staging.result()
            pending_staging = None
        stall += time.perf_counter() - t1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        wait_compute(x.device)
        t1 = time.perf_counter()
        if pending_upload is not None:  # DCP allows one save in flight
            pending_upload.result()
            shutil.rmtree(workdir / f"dcp-{s - 1}", ignore_errors=True)
        state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        kwargs = {"no_dist": True}
        if stager is not None:
            kwargs["async_stager"] = stager
        result = dcp.async_save(state, checkpoint_id=str(workdir / f"dcp-{s}"), **kwargs)
        if hasattr(result, "upload_completion"):
            pending_staging, pending_upload = result.staging_completion, result.upload_completion
        else:
            pending_upload = result
        stall += time.perf_counter() - t1
    t1 = time.perf_counter()
    if pending_staging is not None:
        pending_staging.result()
    stall += time.perf_counter() - t1
    wall = time.perf_counter() - t0
    pending_upload.result()
    shutil.rmtree(workdir / f"dcp-{steps - 1}", ignore_errors=True)
    return {"step_s": wall / steps, "stall_s": stall / steps}


def run_torch_save(model, optimizer, x, y, steps: int, workdir: Path) -> dict:
    stall = 0.0
    path = workdir / "torch_save.pt"
    t0 = time.perf_counter()
    for _ in range(steps):
        step(model, optimizer, x, y)
        t1 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        stall += time.perf_counter() - t1
    wall = time.perf_counter() - t0
    path.unlink()
    return {"step_s": wall / steps, "stall_s": stall / steps}


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


RESTORE_REPEATS = 3  # each restore (and dcp.load) is timed this often; medians are reported


def measure_persist(cp, workdir: Path, state_bytes: int) -> dict:
    """Persist of the newest snapshot (``close()`` asks the daemon and waits) between two dd
    runs on the same disk; the better dd is the reference (the disk is shared and swings).
    The earlier modes' buffered writes are flushed first, so neither competes with them."""
    os.sync()
    dd_nbytes = min(state_bytes, 2 << 30)
    out: dict = {"dd_gbps_before": measure_dd(workdir, dd_nbytes)}
    t0 = time.perf_counter()
    cp.close()
    out["persist_s"] = time.perf_counter() - t0
    out["persist_gbps"] = state_bytes / out["persist_s"] / 1e9
    out["dd_gbps_after"] = measure_dd(workdir, dd_nbytes)
    out["dd_gbps"] = max(out["dd_gbps_before"], out["dd_gbps_after"])
    out.update(daemon_persist_split(workdir / "daemon.log"))
    return out


def daemon_persist_split(log: Path) -> dict:
    """The daemon's own account of its newest persist of JOB: total, staging (the copy out
    of the slot) and writing seconds; empty when it logged none (no daemon)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from persist_daemon import LOGGED_PERSIST_RE

    found = [m for m in LOGGED_PERSIST_RE.finditer(log.read_text() if log.exists() else "")
             if m.group(1) == JOB]
    if not found or found[-1].group(4) is None:
        return {}
    total, staging, writing = (float(v) for v in found[-1].groups()[2:])
    return {"daemon_persist_s": total, "daemon_staging_s": staging, "daemon_writing_s": writing}


def timed_restore(model, optimizer, workdir: Path, device: str) -> tuple[float, str]:
    """(seconds, tier) of one ``restore()`` by a new Checkpointer, as a restarted trainer."""
    cp = ckpt.Checkpointer(model, optimizer, dir=workdir / "ckpt", persist_every=0,
                           daemon_socket=workdir / "daemon.sock", job=JOB)
    t0 = time.perf_counter()
    cp.restore()
    wait_compute(device)
    seconds = time.perf_counter() - t0
    tier = cp.last_restore.tier if cp.last_restore else "none"
    cp.close()
    return seconds, tier


def measure_restores(model, optimizer, workdir: Path, device: str) -> dict:
    """Medians of RESTORE_REPEATS restores from daemon memory, from disk (page cache dropped
    before each) and of ``dcp.load`` of the same state (page cache dropped before each)."""
    out: dict = {}
    memory = [timed_restore(model, optimizer, workdir, device) for _ in range(RESTORE_REPEATS)]
    out["restore_memory_runs_s"] = [s for s, _ in memory]
    out["restore_memory_s"] = statistics.median(out["restore_memory_runs_s"])
    out["restore_memory_tier"] = memory[-1][1]

    from ckpt.control.client import DaemonClient

    with DaemonClient(str(workdir / "daemon.sock"), timeout_s=60) as client:
        client.release(JOB)  # forget the memory tier: the next restores must read the disk
    disk = []
    for _ in range(RESTORE_REPEATS):
        out["page_cache_dropped"] = drop_page_cache()
        disk.append(timed_restore(model, optimizer, workdir, device))
    out["restore_disk_runs_s"] = [s for s, _ in disk]
    out["restore_disk_s"] = statistics.median(out["restore_disk_runs_s"])
    out["restore_disk_tier"] = disk[-1][1]

    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    dcp.save(state, checkpoint_id=str(workdir / "dcp-load"), no_dist=True)
    out["dcp_load_runs_s"] = []
    for _ in range(RESTORE_REPEATS):
        drop_page_cache()
        t0 = time.perf_counter()
        dcp.load(state, checkpoint_id=str(workdir / "dcp-load"), no_dist=True)
        wait_compute(device)
        out["dcp_load_runs_s"].append(time.perf_counter() - t0)
    out["dcp_load_s"] = statistics.median(out["dcp_load_runs_s"])
    return out


def measure_dd(workdir: Path, nbytes: int) -> float:
    path = workdir / "dd.bin"
    count = max(1, nbytes // (16 << 20))
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", "oflag=direct",
                    "conv=fsync"], check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    path.unlink()
    return count * (16 << 20) / seconds / 1e9


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--state-gib", type=float, default=1.1)
    p.add_argument("--steps", type=int, default=6, help="steps per mode (per round for none/ckpt)")
    p.add_argument("--rounds", type=int, default=3, help="alternating none/ckpt blocks")
    p.add_argument("--workdir", default=None)
    p.add_argument("--yield-cores", action="store_true",
                   help="Checkpointer(yield_cores=True): torch lends the copy its core")
    p.add_argument("--copy-nice", type=int, default=0,
                   help="Checkpointer(copy_nice=N): the copy workers' priority, 0..19")
    p.add_argument("--copy-threads", type=int, default=1,
                   help="Checkpointer(copy_threads=N): the copy engine's workers")
    p.add_argument("--skip", default="", help="comma-separated modes to skip")
    p.add_argument("--aa-rounds", type=int, default=0,
                   help="after none/ckpt, this many none-vs-none rounds: the noise of one round's ratio")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model, inputs and optimizer state live")
    p.add_argument("--batch", type=int, default=None,
                   help=f"rows per step (default {DEFAULT_BATCH['cpu']} on cpu, "
                        f"{DEFAULT_BATCH['cuda']} on cuda: fwd+bwd must outlast the D2H copy)")
    args = p.parse_args()
    if args.device == "cuda":
        problem = cuda_problem()
        if problem:
            p.error(f"--device cuda: {problem}")
    return args


def cuda_problem() -> str | None:
    """Why the GPU bench cannot run here, or None."""
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"torch.cuda.is_available() is False (torch {torch.__version__}, {build}); run on "
                f"a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
    try:
        from ckpt import _C_cuda
    except ImportError:
        return ("ckpt._C_cuda is not built (nvcc was not found at build time); run "
                "`python setup.py build_ext --inplace` where nvcc is")
    if not _C_cuda.available():
        return "ckpt._C_cuda sees no usable CUDA device, while torch does; check CUDA_VISIBLE_DEVICES"
    return None


def run_modes(model, optimizer, x, y, workdir: Path, args: argparse.Namespace,
              options: dict) -> tuple[dict, CkptRun]:
    """Every mode's step time and stall, and the ckpt run (its Checkpointer, per-snapshot times)."""
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, dict] = {}
    results["none"], results["ckpt"], ckpt_run = interleaved(model, optimizer, x, y, workdir,
                                                             args.steps, args.rounds, options)
    if args.aa_rounds:
        results["none"]["aa_round_step_s"] = aa_control(model, optimizer, x, y, args.steps,
                                                        args.aa_rounds)
    if "dcp_async" not in skip:
        results["dcp_async"] = run_dcp_async(model, optimizer, x, y, args.steps, workdir)
    if "dcp_async_shm" not in skip:
        try:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                  use_shared_memory=True, use_async_staging=True,
                                                  use_non_blocking_copy=torch.cuda.is_available()))
            results["dcp_async_shm"] = run_dcp_async(model, optimizer, x, y, args.steps, workdir, stager)
            stager.close()
        except ImportError:
            pass
    if "torch_save" not in skip:
        results["torch_save"] = run_torch_save(model, optimizer, x, y, args.steps, workdir)
    return results, ckpt_run


def print_table(results: dict[str, dict]) -> None:
    """One row per mode; adds each mode's throughput and stall ratio to ``results``."""
    base_step = results["none"]["step_s"]
    print(f"{'mode':<16}{'step s':>9}{'throughput':>12}{'stall/snapshot s':>18}{'stall vs async_save':>21}")
    async_stall = results.get("dcp_async", {}).get("stall_s")
    for name, r in results.items():
        r["throughput"] = base_step / r["step_s"]
        ratio = r["stall_s"] / async_stall if async_stall else float("nan")
        r["stall_vs_dcp_async"] = ratio
        print(f"{name:<16}{r['step_s']:>9.3f}{r['throughput']:>12.3f}{r['stall_s']:>18.4f}{ratio:>21.4f}")


def cpu_floor(t_copy_s: float, cores: int, step_s: float) -> float:
    """Throughput when one core's copy of the state each step is all that training loses."""
    return 1 - t_copy_s / (cores * step_s)


def cpu_summary(t_copy_s: float, cores: int, results: dict[str, dict]) -> dict:
    """The throughput loss against the CPU floor (one core copies the state once per step):
    over all steps (medians), and per round (each round's none block against the ckpt block
    that follows it, so slow drift of the machine cancels)."""
    floor = cpu_floor(t_copy_s, cores, results["none"]["step_s"])
    ratio = (1 - results["ckpt"]["throughput"]) / (1 - floor)

    def round_ratio(base_s: float, other_s: float) -> float:
        return (1 - base_s / other_s) / (1 - cpu_floor(t_copy_s, cores, base_s))

    rounds = [round_ratio(a, b) for a, b in zip(results["none"]["round_step_s"],
                                                 results["ckpt"]["round_step_s"])]
    print(f"ckpt throughput loss {1 - results['ckpt']['throughput']:.3f} vs floor loss {1 - floor:.3f} "
          f"(ratio {ratio:.2f}; target <= 1.25)")
    print(f"per round: ratio {statistics.median(rounds):.2f} median, {min(rounds):.2f}..{max(rounds):.2f} "
          f"over {len(rounds)} rounds ({', '.join(f'{r:.2f}' for r in rounds)})")
    out = {"t_copy_s": t_copy_s, "floor": floor, "throughput_loss_vs_floor": ratio,
           "throughput_loss_vs_floor_rounds": rounds,
           "throughput_loss_vs_floor_round_median": statistics.median(rounds)}
    if "aa_round_step_s" in results["none"]:
        aa = [round_ratio(a, b) for a, b in results["none"]["aa_round_step_s"]]
        print(f"A/A control (none vs none, same formula): ratio {statistics.median(aa):.2f} median, "
              f"{min(aa):.2f}..{max(aa):.2f} over {len(aa)} rounds ({', '.join(f'{r:.2f}' for r in aa)})")
        out["aa_control_rounds"] = aa
    return out


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def gpu_summary(ckpt_throughput: float, ckpt_run: CkptRun, pinned_d2h_s: float,
                gpu_bytes: int, batch: int) -> dict:
    """ckpt's throughput against the GPU target, its D2H GB/s against the pinned copy's."""
    pinned_gbps = gpu_bytes / pinned_d2h_s / 1e9
    copy_s_median = median_or_nan(ckpt_run.copy_s)
    commit_s_median = median_or_nan(ckpt_run.commit_s)
    ckpt_gbps = gpu_bytes / copy_s_median / 1e9
    met = "met" if ckpt_throughput >= TARGET_GPU_THROUGHPUT else "NOT met"
    print(f"ckpt throughput {ckpt_throughput:.3f} vs target {TARGET_GPU_THROUGHPUT:.2f} ({met}; the "
          f"optimizer waits for the copy on the device: that wait is in step s, not in stall)")
    print(f"ckpt D2H: {ckpt_gbps:.1f} GB/s (median copy {copy_s_median:.3f} s of "
          f"{len(ckpt_run.copy_s)} snapshots, sealed {commit_s_median:.3f} s after the copy "
          f"began) vs pinned copy {pinned_gbps:.1f} GB/s ({ckpt_gbps / pinned_gbps:.0%})")
    return {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda, "batch": batch,
            "gpu_state_bytes": gpu_bytes, "pinned_d2h_s": pinned_d2h_s,
            "pinned_d2h_gbps": pinned_gbps, "ckpt_copy_s": ckpt_run.copy_s,
            "ckpt_copy_s_median": copy_s_median, "ckpt_commit_s_median": commit_s_median,
            "ckpt_d2h_gbps": ckpt_gbps, "ckpt_d2h_vs_pinned": ckpt_gbps / pinned_gbps,
            "target_throughput": TARGET_GPU_THROUGHPUT,
            "meets_target": ckpt_throughput >= TARGET_GPU_THROUGHPUT}


def main() -> int:
    args = parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    cuda = args.device == "cuda"
    batch = args.batch or DEFAULT_BATCH[args.device]
    options = dict(yield_cores=args.yield_cores, copy_nice=args.copy_nice,
                   copy_threads=args.copy_threads)

    model, optimizer, x, y = build(args.state_gib, args.device, batch)
    tensors = state_tensors(model, optimizer)
    if cuda:
        state_bytes = sum(t.numel() * t.element_size() for t in tensors)
        pinned_d2h_s, gpu_bytes = measure_pinned_d2h_s(tensors)
    else:
        t_copy, state_bytes = measure_copy_s(tensors)
    results, ckpt_run = run_modes(model, optimizer, x, y, workdir, args, options)
    persist = measure_persist(ckpt_run.cp, workdir, state_bytes)
    restore = measure_restores(model, optimizer, workdir, args.device)
    dd_gbps = persist["dd_gbps"]

    base_step = results["none"]["step_s"]
    if cuda:
        print(f"state: {state_bytes / (1 << 30):.2f} GiB ({len(tensors)} tensors, "
              f"{gpu_bytes / (1 << 30):.2f} GiB on {torch.cuda.get_device_name()}), batch: {batch}, "
              f"step (no ckpt): {base_step:.3f} s, pinned D2H copy: {pinned_d2h_s:.3f} s")
    else:
        floor = cpu_floor(t_copy, cores, base_step)
        print(f"state: {state_bytes / (1 << 30):.2f} GiB ({len(tensors)} tensors), cores: {cores}, "
              f"step (no ckpt): {base_step:.3f} s, t_copy (1 core): {t_copy:.3f} s, floor: {floor:.3f}")
    print_table(results)
    if cuda:
        device_fields = gpu_summary(results["ckpt"]["throughput"], ckpt_run, pinned_d2h_s,
                                    gpu_bytes, batch)
    else:
        device_fields = cpu_summary(t_copy, cores, results)
    print(f"first cp.step(): returned in {results['ckpt']['first_step_call_s']:.3f} s; the "
          f"segment was ready {results['ckpt']['segment_ready_s']:.2f} s after the call")
    print(f"restore (medians of {RESTORE_REPEATS}): memory {restore['restore_memory_s']:.3f} s, "
          f"disk {restore['restore_disk_s']:.3f} s, "
          f"dcp.load {restore['dcp_load_s']:.3f} s (memory is {restore['dcp_load_s'] / restore['restore_memory_s']:.1f}x "
          f"faster than dcp.load; page cache dropped: {restore['page_cache_dropped']})")
    print(f"persist: {persist['persist_gbps']:.2f} GB/s vs dd oflag=direct {dd_gbps:.2f} GB/s "
          f"(better of {persist['dd_gbps_before']:.2f} before, {persist['dd_gbps_after']:.2f} after) "
          f"({persist['persist_gbps'] / dd_gbps:.0%})")
    if "daemon_persist_s" in persist:
        print(f"persist, as the daemon logged it: {persist['daemon_persist_s']:.3f} s of the "
              f"{persist['persist_s']:.3f} s close() (staging {persist['daemon_staging_s']:.3f} s, "
              f"writing {persist['daemon_writing_s']:.3f} s)")
    record = {
        "bench": "snapshot_stall", "ckpt_options": options, "machine": platform.node(),
        "cpu_cores": cores, "python": platform.python_version(), "torch": torch.__version__,
        "ckpt": ckpt.__version__, "state_bytes": state_bytes, "steps": args.steps, **device_fields,
        "modes": results, "restore": restore, "persist": persist,
        "dd_gbps": dd_gbps, "persist_vs_dd": persist["persist_gbps"] / dd_gbps,
        "restore_memory_vs_dcp_load": restore["dcp_load_s"] / restore["restore_memory_s"],
        "device": args.device,
    }
    print(json.dumps(record))
    stop_daemon(workdir)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def stop_daemon(workdir: Path) -> None:
    """Stop the daemon this run started (its segments were released above)."""
    from ckpt.control.client import DaemonClient

    try:
        with DaemonClient(str(workdir / "daemon.sock"), timeout_s=10) as client:
            os.kill(client.status().pid, 15)
    except Exception as exc:  # already gone: nothing to stop
        print(f"(daemon not stopped: {exc})", file=sys.stderr)


def run_in_workdir(run, args: argparse.Namespace, job: str) -> int:
    """``run(args, workdir)`` in ``args.workdir`` (default: a temporary directory, removed
    at the end), then ``clean_up_run`` whatever happened."""
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="ckpt-bench-")) if temporary else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, workdir)
    finally:
        clean_up_run(workdir, job, remove=temporary)


def clean_up_run(workdir: Path, job: str, remove: bool) -> None:
    """After a bench run, whatever happened: stop the daemon it started under ``workdir``,
    unlink the job's segments left behind, and remove ``workdir`` when ``remove``."""
    if (workdir / "daemon.sock").exists():
        stop_daemon(workdir)
    for leftover in Path("/dev/shm").glob(f"ckpt-*-{job}*"):
        leftover.unlink(missing_ok=True)
    if remove:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
