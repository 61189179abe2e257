"""The trainer process that ``ckpt demo`` and the fault tests start, kill and restart.

``python -m ckpt.cli.demo_worker --dir D --steps N --out final.npz [--ckpt]``
trains the tiny transformer; with ``--ckpt`` it uses ``ckpt.Checkpointer`` and
resumes from whatever the previous (killed) incarnation left. Under torchrun
(``RANK``/``WORLD_SIZE`` set) it joins a gloo group and wraps the model in DDP
or FSDP2 (``--parallel``).

Progress goes to stdout as JSON lines: ``{"event": "restored", "start": s}``,
``{"event": "step", "step": s, "loss": x}`` after ``cp.step(s)`` returned,
``{"event": "done"}``. ``--kill`` plans faults: ``ATTEMPT:STEP:PHASE`` items
make incarnation ATTEMPT (``TORCHELASTIC_RESTART_COUNT`` or ``CKPT_ATTEMPT``)
send itself SIGKILL at STEP — PHASE ``copy`` right after ``cp.step`` started the
copy (so it dies mid-copy), ``step`` in the middle of the forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np


def _parse_kills(spec: str, attempt: int, rank: int) -> dict[int, str]:
    kills: dict[int, str] = {}
    for item in filter(None, spec.split(",")):
        parts = item.split(":")
        if len(parts) == 4:  # ATTEMPT:STEP:PHASE:RANK
            if int(parts[3]) != rank:
                continue
            parts = parts[:3]
        at, step, phase = parts
        if int(at) == attempt:
            kills[int(step)] = phase
    return kills


def _emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # never reached: SIGKILL cannot be caught


def init_gloo_under_torchrun() -> None:
    """gloo under torchrun, with a store namespace per restart.

    After an elastic restart, torch 2.13's agent store still holds the previous
    attempt's gloo addresses and the new workers try to connect to dead ports
    ("connectFullMesh failed ... Connection refused"); a prefix per restart count
    gives every attempt a clean namespace.
    """
    from datetime import timedelta

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timedelta(seconds=120))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt-{attempt}", store),
                            rank=rank, world_size=world, timeout=timedelta(seconds=120))


def _setup_parallel(model, parallel: str):
    import torch.distributed as dist

    if parallel == "none" or "WORLD_SIZE" not in os.environ:
        return model, 0, 1
    init_gloo_under_torchrun()
    rank, world = dist.get_rank(), dist.get_world_size()
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), rank, world
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks.layers:
            fully_shard(block)
        fully_shard(model)
        return model, rank, world
    raise SystemExit(f"unknown --parallel {parallel!r}: use none, ddp or fsdp")


def run(args: argparse.Namespace) -> int:
    import logging

    import torch

    logging.basicConfig(level=os.environ.get("CKPT_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    torch.set_num_threads(args.threads)
    from ckpt.cli.demo_model import (
        SyntheticTokens, TinyConfig, final_state_arrays, make_training, train_step,
    )

    cfg = TinyConfig(d_model=args.d_model, num_layers=args.layers)
    model, optimizer, scheduler = make_training(cfg, seed=args.seed, total_steps=args.steps)
    model, rank, world = _setup_parallel(model, args.parallel)
    if args.parallel == "fsdp" and world > 1:
        # FSDP2 shards parameters: the optimizer must see the sharded ones.
        optimizer = torch.optim.AdamW(model.parameters(), lr=optimizer.defaults["lr"], weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scheduler.lr_lambdas[0])
    data = SyntheticTokens(cfg, seed=args.seed, rank=rank)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("CKPT_ATTEMPT", "0")))
    kills = _parse_kills(args.kill, attempt, rank)

    cp = None
    start = 0
    if args.ckpt:
        from ckpt import Checkpointer

        cp = Checkpointer(
            model, optimizer, scheduler=scheduler, dir=args.dir, every=args.every,
            persist_every=args.persist_every, extra={"data": data}, daemon_socket=args.socket,
            job=args.job, keep=args.keep, daemon_retry_s=args.daemon_retry_s,
        )
        start = cp.restore()
    _emit({"event": "restored", "start": start, "rank": rank, "attempt": attempt})
    if args.out_restored:
        restored = final_state_arrays(model, optimizer)  # a collective under FSDP2
        if rank == 0:
            np.savez(args.out_restored, **restored)

    for step in range(start, args.steps):
        if kills.get(step) == "step":
            _die()
        loss = train_step(model, optimizer, scheduler, data)
        if cp is not None:
            cp.step(step)
            if kills.get(step) == "copy":
                _die()
        _emit({"event": "step", "step": step, "loss": loss, "rank": rank})
        if args.step_sleep_s:
            time.sleep(args.step_sleep_s)

    if cp is not None:
        stats = cp.stats
        cp.close()
        _emit({"event": "stats", "rank": rank, **{k: v for k, v in vars(stats).items()
                                                   if isinstance(v, (int, float))}}
              if hasattr(stats, "__dict__") else {"event": "stats", "rank": rank})
    arrays = final_state_arrays(model, optimizer)
    if rank == 0 and args.out:
        np.savez(args.out, **arrays)
    _emit({"event": "done", "rank": rank})
    if world > 1:
        import torch.distributed as dist

        # destroy_process_group() waits for this rank's pending works; one that needs a peer
        # which already left never ends (seen once in CI: rank 1 hung there after rank 0
        # exited). A gloo barrier completes only after every earlier work, on both ranks.
        dist.barrier()
        dist.destroy_process_group()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ckpt.cli.demo_worker", description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True, help="checkpoint directory")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the final state here (.npz)")
    p.add_argument("--out-restored", default="",
                   help="write the state right after restore() here (.npz)")
    p.add_argument("--ckpt", action="store_true", help="use ckpt.Checkpointer (else: plain training)")
    p.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"])
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--persist-every", type=int, default=10)
    p.add_argument("--socket", default=None, help="daemon socket (default: the node's)")
    p.add_argument("--keep", type=int, default=3, help="complete steps kept on disk (0: all)")
    p.add_argument("--daemon-retry-s", type=float, default=5.0,
                   help="after a daemon failure, retry (and restart) it this often")
    p.add_argument("--job", default=None, help="job id (default: derived from --dir)")
    p.add_argument("--kill", default="", help="fault plan ATTEMPT:STEP:PHASE[:RANK],...")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--step-sleep-s", type=float, default=0.0, help="pause after each step")
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
