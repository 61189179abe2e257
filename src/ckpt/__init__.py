"""ckpt: fault-tolerant checkpointing for PyTorch training.

``ckpt.Checkpointer`` snapshots every training step into memory owned by a
per-node daemon, persists in the background, and restores bit-exactly.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ckpt import errors  # noqa: E402,F401


def __getattr__(name: str):
    # Lazy: importing ckpt (e.g. for the CLI or the daemon) must not import torch.
    if name == "Checkpointer":
        from ckpt.hook.checkpointer import Checkpointer

        return Checkpointer
    if name == "PipelinePosition":
        from ckpt.recovery.checkfree.position import PipelinePosition

        return PipelinePosition
    raise AttributeError(f"module 'ckpt' has no attribute {name!r}")
