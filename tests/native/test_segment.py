"""Segment: create/open/unlink, owner-only permissions, validation of foreign or
truncated segments, the commit protocol and the slot locks (INTERNALS.md section 2)."""

from __future__ import annotations

import os
import uuid
from typing import Iterator

import numpy as np
import pytest

from ckpt import _C

SLOT_BYTES = 64 * 1024


def shm_path(name: str) -> str:
    return "/dev/shm" + name


@pytest.fixture
def name() -> Iterator[str]:
    n = f"/ckpt-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    yield n
    _C.Segment.unlink(n)


def test_create_open_unlink_round_trip(name: str) -> None:
    assert not _C.Segment.exists(name)
    seg = _C.Segment.create(name, SLOT_BYTES)
    assert _C.Segment.exists(name)
    assert (seg.name, seg.slot_bytes, seg.size_bytes) == (name, SLOT_BYTES, 4096 + 2 * SLOT_BYTES)
    assert os.stat(shm_path(name)).st_size == seg.size_bytes
    assert seg.committed() is None
    assert seg.slot_info(0) == {"state": "EMPTY", "step": 0, "seq": 0, "payload_bytes": 0, "payload_crc": 0}
    seg.slot_view(1)[:5] = b"hello"
    other = _C.Segment.open(name)
    assert bytes(other.slot_view(1)[:5]) == b"hello"
    assert other.slot_address(1) - other.slot_address(0) == SLOT_BYTES
    assert other.slot_address(0) - other.base_address == 4096  # the header, then slot 0
    seg.close(); seg.close(); other.close()
    with pytest.raises(Exception, match="closed"):
        other.base_address
    _C.Segment.unlink(name)
    assert not _C.Segment.exists(name)
    _C.Segment.unlink(name)  # a missing name is not an error


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_segment_is_owner_only_0600_whatever_the_umask(name: str, umask: int) -> None:
    old = os.umask(umask)
    try:
        seg = _C.Segment.create(name, SLOT_BYTES)
    finally:
        os.umask(old)
    assert os.stat(shm_path(name)).st_mode & 0o777 == 0o600
    seg.close()


def test_create_refuses_an_existing_name(name: str) -> None:
    seg = _C.Segment.create(name, SLOT_BYTES)
    seg.slot_view(0)[0] = 42
    with pytest.raises(_C.NativeError, match="exists"):
        _C.Segment.create(name, SLOT_BYTES)
    assert seg.slot_view(0)[0] == 42  # the existing segment is untouched


def test_create_rejects_bad_names_and_sizes(name: str) -> None:
    with pytest.raises(_C.NativeError, match="multiple of 4096"):
        _C.Segment.create(name, 1000)
    with pytest.raises(_C.NativeError, match="start with '/'"):
        _C.Segment.create("no-slash", SLOT_BYTES)
    with pytest.raises(_C.NativeError, match="no other '/'"):
        _C.Segment.create("/a/b", SLOT_BYTES)
    assert not _C.Segment.exists(name)


def test_open_of_missing_segment_says_so(name: str) -> None:
    with pytest.raises(_C.NativeError, match="no such segment"):
        _C.Segment.open(name)


def test_open_refuses_a_foreign_file(name: str) -> None:
    fd = os.open(shm_path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, os.urandom(4096 + 2 * SLOT_BYTES))
    os.close(fd)
    with pytest.raises(_C.NativeError, match="not a ckpt segment"):
        _C.Segment.open(name)


@pytest.mark.parametrize("new_size", [100, 4096 + SLOT_BYTES])
def test_open_refuses_a_truncated_segment(name: str, new_size: int) -> None:
    _C.Segment.create(name, SLOT_BYTES).close()
    os.truncate(shm_path(name), new_size)
    with pytest.raises(_C.NativeError, match="truncated"):
        _C.Segment.open(name)


def test_open_refuses_a_segment_readable_by_others(name: str) -> None:
    _C.Segment.create(name, SLOT_BYTES).close()
    os.chmod(shm_path(name), 0o644)
    with pytest.raises(_C.NativeError, match="owner-only"):
        _C.Segment.open(name)


def test_closed_segment_raises_but_live_views_stay_valid(name: str) -> None:
    seg = _C.Segment.create(name, SLOT_BYTES)
    view = seg.slot_view(0)
    seg.close()
    with pytest.raises(_C.NativeError, match="closed"):
        seg.slot_address(0)
    view[:3] = b"abc"  # mapping kept alive by the view
    assert bytes(view[:3]) == b"abc"
    with pytest.raises(_C.NativeError, match="slots are 0 and 1"):
        _C.Segment.open(name).slot_view(2)


def _write_and_seal(seg: _C.Segment, slot: int, step: int, payload: bytes) -> int:
    pid = os.getpid()
    assert seg.try_lock(slot, pid, "write")
    seg.mark_writing(slot)
    seg.slot_view(slot)[: len(payload)] = payload
    seq = seg.seal(slot, step, len(payload), _C.crc32c(payload))
    seg.unlock(slot, pid)
    return seq


def test_seal_publishes_commit_and_older_slot_stays_sealed(name: str) -> None:
    seg = _C.Segment.create(name, SLOT_BYTES)
    a, b = os.urandom(1000), os.urandom(2000)
    seq_a = _write_and_seal(seg, 0, 5, a)
    assert seg.committed() == (0, 5, seq_a)
    seq_b = _write_and_seal(seg, 1, 6, b)
    assert seq_b > seq_a
    assert seg.committed() == (1, 6, seq_b)
    # The older slot still holds a valid step 5 that a reader can use.
    info = seg.slot_info(0)
    assert info == {"state": "SEALED", "step": 5, "seq": seq_a, "payload_bytes": 1000,
                    "payload_crc": _C.crc32c(a)}
    assert _C.crc32c(seg.slot_view(0)[:1000]) == info["payload_crc"]
    # Another mapping sees the same commit.
    assert _C.Segment.open(name).committed() == (1, 6, seq_b)


def test_slot_marked_writing_is_not_valid(name: str) -> None:
    seg = _C.Segment.create(name, SLOT_BYTES)
    seq_a = _write_and_seal(seg, 0, 5, b"a" * 10)
    seq_b = _write_and_seal(seg, 1, 6, b"b" * 10)
    assert seg.try_lock(1, os.getpid(), "write")
    seg.mark_writing(1)
    assert seg.slot_info(1)["state"] == "WRITING"
    assert seg.committed() == (0, 5, seq_a)  # falls back to the other sealed slot
    seg.mark_writing(0)
    assert seg.committed() is None
    assert seq_b > seq_a


def test_seal_requires_the_write_lock_and_a_payload_that_fits(name: str) -> None:
    seg = _C.Segment.create(name, SLOT_BYTES)
    with pytest.raises(_C.NativeError, match="write lock"):
        seg.seal(0, 1, 10, 0)
    assert seg.try_lock(0, os.getpid(), "write")
    with pytest.raises(_C.NativeError, match="exceeds slot_bytes"):
        seg.seal(0, 1, SLOT_BYTES + 1, 0)
    assert seg.committed() is None


def test_write_lock_is_refused_while_read_locked(name: str) -> None:
    seg = _C.Segment.create(name, SLOT_BYTES)
    reader, writer = 1111, 2222
    assert seg.try_lock(0, reader, "read")
    assert seg.lock_owner(0) == ("read", reader)
    assert not seg.try_lock(0, writer, "write")
    assert not seg.try_lock(0, writer, "read")  # one owner at a time
    assert seg.try_lock(1, writer, "write")  # the other slot is independent
    assert seg.lock_owner(1) == ("write", writer)
    seg.unlock(0, reader)
    assert seg.lock_owner(0) is None
    assert seg.try_lock(0, writer, "write")


def test_unlock_by_non_owner_is_refused_and_break_lock_frees(name: str) -> None:
    seg = _C.Segment.create(name, SLOT_BYTES)
    assert seg.try_lock(0, 1111, "write")
    with pytest.raises(_C.NativeError, match="held by pid 1111"):
        seg.unlock(0, 2222)
    assert seg.lock_owner(0) == ("write", 1111)
    with pytest.raises(_C.NativeError, match="not held"):
        seg.unlock(1, 2222)
    seg.break_lock(0)
    assert seg.lock_owner(0) is None
    with pytest.raises(_C.NativeError, match="mode"):
        seg.try_lock(0, 1, "exclusive")
    with pytest.raises(_C.NativeError, match="owner_pid"):
        seg.try_lock(0, 0, "write")


def test_slot_view_is_numpy_compatible_and_address_matches(name: str) -> None:
    seg = _C.Segment.create(name, SLOT_BYTES)
    arr = np.frombuffer(seg.slot_view(1), dtype=np.uint8)
    assert arr.ctypes.data == seg.slot_address(1) and arr.nbytes == SLOT_BYTES
    assert seg.slot_address(0) % 4096 == 0
    arr[:] = 7
    assert _C.crc32c_addr(seg.slot_address(1), SLOT_BYTES) == _C.crc32c(bytes([7]) * SLOT_BYTES)
    del arr


def _poke_u64(name: str, offset: int, value: int) -> None:
    """Another process of this user writes the shared header (it is mapped read-write)."""
    with open(shm_path(name), "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(8, "little"))


def test_sizes_are_the_ones_checked_at_open_whatever_the_header_says_later(name: str) -> None:
    seg = _C.Segment.create(name, SLOT_BYTES)
    _poke_u64(name, 16, 1 << 30)  # slot_bytes
    _poke_u64(name, 24, 1 << 31)  # size_bytes
    assert (seg.slot_bytes, seg.size_bytes) == (SLOT_BYTES, 4096 + 2 * SLOT_BYTES)
    assert len(seg.slot_view(1)) == SLOT_BYTES
    assert seg.slot_address(1) - seg.slot_address(0) == SLOT_BYTES
    assert seg.try_lock(0, os.getpid(), "write")
    with pytest.raises(_C.NativeError, match="exceeds slot_bytes"):
        seg.seal(0, 1, SLOT_BYTES + 1, 0)


@pytest.mark.parametrize("slot_bytes", [2**63 + 4096, 2**64 - 4096, SLOT_BYTES * 2])
def test_open_refuses_a_header_whose_slot_size_does_not_fit_the_file(name: str,
                                                                    slot_bytes: int) -> None:
    _C.Segment.create(name, SLOT_BYTES).close()
    _poke_u64(name, 16, slot_bytes)  # 4096 + 2 * 2**63 + 8192 wraps around to the file size
    with pytest.raises(_C.NativeError, match="truncated or corrupt"):
        _C.Segment.open(name)


def test_a_payload_size_larger_than_the_slot_reads_as_an_invalid_slot(name: str) -> None:
    seg = _C.Segment.create(name, SLOT_BYTES)
    _write_and_seal(seg, 0, 5, b"x" * 100)
    _write_and_seal(seg, 1, 6, b"y" * 100)
    _poke_u64(name, 64 + 40 + 24, 1 << 40)  # slot 1's payload_bytes
    assert seg.slot_info(1)["state"] == "INVALID"
    assert seg.committed()[:2] == (0, 5)  # the damaged slot is never offered to a reader


def test_break_lock_of_a_checked_owner_keeps_a_lock_taken_since(name: str) -> None:
    seg = _C.Segment.create(name, SLOT_BYTES)
    dead, live = 1111, 2222
    assert seg.try_lock(0, dead, "write")
    assert seg.break_lock(0, dead)  # the first breaker clears it...
    assert seg.try_lock(0, live, "read")  # ...and a live reader takes it
    assert not seg.break_lock(0, dead)  # a second breaker that checked `dead` keeps it
    assert seg.lock_owner(0) == ("read", live)
    assert seg.break_lock(0)  # no owner given: cleared whoever holds it
    assert seg.lock_owner(0) is None and not seg.break_lock(0)
