"""Register with the node daemon: a big segment is not mistaken for a dead daemon."""

from __future__ import annotations

import os
import time
from pathlib import Path

from harness import clean_up_job

from ckpt import _C
from ckpt.config import CheckpointerConfig
from ckpt.hook.daemon_link import DaemonLink, register_timeout_s


def test_the_register_deadline_grows_with_the_segment_it_may_create():
    assert register_timeout_s(10.0, 0) == 10.0
    assert register_timeout_s(10.0, 1 << 30) > 10.0 + 14  # 2 GiB of slots: > 14 s more
    assert register_timeout_s(1.0, 1 << 30) - 1.0 == register_timeout_s(10.0, 1 << 30) - 10.0


def test_a_segment_slower_to_create_than_the_rpc_timeout_comes_from_the_daemon(tmp_path: Path):
    """daemon_timeout_s=0.05 s, but the daemon needs longer to create and pre-fault 2 x 512 MiB:
    the trainer still gets the daemon's segment rather than making one of its own."""
    job = f"reg{os.getpid()}-{time.monotonic_ns() % 10**9}"
    cfg = CheckpointerConfig(dir=tmp_path / "ckpt", job=job, daemon_socket=tmp_path / "daemon.sock",
                             daemon_timeout_s=0.05)
    link = DaemonLink(cfg, rank=0, world_size=1)
    try:
        link._connect()  # starts the daemon (its own, longer, start-up timeout)
        t0 = time.monotonic()
        grant = link.register(512 << 20)
        took_s = time.monotonic() - t0
        assert grant.from_daemon and link.errors == 0
        seg = _C.Segment.open(grant.name, populate=False)
        assert seg.slot_bytes >= 512 << 20
        seg.close()
        print(f"Register of 2 x 512 MiB took {took_s:.2f} s (RPC timeout 0.05 s)")
    finally:
        link.close()
        clean_up_job(tmp_path, job)
