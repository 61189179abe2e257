"""The CheckFree exchange with a peer that died: a StageRebuildError naming the rank, not a hang."""

from __future__ import annotations

import os
from datetime import timedelta

import torch.multiprocessing as mp


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from ckpt.errors import StageRebuildError
    from ckpt.recovery.stage_rebuild import _Wire

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=10))
    dist.barrier()
    if rank == 1:
        os._exit(0)  # dies without sending what rank 0 waits for
    try:
        _Wire(None).recv((torch.int64, [7]), 1)
        result = "received"
    except StageRebuildError as exc:
        result = str(exc)
    with open(os.path.join(out_dir, "rank0.txt"), "w") as f:
        f.write(result)
    os._exit(0)


def test_a_peer_that_dies_mid_exchange_is_named_in_a_stage_rebuild_error(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, p.exitcode
    msg = (tmp_path / "rank0.txt").read_text()
    assert msg.startswith("CheckFree could not receive from rank 1"), msg
    assert "restart the job" in msg
