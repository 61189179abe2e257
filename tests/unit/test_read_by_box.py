"""Reading a step box by box, whatever layout wrote it (``StepReader.read_boxes_into``).

This is what restore onto another world size or sharding stands on: the stored pieces
of a tensor must tile it (checked), a box one piece holds is read straight into the
caller's buffer, any other box is assembled from the pieces it meets, and replicas fall
back to one another when damaged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from harness import flip_byte

from ckpt.errors import ConfigError, CorruptCheckpointError, CorruptChunkError
from ckpt.format import StepReader, persist_payloads
from ckpt.format.boxes import contiguous_span
from ckpt.format.pack import ArrayPiece, pack_payload

CHUNK = 1024


def persist(root: Path, per_rank: dict[int, dict[str, ArrayPiece]], step: int = 1) -> Path:
    payloads = {r: memoryview(pack_payload(a, rank=r, world_size=len(per_rank), step=step,
                                           chunk_bytes=CHUNK)[0])
                for r, a in per_rank.items()}
    return persist_payloads(root, step, len(per_rank), payloads)


def row_shards(full: np.ndarray, cuts: list[int]) -> dict[int, dict[str, ArrayPiece]]:
    """``full`` split by rows at ``cuts`` (FSDP-style), one rank per piece."""
    bounds = [0, *cuts, full.shape[0]]
    return {r: {"model/w": ArrayPiece(full[lo:hi], full.shape, (lo,) + (0,) * (full.ndim - 1))}
            for r, (lo, hi) in enumerate(zip(bounds, bounds[1:]))}


@pytest.fixture
def full() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((48, 20)).astype(np.float32)


def test_boxes_of_another_sharding_are_assembled_from_the_stored_shards(tmp_path, full):
    step_dir = persist(tmp_path, row_shards(full, [20, 31]))  # 3 uneven row shards
    with StepReader(step_dir) as reader:
        for lo, hi in [(0, 16), (16, 32), (32, 48), (0, 48), (19, 21)]:  # 3-way, whole, seam
            out = np.full((hi - lo, 20), np.nan, np.float32)
            reader.read_boxes_into([("model/w", (lo, 0), (hi - lo, 20), out)])
            np.testing.assert_array_equal(out, full[lo:hi])
        out = np.empty((48, 7), np.float32)  # a column box crosses every shard
        reader.read_boxes_into([("model/w", (0, 5), (48, 7), out)])
        np.testing.assert_array_equal(out, full[:, 5:12])


def test_a_box_reads_only_the_chunks_that_hold_its_bytes(tmp_path, full):
    step_dir = persist(tmp_path, row_shards(full, [20, 31]))  # rows are 80 bytes, chunks 1 KiB
    with StepReader(step_dir) as reader:
        out = np.empty((2, 20), np.float32)
        reader.read_boxes_into([("model/w", (19, 0), (2, 20), out)])  # rows 19 | 20: a seam
        np.testing.assert_array_equal(out, full[19:21])
        assert reader.chunks_read == 2  # rank 0's chunk 1 (bytes 1520..1600), rank 1's chunk 0


@pytest.mark.parametrize("piece,span", [
    (((0, 0), (6, 5)), (0, 120)),          # the box itself
    (((2, 0), (3, 5)), (40, 100)),         # a dim-0 shard: rows 2..4
    (((3, 1), (1, 3)), (64, 76)),          # part of one row
    (((2, 1), (2, 3)), None),              # rows 2..3, columns 1..3: two ranges
    (((0, 0), (6, 2)), None),              # a column shard
])
def test_a_piece_is_one_byte_range_of_the_box_only_when_it_spans_the_trailing_dims(piece, span):
    assert contiguous_span(piece, (0, 0), (6, 5), 4) == span
    # the same relative to a box that does not start at 0
    shifted = (tuple(o + 10 for o in piece[0]), piece[1])
    assert contiguous_span(shifted, (10, 10), (6, 5), 4) == span


def test_a_box_one_piece_holds_reads_only_that_pieces_chunks(tmp_path, full):
    step_dir = persist(tmp_path, row_shards(full, [24]))
    with StepReader(step_dir) as reader:
        out = bytearray(24 * 20 * 4)
        reader.read_boxes_into([("model/w", (24, 0), (24, 20), out)])
        np.testing.assert_array_equal(np.frombuffer(out, np.float32).reshape(24, 20), full[24:])
        assert reader.chunks_read == len(reader.rank_pieces(1)[0].chunks)


def test_replicas_are_read_from_the_preferred_rank_and_fall_back_when_damaged(tmp_path):
    per_rank = {r: {"model/b": ArrayPiece(np.full(3000, r, np.int32))} for r in range(2)}
    step_dir = persist(tmp_path, per_rank)  # same box, other bytes (so stored twice)
    with StepReader(step_dir) as reader:
        for prefer, expected in [(None, 0), (0, 0), (1, 1)]:
            out = np.empty(3000, np.int32)
            reader.read_boxes_into([("model/b", (0,), (3000,), out)], prefer_rank=prefer)
            assert set(out.tolist()) == {expected}
    flip_byte(step_dir / "rank-00001.data", 0)
    with StepReader(step_dir) as reader:
        out = np.empty(3000, np.int32)
        reader.read_boxes_into([("model/b", (0,), (3000,), out)], prefer_rank=1)
        assert set(out.tolist()) == {0}, "rank 1's damaged copy must give way to rank 0's"


def test_damage_with_no_replica_is_named_and_leaves_no_damaged_byte(tmp_path, full):
    step_dir = persist(tmp_path, row_shards(full, [24]))
    flip_byte(step_dir / "rank-00001.data", 10)
    with StepReader(step_dir) as reader:
        out = np.full((48, 20), 7.0, np.float32)
        with pytest.raises(CorruptChunkError, match=r"rank-00001\.data: tensor 'model/w' chunk 0"):
            reader.read_boxes_into([("model/w", (0, 0), (48, 20), out)])
        # Rows 24.. come from the damaged piece: none of its bytes reached the buffer.
        assert not np.isin(out[24:], full[24:]).any()


def test_pieces_that_leave_a_hole_are_refused(tmp_path, full):
    shards = row_shards(full, [24])
    shards[1]["model/w"] = ArrayPiece(full[30:], full.shape, (30, 0))  # rows 24..29 missing
    step_dir = persist(tmp_path, shards)
    with StepReader(step_dir) as reader, pytest.raises(CorruptCheckpointError,
                                                       match="hold 840 of its 960 elements"):
        reader.read_boxes_into([("model/w", (0, 0), (4, 20), np.empty((4, 20), np.float32))])


def test_overlapping_pieces_are_refused(tmp_path, full):
    shards = row_shards(full, [24])
    shards[0]["model/w"] = ArrayPiece(full[:30], full.shape, (0, 0))  # overlaps rows 24..29
    shards[1]["model/w"] = ArrayPiece(full[24:42], full.shape, (24, 0))  # and leaves 42..47
    step_dir = persist(tmp_path, shards)
    with StepReader(step_dir) as reader, pytest.raises(CorruptCheckpointError, match="overlaps"):
        reader.read_slice("model/w", (0, 0), (1, 20))


def test_ranks_disagreeing_on_a_tensor_are_refused(tmp_path):
    per_rank = {0: {"model/w": ArrayPiece(np.zeros((4, 4), np.float32))},
                1: {"model/w": ArrayPiece(np.zeros((4, 5), np.float32))}}
    step_dir = persist(tmp_path, per_rank)
    with StepReader(step_dir) as reader, pytest.raises(CorruptCheckpointError,
                                                       match="did not write one tensor"):
        reader.tiling("model/w")


def test_a_buffer_of_the_wrong_size_or_a_box_outside_is_a_usage_error(tmp_path, full):
    step_dir = persist(tmp_path, row_shards(full, [24]))
    with StepReader(step_dir) as reader:
        with pytest.raises(ConfigError, match="needs 1600"):
            reader.read_boxes_into([("model/w", (0, 0), (20, 20), np.empty(10, np.float32))])
        with pytest.raises(ConfigError, match="outside"):
            reader.read_boxes_into([("model/w", (40, 0), (9, 20), np.empty((9, 20), np.float32))])
        with pytest.raises(ConfigError, match="writable"):
            reader.read_boxes_into([("model/w", (0, 0), (1, 20), bytes(80))])
