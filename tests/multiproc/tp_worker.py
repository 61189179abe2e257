"""A tensor-parallel trainer: a two-layer MLP, column- then row-parallel, under torchrun.

``--tp`` with more than one rank: ``parallelize_module`` shards ``fc1`` by rows
(``ColwiseParallel``: weight and bias ``Shard(0)``) and ``fc2`` by columns
(``RowwiseParallel``: weight ``Shard(1)``, bias replicated), so the stored pieces of
``fc2.weight`` are column blocks, not byte ranges of the whole tensor. Without it (or
on one rank) the same model is plain. Every rank trains on the same batches. A
Checkpointer snapshots every step and persists at close; ``--out`` gets,
on rank 0, the model, AdamW and RNG state with each tensor gathered whole (``.npz``,
``ckpt.cli.demo_model.final_state_arrays``), written after ``restore()`` when
``--steps`` is the step restored (nothing to train).

JSON lines on stdout: ``{"event": "restored", "rank", "start"}``, ``{"event": "done"}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np
import torch
from torch import nn


def build(tp: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(12, 40))
    model.add_module("act", nn.GELU())
    model.add_module("fc2", nn.Linear(40, 12))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)

        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tp", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    if "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    model, optimizer = build(args.tp)

    from ckpt import Checkpointer

    cp = Checkpointer(model, optimizer, dir=args.dir, job=args.job, daemon_socket=args.socket,
                      persist_every=0, keep=0)
    start = cp.restore()
    sys.stdout.write(json.dumps({"event": "restored", "rank": rank, "start": start}) + "\n")
    data = torch.Generator().manual_seed(1)
    for _ in range(start):
        torch.randn(16, 12, generator=data)  # the batches already trained on
    for step in range(start, args.steps):
        x = torch.randn(16, 12, generator=data)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cp.step(step)
    cp.close()
    from ckpt.cli.demo_model import final_state_arrays

    arrays = final_state_arrays(model, optimizer)  # each tensor whole; a collective for TP
    if rank == 0 and args.out:
        np.savez(args.out, **arrays)
    sys.stdout.write(json.dumps({"event": "done", "rank": rank}) + "\n")
    sys.stdout.flush()
    if "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
