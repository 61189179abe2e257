"""Reading a step from this node's shared memory onto another layout
(``MemoryReshardSource``): the sealed slots of every rank that wrote it, box by box.

Segments here are made the way the daemon makes them (``Segment.create``, owner-only)
and hold payloads packed as the hook packs them; nothing is mocked.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import torch

from ckpt import _C
from ckpt.control.paths import segment_name
from ckpt.errors import CorruptCheckpointError, CorruptChunkError
from ckpt.format.pack import ArrayPiece, pack_payload
from ckpt.recovery.memory_reshard import MemoryReshardSource, complete_groups
from ckpt.recovery.sources import memory_candidates
from ckpt.snapshot.geometry import TensorGeometry
from ckpt.snapshot.layout import payload_crc

CHUNK = 1024
SLOT_BYTES = 64 * 1024


@pytest.fixture
def job():
    name = f"memreshard-{uuid.uuid4().hex[:10]}"
    made: list[str] = []
    yield name, made
    for seg in made:
        _C.Segment.unlink(seg)


@pytest.fixture
def engine():
    with _C.CopyEngine(2) as e:
        yield e


def seal(job, rank: int, world_size: int, step: int, arrays: dict, *, generation: int = 1,
         slot: int = 0) -> str:
    """A segment of (job, rank) whose ``slot`` holds a sealed payload of ``arrays``."""
    name_, made = job
    payload, layout = pack_payload(arrays, rank=rank, world_size=world_size, step=step,
                                   job=name_, state={"rank": rank}, chunk_bytes=CHUNK)
    name = segment_name(name_, rank, generation)
    seg = _C.Segment.open(name) if name in made else _C.Segment.create(name, SLOT_BYTES)
    made.append(name)
    assert seg.try_lock(slot, os.getpid(), "write")
    seg.mark_writing(slot)
    seg.slot_view(slot)[:len(payload)] = payload
    seg.seal(slot, step, len(payload), payload_crc(memoryview(payload), layout))
    seg.unlock(slot, os.getpid())
    seg.close()
    return name


def row_shards(full: np.ndarray, cuts: list[int]) -> list[dict]:
    """``full`` split by rows at ``cuts`` (FSDP-style): one rank's arrays per piece, each
    with a per-rank tensor beside it."""
    bounds = [0, *cuts, full.shape[0]]
    return [{"model/w": ArrayPiece(full[lo:hi], full.shape, (lo,) + (0,) * (full.ndim - 1)),
             "rng/torch": np.full(8, r, np.uint8)}
            for r, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]


def seal_all(job, per_rank: list[dict], step: int = 5) -> dict:
    for r, arrays in enumerate(per_rank):
        seal(job, r, len(per_rank), step, arrays)
    return complete_groups(memory_candidates(job[0], None))[step]


def load(source: MemoryReshardSource, boxes: dict[str, tuple[tuple, tuple]]) -> dict:
    """Retarget ``source`` to ``boxes`` (name -> (offsets, shape)), load into fresh
    NaN-filled arrays; returns them by name."""
    live = {}
    for e in source.meta["tensors"]:
        if e["name"] in boxes:
            off, shape = boxes[e["name"]]
            live[e["name"]] = TensorGeometry(e["name"], torch.empty(shape), tuple(e["global_shape"]),
                                             off)
    source.retarget(live)
    outs = {e["name"]: np.full(e["shape"], np.nan, np.float32) for e in source.meta["tensors"]
            if e["name"] in boxes}
    index = {e["name"]: i for i, e in enumerate(source.meta["tensors"])}
    source.load_verified({index[n]: a.ctypes.data for n, a in outs.items()})
    return outs


def flip_in_slot(name: str, source_slot, tensor: str, byte: int) -> None:
    """Flip one byte of ``tensor`` in the sealed slot of segment ``name``."""
    index = next(i for i, p in enumerate(source_slot.layout.tensors) if p.spec.name == tensor)
    offset = source_slot.tensor_addr(index) - source_slot._seg.slot_address(0) + byte
    seg = _C.Segment.open(name, populate=False)
    seg.slot_view(0)[offset] ^= 0x40
    seg.close()


@pytest.fixture
def full() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((48, 20)).astype(np.float32)


def test_listing_reads_each_slots_rank_and_world_size_and_groups_only_whole_steps(job):
    seal(job, 0, 2, 7, {"model/w": np.zeros(4, np.float32)})
    seal(job, 1, 2, 7, {"model/w": np.zeros(4, np.float32)})
    seal(job, 0, 2, 8, {"model/w": np.zeros(4, np.float32)}, slot=1)  # rank 1 never sealed 8
    seal(job, 2, 3, 7, {"model/w": np.zeros(4, np.float32)})  # a stale rank of a 3-rank run
    listed = memory_candidates(job[0], None)
    assert sorted((c.step, c.rank, c.world_size) for c in listed) == [
        (7, 0, 2), (7, 1, 2), (7, 2, 3), (8, 0, 2)]
    groups = complete_groups(listed)
    assert list(groups) == [7] and sorted(groups[7]) == [0, 1]
    assert {c.world_size for c in groups[7].values()} == {2}


def test_shards_of_two_ranks_are_gathered_onto_one_bit_for_bit(job, engine, full):
    group = seal_all(job, row_shards(full, [31]))  # 31 | 17 rows, cut inside a chunk
    source = MemoryReshardSource(group, rank=0, world_size=1, engine=engine)
    try:
        assert "read onto 1 by box" in source.where and source.restores_rng
        out = load(source, {"model/w": ((0, 0), (48, 20))})
        np.testing.assert_array_equal(out["model/w"], full)
        rng = next(i for i, e in enumerate(source.meta["tensors"]) if e["name"] == "rng/torch")
        assert source.tensor_bytes(rng).tolist() == [0] * 8  # per-rank state: rank 0's
    finally:
        source.close()


@pytest.mark.parametrize("box", [((16, 0), (16, 20)), ((0, 5), (48, 7)), ((30, 3), (3, 2))],
                         ids=["rows-across-a-seam", "columns-across-every-shard", "small"])
def test_any_box_of_another_sharding_is_assembled_from_the_slots(job, engine, full, box):
    group = seal_all(job, row_shards(full, [20, 31]))
    source = MemoryReshardSource(group, rank=4, world_size=5, engine=engine)
    try:
        (r0, c0), (nr, nc) = box
        out = load(source, {"model/w": box})
        np.testing.assert_array_equal(out["model/w"], full[r0:r0 + nr, c0:c0 + nc])
        assert source.source_rank == 1 and not source.restores_rng  # rank 4 of 5, from 3
    finally:
        source.close()


def test_a_damaged_chunk_a_box_needs_is_named_and_none_of_its_bytes_is_copied(job, engine,
                                                                              full):
    group = seal_all(job, row_shards(full, [24]))
    source = MemoryReshardSource(group, rank=0, world_size=1, engine=engine)
    try:
        flip_in_slot(group[1].segment_name, source._slots[1], "model/w", 1500)  # its chunk 1
        live = {"model/w": TensorGeometry("model/w", torch.empty(48, 20), (48, 20), (0, 0))}
        source.retarget(live)
        i = next(i for i, e in enumerate(source.meta["tensors"]) if e["name"] == "model/w")
        out = np.full((48, 20), 7.0, np.float32)
        with pytest.raises(CorruptChunkError, match=r"r1-g1.*'model/w' chunk 1 has crc32c"):
            source.load_verified({i: out.ctypes.data})
        flat = out.ravel()
        damaged = slice(24 * 20 + 256, 24 * 20 + 480)  # rank 1's chunk 1: bytes 1024..1919
        assert (flat[damaged] == 7.0).all()
        # Everything else holds this step's bytes, or nothing was written there.
        others = np.ones(flat.size, bool)
        others[damaged] = False
        assert ((flat == full.ravel()) | (flat == 7.0))[others].all()
    finally:
        source.close()


def test_a_damaged_chunk_outside_the_box_does_not_matter(job, engine, full):
    group = seal_all(job, row_shards(full, [24]))
    source = MemoryReshardSource(group, rank=0, world_size=2, engine=engine)
    try:
        flip_in_slot(group[1].segment_name, source._slots[1], "model/w", 1900)  # rank 1, row 47
        out = load(source, {"model/w": ((0, 0), (30, 20))})  # rows 0..29: chunk 0 of rank 1
        np.testing.assert_array_equal(out["model/w"], full[:30])
    finally:
        source.close()


def test_a_damaged_replica_is_read_from_the_next_and_all_damaged_is_refused(job, engine, full):
    replicated = [{"model/w": full, "rng/torch": np.full(8, r, np.uint8)} for r in range(2)]
    group = seal_all(job, replicated)  # DDP: both ranks hold the whole tensor
    source = MemoryReshardSource(group, rank=0, world_size=2, engine=engine)
    try:
        flip_in_slot(group[0].segment_name, source._slots[0], "model/w", 100)
        out = load(source, {"model/w": ((0, 0), (24, 20))})
        np.testing.assert_array_equal(out["model/w"], full[:24])
        flip_in_slot(group[1].segment_name, source._slots[1], "model/w", 100)
        with pytest.raises(CorruptChunkError, match=r"replicas on ranks \[0\] are damaged too"):
            load(source, {"model/w": ((0, 0), (24, 20))})
    finally:
        source.close()


def test_pieces_that_do_not_tile_the_tensor_are_refused(job, engine, full):
    per_rank = row_shards(full, [24])
    per_rank[1]["model/w"] = ArrayPiece(full[20:48], full.shape, (20, 0))  # overlaps rank 0
    group = seal_all(job, per_rank)
    source = MemoryReshardSource(group, rank=0, world_size=1, engine=engine)
    try:
        with pytest.raises(CorruptCheckpointError, match="overlaps"):
            load(source, {"model/w": ((0, 0), (48, 20))})
    finally:
        source.close()


def test_slots_that_are_not_one_step_of_one_job_are_refused(job, engine, full):
    per_rank = row_shards(full, [24])
    seal(job, 0, 2, 5, per_rank[0])
    seal(job, 1, 2, 6, per_rank[1])
    listed = {c.rank: c for c in memory_candidates(job[0], None)}
    with pytest.raises(CorruptCheckpointError, match="do not hold one step"):
        MemoryReshardSource(listed, rank=0, world_size=1, engine=engine)
    for c in listed.values():  # every slot it had read-locked is unlocked again
        seg = _C.Segment.open(c.segment_name, populate=False)
        assert seg.lock_owner(c.slot) is None
        seg.close()
