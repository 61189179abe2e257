"""What does a copy of the state running beside training cost each phase of a step?

Question: when ckpt's copy engine copies the whole model + AdamW state on one core
while the next step runs (no Checkpointer, no Python thread: the native engine alone),
how much longer do forward, backward and the optimizer step take, with torch on all
cores and on one core fewer? The difference between the two separates what the copy
costs through sharing a core with torch's threads from what it costs through memory
bandwidth alone. Same model and state as bench/snapshot_stall.py; per phase, the median
of ``--steps`` steps, in ``--rounds`` rounds that alternate no copy / copy with crc32c /
plain copy. Prints a table and one JSON line.

    PYTHONPATH=src python bench/copy_interference.py [--state-gib 1.1] [--threads 2,1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from snapshot_stall import build, copy_jobs, state_tensors  # noqa: E402

from ckpt import _C  # noqa: E402

PHASES = ("forward", "backward", "copy_wait", "optimizer")
MODES = ("none", "copy_crc", "copy_plain")


def measure(state_gib: float, steps: int, rounds: int) -> dict:
    model, optimizer, x, y = build(state_gib, "cpu", 32)
    tensors = state_tensors(model, optimizer)
    total = sum(t.numel() * t.element_size() for t in tensors)
    dst = torch.empty(total, dtype=torch.uint8)
    dst.fill_(1)  # pre-faulted, as a snapshot segment is
    chunk_bytes = 4 << 20
    crcs = np.zeros(_C.num_chunks([t.numel() * t.element_size() for t in tensors], chunk_bytes),
                    dtype=np.uint32)
    engine = _C.CopyEngine(1)

    def jobs() -> list[tuple[int, int, int]]:  # data_ptr()s move as the optimizer steps
        return copy_jobs(tensors, dst.data_ptr())

    def one_step(mode: str) -> list[float]:
        ticket = None
        if mode != "none":  # the copy starts as the step does, as a lazy snapshot's does
            ticket = engine.submit(jobs(), chunk_bytes, crcs.ctypes.data if mode == "copy_crc" else 0)
        t0 = time.perf_counter()
        loss = nn.functional.mse_loss(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if ticket is not None:
            ticket.wait(120)
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]

    t0 = time.perf_counter()
    engine.submit(jobs(), chunk_bytes, crcs.ctypes.data).wait(120)
    alone_s = time.perf_counter() - t0
    samples: dict[str, list[list[float]]] = {m: [] for m in MODES}
    for _ in range(rounds):
        for mode in MODES:
            samples[mode] += [one_step(mode) for _ in range(steps)]
    engine.close()
    medians = {m: dict(zip(PHASES, (statistics.median(c) for c in zip(*rows))))
               for m, rows in samples.items()}
    return {"torch_threads": torch.get_num_threads(), "state_bytes": total,
            "copy_crc_alone_s": alone_s, "median_s": medians}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state-gib", type=float, default=1.1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default=f"{os.cpu_count()},{max(1, (os.cpu_count() or 2) - 1)}",
                    help="torch intra-op thread counts to measure, one child process each")
    ap.add_argument("--child-threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_threads:
        torch.set_num_threads(args.child_threads)
        print(json.dumps(measure(args.state_gib, args.steps, args.rounds)))
        return
    rows = []
    for threads in dict.fromkeys(int(t) for t in args.threads.split(",")):
        res = subprocess.run([sys.executable, __file__, "--child-threads", str(threads),
                              "--state-gib", str(args.state_gib), "--steps", str(args.steps),
                              "--rounds", str(args.rounds)],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"state {rows[0]['state_bytes'] / (1 << 30):.2f} GiB; one core copies it (with crc32c) "
          f"in {rows[0]['copy_crc_alone_s']:.3f} s; the copy starts with the step; median s")
    print(f"{'torch threads':>13s} {'mode':>10s} " + " ".join(f"{p:>9s}" for p in PHASES)
          + f" {'step':>7s} {'+ vs none':>9s}")
    for r in rows:
        base = sum(r["median_s"]["none"].values())
        for mode in MODES:
            m = r["median_s"][mode]
            step = sum(m.values())
            r.setdefault("added_s", {})[mode] = step - base
            print(f"{r['torch_threads']:13d} {mode:>10s} " + " ".join(f"{m[p]:9.3f}" for p in PHASES)
                  + f" {step:7.3f} {step - base:+9.3f}")
    print(json.dumps({"bench": "copy_interference", "cpus": os.cpu_count(),
                      "crc32c": _C.crc32c_impl(), "torch": torch.__version__, "runs": rows}))


if __name__ == "__main__":
    main()
