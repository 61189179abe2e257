"""On-disk format (docs/INTERNALS.md §4): write, commit, read, slice, verify, damage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from harness import flip_byte

from ckpt.errors import ConfigError, CorruptCheckpointError, CorruptChunkError
from ckpt.format import StepReader, persist_payloads, verify, write_rank
from ckpt.format.pack import ArrayPiece, pack_payload
from ckpt.storage import FsStorage

CHUNK = 4096
STATE = {"step": 3, "model": {"w": {"__tensor__": 0}}, "extra": {"lr": 0.1}}


def two_rank_arrays(seed: int = 0) -> tuple[np.ndarray, dict[int, dict[str, ArrayPiece]]]:
    """A (64, 40) float32 tensor split by rows over 2 ranks, plus per-rank extras."""
    rng = np.random.default_rng(seed)
    full = rng.standard_normal((64, 40)).astype(np.float32)
    per_rank = {}
    for rank in range(2):
        rows = slice(32 * rank, 32 * rank + 32)
        per_rank[rank] = {
            "model/w": ArrayPiece(full[rows], (64, 40), (32 * rank, 0)),
            "model/zeros": ArrayPiece(np.zeros(5000, np.float32)),
            "model/bf16": ArrayPiece(np.arange(33, dtype=np.uint16), dtype="bfloat16"),
            "model/empty": ArrayPiece(np.zeros((0, 3), np.float32)),
            "optim/step": ArrayPiece(np.array(rank + 7, dtype=np.int64)),
        }
    return full, per_rank


def persist_two_ranks(root: Path, step: int = 3, seed: int = 0, **kw) -> tuple[np.ndarray, Path]:
    full, per_rank = two_rank_arrays(seed)
    payloads = {r: memoryview(pack_payload(a, rank=r, world_size=2, step=step, state=STATE,
                                           chunk_bytes=CHUNK)[0])
                for r, a in per_rank.items()}
    return full, persist_payloads(root, step, 2, payloads, **kw)


def test_round_trip_restores_every_piece_and_the_state(tmp_path):
    full, per_rank = two_rank_arrays()
    _, step_dir = persist_two_ranks(tmp_path)
    assert step_dir == tmp_path / "step-00000003"
    assert sorted(p.name for p in step_dir.iterdir()) == [
        "manifest.json", "rank-00000.data", "rank-00000.parquet", "rank-00001.data",
        "rank-00001.parquet"]
    with StepReader(step_dir) as reader:
        assert reader.step == 3 and reader.world_size == 2
        assert reader.state_skeleton(1) == STATE
        assert reader.meta(0)["rank"] == 0 and reader.meta(0)["zstd_level"] == 1
        names = [(p.rank, p.name) for p in reader.tensors()]
        assert names[:5] == [(0, n) for n in per_rank[0]]
        for rank in range(2):
            for name, piece in per_rank[rank].items():
                out = np.empty_like(piece.array)
                reader.read_tensor_into(name, rank, out)
                assert np.array_equal(out, piece.array), (rank, name)
        np.testing.assert_array_equal(reader.read_slice("model/w", (0, 0), (64, 40)), full)
        assert reader.read_slice("model/bf16", (3,), (2,)).tolist() == [3, 4]


def test_zero_chunks_are_compressed_and_random_chunks_are_stored_raw(tmp_path):
    rng = np.random.default_rng(5)
    arrays = {"zeros": np.zeros(4 * CHUNK, np.uint8),
              "noise": rng.integers(0, 256, 2 * CHUNK, dtype=np.uint8)}
    buf, _ = pack_payload(arrays, chunk_bytes=CHUNK)
    step_dir = persist_payloads(tmp_path, 0, 1, {0: memoryview(buf)})
    with StepReader(step_dir) as reader:
        zeros, noise = reader.tensors()
        assert [c.compressed for c in zeros.chunks] == [True] * 4
        assert zeros.stored_bytes < zeros.raw_bytes // 20 and zeros.compression == "zstd"
        assert [c.compressed for c in noise.chunks] == [False, False]
        assert noise.stored_bytes == noise.raw_bytes and noise.compression == "none"
        out = np.empty(2 * CHUNK, np.uint8)
        reader.read_tensor_into("noise", 0, out)
        assert np.array_equal(out, arrays["noise"])


def test_slice_read_touches_only_the_chunks_holding_the_box(tmp_path):
    arr = np.arange(256 * 64, dtype=np.float32).reshape(256, 64)  # a row is 256 B; a chunk 16 rows
    buf, _ = pack_payload({"w": arr}, step=1, chunk_bytes=CHUNK)
    step_dir = persist_payloads(tmp_path, 1, 1, {0: memoryview(buf)})
    with StepReader(step_dir) as reader:
        piece = reader.tensors()[0]
        assert len(piece.chunks) == 16
        got = reader.read_slice("w", (40, 8), (10, 3))  # rows 40..49: chunks 2 and 3
        np.testing.assert_array_equal(got, arr[40:50, 8:11])
        assert reader.chunks_read == 2
        reader.read_slice("w", (17, 0), (2, 64))  # rows 17..18: chunk 1 only
        assert reader.chunks_read == 3


def test_slice_spanning_two_ranks_reads_from_both(tmp_path):
    full, step_dir = persist_two_ranks(tmp_path)
    with StepReader(step_dir) as reader:
        got = reader.read_slice("model/w", (30, 5), (4, 10))
        np.testing.assert_array_equal(got, full[30:34, 5:15])
        # rank 0 rows 30,31 live in its chunk 1 (rows 25..), rank 1 rows 0,1 in its chunk 0
        assert reader.chunks_read == 2


def test_slice_outside_the_tensor_is_a_usage_error(tmp_path):
    _, step_dir = persist_two_ranks(tmp_path)
    with StepReader(step_dir) as reader, pytest.raises(ConfigError, match="outside"):
        reader.read_slice("model/w", (60, 0), (8, 40))


def test_flipped_byte_is_named_by_verify_and_never_returned_by_reads(tmp_path):
    full, step_dir = persist_two_ranks(tmp_path)
    with StepReader(step_dir) as reader:
        piece = next(p for p in reader.tensors() if p.rank == 1 and p.name == "model/w")
        target = piece.chunks[1]
    data_file = step_dir / "rank-00001.data"
    flip_byte(data_file, target.stored_offset + target.stored_bytes // 2)
    report = verify(step_dir)
    assert not report.ok
    assert [(d.file, d.tensor, d.chunk_index) for d in report.damage] == [
        (str(data_file), "model/w", 1)]
    with StepReader(step_dir) as reader:
        out = np.zeros((32, 40), np.float32)
        with pytest.raises(CorruptChunkError, match=r"rank-00001\.data: tensor 'model/w' chunk 1"):
            reader.read_tensor_into("model/w", 1, out)
        with pytest.raises(CorruptChunkError, match="chunk 1"):
            reader.read_slice("model/w", (0, 0), (64, 40))
        # the undamaged rank still reads
        np.testing.assert_array_equal(reader.read_slice("model/w", (0, 0), (32, 40)), full[:32])


def test_truncated_data_file_is_named(tmp_path):
    _, step_dir = persist_two_ranks(tmp_path)
    data_file = step_dir / "rank-00000.data"
    os.truncate(data_file, data_file.stat().st_size - 10)
    with pytest.raises(CorruptCheckpointError, match=r"rank-00000\.data is \d+ bytes.*truncated"):
        StepReader(step_dir)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        verify(step_dir)


def test_missing_manifest_is_reported_as_an_uncommitted_step(tmp_path):
    _, step_dir = persist_two_ranks(tmp_path)
    (step_dir / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError,
                       match="manifest.json is missing: it was never committed"):
        StepReader(step_dir)


def test_foreign_directory_is_refused(tmp_path):
    foreign = tmp_path / "step-00000009"
    foreign.mkdir()
    (foreign / "notes.txt").write_bytes(os.urandom(100))
    (foreign / "blob.bin").write_bytes(os.urandom(1000))
    with pytest.raises(CorruptCheckpointError, match="does not look like a ckpt step"):
        StepReader(foreign)
    (foreign / "manifest.json").write_text('{"some": "other tool"}')
    with pytest.raises(CorruptCheckpointError, match="format None"):
        StepReader(foreign)


def test_newer_format_version_is_refused_with_its_name(tmp_path):
    _, step_dir = persist_two_ranks(tmp_path)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["format"] = "ckpt/2"
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="'ckpt/2'"):
        StepReader(step_dir)


READ_A_STEP_AND_COUNT_THREADS = """
import os, sys
import pyarrow
from ckpt.format import StepReader
before = len(os.listdir("/proc/self/task"))
with StepReader(sys.argv[1]) as reader:
    reader.tensors()
print(before, len(os.listdir("/proc/self/task")))
"""


def test_reading_the_tensor_tables_starts_no_arrow_thread(tmp_path):
    # An Arrow pool thread holding a Python buffer at interpreter exit takes the GIL during
    # finalization and aborts the process ("terminate called without an active exception"):
    # the tables must be read on the caller's thread.
    _, step_dir = persist_two_ranks(tmp_path)
    res = subprocess.run([sys.executable, "-c", READ_A_STEP_AND_COUNT_THREADS, str(step_dir)],
                         capture_output=True, text=True, timeout=60, check=True)
    before, after = map(int, res.stdout.split())
    assert after == before


def test_damaged_tensor_table_is_named(tmp_path):
    _, step_dir = persist_two_ranks(tmp_path)
    table = step_dir / "rank-00001.parquet"
    flip_byte(table, table.stat().st_size // 2)
    with StepReader(step_dir) as reader, pytest.raises(CorruptCheckpointError,
                                                       match=r"rank-00001\.parquet: crc32c"):
        reader.tensors()


def test_payload_chunk_with_a_bad_crc_is_never_persisted(tmp_path):
    persist_two_ranks(tmp_path, step=1)
    buf, layout = pack_payload({"w": np.ones(3 * CHUNK, np.uint8)}, step=2, chunk_bytes=CHUNK)
    data_offset = len(buf) - layout.data_bytes
    buf[data_offset + CHUNK + 5] ^= 1  # damage chunk 1 after its crc was taken
    with pytest.raises(CorruptChunkError, match="tensor 'w' chunk 1.*refusing to persist"):
        persist_payloads(tmp_path, 2, 1, {0: memoryview(buf)})
    steps = FsStorage(tmp_path).list_steps()
    assert [(s.step, s.complete, s.staging) for s in steps] == [(1, True, False)]


def test_payload_of_another_rank_or_step_is_refused(tmp_path):
    buf, _ = pack_payload({"w": np.ones(10, np.float32)}, rank=0, world_size=1, step=5)
    staging = FsStorage(tmp_path).begin_step(6)
    with pytest.raises(ConfigError, match="step=5.*written as step=6"):
        write_rank(staging, 0, 1, memoryview(buf))
    assert list(staging.iterdir()) == []


def test_progress_reports_every_raw_byte(tmp_path):
    calls = []
    buf, layout = pack_payload({"a": np.ones(10 * CHUNK + 3, np.uint8)}, chunk_bytes=CHUNK)
    persist_payloads(tmp_path, 0, 1, {0: memoryview(buf)},
                     progress=lambda d, t: calls.append((d, t)))
    assert len(calls) == 11 and calls[-1] == (layout.data_bytes, layout.data_bytes)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_large_file_goes_through_direct_io_and_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(9)
    noise = rng.integers(0, 256, (20 << 20) + 123, dtype=np.uint8)  # > one 16 MiB block
    arrays = {"noise": noise, "zeros": np.zeros(1 << 20, np.uint8)}
    buf, layout = pack_payload(arrays, chunk_bytes=1 << 20)
    step_dir = persist_payloads(tmp_path, 0, 1, {0: memoryview(buf)})
    with StepReader(step_dir) as reader:
        noise_piece, zeros_piece = reader.tensors()
        # 1 MiB chunks: noise fails the 64 KiB compressibility sample, zeros compress
        assert not any(c.compressed for c in noise_piece.chunks)
        assert all(c.compressed for c in zeros_piece.chunks)
        size = (step_dir / "rank-00000.data").stat().st_size
        assert size == noise_piece.stored_bytes + zeros_piece.stored_bytes
        out = np.empty_like(noise)
        reader.read_tensor_into("noise", 0, out)
        assert np.array_equal(out, noise)
    assert verify(step_dir).ok


def test_persisting_a_committed_step_again_changes_nothing(tmp_path):
    _, step_dir = persist_two_ranks(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in step_dir.iterdir()}
    _, again = persist_two_ranks(tmp_path)
    assert again == step_dir
    assert {p.name: p.stat().st_mtime_ns for p in step_dir.iterdir()} == before
    assert not (tmp_path / ".staging" / "step-00000003").exists()


def test_a_second_writer_of_the_same_rank_replaces_whole_files(tmp_path):
    buf, _ = pack_payload({"w": np.arange(50_000, dtype=np.float32)}, step=4)
    staging = FsStorage(tmp_path).begin_step(4)
    write_rank(staging, 0, 1, memoryview(buf))
    write_rank(staging, 0, 1, memoryview(buf))  # a retried persist of the same rank
    assert sorted(p.name for p in staging.iterdir()) == [
        "rank-00000.data", "rank-00000.done", "rank-00000.parquet"]
    from ckpt.format import finish_if_complete
    assert verify(finish_if_complete(staging, 1)).ok


def test_random_boxes_over_3d_pieces_match_numpy_slicing(tmp_path):
    rng = np.random.default_rng(11)
    full = rng.integers(0, 1000, (6, 10, 14)).astype(np.int32)
    # 2 ranks split dim 1 unevenly; small chunks so boxes cut across many of them
    cuts = [(0, 3), (3, 10)]
    payloads = {}
    for rank, (lo, hi) in enumerate(cuts):
        piece = ArrayPiece(full[:, lo:hi], full.shape, (0, lo, 0))
        payloads[rank] = memoryview(pack_payload({"t": piece}, rank=rank, world_size=2, step=1,
                                                 chunk_bytes=100)[0])
    step_dir = persist_payloads(tmp_path, 1, 2, payloads)
    with StepReader(step_dir) as reader:
        for _ in range(40):
            off = [int(rng.integers(0, n)) for n in full.shape]
            shape = [int(rng.integers(1, n - o + 1)) for n, o in zip(full.shape, off)]
            box = tuple(slice(o, o + n) for o, n in zip(off, shape))
            np.testing.assert_array_equal(reader.read_slice("t", off, shape), full[box])


def ddp_like_payloads(step: int = 3) -> tuple[dict[str, np.ndarray], dict[int, memoryview]]:
    """Two ranks holding the same weights (as under DDP) and different RNG states."""
    rng = np.random.default_rng(5)
    shared = {"model/w": rng.standard_normal((256, 64)).astype(np.float32),
              "optim/exp_avg": rng.standard_normal((256, 64)).astype(np.float32)}
    payloads = {}
    for rank in range(2):
        arrays = {n: ArrayPiece(a.copy()) for n, a in shared.items()}
        arrays["rng/torch"] = ArrayPiece(np.full(100, rank, np.uint8))
        payloads[rank] = memoryview(pack_payload(arrays, rank=rank, world_size=2, step=step,
                                                 state=STATE, chunk_bytes=CHUNK)[0])
    return shared, payloads


def test_a_tensor_every_rank_holds_identically_is_written_once(tmp_path):
    shared, payloads = ddp_like_payloads()
    step_dir = persist_payloads(tmp_path, 3, 2, payloads)
    data0 = (step_dir / "rank-00000.data").stat().st_size
    data1 = (step_dir / "rank-00001.data").stat().st_size
    assert data0 > 100_000 and data1 < 4096  # rank 1 wrote only its RNG state
    with StepReader(step_dir) as reader:
        files = {(p.rank, p.name): p.file for p in reader.tensors()}
        assert files[(1, "model/w")] == files[(1, "optim/exp_avg")] == "rank-00000.data"
        assert files[(1, "rng/torch")] == "rank-00001.data"
        for rank in range(2):
            for name, want in shared.items():
                out = np.empty_like(want)
                reader.read_tensor_into(name, rank, out)
                assert np.array_equal(out, want), (rank, name)
            rng_state = np.empty(100, np.uint8)
            reader.read_tensor_into("rng/torch", rank, rng_state)
            assert (rng_state == rank).all()
    report = verify(step_dir)
    assert report.ok and report.raw_bytes_checked == 2 * 256 * 64 * 4 + 2 * 100


def test_damage_in_a_shared_chunk_is_named_once_and_never_read_for_any_rank(tmp_path):
    shared, payloads = ddp_like_payloads()
    step_dir = persist_payloads(tmp_path, 3, 2, payloads)
    with open(step_dir / "rank-00000.data", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x40]))
    report = verify(step_dir)
    assert len(report.damage) == 1 and report.damage[0].file.endswith("rank-00000.data")
    with StepReader(step_dir) as reader:
        for rank in range(2):
            with pytest.raises(CorruptChunkError, match="rank-00000.data"):
                reader.read_tensor_into("model/w", rank, np.empty((256, 64), np.float32))


def test_same_name_and_checksums_but_different_bytes_are_not_shared():
    from ckpt.format.replicas import ReplicaIndex

    index = ReplicaIndex()
    a = memoryview(bytes(range(256)) * 64)
    b = bytearray(a)
    b[-1] ^= 1
    key = ("model/w", "float32", (4096,), (4096,), (), 16384, 4096, (1, 2, 3, 4))
    index.add(key, {"file": "rank-00000.data"}, a)
    assert index.find(key, memoryview(b)) is None  # the bytes decide, not the crcs
    assert index.find(key, memoryview(bytes(a))) == {"file": "rank-00000.data"}
    assert index.bytes_deduplicated == len(a)
