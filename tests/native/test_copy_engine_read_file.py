"""CopyEngine.read_file: pread() a file into memory with per-chunk crcs, mapping nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ckpt import _C

CHUNK = 1 << 20


def _random(nbytes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def _oracle_crcs(data: np.ndarray, chunk_bytes: int) -> list[int]:
    return [_C._crc32c_scalar(data[o:o + chunk_bytes]) for o in range(0, data.nbytes, chunk_bytes)]


@pytest.fixture
def data_file(tmp_path):
    data = _random((5 << 20) + 4099, seed=1)
    path = tmp_path / "data.bin"
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


# Sizes around the 256 KiB read buffer and the 1 MiB piece; offsets and destinations
# off any alignment.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("offset", "nbytes", "dst_misalignment"), [
    (0, 5 << 20, 0), (7, (1 << 20) + 1, 3), (4096, 256 << 10, 63), (1, (256 << 10) - 1, 1),
    (12345, (3 << 20) + 777, 8), (0, 1, 0)])
def test_reads_the_bytes_and_records_each_chunks_crc(data_file, threads, offset, nbytes,
                                                     dst_misalignment):
    fd, data = data_file
    dst = np.zeros(nbytes + dst_misalignment, dtype=np.uint8)[dst_misalignment:]
    chunk = 700_001  # chunks straddle pieces and read buffers
    crcs = np.zeros(-(-nbytes // chunk) + 1, dtype=np.uint32)
    crcs[-1] = 0xDEADBEEF  # guard: nothing written past the last chunk
    with _C.CopyEngine(threads) as engine:
        ticket = engine.read_file(fd, [(offset, dst.ctypes.data, nbytes)], chunk, crcs.ctypes.data)
        assert ticket.wait(30) is True
    assert ticket.bytes_total == nbytes
    want = data[offset:offset + nbytes]
    assert np.array_equal(dst, want)
    assert crcs[:-1].tolist() == _oracle_crcs(want, chunk)
    assert int(crcs[-1]) == 0xDEADBEEF


def test_several_jobs_number_chunks_one_after_another_and_crc_0_skips_the_crcs(data_file):
    fd, data = data_file
    sizes, offsets = [300_000, 0, 2 << 20], [5, 999, 1 << 20]
    dsts = [np.zeros(n, dtype=np.uint8) for n in sizes]
    jobs = [(o, d.ctypes.data, n) for o, d, n in zip(offsets, dsts, sizes)]
    crcs = np.zeros(_C.num_chunks(sizes, CHUNK), dtype=np.uint32)
    with _C.CopyEngine(2) as engine:
        engine.read_file(fd, jobs, CHUNK, crcs.ctypes.data).wait(30)
        want = [data[o:o + n] for o, n in zip(offsets, sizes)]
        assert all(np.array_equal(d, w) for d, w in zip(dsts, want))
        assert crcs.tolist() == _oracle_crcs(want[0], CHUNK) + _oracle_crcs(want[2], CHUNK)
        plain = np.zeros(sizes[2], dtype=np.uint8)
        engine.read_file(fd, [(offsets[2], plain.ctypes.data, sizes[2])], CHUNK, 0).wait(30)
    assert np.array_equal(plain, want[2])


def test_a_file_that_ends_before_a_job_fails_the_ticket_and_names_where(data_file):
    fd, data = data_file
    dst = np.zeros(1 << 20, dtype=np.uint8)
    start = data.nbytes - 1000
    with _C.CopyEngine(1) as engine:
        ticket = engine.read_file(fd, [(start, dst.ctypes.data, dst.nbytes)], CHUNK, 0)
        with pytest.raises(_C.NativeError, match=f"ends at byte {data.nbytes}.*truncated"):
            ticket.wait(30)


def test_a_closed_descriptor_fails_the_ticket_with_the_os_reason(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    dst = np.zeros(4096, dtype=np.uint8)
    with _C.CopyEngine(1) as engine:
        ticket = engine.read_file(fd, [(0, dst.ctypes.data, 4096)], CHUNK, 0)
        with pytest.raises(_C.NativeError, match="pread at offset 0 failed: Bad file descriptor"):
            ticket.wait(30)


def test_bad_arguments_are_refused_before_any_read(data_file):
    fd, _ = data_file
    dst = np.zeros(16, dtype=np.uint8)
    with _C.CopyEngine(1) as engine:
        with pytest.raises(_C.NativeError, match="fd must be an open file descriptor"):
            engine.read_file(-1, [(0, dst.ctypes.data, 16)], CHUNK, 0)
        with pytest.raises(_C.NativeError, match="null dst_addr"):
            engine.read_file(fd, [(0, 0, 16)], CHUNK, 0)
        with pytest.raises(_C.NativeError, match=r"\(file_offset, dst_addr, nbytes\)"):
            engine.read_file(fd, [(0, dst.ctypes.data)], CHUNK, 0)
        with pytest.raises(_C.NativeError, match="chunk_bytes must be > 0"):
            engine.read_file(fd, [(0, dst.ctypes.data, 16)], 0, 0)


def _resident_kib(address: int) -> int:
    """Rss of the mapping of this process that starts at ``address`` (/proc/self/smaps)."""
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{address:x}":
            for field in lines[i + 1:]:
                if field.startswith("Rss:"):
                    return int(field.split()[1])
    raise AssertionError(f"no mapping at {address:#x}")


def test_a_slot_read_through_the_segments_file_equals_it_and_maps_none_of_its_pages():
    name = f"/ckpt-test-readfile-{os.getpid()}"
    slot_bytes = 8 << 20
    seg = _C.Segment.create(name, slot_bytes)
    try:
        data = _random(slot_bytes, seed=3)
        np.frombuffer(seg.slot_view(1), dtype=np.uint8)[:] = data
        seg.close()
        reader = _C.Segment.open(name, populate=False)
        offset = reader.slot_address(1) - reader.base_address
        dst = np.zeros(slot_bytes, dtype=np.uint8)
        crcs = np.zeros(slot_bytes // CHUNK, dtype=np.uint32)
        with _C.CopyEngine(2) as engine:
            engine.read_file(reader.fileno(), [(offset, dst.ctypes.data, slot_bytes)], CHUNK,
                             crcs.ctypes.data).wait(30)
            assert np.array_equal(dst, data)
            assert crcs.tolist() == _oracle_crcs(data, CHUNK)
            # Only the header page was touched through the mapping.
            assert _resident_kib(reader.base_address) <= 64
            # The same read through the mapping faults the slot in (the cost avoided).
            engine.submit([(reader.slot_address(1), dst.ctypes.data, slot_bytes)], CHUNK,
                          crcs.ctypes.data).wait(30)
            assert _resident_kib(reader.base_address) >= slot_bytes >> 10
        reader.close()
        with pytest.raises(_C.NativeError, match="closed"):
            reader.fileno()
    finally:
        _C.Segment.unlink(name)
