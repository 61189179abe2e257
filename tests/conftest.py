"""Shared pytest setup: the `slow` and `gpu` markers, skipping GPU tests when no CUDA
device is usable (checked without importing torch when possible), and the snapshot
template's self-check."""

from __future__ import annotations

import functools
import os
import sys

import pytest

# Every snapshot taken from a reused template is also collected the full way and compared
# (ckpt.hook.collect), here and in every worker process the tests start.
os.environ.setdefault("CKPT_CHECK_SNAPSHOT_TEMPLATE", "1")

_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
try:
    import ckpt  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, _SRC)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than ~20 s; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when none is present")


@functools.lru_cache(maxsize=1)
def cuda_device_usable() -> bool:
    """True when a CUDA device can be used by both ckpt._C_cuda and torch."""
    try:
        from ckpt import _C_cuda

        if not _C_cuda.available():
            return False
    except ImportError:
        pass  # built without nvcc: fall back to torch's view
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not cuda_device_usable():
        skip = pytest.mark.skip(reason="needs a CUDA device (none is usable here)")
        for item in gpu_items:
            item.add_marker(skip)


# tests/harness.py (trainer processes, torchrun launches) is imported as `harness`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_dir(tmp_path):
    """A private directory for one test's checkpoints and daemon socket; cleaned up after.

    Trainers started with ``harness.worker_args(run_dir, ...)`` use the job id
    ``run_dir.name``, so only this test's shared-memory segments are removed.
    """
    from harness import kill_daemons_under, shm_names

    yield tmp_path
    kill_daemons_under(tmp_path)
    for name in shm_names():
        if f"-{tmp_path.name}-" in name:
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass
