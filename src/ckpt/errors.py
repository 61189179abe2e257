"""The exceptions ckpt raises.

One root, :class:`CkptError`; each subclass also inherits the built-in that
matches it, so ``except ValueError`` and ``except OSError`` keep working for
callers that do not know ckpt. A message says what was expected, what was
found, and what to do.
"""

from __future__ import annotations


class CkptError(Exception):
    """Root of every error raised by ckpt."""


class ConfigError(CkptError, ValueError):
    """An argument or configuration value is invalid."""


class NativeError(CkptError, RuntimeError):
    """The native core (``ckpt._C``) reported a failure."""


class SegmentError(CkptError, OSError):
    """A shared-memory segment is missing, foreign, or has the wrong size."""


class SlotBusyError(SegmentError):
    """A slot is being written or read by another process."""


class CorruptChunkError(CkptError, IOError):
    """Bytes on disk or in memory do not match their recorded crc32c."""


class CorruptCheckpointError(CkptError, IOError):
    """A checkpoint directory is incomplete, truncated, or foreign."""


class StepNotFoundError(CkptError, FileNotFoundError):
    """No valid snapshot of the requested step exists in any tier."""


class DaemonUnavailableError(CkptError, ConnectionError):
    """The snapshot daemon cannot be reached."""


class LayoutMismatchError(CkptError, ValueError):
    """Stored tensors do not fit the model being restored (names, shapes, dtypes)."""


class ShardingMismatchError(LayoutMismatchError):
    """Stored tensors match the model's names, dtypes and global shapes but were written
    with another parallel layout (world size, sharding); restore reads them from disk
    box by box onto the live layout."""


class UnsupportedStateError(CkptError, TypeError):
    """A state_dict holds a value ckpt cannot store without pickle."""


class DaemonAuthError(CkptError, PermissionError):
    """The snapshot daemon refused the call: missing or wrong token."""


class StorageFullError(CkptError, OSError):
    """The filesystem ran out of space (or a file-size limit) while writing a checkpoint."""


class CodecError(CkptError, ValueError):
    """The erasure codec was given shards or a matrix it cannot use (unequal lengths,
    too few survivors, k + m > 256, a matrix that is not MDS, a read-only output)."""


class StageRebuildError(CkptError, ValueError):
    """CheckFree cannot rebuild a lost pipeline stage: an edge stage without CheckFree+,
    two adjacent stages lost together, a neighbour that is not available, or neighbours
    whose state dicts differ in keys, shapes or dtypes."""
