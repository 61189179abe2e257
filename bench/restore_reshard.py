"""How long does ``restore()`` take onto another world size, next to ``dcp.load`` doing the
same reshard?

One run, one state: an MLP of ``--layers`` square Linear layers with AdamW moments
(``--gib`` of model + optimizer state in all), trained one step by ``--from-ranks`` gloo
ranks (FSDP2 when more than one) and saved twice, by ckpt (``close()`` persists) and by
``dcp.save``. Then fresh processes with ``--to-ranks`` ranks restore it: ckpt's
``restore()`` from the daemon's memory (the writer's slots, read box by box onto the new
layout), ckpt's ``restore()`` from disk (the same job under another name, so memory holds
nothing of it), and ``dcp.load`` + ``set_state_dict`` of the same state onto another
fresh copy; the restored model and optimizer must be equal bit for bit, or the script
fails. Two more launches restore with ``--from-ranks`` ranks (the layout that wrote it),
from memory and from disk, as the same-layout reference. Each figure is the slowest
rank's, after a barrier. Before each launch every file of both checkpoints is read once,
so that both sit in the page cache (ckpt writes its data with O_DIRECT, DCP through the
cache): this measures the restore's work, not the disk. With ``--page-cache cold`` the
page cache is dropped before each launch instead (needs root), so that disk reads come
from the disk; the daemon's shared memory is not page cache and stays. Prints a table and
one JSON line.

    python bench/restore_reshard.py [--gib 1] [--from-ranks 2] [--to-ranks 1]
                                    [--no-same-layout] [--page-cache warm|cold] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from snapshot_stall import drop_page_cache, run_in_workdir  # noqa: E402 - same directory

from ckpt.snapshot.geometry import local_shard  # noqa: E402

def build(width: int, layers: int, world: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer


def train_step(model, optimizer, width: int) -> None:
    torch.manual_seed(1)
    model(torch.randn(8, width)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _init(rank: int, world: int, workdir: Path, tag: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store-{tag}", rank=rank,
                            world_size=world)


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _options(workdir: Path, job: str) -> dict:
    return dict(dir=workdir / "ckpt", persist_every=0, daemon_socket=workdir / "daemon.sock",
                job=job, keep=0)


def writer(rank: int, world: int, args: argparse.Namespace, workdir: Path) -> None:
    import ckpt
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    _init(rank, world, workdir, "writer")
    model, optimizer = build(args.width, args.layers, world)
    train_step(model, optimizer, args.width)
    cp = ckpt.Checkpointer(model, optimizer, **_options(workdir, args.job))
    cp.step(0)
    if not cp.wait(600):
        raise RuntimeError("the snapshot of step 0 was not sealed within 600 s")
    cp.close()  # persists step 0 and waits for its manifest
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(workdir / "dcp"))
    dist.barrier()
    dist.destroy_process_group()


def _state_tensors(model, optimizer) -> list[torch.Tensor]:
    """Every parameter and optimizer-state tensor, local shards, in a fixed order."""
    out = []
    for p in model.parameters():
        out.append(p)
        out.extend(v for _, v in sorted(optimizer.state[p].items()) if torch.is_tensor(v))
    return [local_shard(t) for t in out]


# tag -> (ranks: "to" or "from", the tier restore must use)
READS = {"reshard-memory": ("to", "memory"), "reshard-disk": ("to", "disk"),
         "same-memory": ("from", "memory"), "same-disk": ("from", "disk")}


def reader(rank: int, world: int, args: argparse.Namespace, workdir: Path, tag: str) -> None:
    import ckpt
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init(rank, world, workdir, tag)
    model, optimizer = build(args.width, args.layers, world)
    tier = READS[tag][1]
    # The writer's job finds its snapshots in daemon memory; another name finds only disk.
    job = args.job if tier == "memory" else f"{args.job}-{tag}"
    with ckpt.Checkpointer(model, optimizer, **_options(workdir, job)) as cp:
        dist.barrier()
        t0 = time.perf_counter()
        start = cp.restore()
        ckpt_s = _slowest(time.perf_counter() - t0)
        if start != 1 or cp.last_restore is None or cp.last_restore.tier != tier:
            raise RuntimeError(f"restore resumed at {start} from {cp.last_restore}, "
                               f"expected step 0 from {tier}")

    model2, optimizer2 = build(args.width, args.layers, world)
    dist.barrier()
    t0 = time.perf_counter()
    model_sd, optim_sd = get_state_dict(model2, optimizer2)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(workdir / "dcp"))
    set_state_dict(model2, optimizer2, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    dcp_s = _slowest(time.perf_counter() - t0)

    a, b = _state_tensors(model, optimizer), _state_tensors(model2, optimizer2)
    same = len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    flag = torch.tensor([1 if same else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if rank == 0:
        state_bytes = sum(t.numel() * t.element_size() for t in a)
        (workdir / f"result-{tag}.json").write_text(json.dumps(
            {"ckpt_restore_s": ckpt_s, "dcp_load_s": dcp_s, "bit_equal": bool(flag.item()),
             "rank0_state_bytes": state_bytes}))
    dist.barrier()
    dist.destroy_process_group()


def warm_page_cache(*dirs: Path) -> int:
    """Read every file under ``dirs`` once (into the page cache); returns the bytes read."""
    total = 0
    for d in dirs:
        for path in sorted(d.rglob("*")):
            if path.is_file():
                with open(path, "rb", buffering=0) as f:
                    while chunk := f.read(16 << 20):
                        total += len(chunk)
    return total


def _launch(fn, world: int, *args) -> None:
    mp.start_processes(fn, args=(world, *args), nprocs=world, join=True, start_method="spawn")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=1.0, help="model + AdamW state, GiB")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--from-ranks", type=int, default=2)
    p.add_argument("--to-ranks", type=int, default=1)
    p.add_argument("--page-cache", choices=["warm", "cold"], default="warm",
                   help="read both checkpoints into the page cache before each restore "
                        "(warm), or drop the page cache (cold; needs root)")
    p.add_argument("--no-same-layout", action="store_true",
                   help="skip the two same-layout reference restores")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the daemon, checkpoints and DCP files go (default: a temporary "
                        "directory, removed at the end)")
    args = p.parse_args()
    # 3 tensors (weight, exp_avg, exp_avg_sq) of width^2 float32 per layer, biases aside.
    args.job = f"bench-reshard-{os.getpid()}"  # passed to the spawned ranks
    args.width = int(math.sqrt(args.gib * (1 << 30) / (3 * 4 * args.layers)))
    return run_in_workdir(run, args, args.job)


def run(args: argparse.Namespace, workdir: Path) -> int:
    t0 = time.perf_counter()
    _launch(writer, args.from_ranks, args, workdir)
    write_s = time.perf_counter() - t0
    ranks = {"to": args.to_ranks, "from": args.from_ranks}
    reads = {tag: how for tag, how in READS.items()
             if not (args.no_same_layout and how[0] == "from")}
    for tag, (which, _) in reads.items():
        if args.page_cache == "warm":
            warm_page_cache(workdir / "ckpt", workdir / "dcp")
        elif not drop_page_cache():
            raise SystemExit("--page-cache cold writes /proc/sys/vm/drop_caches: run as root, "
                             "or use --page-cache warm")
        _launch(reader, ranks[which], args, workdir, tag)
    res = {tag: json.loads((workdir / f"result-{tag}.json").read_text()) for tag in reads}
    bit_equal = all(r["bit_equal"] for r in res.values())
    if not bit_equal:
        raise SystemExit(f"ckpt's restore and dcp.load disagree: {res}")
    state_gib = sum(f.stat().st_size for f in (workdir / "ckpt").rglob("*.data")) / (1 << 30)
    print(f"state: {args.layers} x Linear({args.width}, {args.width}) + AdamW, "
          f"{state_gib:.2f} GiB on disk; written by {args.from_ranks} rank(s) in {write_s:.1f} s;"
          f" page cache {args.page_cache} before each restore")
    print(f"{'restore onto':<34}{'ckpt restore() s':>18}{'dcp.load s':>12}{'dcp / ckpt':>12}")
    for tag, (which, tier) in reads.items():
        r = res[tag]
        label = (f"{ranks[which]} rank(s) ({'resharded' if which == 'to' else 'same layout'}"
                 f", {tier})")
        print(f"{label:<34}{r['ckpt_restore_s']:>18.3f}{r['dcp_load_s']:>12.3f}"
              f"{r['dcp_load_s'] / r['ckpt_restore_s']:>11.1f}x")
    record = {"bench": "restore_reshard", "from_ranks": args.from_ranks,
              "to_ranks": args.to_ranks, "layers": args.layers, "width": args.width,
              "state_gib_on_disk": state_gib, "page_cache": args.page_cache}
    for tag in reads:
        key = tag.replace("-", "_")
        record[f"{key}_ckpt_restore_s"] = res[tag]["ckpt_restore_s"]
        record[f"{key}_dcp_load_s"] = res[tag]["dcp_load_s"]
        record[f"{key}_vs_dcp_load"] = res[tag]["dcp_load_s"] / res[tag]["ckpt_restore_s"]
    record["reshard_memory_over_disk"] = (res["reshard-memory"]["ckpt_restore_s"]
                                          / res["reshard-disk"]["ckpt_restore_s"])
    record.update(bit_equal_to_dcp_load=bit_equal, torch=torch.__version__,
                  cpu_cores=os.cpu_count())
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
