"""Persistence, release and orphan reclaim by the daemon, through the client.

Real gRPC server on a Unix socket in this process, real files through ckpt.format;
the full-disk case runs a real daemon process whose file-size limit makes writes fail.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


import pytest

from ckpt.control.client import DaemonClient
from ckpt.daemon import persister
from ckpt.control.paths import shm_file
from ckpt.format import verify
from test_daemon_rpc import (Trainer, daemon, job, make_payload, start_daemon,  # noqa: F401
                             wait_until)


def complete_steps(d: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in d.glob("step-*") if (p / "manifest.json").exists())


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_every_nth_step_is_persisted_as_a_complete_verified_step_dir(daemon, job, tmp_path):
    _, client = daemon
    out = tmp_path / "ckpts"
    t = Trainer(client, job, persist_dir=out, persist_every=3, keep=2)
    scheduled = [t.snapshot(step) for step in range(1, 8)]
    assert scheduled == [False, False, True, False, False, True, False]
    wait_until(lambda: complete_steps(out) == [3, 6], what="steps 3 and 6 on disk")
    manifest = json.loads((out / "step-00000006" / "manifest.json").read_text())
    assert manifest["step"] == 6 and manifest["world_size"] == 1
    assert verify(out / "step-00000006").ok
    assert client.latest(job, 0).disk_steps == (3, 6)
    assert client.status().segments[0].last_persisted_step == 6 or any(
        s.last_persisted_step == 6 for s in client.status().segments if s.job == job)
    t.close()


def test_a_commit_the_watcher_saw_first_gets_the_same_answer(daemon, job, tmp_path):
    """The watcher polls commit words, so it can record a seal before the trainer's Commit
    arrives; that Commit must still say whether the step was scheduled for persistence."""
    core, client = daemon
    out = tmp_path / "ckpts"
    t = Trainer(client, job, persist_dir=out, persist_every=2, keep=0)
    for step in (1, 2, 3):
        slot, seq = t.write(step, make_payload(step, job=job))
        core.watch.tick()  # as if the watcher woke between the seal and the Commit
        assert client.commit(job, 0, slot, step, seq) == (step == 2)
    wait_until(lambda: complete_steps(out) == [2], what="step 2 on disk")
    t.close()


@pytest.fixture
def slow_disk(monkeypatch):
    """Every persist's write to disk takes at least 0.6 s (staging stays fast)."""
    real = persister.write_step

    def slow_write_step(*args, **kwargs):
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(persister, "write_step", slow_write_step)


class HeldDisk:
    """The first persist's write to disk waits until ``release()`` (``writing`` is set once
    it waits); later writes go straight through. Makes "while a write is in progress"
    deterministic, however slowly the machine runs the test."""

    def __init__(self) -> None:
        import threading

        self.writing, self._released = threading.Event(), threading.Event()

    def release(self) -> None:
        self._released.set()

    def wrap(self, real):
        def held_write_step(*args, **kwargs):
            if not self.writing.is_set():
                self.writing.set()
                assert self._released.wait(30), "the test never released the held write"
            return real(*args, **kwargs)
        return held_write_step


@pytest.fixture
def held_disk(monkeypatch):
    held = HeldDisk()
    monkeypatch.setattr(persister, "write_step", held.wrap(persister.write_step))
    yield held
    held.release()


def test_a_persist_step_waiting_behind_a_slow_write_is_not_overwritten(daemon, job, tmp_path,
                                                                        slow_disk):
    _, client = daemon
    out = tmp_path / "ckpts"
    t = Trainer(client, job, persist_dir=out, persist_every=3, keep=0)
    # Step 3's write takes 0.6 s; steps 4..8 are snapshotted meanwhile. Step 6 waits in
    # the queue pinned, so steps 7 and 8 go to the other slot instead of overwriting it.
    assert [t.snapshot(step) for step in range(1, 9)] == [False, False, True, False, False,
                                                          True, False, False]
    wait_until(lambda: complete_steps(out) == [3, 6], timeout_s=10, what="steps 3 and 6 on disk")
    assert verify(out / "step-00000006").ok
    assert client.status().errors == []
    t.close()


def test_a_persist_step_queued_while_the_worker_is_not_writing_is_never_superseded(
        daemon, job, tmp_path, monkeypatch):
    """Queued-but-not-started only means "the disk is behind" while a write is in progress;
    a worker busy with anything else (here: held in its idle buffer preparation, as a loaded
    machine may hold it) starts the queued step next, so a newer step queues behind it."""
    import threading

    _, client = daemon
    entered, release = threading.Event(), threading.Event()
    real = persister.SlotPersister._prepare_buffers

    def held_prepare(self):
        entered.set()
        release.wait(10)
        return real(self)

    monkeypatch.setattr(persister.SlotPersister, "_prepare_buffers", held_prepare)
    assert entered.wait(5), "the persister never reached its idle tick"
    out = tmp_path / "ckpts"
    t = Trainer(client, job, persist_dir=out, persist_every=3, keep=0)
    assert [t.snapshot(step) for step in range(1, 7)] == [False, False, True, False, False, True]
    release.set()
    wait_until(lambda: complete_steps(out) == [3, 6], timeout_s=10, what="steps 3 and 6 on disk")
    assert client.status().errors == []
    t.close()


def test_a_newer_persist_step_supersedes_one_still_queued_with_a_warning(daemon, job, tmp_path,
                                                                         held_disk):
    _, client = daemon
    out = tmp_path / "ckpts"
    t = Trainer(client, job, persist_dir=out, persist_every=2, keep=0)
    t.snapshot(1)
    t.snapshot(2)
    assert held_disk.writing.wait(10), "step 2's persist never started"
    # Step 2 is being written while 4 and then 6 are committed: 6 replaces 4 in the
    # queue, so at most one slot waits pinned and the trainer never has to skip.
    for step in range(3, 8):
        t.snapshot(step)
    held_disk.release()
    wait_until(lambda: complete_steps(out) == [2, 6], timeout_s=10, what="steps 2 and 6 on disk")
    errors = client.status().errors
    assert len(errors) == 1 and "step 4 skipped" in errors[0] and "persist_every" in errors[0]
    t.snapshot(8)  # the trainer was never blocked by two pinned slots, and is not now
    wait_until(lambda: complete_steps(out) == [2, 6, 8], timeout_s=10, what="step 8 on disk")
    t.close()


def test_a_superseded_persist_is_dropped_even_if_its_superseder_is_preempted(daemon, job,
                                                                            tmp_path, held_disk):
    """The worker may take the superseded task off the queue at any instant of submit():
    it must see it dropped (never write it, never resolve its Future twice and die)."""
    core, client = daemon

    class PreemptedAdd(set):  # the submitting thread loses the CPU inside the supersede
        def add(self, item):
            time.sleep(0.5)
            super().add(item)

    core.persister._dropped = PreemptedAdd()
    out = tmp_path / "ckpts"
    t = Trainer(client, job, persist_dir=out, persist_every=2, keep=0)
    t.snapshot(1)
    t.snapshot(2)
    assert held_disk.writing.wait(10)
    for step in (3, 4, 5):
        t.snapshot(step)
    threading.Timer(0.2, held_disk.release).start()  # step 2 ends while 6 supersedes 4
    t.snapshot(6)
    wait_until(lambda: complete_steps(out) == [2, 6], timeout_s=10, what="steps 2 and 6 on disk")
    assert core.persister._thread.is_alive()
    t.snapshot(8)
    assert client.persist(job, step=8, wait=True, timeout_s=10).done
    assert complete_steps(out) == [2, 6, 8]
    t.close()


def rank_0_then_rank_1(client, job, out: Path, steps) -> None:
    """A 2-rank job on this node, persisting every step, whose rank 1 seals ``steps``
    only after rank 0 has sealed them all."""
    trainers = [Trainer(client, job, rank=r, world_size=2, persist_dir=out, persist_every=1)
                for r in (0, 1)]
    for rank, t in enumerate(trainers):
        for step in steps:
            t.snapshot(step, make_payload(step, rank, 2, job))
    for t in trainers:
        t.close()


def test_a_persist_step_a_slow_rank_seals_after_a_fast_ranks_next_one_is_still_written(
        daemon, job, tmp_path):
    _, client = daemon
    out = tmp_path / "ckpts"
    rank_0_then_rank_1(client, job, out, (1, 2))  # rank 0 still holds 1 in its other slot
    wait_until(lambda: complete_steps(out) == [1, 2], what="steps 1 and 2 on disk")
    assert client.status().errors == []


def test_a_persist_step_a_rank_overwrote_before_the_others_sealed_it_is_reported(
        daemon, job, tmp_path):
    _, client = daemon
    out = tmp_path / "ckpts"
    rank_0_then_rank_1(client, job, out, (1, 2, 3))  # rank 0's step 3 overwrote its step 1
    wait_until(lambda: complete_steps(out) == [2, 3], what="steps 2 and 3 on disk")
    errors = client.status().errors
    assert len(errors) == 1 and "step 1 dropped" in errors[0] and "[0]" in errors[0]


def test_persist_of_an_older_sealed_step_writes_it_even_after_a_newer_one(daemon, job,
                                                                          tmp_path):
    _, client = daemon
    out = tmp_path / "ckpts"
    t = Trainer(client, job, persist_dir=out, persist_every=6, keep=0)
    t.snapshot(4)
    t.snapshot(6)  # persisted by persist_every
    wait_until(lambda: complete_steps(out) == [6], what="step 6 on disk")
    outcome = client.persist(job, rank=0, step=4, wait=True, timeout_s=10)
    assert (outcome.step, outcome.done, outcome.error) == (4, True, "")
    assert complete_steps(out) == [4, 6] and verify(out / "step-00000004").ok
    t.close()


def test_a_waiting_persist_reports_the_daemons_progress_in_bytes(daemon, job, tmp_path,
                                                                 held_disk):
    _, client = daemon
    out = tmp_path / "ckpts"
    t = Trainer(client, job, slot_bytes=8 << 20, persist_dir=out)  # only on request
    payload = make_payload(1, nbytes=4 << 20, chunk_bytes=1 << 20)
    t.snapshot(1, payload)
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        held_disk.release()  # the write starts only after the client saw it at 0 bytes

    outcome = client.persist(job, rank=0, wait=True, timeout_s=30, progress=progress)
    assert (outcome.step, outcome.done, outcome.error) == (1, True, "")
    # The held write comes before the first byte is written: the polls see it start,
    # and the last report is the whole payload.
    assert seen[0] == (0, len(payload)) and seen[-1] == (len(payload), len(payload))
    assert all(total == len(payload) for _, total in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    seg = next(s for s in client.status().segments if s.job == job)
    assert (seg.persist_step, seg.persist_done_bytes, seg.persist_total_bytes) == (-1, 0, 0)
    t.close()


def test_retention_keeps_the_newest_k_steps(daemon, job, tmp_path):
    _, client = daemon
    out = tmp_path / "ckpts"
    t = Trainer(client, job, persist_dir=out, persist_every=1, keep=2)
    for step in range(1, 6):
        t.snapshot(step)
        wait_until(lambda: step in complete_steps(out), what=f"step {step} on disk")
    # Retention runs right after the rename that makes a step visible.
    wait_until(lambda: complete_steps(out) == [4, 5], what="only the newest 2 steps kept")
    t.close()


def test_ranks_of_one_job_on_this_node_go_into_one_step_dir(daemon, job, tmp_path):
    _, client = daemon
    out = tmp_path / "ckpts"
    ranks = [Trainer(client, job, rank=r, world_size=2, persist_dir=out, persist_every=2)
             for r in (0, 1)]
    assert ranks[0].snapshot(2, make_payload(2, 0, 2, job)) is False  # rank 1 not there yet
    assert ranks[1].snapshot(2, make_payload(2, 1, 2, job)) is True
    wait_until(lambda: complete_steps(out) == [2], what="step 2 on disk")
    manifest = json.loads((out / "step-00000002" / "manifest.json").read_text())
    assert sorted(manifest["ranks"]) == ["0", "1"]
    for t in ranks:
        t.close()


def test_a_persist_step_waits_for_every_rank_of_this_node_to_register(daemon, job, tmp_path):
    _, client = daemon
    out = tmp_path / "ckpts"
    first = Trainer(client, job, rank=0, world_size=2, persist_dir=out, persist_every=2,
                    local_world_size=2)
    # Rank 1 registers late (its segment is still being created): rank 0's seal of the
    # persist step must wait for it, not go to disk alone and leave the step incomplete.
    assert first.snapshot(2, make_payload(2, 0, 2, job)) is False
    assert not any("ranks of this node" in e for e in client.status().errors)
    assert first.snapshot(4, make_payload(4, 0, 2, job)) is False
    # A second persist step waiting: now the daemon says what it waits for.
    assert any("wait until all 2 ranks of this node" in e for e in client.status().errors)
    late = Trainer(client, job, rank=1, world_size=2, persist_dir=out, persist_every=2,
                   local_world_size=2)
    assert late.snapshot(2, make_payload(2, 1, 2, job)) is True
    assert late.snapshot(4, make_payload(4, 1, 2, job)) is True
    wait_until(lambda: complete_steps(out) == [2, 4], what="steps 2 and 4 of both ranks")
    manifest = json.loads((out / "step-00000002" / "manifest.json").read_text())
    assert sorted(manifest["ranks"]) == ["0", "1"]
    for t in (first, late):
        t.close()


def test_local_world_size_comes_from_torchrun_only_for_its_whole_world(monkeypatch):
    from ckpt.hook.daemon_link import local_world_size

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert local_world_size(1) == 1
    assert local_world_size(4) == 0  # not torchrun: not known
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_world_size(8) == 4
    assert local_world_size(2) == 0  # a subgroup of the world: its local share is not known
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "many")
    assert local_world_size(8) == 0


def test_a_job_relaunched_on_fewer_ranks_persists_without_its_old_ranks(daemon, job,
                                                                        tmp_path):
    _, client = daemon
    out = tmp_path / "ckpts"
    old = [Trainer(client, job, rank=r, world_size=2, persist_dir=out, persist_every=2)
           for r in (0, 1)]
    for t in old:
        t.snapshot(2, make_payload(2, t.rank, 2, job))
    wait_until(lambda: complete_steps(out) == [2], what="step 2 of the 2-rank job on disk")
    for t in old:
        t.close()
    # Relaunched on one rank (a restore read step 2 onto it): rank 1's segment stays in
    # the daemon, but is no part of the job any more.
    new = Trainer(client, job, rank=0, world_size=1, persist_dir=out, persist_every=2)
    assert new.snapshot(4, make_payload(4, 0, 1, job)) is True
    wait_until(lambda: complete_steps(out) == [2, 4], what="step 4 of the 1-rank job on disk")
    manifest = json.loads((out / "step-00000004" / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and sorted(manifest["ranks"]) == ["0"]
    assert client.persist(job, step=-1, wait=True).step == 4  # every rank "held here": rank 0
    # Rank 1's newest commit (step 2) is on disk: its memory is given back.
    wait_until(lambda: not shm_file(old[1].reg.segment_name).exists(),
               what="rank 1's segment unlinked")
    assert [s.rank for s in client.status().segments if s.job == job] == [0]
    new.close()


def test_a_rank_a_relaunched_job_lacks_keeps_its_memory_until_disk_has_a_newer_step(
        daemon, job, tmp_path):
    core, client = daemon
    out = tmp_path / "ckpts"
    old = [Trainer(client, job, rank=r, world_size=2, persist_dir=out, persist_every=4)
           for r in (0, 1)]
    for t in old:
        assert t.snapshot(3, make_payload(3, t.rank, 2, job)) is False  # in memory only
        t.close()
    rank1 = shm_file(old[1].reg.segment_name)
    new = Trainer(client, job, rank=0, world_size=1, persist_dir=out, persist_every=4)
    assert new.snapshot(5, make_payload(5, 0, 1, job)) is False
    for _ in range(3):
        core.watch.tick()
    # Step 3 of rank 1 is on no disk: a restore onto 2 ranks would still need it.
    assert rank1.exists()
    assert new.snapshot(8, make_payload(8, 0, 1, job)) is True
    wait_until(lambda: complete_steps(out) == [8], what="step 8 on disk")
    wait_until(lambda: not rank1.exists(), what="rank 1's segment unlinked")
    assert shm_file(new.reg.segment_name).exists()
    new.close()


def test_ranks_on_two_nodes_persist_every_step_through_their_own_daemons(tmp_path, job,
                                                                          slow_disk):
    # Two daemons stand for two nodes; each holds one rank of a 2-rank job. Each writes its
    # rank into the shared dir, and whichever finishes second commits the step. The disk
    # is slower than persist_every: a single-node job would skip a step, but here a step
    # one node skipped could never complete, so neither skips.
    for n in (0, 1):
        (tmp_path / f"node{n}").mkdir()
    nodes = [start_daemon(tmp_path / f"node{n}") for n in (0, 1)]
    try:
        out = tmp_path / "shared-ckpts"
        ranks = [Trainer(nodes[r][2], job, rank=r, world_size=2, persist_dir=out,
                         persist_every=2, keep=2) for r in (0, 1)]
        for step in range(1, 7):
            for r, t in enumerate(ranks):
                t.snapshot(step, make_payload(step, r, 2, job))
        wait_until(lambda: complete_steps(out) == [4, 6], timeout_s=30,
                   what="steps 4 and 6 complete (step 2 dropped by keep=2)")
        assert all(client.status().errors == [] for _, _, client in nodes)
        for step in (4, 6):
            manifest = json.loads((out / f"step-{step:08d}" / "manifest.json").read_text())
            assert sorted(manifest["ranks"]) == ["0", "1"]
            assert verify(out / f"step-{step:08d}").ok
        for t in ranks:
            t.close()
    finally:
        for core, server, client in nodes:
            client.close()
            server.stop(0).wait(2)
            core.close()


def test_persist_with_wait_writes_the_newest_step_now(daemon, job, tmp_path):
    _, client = daemon
    out = tmp_path / "ckpts"
    t = Trainer(client, job, persist_dir=out)  # persist_every=0: only on request
    t.snapshot(4)
    t.snapshot(5)
    assert complete_steps(out) == []
    outcome = client.persist(job, rank=0, wait=True, timeout_s=10)
    assert (outcome.step, outcome.done, outcome.error) == (5, True, "")
    assert complete_steps(out) == [5]
    assert client.persist(job, wait=True, timeout_s=10).done  # again: already persisted
    t.close()


def test_persist_into_a_bad_dir_is_reported_and_the_daemon_keeps_serving(daemon, job, tmp_path):
    _, client = daemon
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    t = Trainer(client, job, persist_dir=blocker / "ckpts", persist_every=1)
    t.snapshot(1)
    outcome = client.persist(job, wait=True, timeout_s=10)
    assert not outcome.done and "not-a-dir" in outcome.error
    seg = next(s for s in client.status().segments if s.job == job)
    assert any("persist of job" in e for e in seg.errors)
    t.snapshot(2)  # still serving
    assert client.latest(job, 0).slots[0].step == 2
    t.close()


def test_release_waits_for_the_newest_commit_to_be_persisted(daemon, job, tmp_path):
    _, client = daemon
    out = tmp_path / "ckpts"
    t = Trainer(client, job, persist_dir=out)
    t.snapshot(1)
    reply = client.release(job)
    assert list(reply.pending) == [t.reg.segment_name] and not reply.unlinked
    wait_until(lambda: not shm_file(t.reg.segment_name).exists(), what="released segment gone")
    assert complete_steps(out) == [1]
    t.close()


def test_orphans_are_never_reclaimed_without_the_flag(daemon, job):
    core, client = daemon
    reg = client.register(job, 0, 1, dead_pid(), 1 << 20)
    time.sleep(0.5)
    core.watch.tick()
    assert shm_file(reg.segment_name).exists()
    assert not next(s for s in client.status().segments if s.job == job).owner_alive


def test_orphan_is_reclaimed_only_after_its_newest_commit_is_persisted(tmp_path, job):
    core, server, client = start_daemon(tmp_path, reclaim_orphans_after_s=0.2)
    try:
        out = tmp_path / "ckpts"
        t = Trainer(client, job, persist_dir=out)
        t.snapshot(1)
        t.close()
        client.register(job, 0, 1, dead_pid(), 1 << 20, persist_dir=out)  # owner is now dead
        time.sleep(0.6)
        assert shm_file(t.reg.segment_name).exists(), "reclaimed an unpersisted snapshot"
        assert client.persist(job, wait=True, timeout_s=10).done
        wait_until(lambda: not shm_file(t.reg.segment_name).exists(), what="orphan reclaimed")
        assert any("reclaimed" in e for e in client.status().errors)
    finally:
        client.close()
        server.stop(0).wait(2)
        core.close()


def test_an_orphan_whose_trainer_registers_again_meanwhile_is_not_reclaimed(tmp_path, job,
                                                                          monkeypatch):
    """The watcher decides to reclaim, then the restarted trainer's Register lands before
    the unlink: the trainer keeps the segment Register told it exists."""
    core, server, client = start_daemon(tmp_path, reclaim_orphans_after_s=0.2)
    try:
        out = tmp_path / "ckpts"
        t = Trainer(client, job, persist_dir=out)
        t.snapshot(1)
        assert client.persist(job, wait=True, timeout_s=10).done
        real_reclaim, answers = core.reclaim, []

        def register_then_reclaim(entry, *args):
            if not answers:
                answers.append(client.register(job, 0, 1, os.getpid(), 1 << 20,
                                               persist_dir=str(out)))
            real_reclaim(entry, *args)

        monkeypatch.setattr(core, "reclaim", register_then_reclaim)
        client.register(job, 0, 1, dead_pid(), 1 << 20, persist_dir=str(out))  # owner dead
        wait_until(lambda: answers, what="the watcher's reclaim decision")
        time.sleep(0.3)  # a few more watcher ticks: the owner is alive again
        assert answers[0].existed and shm_file(answers[0].segment_name).exists()
        slot, seq = t.write(2, make_payload(2, job=job))
        client.commit(job, 0, slot, 2, seq)
        assert not any("reclaimed" in e for e in client.status().errors)
        t.close()
    finally:
        client.close()
        server.stop(0).wait(2)
        core.close()


def test_full_persist_dir_reports_an_error_while_the_daemon_keeps_serving(tmp_path, job):
    sock = tmp_path / "run" / "daemon.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "ckpt.daemon.server", "--socket", str(sock),
                             "--watch-interval-s", "0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = DaemonClient(sock, timeout_s=5)
        wait_until(lambda: client.ping(0.5), what="daemon up")
        out = tmp_path / "ckpts"
        t = Trainer(client, job, slot_bytes=2 << 20, persist_dir=out, persist_every=1)
        # The segment exists; from now on the daemon cannot write a file past 256 KiB (Python
        # ignores SIGXFSZ, so the write fails with EFBIG, as on a full disk).
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
        t.snapshot(1, make_payload(1, nbytes=1 << 20))
        seg = wait_until(lambda: next((s for s in client.status().segments
                                       if s.job == job and s.errors), None),
                         what="persist error in Status")
        assert "step 1" in seg.errors[0] and seg.last_persisted_step == -1
        assert complete_steps(out) == []
        t.snapshot(2, make_payload(2, nbytes=1 << 20))
        assert client.latest(job, 0).slots[0].step == 2 and proc.poll() is None
        t.close()
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def _maps_arrow(pid: int) -> bool:
    return "libarrow" in Path(f"/proc/{pid}/maps").read_text()


def test_an_idle_daemon_loads_the_writer_once_a_job_will_be_persisted(tmp_path, job):
    """The first persist must not pay for importing pyarrow and zstd: the daemon loads them
    while idle, once a registered job has a persist_dir (and not for a job without one)."""
    sock = tmp_path / "run" / "daemon.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "ckpt.daemon.server", "--socket", str(sock)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = DaemonClient(sock, timeout_s=5)
        wait_until(lambda: client.ping(0.5), what="daemon up")
        memory_only = Trainer(client, job + "-m", slot_bytes=1 << 20)
        time.sleep(3 * persister.SlotPersister.IDLE_POLL_S)
        assert not _maps_arrow(proc.pid), "a job without persist_dir made the daemon load pyarrow"
        persisted = Trainer(client, job, slot_bytes=1 << 20, persist_dir=tmp_path / "ckpts")
        wait_until(lambda: _maps_arrow(proc.pid), what="pyarrow loaded by the idle daemon")
        persisted.close()
        memory_only.close()
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
        for p in Path("/dev/shm").glob(f"ckpt-{os.getuid()}-{job}-m-r*"):
            p.unlink()  # the job fixture removes only ``job``'s own segments
