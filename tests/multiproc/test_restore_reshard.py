"""A step restores onto another world size or parallel layout, read box by box, from the
daemon's memory (every old rank's slot is on this node) or from disk.

A writer trains with one layout and persists; a reader with another layout restores
the newest step, dumps its state (model, optimizer and RNG, each tensor gathered whole
on rank 0), trains on and persists in its own layout. The dumps of writer and reader
must be equal bit for bit. Real processes: torchrun with gloo ranks, or one plain
process, and the real daemon.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from harness import (child_env, flip_byte, load_npz, records_of, run_torchrun, run_worker,
                     worker_args)

from ckpt.cli.demo_model import compare_arrays
from ckpt.format import StepReader

WRITER_STEPS = 8     # persists steps 0, 4 and 7 (close() persists the last)
READER_STEPS = 11    # restores step 7, trains 8..10, persists step 10
TP_WORKER = str(Path(__file__).with_name("tp_worker.py"))


def _launch(layout: tuple[str, int], args: list[str]) -> tuple[list[dict], str]:
    parallel, nproc = layout
    if nproc == 1 and parallel == "none":
        log = run_worker(args)
        assert log.returncode == 0, log.stderr[-4000:]  # type: ignore[attr-defined]
        return log.records, log.stderr  # type: ignore[attr-defined]
    run = run_torchrun(args + ["--parallel", parallel], nproc=nproc)
    assert run.returncode == 0, run.stderr[-6000:]
    return records_of(run.stdout), run.stderr


def _by_global_name(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DDP's state dict names carry its ``module.`` prefix; the stored names do not."""
    return {k.replace("/module.", "/", 1): v for k, v in arrays.items()}


def _write(run_dir: Path, layout: tuple[str, int]) -> dict[str, np.ndarray]:
    args = worker_args(run_dir, WRITER_STEPS, ckpt=True, out=run_dir / "writer.npz",
                       persist_every=4, keep=0)
    _launch(layout, args)
    with StepReader(run_dir / "checkpoints" / "step-00000007") as reader:
        assert reader.world_size == layout[1]
    return _by_global_name(load_npz(run_dir / "writer.npz"))


def _read(run_dir: Path, reader: tuple[str, int], *, job: str | None = None
          ) -> tuple[list[dict], str, dict[str, np.ndarray]]:
    """Restore with ``reader``'s layout, dump the restored state, train on and persist."""
    args = worker_args(run_dir, READER_STEPS, ckpt=True, persist_every=4, keep=0,
                       out_restored=run_dir / "restored.npz", **({"job": job} if job else {}))
    records, stderr = _launch(reader, args)
    starts = {r["start"] for r in records if r["event"] == "restored"}
    assert starts == {WRITER_STEPS}, f"restored at {starts}; stderr:\n{stderr[-3000:]}"
    assert "read onto" in stderr, "the restore did not say it read the step by box"
    # Training went on in the new layout, and its snapshots are of that layout.
    assert sorted(r["step"] for r in records if r["event"] == "step" and r["rank"] == 0) \
        == list(range(WRITER_STEPS, READER_STEPS))
    # Its periodic persist (step 8) and the one at close (step 10) are of that layout.
    for persisted in (8, READER_STEPS - 1):
        with StepReader(run_dir / "checkpoints" / f"step-{persisted:08d}") as step:
            assert step.world_size == reader[1]
    return records, stderr, _by_global_name(load_npz(run_dir / "restored.npz"))


@pytest.mark.parametrize("writer,reader", [
    (("fsdp", 2), ("none", 1)),   # gather: each tensor from both ranks' shards
    (("none", 1), ("fsdp", 3)),   # scatter onto uneven shards (64 rows over 3 ranks)
    (("ddp", 2), ("fsdp", 2)),    # same world size, another sharding
], ids=["fsdp2-to-1", "1-to-fsdp3", "ddp2-to-fsdp2"])
def test_a_step_restores_bit_exactly_onto_another_layout_from_memory_and_from_disk(
        run_dir, writer, reader):
    written = _write(run_dir, writer)
    # The same steps under another job name, for a reader that finds nothing in memory.
    disk_only = run_dir / "disk-only"
    shutil.copytree(run_dir / "checkpoints", disk_only / "checkpoints")
    # Step 7 is then only in daemon memory: a restore from disk would resume at 5.
    shutil.rmtree(run_dir / "checkpoints" / "step-00000007")

    _, stderr, restored = _read(run_dir, reader)
    assert f"in the slots of {writer[1]} rank(s)" in stderr, stderr[-3000:]
    diffs = compare_arrays(written, restored)
    assert diffs == [], f"{writer} -> {reader} from memory: restored state differs in {diffs[:10]}"

    _, stderr, restored = _read(disk_only, reader, job=f"{run_dir.name}-disk")
    assert "disk" in stderr and f"written by {writer[1]} rank(s)" in stderr, stderr[-3000:]
    diffs = compare_arrays(written, restored)
    assert diffs == [], f"{writer} -> {reader} from disk: restored state differs in {diffs[:10]}"


def test_a_damaged_shard_makes_a_reshard_fall_back_to_the_previous_step(run_dir):
    _write(run_dir, ("fsdp", 2))
    # A copy under another job name: the writer's snapshots in memory do not apply.
    copy_dir = run_dir / "copy"
    shutil.copytree(run_dir / "checkpoints", copy_dir / "checkpoints")
    data = copy_dir / "checkpoints" / "step-00000007" / "rank-00001.data"
    flip_byte(data, 0)  # rank 1's first chunk: part of a shard that rank 0 needs

    log = run_worker(worker_args(copy_dir, 4, ckpt=True, persist_every=100,
                                 job=f"{run_dir.name}-copy"))
    stderr = log.stderr  # type: ignore[attr-defined]
    assert log.start() == 5, stderr[-3000:]  # step 4, the one before the damaged step 7
    assert "rank-00001.data" in stderr and "step 7" in stderr, stderr[-3000:]


def _tp_run(run_dir: Path, *, nproc: int, out: Path, tp: bool) -> tuple[list[dict], str]:
    args = [TP_WORKER, "--dir", str(run_dir / "checkpoints"), "--job", run_dir.name,
            "--socket", str(run_dir / "daemon.sock"), "--steps", "4", "--out", str(out),
            *(["--tp"] if tp else [])]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={nproc}", "--max-restarts=0"] if nproc > 1
                else [sys.executable])
    proc = subprocess.run(launcher + args, capture_output=True, text=True, timeout=240,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr[-6000:]
    return records_of(proc.stdout), proc.stderr


def test_tensor_parallel_column_shards_restore_bit_exactly_onto_one_process(run_dir):
    _tp_run(run_dir, nproc=2, out=run_dir / "tp.npz", tp=True)
    with StepReader(run_dir / "checkpoints" / "step-00000003") as step:
        # RowwiseParallel stores fc2.weight as two column blocks: no piece is a byte range
        # of the whole tensor, so the restore assembles every row from both.
        assert sorted(p.offsets for p in step.pieces("model/fc2.weight")) == [(0, 0), (0, 20)]
    records, stderr = _tp_run(run_dir, nproc=1, out=run_dir / "plain.npz", tp=False)
    assert [r["start"] for r in records if r["event"] == "restored"] == [4], stderr[-3000:]
    assert "in the slots of 2 rank(s) (read onto 1 by box)" in stderr, stderr[-3000:]
    diffs = compare_arrays(load_npz(run_dir / "tp.npz"), load_npz(run_dir / "plain.npz"))
    assert diffs == [], f"restored state differs in {diffs}"
