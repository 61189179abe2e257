"""One stage process of a tiny LLaMA trained with torch.distributed.pipelining (gloo, GPipe).

Run under torchrun with ``--nproc-per-node = num_body_stages + 2``: rank 0 runs the
embedding, ranks 1..S one transformer block each, the last rank the final norm and head
(together, the weights of ``build_stage(cfg, 0)``). Every step: GPipe over
``--microbatches`` micro-batches, per-stage gradient clipping (max norm 1), AdamW, and
with ``--ckpt`` a ``Checkpointer(pipeline=PipelinePosition(...))`` snapshot whose daemon
socket is private to the stage (``DIR/node-R.sock``: one node per stage).

JSON lines on stdout: ``{"event": "restored", "rank", "start", "tier", "attempt", "pid"}``,
``{"event": "step", "rank", "step", "loss" (last rank only), "pid"}``, ``{"event": "done"}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn


def _emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


class EmbedOnly(nn.Module):
    def __init__(self, stage0: nn.Module) -> None:
        super().__init__()
        self.embed = stage0.embed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)


class HeadOnly(nn.Module):
    def __init__(self, stage0: nn.Module) -> None:
        super().__init__()
        self.norm, self.head = stage0.norm, stage0.head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--job", default="pipe")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ckpt", action="store_true")
    p.add_argument("--step-sleep-s", type=float, default=0.0,
                   help="pause after each step (lets a test act between steps)")
    args = p.parse_args()
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)

    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from ckpt.cli.demo_worker import init_gloo_under_torchrun
    from ckpt.testing.tiny_llama import SyntheticCorpus, TinyLlamaConfig, build_stage, lm_loss

    init_gloo_under_torchrun()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TinyLlamaConfig(vocab_size=64, dim=32, num_heads=2, ffn_dim=64, seq_len=16,
                          num_body_stages=world - 2)
    if rank == 0:
        model: nn.Module = EmbedOnly(build_stage(cfg, 0, args.seed))
    elif rank == world - 1:
        model = HeadOnly(build_stage(cfg, 0, args.seed))
    else:
        model = build_stage(cfg, rank, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    mb = args.batch_size // args.microbatches
    # Static shapes (shape inference at run time hangs on gloo); requires_grad marks the
    # activations whose gradients travel back between stages.
    hidden = torch.zeros(mb, cfg.seq_len, cfg.dim, requires_grad=True)
    stage = PipelineStage(
        model, rank, world, torch.device("cpu"),
        input_args=torch.zeros(mb, cfg.seq_len, dtype=torch.int64) if rank == 0 else hidden,
        output_args=torch.zeros(mb, cfg.seq_len, cfg.vocab_size) if rank == world - 1 else hidden)
    schedule = ScheduleGPipe(stage, args.microbatches, loss_fn=lm_loss)
    corpus = SyntheticCorpus(cfg, seed=args.seed)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    cp, start, tier = None, 0, "none"
    if args.ckpt:
        from ckpt import Checkpointer, PipelinePosition

        cp = Checkpointer(model, optimizer, scheduler=scheduler, dir=args.dir, job=args.job,
                          persist_every=0, daemon_socket=Path(args.dir) / f"node-{rank}.sock",
                          pipeline=PipelinePosition(stage=rank, num_stages=world))
        start = cp.restore()
        tier = cp.last_restore.tier if cp.last_restore else "none"
    _emit({"event": "restored", "rank": rank, "start": start, "tier": tier, "attempt": attempt,
           "pid": os.getpid()})

    for step in range(start, args.steps):
        batches = [corpus.batch(step, m, mb) for m in range(args.microbatches)]
        tokens = torch.cat([b[0] for b in batches])
        targets = torch.cat([b[1] for b in batches])
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(tokens)
        elif rank == world - 1:
            schedule.step(target=targets, losses=losses)
        else:
            schedule.step()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if cp is not None:
            cp.step(step)
        record = {"event": "step", "rank": rank, "step": step, "pid": os.getpid()}
        if losses:
            record["loss"] = float(torch.stack(losses).mean())
        _emit(record)
        if args.step_sleep_s:
            time.sleep(args.step_sleep_s)
    if cp is not None:
        cp.wait(60)
    dist.barrier()
    _emit({"event": "done", "rank": rank})
    # No close(): the test's last incarnation needs no persist, and close() would persist.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
