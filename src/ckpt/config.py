"""Configuration of the training-loop hook (``ckpt.Checkpointer``).

One kw_only dataclass; every field is validated in ``__post_init__`` and a bad
value raises :class:`ckpt.errors.ConfigError` saying what was expected.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ckpt.errors import ConfigError

DEFAULT_CHUNK_BYTES = 4 << 20
_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def default_job_id(directory: Path) -> str:
    """A job id derived from the checkpoint directory, stable across restarts.

    ``$CKPT_JOB`` wins; else the directory's name plus a short hash of its absolute
    path, so two runs in different directories never share a segment.
    """
    env = os.environ.get("CKPT_JOB")
    if env:
        return env
    import zlib

    absolute = str(Path(directory).absolute())
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(absolute).name or "job")[:40].lstrip("_.-") or "job"
    return f"{base}-{zlib.crc32(absolute.encode()):08x}"


@dataclass(frozen=True, kw_only=True)
class CheckpointerConfig:
    """What ``Checkpointer`` does and where. All sizes in bytes, all times in seconds."""

    dir: Path
    """Where persisted steps go (``DIR/step-XXXXXXXX``)."""
    every: int = 1
    """Snapshot into memory every ``every`` calls of ``step()`` (step % every == 0)."""
    persist_every: int = 100
    """The daemon persists a committed snapshot to ``dir`` every this many steps; 0: only on
    ``close()``."""
    keep: int = 3
    """Retention on disk: keep the newest ``keep`` complete steps; 0 keeps all."""
    job: str = ""
    """Job id (names the shared-memory segments); "" derives it from ``dir``."""
    daemon_socket: Path | None = None
    """The daemon's Unix socket; None: ``$CKPT_DAEMON_SOCKET`` or the per-user default."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Unit of checksumming and compression; each tensor is cut into chunks of this size."""
    copy_threads: int = 1
    """Threads of the CPU copy engine."""
    copy_nice: int = 0
    """Priority of the CPU copy engine's workers, 0 (normal) to 19 (lowest): with a high
    value the copy runs when training threads leave a core idle and yields the moment
    they want it, instead of preempting one of them mid-parallel-region (which stalls
    every other thread at the region's barrier). Numerics are untouched; a copy that has
    not finished when the optimizer steps makes that step wait for it."""
    yield_cores: bool = False
    """While a CPU copy runs, give its cores up: torch runs with ``copy_threads`` fewer
    intra-op threads until the copy is done (checked at every module call), so the copy
    and training do not share a core (a shared core stalls every parallel region at its
    barrier). Measured on 2 cores: throughput 0.91-0.94 of no checkpointing instead of
    0.81-0.90. Off by default: CPU kernels may round differently with another thread
    count, and the switch happens when the copy ends, so a run is no longer bitwise
    reproducible (resume stays exact: the snapshot holds the state as it was)."""
    segment_wait_s: float = 1.0
    """How long a ``step()`` that needs a new segment (the first one, or a state that
    outgrew its slots) waits for it. The daemon reserves and pre-faults both slots, which
    takes seconds for a big state (3 GB: 5.6 s on the 2-core CI VM); past this wait the
    segment is finished in the background, those steps are not snapshotted (counted in
    ``stats.snapshots_skipped``) and snapshots start with the first step after it is ready.
    ``close()`` snapshots the last step if it was one of them."""
    start_daemon: bool = True
    """Start a node daemon (detached) when none answers; False: use one or go without."""
    daemon_timeout_s: float = 10.0
    """Deadline of each daemon call."""
    daemon_retry_s: float = 5.0
    """After a daemon error, wait this long before trying it again."""
    wait_timeout_s: float = 600.0
    """Upper bound of any wait for a copy or a commit (the optimizer pre-hook, close())."""
    persist_timeout_s: float = 600.0
    """How long ``close()`` waits for the final persist."""
    slot_headroom: float = 1.25
    """Registered slots are this much larger than the first payload, so small growth of the
    state (a new optimizer entry) does not need a new segment."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))
        if str(self.dir) == "":
            raise ConfigError("dir must name a directory for persisted checkpoints")
        for name in ("every", "copy_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.copy_nice, int) or isinstance(self.copy_nice, bool) \
                or not 0 <= self.copy_nice <= 19:
            raise ConfigError(f"copy_nice must be an int in [0, 19] (0 = normal priority, "
                              f"19 = lowest), got {self.copy_nice!r}")
        for name in ("persist_every", "keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0 (0 = {'only on close()' if name == 'persist_every' else 'keep all'}), got {value!r}")
        if not isinstance(self.chunk_bytes, int) or self.chunk_bytes < 4096 or self.chunk_bytes % 64:
            raise ConfigError(f"chunk_bytes must be an int >= 4096 and a multiple of 64, "
                              f"got {self.chunk_bytes!r} (default {DEFAULT_CHUNK_BYTES})")
        if not isinstance(self.segment_wait_s, (int, float)) or isinstance(self.segment_wait_s, bool) \
                or not self.segment_wait_s >= 0:
            raise ConfigError(f"segment_wait_s must be a number >= 0 (0: never wait for a new "
                              f"segment), got {self.segment_wait_s!r}")
        for name in ("daemon_timeout_s", "daemon_retry_s", "wait_timeout_s", "persist_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be a number > 0, got {value!r}")
        if not isinstance(self.slot_headroom, (int, float)) or self.slot_headroom < 1.0:
            raise ConfigError(f"slot_headroom must be >= 1.0, got {self.slot_headroom!r}")
        if not self.job:
            object.__setattr__(self, "job", default_job_id(self.dir))
        if not isinstance(self.job, str) or not _JOB_RE.match(self.job):
            raise ConfigError(f"job id {self.job!r} is invalid: expected 1-128 characters of "
                              f"[A-Za-z0-9_.-] starting with a letter or digit")
        if self.daemon_socket is not None:
            object.__setattr__(self, "daemon_socket", Path(self.daemon_socket))
