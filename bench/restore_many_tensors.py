"""How long do ``restore()`` and persisting take when the state has thousands of tensors?

The model of ``bench/step_overhead.py`` (``--layers`` Linear(32, 32) layers + AdamW: 8 small
tensors per layer), optionally FSDP2-sharded on a one-rank gloo group (``--fsdp``). One
run: snapshot it; ``close()`` persists it to disk (timed); restore into a fresh model and
optimizer from daemon memory (timed); the daemon forgets the job and another fresh copy
restores from disk (timed), then takes its first snapshot (timed: the first ``step()``
builds the snapshot's plan). The baselines, same state, same run: ``dcp.save`` (against
the persist) and ``dcp.load`` into a fresh copy (against both restores). Prints one line
and a JSON line.

    python bench/restore_many_tensors.py [--layers 2000] [--fsdp] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import ckpt  # noqa: E402
from snapshot_stall import run_in_workdir  # noqa: E402 - same directory
from step_overhead import build, train_step  # noqa: E402 - same directory

JOB = f"bench-restore-{os.getpid()}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2000)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the daemon, checkpoints and DCP files go (default: a temporary "
                        "directory, removed at the end)")
    args = p.parse_args()
    return run_in_workdir(run, args, JOB)


def run(args: argparse.Namespace, workdir: Path) -> int:
    if args.fsdp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{workdir}/store",
                                             rank=0, world_size=1)
    options = dict(dir=workdir / "ckpt", persist_every=0, daemon_socket=workdir / "daemon.sock",
                   job=JOB)
    model, optimizer, x = build(args.layers, args.fsdp)
    cp = ckpt.Checkpointer(model, optimizer, **options)
    cp.step(0)
    if not cp.ready(600):
        raise RuntimeError("the daemon did not create the segment within 600 s")
    train_step(model, optimizer, x)
    cp.step(1)
    if not cp.wait(120):
        raise RuntimeError("the snapshot of step 1 was not sealed within 120 s")
    t0 = time.perf_counter()
    cp.close()  # persists step 1 and waits for the manifest
    persist_s = time.perf_counter() - t0
    from ckpt.control.client import DaemonClient

    restore_s = {}
    for tier in ("memory", "disk"):
        if tier == "disk":
            with DaemonClient(str(workdir / "daemon.sock"), timeout_s=60) as client:
                client.release(JOB)  # forget the memory tier: this restore must read the disk
        model2, optimizer2, x2 = build(args.layers, args.fsdp)
        with ckpt.Checkpointer(model2, optimizer2, **options) as cp2:
            t0 = time.perf_counter()
            resumed = cp2.restore()
            restore_s[tier] = time.perf_counter() - t0
            got = cp2.last_restore.tier if cp2.last_restore else None
            if resumed != 2 or got != tier:
                raise RuntimeError(f"restore resumed at {resumed} from {got}; expected 2 from "
                                   f"{tier}")
            for a, b in zip(model.parameters(), model2.parameters(), strict=True):
                if not torch.equal(a.full_tensor() if args.fsdp else a,
                                   b.full_tensor() if args.fsdp else b):
                    raise RuntimeError(f"the parameters restored from {tier} differ from the "
                                       f"snapshotted ones")
            if tier == "disk":  # the last restore: its snapshot may replace step 1
                train_step(model2, optimizer2, x2)
                t0 = time.perf_counter()
                cp2.step(resumed)  # the first one builds the snapshot's plan and template
                first_step_s = time.perf_counter() - t0

    no_dist = not args.fsdp
    t0 = time.perf_counter()
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()},
             checkpoint_id=str(workdir / "dcp"), no_dist=no_dist)
    dcp_save_s = time.perf_counter() - t0
    model3, optimizer3, _ = build(args.layers, args.fsdp)
    state = {"model": model3.state_dict(), "optim": optimizer3.state_dict()}
    t0 = time.perf_counter()
    dcp.load(state, checkpoint_id=str(workdir / "dcp"), no_dist=no_dist)
    dcp_s = time.perf_counter() - t0

    tensors = 8 * args.layers
    mem, disk = restore_s["memory"], restore_s["disk"]
    print(f"{tensors} tensors{' (FSDP2)' if args.fsdp else ''}: restore from memory "
          f"{mem:.3f} s, from disk {disk:.3f} s, dcp.load {dcp_s:.3f} s (memory "
          f"{dcp_s / mem:.1f}x, disk {dcp_s / disk:.1f}x faster); persist {persist_s:.3f} s, "
          f"dcp.save {dcp_save_s:.3f} s ({dcp_save_s / persist_s:.1f}x); first step() after "
          f"the restore {first_step_s:.3f} s")
    print(json.dumps({"bench": "restore_many_tensors", "fsdp": args.fsdp, "layers": args.layers,
                      "snapshot_tensors": tensors, "restore_memory_s": mem,
                      "restore_disk_s": disk, "dcp_load_s": dcp_s,
                      "restore_vs_dcp_load": dcp_s / mem, "disk_restore_vs_dcp_load": dcp_s / disk,
                      "persist_s": persist_s, "dcp_save_s": dcp_save_s,
                      "persist_vs_dcp_save": dcp_save_s / persist_s,
                      "first_step_after_restore_s": first_step_s,
                      "torch": torch.__version__, "cpu_cores": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
