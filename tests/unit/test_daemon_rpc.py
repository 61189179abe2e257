"""The daemon's RPCs through DaemonClient against a real gRPC server on a Unix socket.

The server runs in this process (DaemonCore + servicer, as ``ckpt daemon`` wires them);
trainers are played by this test (it maps the segment and seals slots itself, as the
Checkpointer does) or by real child processes where a pid must die.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from ckpt import _C
from ckpt.control import ckpt_pb2_grpc as pb_grpc
from ckpt.control.client import DaemonClient
from ckpt.control.paths import shm_file
from ckpt.control.servicer import SnapshotDaemonServicer
from ckpt.daemon.service import DaemonCore
from ckpt.errors import ConfigError, SegmentError, StepNotFoundError

SRC = str(Path(__file__).resolve().parents[2] / "src")


def make_payload(step: int, rank: int = 0, world_size: int = 1, job: str = "job",
                 nbytes: int = 64 << 10, chunk_bytes: int = 16 << 10) -> bytes:
    """A valid §3 payload (via ckpt.format.pack) holding one tensor of ``nbytes`` bytes."""
    from ckpt.format.pack import pack_payload

    # Random bytes: zstd cannot shrink them, so the persisted size is known.
    arr = np.random.default_rng(step).integers(0, 2**32, nbytes // 4, dtype=np.uint32)
    buf, _ = pack_payload({"model/w": arr}, rank=rank, world_size=world_size, step=step,
                          job=job, chunk_bytes=chunk_bytes)
    return bytes(buf)


def payload_crc(payload: bytes) -> int:
    data_offset = struct.unpack_from("<Q", payload, 40)[0]
    return _C.crc32c(payload[:data_offset])


class Trainer:
    """Plays a trainer: maps the segment, writes the non-committed slot, seals, commits."""

    def __init__(self, client: DaemonClient, job: str, rank: int = 0, world_size: int = 1,
                 slot_bytes: int = 1 << 20, **register_kw) -> None:
        self.client, self.job, self.rank = client, job, rank
        self.reg = client.register(job, rank, world_size, os.getpid(), slot_bytes, **register_kw)
        self.seg = _C.Segment.open(self.reg.segment_name)

    def write(self, step: int, payload: bytes) -> tuple[int, int]:
        (slot,) = wait_until(self._lock_a_slot, what="a slot no reader holds")
        self.seg.mark_writing(slot)
        view = self.seg.slot_view(slot)
        view[:len(payload)] = payload
        view.release()
        seq = self.seg.seal(slot, step, len(payload), payload_crc(payload))
        self.seg.unlock(slot, os.getpid())
        return slot, seq

    def _lock_a_slot(self) -> tuple[int] | None:
        """The stager's choice (ckpt.snapshot.stager): the slot that is not committed, else
        the committed one when a reader holds the other. A real trainer skips the snapshot
        when both are held; this one waits, so that tests are deterministic."""
        committed = self.seg.committed()
        first = 0 if committed is None else 1 - committed[0]
        for slot in (first, 1 - first):
            if self.seg.try_lock(slot, os.getpid(), "write"):
                if slot != first and self.seg.slot_info(first)["state"] != "SEALED":
                    self.seg.unlock(slot, os.getpid())
                    return None
                return (slot,)
        return None

    def snapshot(self, step: int, payload: bytes | None = None) -> bool:
        payload = payload if payload is not None else make_payload(step, self.rank, job=self.job)
        slot, seq = self.write(step, payload)
        return self.client.commit(self.job, self.rank, slot, step, seq)

    def close(self) -> None:
        self.seg.close()


@pytest.fixture
def job():
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    for p in Path("/dev/shm").glob(f"ckpt-{os.getuid()}-{name}-r*"):
        p.unlink(missing_ok=True)


def start_daemon(tmp_path: Path, **core_kw):
    sock = tmp_path / "run" / "daemon.sock"
    sock.parent.mkdir(mode=0o700)
    core = DaemonCore(tmp_path / "state", str(sock), watch_interval_s=0.1, **core_kw)
    core.start()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_SnapshotDaemonServicer_to_server(SnapshotDaemonServicer(core), server)
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    return core, server, DaemonClient(sock, timeout_s=5)


@pytest.fixture
def daemon(tmp_path):
    core, server, client = start_daemon(tmp_path)
    yield core, client
    client.close()
    server.stop(0).wait(2)
    core.close()


def wait_until(predicate, timeout_s: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_register_creates_owner_only_segment_and_returns_it_again(daemon, job):
    _, client = daemon
    reg = client.register(job, 0, 1, os.getpid(), 10_000)
    assert reg.slot_bytes == 12288 and reg.generation == 0 and not reg.existed
    st = shm_file(reg.segment_name).stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    again = client.register(job, 0, 1, os.getpid(), 4096)
    assert (again.segment_name, again.existed) == (reg.segment_name, True)


def test_commit_latest_round_trip_reports_both_sealed_slots(daemon, job):
    _, client = daemon
    t = Trainer(client, job)
    assert client.latest(job, 0).slots == ()
    t.snapshot(1)
    t.snapshot(2)
    latest = client.latest(job, 0)
    assert [(s.step, s.slot) for s in latest.slots] == [(2, 1), (1, 0)]
    assert latest.slots[0].seq > latest.slots[1].seq
    assert latest.slots[0].segment_name == t.reg.segment_name
    assert latest.disk_steps == ()
    t.close()


def test_commit_that_disagrees_with_slot_header_is_refused(daemon, job):
    _, client = daemon
    t = Trainer(client, job)
    slot, seq = t.write(5, make_payload(5))
    with pytest.raises(SegmentError, match="does not match the slot header"):
        client.commit(job, 0, slot, 6, seq)
    with pytest.raises(SegmentError, match="does not match"):
        client.commit(job, 0, 1 - slot, 5, seq)
    with pytest.raises(ConfigError, match="slot must be 0 or 1"):
        client.commit(job, 0, 2, 5, seq)
    with pytest.raises(StepNotFoundError, match="Register first"):
        client.commit(job, 3, 0, 5, seq)
    t.close()


def test_register_with_bigger_slots_makes_a_new_generation_and_drops_old_after_commit(
        daemon, job):
    _, client = daemon
    small = Trainer(client, job, slot_bytes=1 << 20)
    small.snapshot(1)
    big = Trainer(client, job, slot_bytes=2 << 20)
    assert big.reg.generation == 1 and big.reg.slot_bytes == 2 << 20
    # The old generation keeps its snapshot until the new one has a commit.
    assert [s.generation for s in client.latest(job, 0).slots] == [0]
    big.snapshot(2)
    wait_until(lambda: not shm_file(small.reg.segment_name).exists(), what="gen 0 unlinked")
    assert [(s.step, s.generation) for s in client.latest(job, 0).slots] == [(2, 1)]
    small.close()
    big.close()


def test_fetch_streams_the_exact_payload_in_chunks_of_at_most_1_mib(daemon, job):
    _, client = daemon
    t = Trainer(client, job, slot_bytes=4 << 20)
    payload = make_payload(7, nbytes=(2 << 20) + 12345)
    t.snapshot(7, payload)
    t.snapshot(8)
    chunks = list(client.iter_fetch(job, 0, 7))
    assert len(chunks) == 3 and all(len(c.data) <= 1 << 20 for c in chunks)
    assert chunks[0].payload_crc == payload_crc(payload)
    assert client.fetch(job, 0, 7) == payload
    with pytest.raises(StepNotFoundError, match="step 6 is not sealed"):
        client.fetch(job, 0, 6)
    t.close()


def test_fetch_holds_the_read_lock_until_the_stream_ends(daemon, job):
    # Driven on the core's stream directly: over gRPC the server may run ahead of the reader
    # (flow-control windows of several MiB), so when the lock is dropped is not observable.
    core, client = daemon
    t = Trainer(client, job, slot_bytes=4 << 20)
    t.snapshot(1, make_payload(1, nbytes=3 << 20))
    t.snapshot(2)
    stream = core.fetch(job, 0, 1)
    next(stream)  # slot 0 (step 1) is pinned while the stream is open
    assert t.seg.lock_owner(0) == ("read", os.getpid())  # the daemon runs in this process
    assert not t.seg.try_lock(0, os.getpid(), "write")
    stream.close()  # what gRPC does when the client cancels
    assert t.seg.lock_owner(0) is None
    assert len(list(core.fetch(job, 0, 1))) == 4 and t.seg.lock_owner(0) is None
    t.close()


def test_write_lock_of_a_dead_trainer_is_broken(daemon, job):
    core, client = daemon
    reg = client.register(job, 0, 1, os.getpid(), 1 << 20)
    code = ("import sys; from ckpt import _C; import os\n"
            f"s = _C.Segment.open({reg.segment_name!r}); assert s.try_lock(0, os.getpid(), 'write')\n"
            "print(os.getpid(), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=30)
    assert out.returncode == 0, out.stderr
    dead_pid = int(out.stdout)
    seg = _C.Segment.open(reg.segment_name)
    assert seg.lock_owner(0) in (("write", dead_pid), None)
    wait_until(lambda: seg.lock_owner(0) is None, what="dead pid's lock broken")
    errors = client.status().segments
    assert any(f"dead pid {dead_pid}" in e for s in errors for e in s.errors)
    seg.close()


def test_status_reports_segments_owner_liveness_and_slot_steps(daemon, job):
    _, client = daemon
    t = Trainer(client, job)
    t.snapshot(3)
    st = client.status()
    assert st.pid == os.getpid() and st.version
    mine = [s for s in st.segments if s.job == job]
    assert len(mine) == 1
    s = mine[0]
    assert (s.rank, s.owner_pid, s.owner_alive) == (0, os.getpid(), True)
    assert [x.step for x in s.slots] == [3]
    assert s.size_bytes == 4096 + 2 * (1 << 20) and s.last_persisted_step == -1
    t.close()


def test_release_unlinks_a_job_without_persist_dir_at_once(daemon, job):
    _, client = daemon
    t = Trainer(client, job)
    t.snapshot(1)
    reply = client.release(job)
    assert list(reply.unlinked) == [t.reg.segment_name] and not reply.pending
    assert not shm_file(t.reg.segment_name).exists()
    with pytest.raises(StepNotFoundError):
        client.latest(job, 0)
    t.close()
