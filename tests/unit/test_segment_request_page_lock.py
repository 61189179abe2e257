"""SegmentRequest(page_lock=True), asked for when the state has CUDA tensors: the segment is
page-locked off the training thread, and when CUDA refuses (here: no GPU) the segment still
arrives, with a warning that says what to do, and the stager does not try again."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from harness import clean_up_job

from ckpt.config import CheckpointerConfig
from ckpt.hook.daemon_link import DaemonLink
from ckpt.hook.segments import SegmentRequest
from ckpt.snapshot.stager import SlotStager


def cuda_usable() -> bool:
    try:
        from ckpt import _C_cuda
    except ImportError:
        return False
    return _C_cuda.available()


@pytest.mark.skipif(cuda_usable(), reason="page-locking succeeds where a GPU is usable")
def test_a_refused_page_lock_still_delivers_the_segment(tmp_path: Path, caplog) -> None:
    job = f"pl{os.getpid()}-{time.monotonic_ns() % 10**9}"
    cfg = CheckpointerConfig(dir=tmp_path / "ckpt", job=job, daemon_socket=tmp_path / "daemon.sock",
                             start_daemon=False, daemon_timeout_s=0.2)
    link = DaemonLink(cfg, rank=0, world_size=1)
    try:
        with caplog.at_level(logging.WARNING, logger="ckpt"):
            req = SegmentRequest(link, job, 0, 1 << 20, page_lock=True)
            seg = req.result(30)
        assert seg is not None and seg.slot_bytes >= 1 << 20
        assert req.page_locked is False  # tried, refused
        assert any("cannot page-lock" in r.getMessage() and "ulimit -l" in r.getMessage()
                   for r in caplog.records)
        stager = SlotStager(seg, engine=None, page_locked=req.page_locked)
        assert stager._page_locked is False  # tried: no second try on the training thread
        stager.close()
        seg.close()
    finally:
        link.close()
        clean_up_job(tmp_path, job)
