"""Storage backends for persisted checkpoints (local/NFS filesystem first)."""

from ckpt.storage.fs import (  # noqa: F401
    FsStorage,
    StepInfo,
    Storage,
    keep_newest,
    list_steps,
    read_manifest,
    step_dirname,
)
