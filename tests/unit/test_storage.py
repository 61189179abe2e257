"""Filesystem storage: atomic commit, multi-writer completion, retention, a full disk."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ckpt.errors import ConfigError, StorageFullError
from ckpt.format import StepReader, finish_if_complete, persist_payloads, verify, write_rank
from ckpt.format.pack import pack_payload
from ckpt.storage import FsStorage, keep_newest, list_steps

CHUNK = 64 << 10


def persist(root: Path, step: int, nbytes: int = 10_000, world_size: int = 1, **kw) -> Path:
    rng = np.random.default_rng(step)
    payloads = {r: memoryview(pack_payload(
        {"w": rng.integers(0, 256, nbytes, dtype=np.uint8)}, rank=r, world_size=world_size,
        step=step, chunk_bytes=CHUNK)[0]) for r in range(world_size)}
    return persist_payloads(root, step, world_size, payloads, **kw)


def summary(root: Path) -> list[tuple[int, bool, bool]]:
    return [(s.step, s.complete, s.staging) for s in list_steps(root)]


def test_list_steps_reports_complete_staging_and_incomplete_steps(tmp_path):
    persist(tmp_path, 5, world_size=2)
    FsStorage(tmp_path).begin_step(7)
    (tmp_path / "step-00000006").mkdir()  # a final-looking dir without a manifest
    infos = list_steps(tmp_path)
    assert [(s.step, s.complete, s.staging) for s in infos] == [
        (5, True, False), (6, False, False), (7, False, True)]
    assert infos[0].world_size == 2 and infos[0].size_bytes > 20_000


def test_keep_newest_deletes_old_complete_steps_and_ignores_foreign_entries(tmp_path):
    for step in (1, 2, 3, 4):
        persist(tmp_path, step)
    (tmp_path / "notes").mkdir()
    (tmp_path / "step-12").mkdir()  # not step-%08d: foreign
    (tmp_path / "step-00000000").mkdir()  # incomplete: left for a human to look at
    removed = keep_newest(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step-00000001", "step-00000002"]
    assert summary(tmp_path) == [(0, False, False), (3, True, False), (4, True, False)]
    assert (tmp_path / "notes").is_dir() and (tmp_path / "step-12").is_dir()
    with pytest.raises(ConfigError, match="keep must be >= 1"):
        keep_newest(tmp_path, 0)
    assert keep_newest(tmp_path, 1) == [tmp_path / "step-00000003"]
    assert summary(tmp_path) == [(0, False, False), (4, True, False)]


def test_persist_with_keep_applies_retention_and_cleans_stale_staging(tmp_path):
    storage = FsStorage(tmp_path)
    stale = storage.begin_step(2)  # a writer died while persisting step 2
    (stale / "rank-00000.data").write_bytes(b"partial")
    future = storage.begin_step(9)  # a newer step still being written: kept
    for step in (1, 3, 4):
        persist(tmp_path, step, keep=2)
    assert summary(tmp_path) == [(3, True, False), (4, True, False), (9, False, True)]
    assert not stale.exists() and future.exists()


def test_commit_breaks_a_lock_left_by_a_dead_committer(tmp_path):
    buf, _ = pack_payload({"w": np.ones(100, np.uint8)}, step=3)
    staging = FsStorage(tmp_path).begin_step(3)
    write_rank(staging, 0, 1, memoryview(buf))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (staging / "manifest.lock").write_text(json.dumps({"pid": dead.pid,
                                                       "host": socket.gethostname()}))
    assert finish_if_complete(staging, 1) == tmp_path / "step-00000003"
    assert verify(tmp_path / "step-00000003").ok


def test_commit_waits_for_a_live_lock_holder(tmp_path):
    buf, _ = pack_payload({"w": np.ones(100, np.uint8)}, step=3)
    staging = FsStorage(tmp_path).begin_step(3)
    write_rank(staging, 0, 1, memoryview(buf))
    (staging / "manifest.lock").write_text(json.dumps({"pid": os.getpid(),
                                                       "host": socket.gethostname()}))
    assert finish_if_complete(staging, 1) is None
    assert summary(tmp_path) == [(3, False, True)]


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from ckpt.format import write_rank, finish_if_complete
    from ckpt.format.pack import ArrayPiece, pack_payload
    from ckpt.storage import FsStorage
    root, rank, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    full = np.arange(2 * 300_000, dtype=np.float32).reshape(2, 300_000)
    buf, _ = pack_payload({"w": ArrayPiece(full[rank:rank + 1], (2, 300_000), (rank, 0))},
                          rank=rank, world_size=2, step=4, chunk_bytes=65536)
    deadline = time.monotonic() + 30
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    staging = FsStorage(root).begin_step(4)
    write_rank(staging, rank, 2, memoryview(buf))
    print(finish_if_complete(staging, 2, keep=1))
""")


def test_two_writer_processes_complete_one_step_together(tmp_path):
    persist(tmp_path, 1)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(r), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    results = [o.strip() for o, _ in outs]
    final = tmp_path / "step-00000004"
    assert str(final) in results and set(results) <= {str(final), "None"}
    assert summary(tmp_path) == [(4, True, False)]  # keep=1 removed step 1
    with StepReader(final) as reader:
        assert reader.world_size == 2
        got = reader.read_slice("w", (0, 299_990), (2, 10))
    full = np.arange(2 * 300_000, dtype=np.float32).reshape(2, 300_000)
    np.testing.assert_array_equal(got, full[:, 299_990:])


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 2 MiB tmpfs (needs root and mount(2)); skipped where it cannot be mounted."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("nbytes", [4_000_000, 20 << 20], ids=["buffered", "direct-io"])
def test_full_disk_names_the_file_and_the_space_and_keeps_earlier_steps(tiny_fs, nbytes):
    persist(tiny_fs, 1, nbytes=200_000)
    with pytest.raises(StorageFullError) as info:
        persist(tiny_fs, 2, nbytes=nbytes, keep=1)
    msg = str(info.value)
    data_file = tiny_fs / ".staging" / "step-00000002" / "rank-00000.data"
    assert f"no space left on device writing {data_file}:" in msg
    needed = int(msg.split(" more bytes needed")[0].rsplit(" ", 1)[1])
    written = int(msg.split(" bytes written")[0].rsplit(" ", 1)[1])
    assert written + needed >= nbytes and "bytes free" in msg
    assert summary(tiny_fs) == [(1, True, False)]
    assert verify(tiny_fs / "step-00000001").ok
    assert not any((tiny_fs / ".staging").iterdir())
