"""How long does ``restore()`` from daemon memory take when the state has thousands of tensors?

The model of ``bench/step_overhead.py`` (``--layers`` Linear(32, 32) layers + AdamW: 8 small
tensors per layer), optionally FSDP2-sharded on a one-rank gloo group (``--fsdp``). One
run: snapshot it, restore into a fresh model and optimizer from daemon memory (timed),
then ``dcp.save`` the same state and time ``dcp.load`` into another fresh copy, the
baseline. Prints one line and a JSON line.

    python bench/restore_many_tensors.py [--layers 2000] [--fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import ckpt  # noqa: E402
from step_overhead import build, train_step  # noqa: E402 - same directory

JOB = f"bench-restore-{os.getpid()}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2000)
    p.add_argument("--fsdp", action="store_true")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    if args.fsdp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{workdir}/store",
                                             rank=0, world_size=1)
    options = dict(dir=workdir / "ckpt", persist_every=0, daemon_socket=workdir / "daemon.sock",
                   job=JOB)
    model, optimizer, x = build(args.layers, args.fsdp)
    with ckpt.Checkpointer(model, optimizer, **options) as cp:
        cp.step(0)
        if not cp.ready(600):
            raise RuntimeError("the daemon did not create the segment within 600 s")
        train_step(model, optimizer, x)
        cp.step(1)
        if not cp.wait(120):
            raise RuntimeError("the snapshot of step 1 was not sealed within 120 s")
    model2, optimizer2, _ = build(args.layers, args.fsdp)
    with ckpt.Checkpointer(model2, optimizer2, **options) as cp2:
        t0 = time.perf_counter()
        resumed = cp2.restore()
        restore_s = time.perf_counter() - t0
        tier = cp2.last_restore.tier if cp2.last_restore else None
    if resumed != 2 or tier != "memory":
        raise RuntimeError(f"restore resumed at {resumed} from {tier}; expected 2 from memory")
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        if not torch.equal(a.full_tensor() if args.fsdp else a, b.full_tensor() if args.fsdp else b):
            raise RuntimeError("the restored parameters differ from the snapshotted ones")

    no_dist = not args.fsdp
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()},
             checkpoint_id=str(workdir / "dcp"), no_dist=no_dist)
    model3, optimizer3, _ = build(args.layers, args.fsdp)
    state = {"model": model3.state_dict(), "optim": optimizer3.state_dict()}
    t0 = time.perf_counter()
    dcp.load(state, checkpoint_id=str(workdir / "dcp"), no_dist=no_dist)
    dcp_s = time.perf_counter() - t0

    tensors = 8 * args.layers
    print(f"{tensors} tensors{' (FSDP2)' if args.fsdp else ''}: restore from memory "
          f"{restore_s:.3f} s, dcp.load {dcp_s:.3f} s ({dcp_s / restore_s:.1f}x faster)")
    print(json.dumps({"bench": "restore_many_tensors", "fsdp": args.fsdp, "layers": args.layers,
                      "snapshot_tensors": tensors, "restore_memory_s": restore_s,
                      "dcp_load_s": dcp_s, "restore_vs_dcp_load": dcp_s / restore_s,
                      "torch": torch.__version__, "cpu_cores": os.cpu_count()}))
    from ckpt.control.client import DaemonClient
    from snapshot_stall import stop_daemon

    with DaemonClient(str(workdir / "daemon.sock"), timeout_s=10) as client:
        client.release(JOB)
    stop_daemon(workdir)
    for leftover in Path("/dev/shm").glob(f"ckpt-*-{JOB}-*"):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
