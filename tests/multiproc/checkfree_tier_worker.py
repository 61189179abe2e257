"""One rank of a five-stage toy pipeline, for tests/multiproc/test_checkfree_tier.py.

Run under torchrun (``--nproc-per-node=5``). Stage 0 and 4 are the embedding/head stages
(Linear layers of their own shapes), stages 1..3 are blocks of one structure. No
pipeline schedule runs: the test is about restore, so each step sets gradients from a
per-rank generator, clips them (max norm 1), steps AdamW and a LambdaLR, and snapshots.

``--phase train``: fresh start, ``--steps`` steps, then writes ``OUT/rank-R.json``
(weights after the last step and after the last replication step, that step's post-clip
gradient norm, lr, scheduler position) and exits without ``close()`` (no persist): only daemon-less shared memory
holds the snapshots, as after a crash.
``--phase restore``: builds the stages with other initial weights, calls ``restore()``
and writes what it restored (or the error) to ``OUT/rank-R.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from torch import nn

from ckpt import Checkpointer, PipelinePosition
from ckpt.cli.demo_worker import init_gloo_under_torchrun
from ckpt.errors import CkptError
from ckpt.recovery.checkfree import gradient_norm

NUM_STAGES = 5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


class Position:
    """A data-loader stand-in: its state must follow the step, also on a rebuilt stage."""

    def __init__(self) -> None:
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])


def build(stage: int, seed: int) -> nn.Module:
    torch.manual_seed(seed * 100 + stage)
    if stage == 0:
        return nn.Linear(4, 8)
    if stage == NUM_STAGES - 1:
        return nn.Linear(8, 2)
    return Block()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--phase", choices=["train", "restore"], required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--replica-every", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    init_gloo_under_torchrun()
    import torch.distributed as dist

    rank = dist.get_rank()
    model = build(rank, seed=1 if args.phase == "train" else 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.9 ** e)
    position = Position()
    cp = Checkpointer(model, optimizer, scheduler=scheduler, dir=args.dir, job=args.job,
                      persist_every=0, start_daemon=False, extra={"data": position},
                      daemon_socket=Path(args.dir) / "no-daemon.sock",
                      pipeline=PipelinePosition(stage=rank, num_stages=NUM_STAGES,
                                                replica_every=args.replica_every))
    out = Path(args.out) / f"rank-{rank}.json"
    if args.phase == "train":
        gen = torch.Generator().manual_seed(rank)
        norm, replicated = None, {}
        for step in range(cp.restore(), args.steps):
            for param in model.parameters():
                param.grad = torch.randn(param.shape, generator=gen) * (0.05 * (rank + 1))
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            norm = gradient_norm(model.parameters())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            position.pos = step + 1
            cp.step(step)
            if args.replica_every and step % args.replica_every == 0:
                replicated = {"step": step,
                              "state": {k: v.tolist() for k, v in model.state_dict().items()}}
        assert cp.wait(60)
        record = {"grad_norm": norm, "lr": optimizer.param_groups[0]["lr"],
                  "last_epoch": scheduler.last_epoch, "replicated": replicated}
    else:
        try:
            start = cp.restore()
        except CkptError as exc:
            record = {"error": f"{type(exc).__name__}: {exc}"}
        else:
            outcome = cp.last_restore
            record = {"start": start, "tier": outcome.tier, "where": outcome.where,
                      "lr": optimizer.param_groups[0]["lr"], "last_epoch": scheduler.last_epoch,
                      "base_lrs": scheduler.base_lrs, "optimizer_state": len(optimizer.state),
                      "pos": position.pos}
    record["state"] = {k: v.tolist() for k, v in model.state_dict().items()}
    out.write_text(json.dumps(record))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # no close(): nothing is persisted, as after a crash


if __name__ == "__main__":
    raise SystemExit(main())
