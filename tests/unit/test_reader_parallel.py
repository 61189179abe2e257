"""Batched, threaded reads of a step (StepReader.read_tensors_into, DiskSource.verify)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ckpt.errors import CkptError, CorruptChunkError
from ckpt.format import StepReader, persist_payloads
from ckpt.format.pack import pack_payload
from ckpt.recovery.sources import DiskSource

CHUNK = 64 << 10


def mixed_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Raw-only, compressed-only, and interleaved raw/compressed pieces, plus tiny ones."""
    rng = np.random.default_rng(seed)
    mixed = rng.integers(0, 256, 12 * CHUNK + 77, dtype=np.uint8)
    for j in range(0, 12, 3):  # every third chunk compresses
        mixed[j * CHUNK:(j + 1) * CHUNK] = 0
    return {"noise": rng.integers(0, 256, 20 * CHUNK + 5, dtype=np.uint8),
            "zeros": np.zeros(9 * CHUNK, np.uint8),
            "mixed": mixed,
            "bias": rng.standard_normal(31).astype(np.float32),
            "empty": np.zeros(0, np.float32)}


def persist(root: Path, arrays: dict[str, np.ndarray]) -> Path:
    buf, _ = pack_payload(arrays, step=2, chunk_bytes=CHUNK)
    return persist_payloads(root, 2, 1, {0: memoryview(buf)})


@pytest.mark.parametrize("threads,segment_bytes", [(1, 16 << 20), (4, 3 * CHUNK), (3, 1)])
def test_batched_read_returns_every_tensor_exactly(tmp_path, threads, segment_bytes):
    arrays = mixed_arrays()
    step_dir = persist(tmp_path, arrays)
    with StepReader(step_dir, read_threads=threads, segment_bytes=segment_bytes) as reader:
        mixed = next(p for p in reader.tensors() if p.name == "mixed")
        assert {c.compressed for c in mixed.chunks} == {True, False}
        outs = {name: np.full_like(a, 0xAB) for name, a in arrays.items()}
        reader.read_tensors_into(0, list(outs.items()))
        for name, a in arrays.items():
            assert np.array_equal(outs[name], a), name
        assert reader.chunks_read == sum(len(p.chunks) for p in reader.tensors())


def test_damaged_chunk_is_named_and_its_bytes_never_reach_the_buffer(tmp_path):
    arrays = mixed_arrays()
    step_dir = persist(tmp_path, arrays)
    with StepReader(step_dir) as reader:
        target = next(p for p in reader.tensors() if p.name == "noise").chunks[13]
    data_file = step_dir / "rank-00000.data"
    with open(data_file, "r+b") as f:
        f.seek(target.stored_offset + 100)
        byte = f.read(1)
        f.seek(target.stored_offset + 100)
        f.write(bytes([byte[0] ^ 0x01]))
    with StepReader(step_dir, read_threads=4, segment_bytes=4 * CHUNK) as reader:
        outs = {name: np.full_like(a, 0xAB) for name, a in arrays.items()}
        with pytest.raises(CorruptChunkError,
                           match=rf"{data_file}: tensor 'noise' chunk 13: crc32c .* damaged"):
            reader.read_tensors_into(0, list(outs.items()))
        noise = outs["noise"]
        bad = slice(target.raw_offset, target.raw_offset + target.raw_bytes)
        assert not noise[bad].any()  # the damaged chunk was wiped, not left behind
        for c in reader.pieces("noise")[0].chunks:  # every other byte: verified or untouched
            got = noise[c.raw_offset:c.raw_offset + c.raw_bytes]
            want = arrays["noise"][c.raw_offset:c.raw_offset + c.raw_bytes]
            assert np.array_equal(got, want) or not got.any() or (got == 0xAB).all(), c.index
        # the other tensors still read
        out = np.empty_like(arrays["mixed"])
        reader.read_tensor_into("mixed", 0, out)
        assert np.array_equal(out, arrays["mixed"])


def test_file_truncated_after_open_is_reported_as_truncated(tmp_path):
    arrays = mixed_arrays()
    step_dir = persist(tmp_path, arrays)
    with StepReader(step_dir, read_threads=2, segment_bytes=2 * CHUNK) as reader:
        pieces = reader.tensors()
        last = pieces[-1] if pieces[-1].chunks else next(p for p in reversed(pieces) if p.chunks)
        os.truncate(step_dir / "rank-00000.data", last.chunks[-1].stored_offset + 10)
        with pytest.raises(CorruptChunkError,
                           match=rf"tensor '{last.name}' chunk {len(last.chunks) - 1}: file "
                                 rf"ends after 10 of"):
            reader.read_tensor_into(last.name, 0, np.empty(last.raw_bytes, np.uint8))


def test_disk_source_verify_reads_every_tensor_and_names_damage(tmp_path):
    arrays = mixed_arrays()
    step_dir = persist(tmp_path, arrays)
    source = DiskSource(step_dir, 0, 1)
    try:
        source.verify()
        for i, (name, a) in enumerate(arrays.items()):
            assert source.meta["tensors"][i]["name"] == name
            got = source.tensor_bytes(i).numpy()
            assert np.array_equal(got, a.view(np.uint8).reshape(-1)), name
            if a.nbytes:
                assert source.tensor_addr(i) % 4096 == 0
    finally:
        source.close()
        source.close()
    with StepReader(step_dir) as reader:
        target = next(p for p in reader.tensors() if p.name == "zeros").chunks[4]
    with open(step_dir / "rank-00000.data", "r+b") as f:
        f.seek(target.stored_offset + target.stored_bytes - 1)
        f.write(b"\xff")
    source = DiskSource(step_dir, 0, 1)
    try:
        with pytest.raises(CorruptChunkError, match=r"tensor 'zeros' chunk 4"):
            source.verify()
    finally:
        source.close()


def test_disk_source_load_verified_reads_straight_into_the_targets(tmp_path):
    arrays = mixed_arrays()
    step_dir = persist(tmp_path, arrays)
    targets = {0: np.zeros_like(arrays["noise"]), 2: np.zeros_like(arrays["mixed"])}
    source = DiskSource(step_dir, 0, 1)
    try:
        source.load_verified({i: t.ctypes.data for i, t in targets.items()})
        assert np.array_equal(targets[0], arrays["noise"])
        assert np.array_equal(targets[2], arrays["mixed"])
        assert np.array_equal(source.tensor_bytes(1).numpy(), arrays["zeros"])
        with pytest.raises(CkptError, match="tensor 0 was not read into this source"):
            source.tensor_bytes(0)
    finally:
        source.close()
