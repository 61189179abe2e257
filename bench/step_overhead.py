"""What does ``cp.step()`` cost when the state has thousands of tensors?

``bench/snapshot_stall.py`` measures a big state of few tensors (48), where the copy
dominates. Here the tensors are small and many (an MLP of ``--layers`` Linear(32, 32)
layers: 2 parameters per layer and AdamW's ``step``/``exp_avg``/``exp_avg_sq`` each, so
8 snapshotted tensors per layer), so what is measured is the per-tensor bookkeeping a
snapshot does on the training thread: reading the state dicts, the tensor table, the
plan, the meta.

Per model size, in one run on the same model and optimizer state:

- ``state_dicts``  ``model.state_dict()`` + ``optimizer.state_dict()``: what any
                   checkpointer that starts from the state dicts pays, the floor here;
- ``dcp_get_state_dict``  DCP's ``get_state_dict(model, optimizer)`` (what ckpt called per
                   step before 2026-12-01's rewrite; ckpt's state names are DCP's);
- ``ckpt``         ``cp.step()`` with a snapshot of every step (median and max over the
                   timed steps), and how many cyclic garbage collections ran inside it;
- ``dcp_async``    ``torch.distributed.checkpoint.async_save`` of the state dicts, default
                   settings: the time the call blocks (the planning is per tensor too).

Prints a table and one JSON line per size.

With ``--fsdp`` every layer is sharded with FSDP2's ``fully_shard`` on a one-rank gloo
group, so the state is DTensors (what an FSDP2 rank snapshots).

    python bench/step_overhead.py [--layers 50,500,2000] [--steps 10] [--dcp-steps 3] [--fsdp]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import ckpt  # noqa: E402
from copy_engine import best_s  # noqa: E402 - same directory

WIDTH = 32
JOB = f"bench-{os.getpid()}"


def build(layers: int, fsdp: bool):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    if fsdp:  # every parameter and moment becomes a DTensor shard (one rank holds all)
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(4, WIDTH)
    train_step(model, optimizer, x)
    return model, optimizer, x


def train_step(model, optimizer, x) -> None:
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class CollectionsInside:
    """Counts the cyclic collections (by generation) that start while ``inside`` is set."""

    def __init__(self) -> None:
        self.inside = False
        self.by_generation = [0, 0, 0]
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start" and self.inside:
            self.by_generation[info["generation"]] += 1

    def remove(self) -> None:
        gc.callbacks.remove(self)


def run_ckpt(model, optimizer, x, steps: int, workdir: Path) -> dict:
    cp = ckpt.Checkpointer(model, optimizer, dir=workdir / "ckpt", every=1, persist_every=0,
                           daemon_socket=workdir / "daemon.sock", job=JOB)
    counter = CollectionsInside()
    try:
        train_step(model, optimizer, x)
        cp.step(0)  # asks the daemon for the segment
        if not cp.ready(600):
            raise RuntimeError("the daemon did not create the segment within 600 s")
        times = []
        for s in range(1, steps + 1):
            train_step(model, optimizer, x)
            counter.inside = True
            t0 = time.perf_counter()
            cp.step(s)
            times.append(time.perf_counter() - t0)
            counter.inside = False
        cp.wait(120)
        skipped = cp.stats.snapshots_skipped
    finally:
        counter.remove()
        cp.close()
    return {"step_call_s_median": statistics.median(times), "step_call_s_max": max(times),
            "step_call_s": times, "collections_inside_step": counter.by_generation,
            "snapshots_skipped": skipped}


def run_dcp_async(model, optimizer, x, steps: int, workdir: Path) -> dict:
    stalls = []
    pending = None
    for s in range(steps):
        train_step(model, optimizer, x)
        t0 = time.perf_counter()
        if pending is not None:  # DCP allows one save in flight
            pending.result()
            shutil.rmtree(workdir / f"dcp-{s - 1}", ignore_errors=True)
        state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        result = dcp.async_save(state, checkpoint_id=str(workdir / f"dcp-{s}"),
                                no_dist=not torch.distributed.is_initialized())
        pending = getattr(result, "upload_completion", result)
        staging = getattr(result, "staging_completion", None)
        if staging is not None:
            staging.result()
        stalls.append(time.perf_counter() - t0)
    pending.result()
    shutil.rmtree(workdir / f"dcp-{steps - 1}", ignore_errors=True)
    return {"stall_s_median": statistics.median(stalls), "stall_s": stalls}


def measure(layers: int, steps: int, dcp_steps: int, workdir: Path, fsdp: bool) -> dict:
    model, optimizer, x = build(layers, fsdp)
    tensors = 2 * layers * 4
    step_s = best_s(lambda: train_step(model, optimizer, x), 3)
    floor_s = best_s(lambda: (model.state_dict(), optimizer.state_dict()), 5)
    dcp_sd_s = best_s(lambda: get_state_dict(model, optimizer), 3)
    ckpt_run = run_ckpt(model, optimizer, x, steps, workdir)
    dcp_run = run_dcp_async(model, optimizer, x, dcp_steps, workdir)
    ck = ckpt_run["step_call_s_median"]
    return {"bench": "step_overhead", "fsdp": fsdp, "layers": layers, "parameters": 2 * layers,
            "snapshot_tensors": tensors, "train_step_s": step_s, "state_dicts_s": floor_s,
            "dcp_get_state_dict_s": dcp_sd_s, "ckpt": ckpt_run, "dcp_async": dcp_run,
            "ckpt_vs_state_dicts": ck / floor_s, "ckpt_vs_dcp_get_state_dict": ck / dcp_sd_s,
            "ckpt_vs_dcp_async": ck / dcp_run["stall_s_median"],
            "ckpt_us_per_tensor": ck / tensors * 1e6}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="50,500,2000",
                   help="comma-separated model sizes in Linear layers (8 tensors each)")
    p.add_argument("--steps", type=int, default=10, help="timed cp.step() calls per size")
    p.add_argument("--dcp-steps", type=int, default=3, help="timed async_save calls per size")
    p.add_argument("--workdir", help="where the daemon socket and DCP's files go")
    p.add_argument("--fsdp", action="store_true",
                   help="shard every layer with FSDP2's fully_shard on a 1-rank gloo group")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.fsdp:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=0,
                                world_size=1)
    records = [measure(int(n), args.steps, args.dcp_steps, workdir, args.fsdp)
               for n in args.layers.split(",")]
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} cores{', FSDP2 (1 rank)' if args.fsdp else ''}; times in ms "
          f"(ckpt: median of {args.steps} step() calls)")
    print(f"{'tensors':>8}{'train step':>12}{'state_dicts':>13}{'dcp get_sd':>12}"
          f"{'ckpt step()':>13}{'ckpt max':>10}{'async_save':>12}{'ckpt/sd':>9}"
          f"{'ckpt/get_sd':>13}{'ckpt/async':>12}{'gc in step':>12}")
    for r in records:
        print(f"{r['snapshot_tensors']:>8}{r['train_step_s'] * 1e3:>12.1f}"
              f"{r['state_dicts_s'] * 1e3:>13.1f}{r['dcp_get_state_dict_s'] * 1e3:>12.1f}"
              f"{r['ckpt']['step_call_s_median'] * 1e3:>13.1f}"
              f"{r['ckpt']['step_call_s_max'] * 1e3:>10.1f}"
              f"{r['dcp_async']['stall_s_median'] * 1e3:>12.1f}"
              f"{r['ckpt_vs_state_dicts']:>9.2f}{r['ckpt_vs_dcp_get_state_dict']:>13.3f}"
              f"{r['ckpt_vs_dcp_async']:>12.3f}{sum(r['ckpt']['collections_inside_step']):>12}")
    for r in records:
        print(json.dumps({**r, "python": platform.python_version(), "torch": torch.__version__,
                          "cpu_cores": os.cpu_count()}))
    from ckpt.control.client import DaemonClient
    from snapshot_stall import stop_daemon

    with DaemonClient(str(workdir / "daemon.sock"), timeout_s=10) as client:
        client.release(JOB)  # the segments go with the job
    stop_daemon(workdir)
    for leftover in Path("/dev/shm").glob(f"ckpt-*-{JOB}-*"):  # one still waiting to persist
        leftover.unlink(missing_ok=True)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
