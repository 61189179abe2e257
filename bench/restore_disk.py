"""How fast does the disk tier read a snapshot back, compared with ``dcp.load``?

Builds a state shaped like an MLP + AdamW (8 square layers with biases: weights,
biases, exp_avg, exp_avg_sq = 48 tensors, ~1.13 GiB of normal-distributed
float32, which zstd does not shrink enough, so it is stored raw), persists it
with ``persist_payloads`` (4 MiB chunks) and saves the same tensors with
``torch.distributed.checkpoint.save``. Then, dropping the page cache before each
read (``echo 3 > /proc/sys/vm/drop_caches``, needs root; without it the reads
come from cache and the table says so), times in alternation:

- ``DiskSource.verify()``: what ``Checkpointer.restore`` does for the disk tier
  (every chunk read, crc-checked, into fresh tensors);
- ``StepReader.read_tensor_into`` of every tensor into preallocated buffers;
- ``dcp.load`` of the same tensors into preallocated tensors.

Prints a table (median and best of ``--repeats``) and one JSON line with
``ratio_dcp_over_disk`` (> 1: the disk tier is faster than dcp.load).

    PYTHONPATH=src python bench/restore_disk.py [--dir DIR] [--gib 1.13] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from ckpt import __version__
from ckpt.format import StepReader, persist_payloads
from ckpt.format.pack import pack_payload
from ckpt.recovery.sources import DiskSource


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def mlp_adamw_state(gib: float, layers: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """weights/biases of ``layers`` square Linear layers and their AdamW moments."""
    per_tensor_bytes = gib * (1 << 30) / (3 * layers)
    hidden = int(math.sqrt(per_tensor_bytes / 4))
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for i in range(layers):
        params[f"layers.{i}.weight"] = rng.standard_normal((hidden, hidden), dtype=np.float32)
        params[f"layers.{i}.bias"] = rng.standard_normal(hidden, dtype=np.float32)
    state: dict[str, np.ndarray] = {f"model/{k}": v for k, v in params.items()}
    for k, v in params.items():
        state[f"optim/state/{k}/exp_avg"] = v * np.float32(0.1)
        state[f"optim/state/{k}/exp_avg_sq"] = np.abs(v * np.float32(0.01))
    return state


def timed(fn: Callable[[], object], cold: bool) -> float:
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir on /tmp)")
    ap.add_argument("--gib", type=float, default=1.13)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="ckpt-restore-bench-", dir=args.dir))
    try:
        state = mlp_adamw_state(args.gib)
        total_bytes = sum(a.nbytes for a in state.values())
        buf, _ = pack_payload(state, step=1, chunk_bytes=4 << 20)
        step_dir = persist_payloads(work / "ckpt", 1, 1, {0: memoryview(buf)}, threads=2)
        del buf
        stored = sum(f.stat().st_size for f in step_dir.iterdir() if f.name.endswith(".data"))
        tensors = {k: torch.from_numpy(v) for k, v in state.items()}
        dcp.save(tensors, checkpoint_id=str(work / "dcp"))
        del tensors, state

        with StepReader(step_dir) as reader:
            pieces = [p for p in reader.tensors() if p.rank == 0]
        outs = {p.name: np.empty(p.raw_bytes, dtype=np.uint8) for p in pieces}
        for a in outs.values():
            a.fill(0)  # fault the pages in: both readers get warm destination buffers
        dst = {p.name: torch.empty(p.shape, dtype=torch.float32) for p in pieces}
        for t in dst.values():
            t.zero_()

        def disk_source() -> None:
            src = DiskSource(step_dir, 0, 1)
            try:
                src.verify()
            finally:
                src.close()

        def step_reader() -> None:
            with StepReader(step_dir) as r:
                for p in pieces:
                    r.read_tensor_into(p.name, 0, outs[p.name])

        def dcp_load() -> None:
            dcp.load(dst, checkpoint_id=str(work / "dcp"))

        cold = drop_caches()
        cases = {"DiskSource.verify": disk_source, "StepReader.read_tensor_into": step_reader,
                 "dcp.load": dcp_load}
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                times[name].append(timed(fn, cold))
        # Same bytes back?
        with StepReader(step_dir) as r:
            for p in pieces[:3]:
                assert np.array_equal(outs[p.name].view(np.float32).reshape(p.shape),
                                      dst[p.name].numpy()), p.name
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gib = total_bytes / (1 << 30)
    print(f"{len(pieces)} tensors, {gib:.3f} GiB raw, {stored / (1 << 30):.3f} GiB stored, "
          f"page cache {'dropped before each read' if cold else 'NOT dropped (not root)'}")
    print(f"{'reader':<30}{'median s':>10}{'best s':>10}{'GiB/s':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<30}{med:>10.3f}{min(ts):>10.3f}{gib / med:>8.2f}")
    disk = statistics.median(times["DiskSource.verify"])
    dcp_s = statistics.median(times["dcp.load"])
    print(json.dumps({
        "bench": "restore_disk", "version": __version__, "host": platform.node(),
        "cpus": os.cpu_count(), "tensors": len(pieces), "raw_bytes": total_bytes,
        "stored_bytes": stored, "cold_cache": cold, "repeats": args.repeats,
        "disk_source_s": round(disk, 4),
        "step_reader_s": round(statistics.median(times["StepReader.read_tensor_into"]), 4),
        "dcp_load_s": round(dcp_s, 4), "ratio_dcp_over_disk": round(dcp_s / disk, 3)}))


if __name__ == "__main__":
    main()
