"""Checkpointer hardening: what the snapshot holds when the copy is slow, a daemon that
hangs, a copy that outlives ``wait_timeout_s``, close() after skipped steps, and segments
left behind when the state grows.

A slow copy is made deterministic with ``_GatedEngine``: the real ``CopyEngine`` starts a
snapshot's copies only when the test opens the gate, so "the state changed while the copy
was still running" happens every time rather than on a slow machine only.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import signal
import threading
import time
from typing import Any

import torch

from harness import clean_up_job

from ckpt.errors import CkptError, NativeError
from ckpt.hook.checkpointer import Checkpointer


def _job(tag: str) -> str:
    return f"hd{tag}{os.getpid()}-{time.monotonic_ns() % 10**9}"


def _no_daemon(tmp_path, model, opt, job, **options) -> Checkpointer:
    options.setdefault("persist_every", 0)
    return Checkpointer(model, opt, dir=tmp_path / "ckpt", job=job, start_daemon=False,
                        daemon_socket=tmp_path / "none.sock", **options)


def _shm_files(job: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"/dev/shm/ckpt-*-{job}-*"))


class _GatedTicket:
    """Copies into the slot only once the gate opens; first checks that the slot is still
    write-locked by this process in a mapped segment (else records a violation and does
    not copy, which would write into memory nobody owns any more)."""

    def __init__(self, gate: "_GatedEngine", args: tuple, segment: Any, slot: int) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.bytes_total = sum(job[2] for job in args[0])
        threading.Thread(target=self._run, args=(gate, args, segment, slot), daemon=True).start()

    def _run(self, gate: "_GatedEngine", args: tuple, segment: Any, slot: int) -> None:
        try:
            gate.opened.wait()
            try:
                owner = segment.lock_owner(slot)
            except NativeError as exc:  # the segment was closed under the copy
                owner = f"closed ({exc})"
            if owner != ("write", os.getpid()):
                gate.violations.append(f"slot {slot} was {owner} when its copy ran")
                return
            gate.engine.submit(*args).wait()
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        done = self._done.wait(timeout_s)
        if done and self._error is not None:
            raise self._error
        return done

    def done(self) -> bool:
        return self._done.is_set()


class _GatedEngine:
    """Stands in for ``cp.engine``: snapshot copies wait for ``open()``."""

    def __init__(self, cp: Checkpointer) -> None:
        self.engine = cp.engine
        self._cp = cp
        self.opened = threading.Event()
        self.violations: list[str] = []
        self.tickets: list[_GatedTicket] = []

    def submit(self, jobs, chunk_bytes, crc_out_addr):
        segment = self._cp._segment
        slot = next(i for i in (0, 1) if segment.lock_owner(i) == ("write", os.getpid()))
        ticket = _GatedTicket(self, (jobs, chunk_bytes, crc_out_addr), segment, slot)
        self.tickets.append(ticket)
        return ticket

    def wait_copies(self, timeout_s: float) -> None:
        """After ``open()``: until every gated copy has run (or been refused)."""
        for ticket in self.tickets:
            assert ticket._done.wait(timeout_s)

    def open(self) -> None:
        self.opened.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def _gate(cp: Checkpointer) -> _GatedEngine:
    gate = _GatedEngine(cp)
    cp.engine = gate  # before the first step(): the stager is made with it
    return gate


# -- A: every tensor the optimizer pre-hook does not guard is copied before step() returns --


class _Counter:
    """An extra whose state is a tensor that training updates in place."""

    def __init__(self) -> None:
        self.seen = torch.zeros(16)

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, sd):
        self.seen.copy_(sd["seen"])


def _assert_counter_and_params_as_of_step(counter, model, params_at_step) -> None:
    """The restored extra never saw the increment after step(), and the parameters are
    the step's."""
    assert torch.equal(counter.seen, torch.zeros(16))
    for a, b in zip(params_at_step, model.parameters()):
        assert torch.equal(a, b)


def _lr_tensor_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched, _Counter()


def test_tensor_lr_scheduler_and_extra_tensors_are_saved_as_of_step_while_the_copy_lags(
        tmp_path):
    job = _job("a")
    model, opt, sched, counter = _lr_tensor_setup()
    cp = _no_daemon(tmp_path, model, opt, job, scheduler=sched, extra={"counter": counter})
    gate = _gate(cp)
    try:
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        cp.step(0)
        lr_at_step = float(opt.param_groups[0]["lr"])
        params_at_step = [p.detach().clone() for p in model.parameters()]
        sched.step()           # fills the lr tensor in place, before the copy has run
        counter.seen.add_(1)
        gate.open()
        assert cp.wait(30)
        cp.close()
        assert gate.violations == []

        model2, opt2, sched2, counter2 = _lr_tensor_setup()
        with _no_daemon(tmp_path, model2, opt2, job, scheduler=sched2,
                        extra={"counter": counter2}) as cp2:
            assert cp2.restore() == 1
        assert sched2.last_epoch == 0  # sched.step() came after the snapshot
        assert float(opt2.param_groups[0]["lr"]) == lr_at_step
        _assert_counter_and_params_as_of_step(counter2, model2, params_at_step)
    finally:
        gate.open()
        cp.close()
        clean_up_job(tmp_path, job)


# -- C: a copy that outlives wait_timeout_s never writes into a released slot -------------


def test_close_waits_for_a_copy_late_past_wait_timeout_before_unlocking_or_unmapping(
        tmp_path, caplog):
    job = _job("c")
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cp = _no_daemon(tmp_path, model, opt, job, wait_timeout_s=0.05)
    gate = _gate(cp)
    opener = threading.Timer(0.5, gate.open)  # the copy ends well after wait_timeout_s
    try:
        model(torch.randn(2, 64)).sum().backward()
        opt.step()
        cp.step(0)
        opener.start()
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="ckpt"):
            with contextlib.suppress(CkptError):  # the committer's timeout may surface here
                cp.close()
        closed_after_s = time.monotonic() - t0
        opener.join()
        gate.wait_copies(10)
        assert gate.violations == []  # the slot was still ours and mapped when the copy ran
        assert closed_after_s >= 0.4  # close() returned only once the copy had ended
        assert any("did not finish within 0.05 s" in r.getMessage() for r in caplog.records)
    finally:
        opener.cancel()
        gate.open()
        cp.close()
        clean_up_job(tmp_path, job)


# -- B: step() never waits for the daemon, hung (SIGSTOP) or dead (SIGKILL) ---------------


def _daemon_checkpointer(tmp_path, job, **options):
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cp = Checkpointer(model, opt, dir=tmp_path / "ckpt", job=job,
                      daemon_socket=tmp_path / "daemon.sock", persist_every=0,
                      daemon_timeout_s=1.0, daemon_retry_s=0.2, **options)
    assert cp.restore() == 0  # starts the node daemon
    return cp, model, opt, int((tmp_path / "daemon.pid").read_text().split()[0])


def _timed_steps(cp, model, opt, steps, pause_s=0.02) -> float:
    """Train ``steps``; the slowest step() call, in seconds."""
    slowest = 0.0
    for s in steps:
        model(torch.randn(4, 32)).sum().backward()
        opt.step()
        opt.zero_grad()
        t0 = time.perf_counter()
        cp.step(s)
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(pause_s)
    return slowest


def _spy_on_commits(cp) -> list[int]:
    """The steps whose Commit the daemon answered (appended on the notifier thread)."""
    answered: list[int] = []
    commit = cp.link.commit

    def spy(slot, step, seq, **kwargs):
        errors = cp.link.errors
        out = commit(slot, step, seq, **kwargs)
        if cp.link.errors == errors and cp.link.connected:
            answered.append(step)
        return out

    cp.link.commit = spy
    return answered


def _train_until_commits_reach_the_daemon(cp, model, opt, answered, first, within_s):
    """Train from step ``first`` until the daemon answers a Commit of one of them;
    (whether it did, the slowest step() call)."""
    deadline, step, slowest = time.monotonic() + within_s, first, 0.0
    while time.monotonic() < deadline:
        slowest = max(slowest, _timed_steps(cp, model, opt, [step], pause_s=0.05))
        step += 1
        if any(s >= first for s in answered):
            return True, slowest
    return False, slowest


def test_step_stays_fast_while_the_daemon_is_hung_and_commits_resume_after_sigcont(
        tmp_path, caplog):
    job = _job("b")
    # wait_timeout_s=2: on a step() that waits for the daemon, fail in seconds, not minutes.
    cp, model, opt, pid = _daemon_checkpointer(tmp_path, job, wait_timeout_s=2.0)
    answered = _spy_on_commits(cp)
    try:
        _timed_steps(cp, model, opt, range(3))  # step(0) waits for its segment
        assert cp.wait(10) and cp.stats.daemon_errors == 0
        os.kill(pid, signal.SIGSTOP)
        try:
            with caplog.at_level(logging.WARNING, logger="ckpt"):
                # Commit RPCs hang for daemon_timeout_s (1 s), then reconnects wait for it.
                slowest = _timed_steps(cp, model, opt, range(3, 40), pause_s=0.05)
                assert slowest < 0.3, f"a step() took {slowest:.2f} s with the daemon hung"
                assert cp.stats.snapshots_taken == 40 and cp.stats.last_committed_step == 39
        finally:
            os.kill(pid, signal.SIGCONT)
        assert sum("daemon is unavailable" in r.getMessage() for r in caplog.records) == 1
        assert cp.stats.daemon_errors >= 1
        # Back: later snapshots reach the daemon again.
        reached, slowest = _train_until_commits_reach_the_daemon(cp, model, opt, answered,
                                                                 40, within_s=8)
        assert reached, f"no Commit after SIGCONT was answered (answered: {answered})"
        assert slowest < 0.3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        cp.close()
        clean_up_job(tmp_path, job)


def test_step_stays_fast_while_a_killed_daemon_is_being_restarted(tmp_path):
    job = _job("k")
    cp, model, opt, pid = _daemon_checkpointer(tmp_path, job, wait_timeout_s=2.0)
    answered = _spy_on_commits(cp)
    try:
        _timed_steps(cp, model, opt, range(3))
        assert cp.wait(10)
        os.kill(pid, signal.SIGKILL)
        # The link reconnects after daemon_retry_s, which starts a new daemon (seconds).
        reached, slowest = _train_until_commits_reach_the_daemon(cp, model, opt, answered,
                                                                 3, within_s=8)
        assert slowest < 0.3, f"a step() took {slowest:.2f} s while the daemon was restarted"
        assert reached, f"the restarted daemon answered no Commit (answered: {answered})"
    finally:
        cp.close()
        clean_up_job(tmp_path, job)


# -- D: close() snapshots a step skipped for want of a segment as it was at that step ------


def _bn_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), _Counter()


def test_close_saves_the_step_skipped_without_segment_with_that_steps_rng_buffers_and_extras(
        tmp_path, monkeypatch):
    import ckpt.hook.segments as segments

    job = _job("d")
    segment_may_arrive, segment_made = threading.Event(), threading.Event()
    acquire = segments.acquire_segment

    def slow_acquire(*args, **kwargs):  # a big segment: still being made at step(0)
        segment_may_arrive.wait(30)
        try:
            return acquire(*args, **kwargs)
        finally:
            segment_made.set()

    monkeypatch.setattr(segments, "acquire_segment", slow_acquire)
    model, opt, counter = _bn_setup()
    cp = _no_daemon(tmp_path, model, opt, job, segment_wait_s=0, extra={"counter": counter})
    try:
        model(torch.randn(8, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
        cp.step(0)
        assert cp.stats.snapshots_skipped == 1
        rng_at_step = torch.get_rng_state()
        bn_at_step = model[1].running_mean.clone()
        params_at_step = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():  # e.g. an evaluation pass in train mode: RNG and BN move on
            model(torch.randn(8, 16))
        counter.seen.add_(1)
        segment_may_arrive.set()
        cp.close()
        assert cp.stats.snapshots_taken == 1 and cp.stats.last_committed_step == 0

        monkeypatch.setattr(segments, "acquire_segment", acquire)
        model2, opt2, counter2 = _bn_setup()
        with _no_daemon(tmp_path, model2, opt2, job, extra={"counter": counter2}) as cp2:
            assert cp2.restore() == 1
            assert torch.equal(torch.get_rng_state(), rng_at_step)
        assert torch.equal(model2[1].running_mean, bn_at_step)
        _assert_counter_and_params_as_of_step(counter2, model2, params_at_step)
    finally:
        segment_may_arrive.set()
        cp.close()
        segment_made.wait(10)  # created even when nobody takes it any more
        clean_up_job(tmp_path, job)



# -- E: without a daemon, a generation outgrown by the state is unlinked once replaced -----


def _growing_setup(grown: bool):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
    model = torch.nn.Sequential(a, b)
    opt = torch.optim.Adam(a.parameters(), lr=1e-3)
    if grown:
        opt.add_param_group({"params": b.parameters(), "lr": 1e-4})
    return model, opt, b


def test_an_outgrown_segment_generation_is_unlinked_once_the_next_holds_a_snapshot(tmp_path):
    job = _job("e")
    model, opt, b = _growing_setup(False)
    cp = _no_daemon(tmp_path, model, opt, job)
    try:
        for s in range(4):
            if s == 2:  # the state grows past the slots of generation 0
                opt.add_param_group({"params": b.parameters(), "lr": 1e-4})
            model(torch.randn(4, 256)).sum().backward()
            opt.step()
            opt.zero_grad()
            cp.step(s)
            assert cp.wait(30)
            if s == 1:
                assert [n.rsplit("-", 1)[1] for n in _shm_files(job)] == ["g0"]
        assert cp.stats.snapshots_taken == 4
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        cp.close()
        assert [n.rsplit("-", 1)[1] for n in _shm_files(job)] == ["g1"]

        model2, opt2, _ = _growing_setup(True)
        with _no_daemon(tmp_path, model2, opt2, job) as cp2:
            assert cp2.restore() == 4
        for k, v in model2.state_dict().items():
            assert torch.equal(v, expected[k])
    finally:
        cp.close()
        clean_up_job(tmp_path, job)
