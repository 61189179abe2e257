from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import kill_daemons_under, shm_names  # noqa: E402


@pytest.fixture
def run_dir(tmp_path: Path):
    """A private directory for one test's checkpoints and daemon socket; cleaned up after.

    Trainers started with ``worker_args(run_dir, ...)`` use the job id
    ``run_dir.name``, so only this test's shared-memory segments are removed.
    """
    yield tmp_path
    kill_daemons_under(tmp_path)
    for name in shm_names():
        if f"-{tmp_path.name}-" in name:
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass
