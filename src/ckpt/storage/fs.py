"""Local/NFS filesystem storage: step directories, atomic commit, retention.

Layout of a checkpoint directory (docs/INTERNALS.md §4)::

    DIR/step-00000100/            complete step, appears by rename, has manifest.json
    DIR/.staging/step-00000100/   ranks write here first; rank-XXXXX.done when a rank is done

A step is visible under ``DIR`` only once complete: files are fsynced, the
manifest is written last under an O_EXCL ``manifest.lock``, and the staging
directory is renamed into place, then ``DIR`` is fsynced. Deleting a step
renames it into ``.staging`` first, so no half-deleted step is ever visible.
Entries whose names do not match ``step-%08d`` are foreign and never touched.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ckpt.errors import ConfigError, CorruptCheckpointError, StorageFullError
from ckpt.procs import pid_alive

STAGING_DIRNAME = ".staging"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = "manifest.lock"
MANIFEST_FORMAT = "ckpt/1"
MAX_MANIFEST_BYTES = 64 << 20  # ~150 bytes a rank: room for 400k ranks
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_DONE_RE = re.compile(r"^rank-(\d{5,})\.done$")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def step_dirname(step: int) -> str:
    if step < 0:
        raise ConfigError(f"step must be >= 0, got {step}")
    return "step-%08d" % step


def parse_step_dirname(name: str) -> int | None:
    """The step of a ``step-%08d`` name, or None for any other (foreign) name."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def done_marker_name(rank: int) -> str:
    return "rank-%05d.done" % rank


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def full_error(exc: OSError, path: Path, written_bytes: int,
               needed_bytes: int) -> StorageFullError:
    """A StorageFullError naming ``path`` and how much more space the file needed."""
    what = {errno.EFBIG: "file size limit reached"}.get(exc.errno, "no space left on device")
    return StorageFullError(
        exc.errno, f"{what} writing {path}: {written_bytes} bytes written, {needed_bytes} more "
        f"bytes needed for this file (less if it compresses); the filesystem has "
        f"{free_bytes(path.parent)} bytes free. Free space or lower the retention (keep=); "
        f"earlier complete steps are untouched and this step was not committed")


def is_full_error(exc: OSError) -> bool:
    return exc.errno in _FULL_ERRNOS


@dataclass(frozen=True)
class StepInfo:
    """One step directory found under a checkpoint directory."""

    step: int
    path: Path
    complete: bool          # final dir with a readable manifest of this step
    staging: bool           # lives under .staging (still being written, or abandoned)
    size_bytes: int
    world_size: int | None  # from the manifest, or a done marker, when known
    mtime_unix_s: float
    problem: str | None = None  # why a step whose manifest.json exists is not complete


class Storage(Protocol):
    """What ckpt.format needs from a storage backend (the filesystem is the first)."""

    root: Path

    def staging_dir(self, step: int) -> Path: ...
    def step_dir(self, step: int) -> Path: ...
    def step_is_complete(self, step: int) -> bool:
        """True when ``step`` is committed here with a readable manifest of that step."""
        try:
            return read_manifest(self.step_dir(step)).get("step") == step
        except CorruptCheckpointError:
            return False

    def begin_step(self, step: int) -> Path: ...
    def mark_rank_done(self, step: int, rank: int, info: dict[str, Any]) -> None: ...
    def done_markers(self, step: int) -> dict[int, dict[str, Any]]: ...
    def commit_step(self, step: int, manifest: dict[str, Any]) -> Path | None: ...
    def abort_step(self, step: int) -> None: ...
    def list_steps(self) -> list[StepInfo]: ...
    def keep_newest(self, k: int) -> list[Path]: ...
    def clean_stale_staging(self) -> list[Path]: ...


# What every "is damaged" error ends with: what restore does, and what the user can do.
DAMAGED_ADVICE = "restore uses an older step; delete the step dir or re-persist it"
_MAX_U32 = (1 << 32) - 1


def damaged(where: str, what: str) -> CorruptCheckpointError:
    """The error for a step file whose contents are inconsistent (``where`` names it)."""
    return CorruptCheckpointError(f"{where} is damaged: {what}; {DAMAGED_ADVICE}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_plain_file_name(value: Any) -> bool:
    """A name of a file in the step directory itself (no path, no '..', no NUL)."""
    return (isinstance(value, str) and 0 < len(value) <= 255 and value not in (".", "..")
            and "/" not in value and "\0" not in value)


def check_manifest(manifest: dict[str, Any], path: str
                   ) -> tuple[int, int, dict[int, dict[str, Any]]]:
    """(step, world_size, {rank: entry}) of a parsed manifest.json, every field type-checked.

    The manifest has no checksum of its own, so nothing in it is trusted: a field of the
    wrong type or range raises CorruptCheckpointError naming ``path`` and the field.
    Cost: O(world_size).
    """
    step, world_size, ranks = (manifest.get(k) for k in ("step", "world_size", "ranks"))
    if not _is_int(step) or step < 0:
        raise damaged(path, f'"step" is {step!r}, expected an integer >= 0')
    if not _is_int(world_size) or world_size < 1:
        raise damaged(path, f'"world_size" is {world_size!r}, expected an integer >= 1')
    if not isinstance(ranks, dict):
        raise damaged(path, f'"ranks" is a {type(ranks).__name__}, expected an object')
    if len(ranks) != world_size:  # checked before anything is sized by world_size
        raise damaged(path, f'"ranks" lists {len(ranks)} ranks for "world_size" {world_size}')
    out: dict[int, dict[str, Any]] = {}
    for key, info in ranks.items():
        rank = int(key) if key.isascii() and key.isdigit() else -1
        if not 0 <= rank < world_size or rank in out:
            raise damaged(path, f'"ranks" has key {key!r}, expected each of 0..{world_size - 1} '
                                f"once")
        field = f'"ranks"/"{key}"'
        if not isinstance(info, dict):
            raise damaged(path, f"{field} is a {type(info).__name__}, expected an object")
        for name in ("meta", "data"):
            if not is_plain_file_name(info.get(name)):
                raise damaged(path, f'{field}/"{name}" is {info.get(name)!r}, expected the '
                                    f"name of a file in the step directory")
        crc, size = info.get("meta_crc32c"), info.get("data_bytes")
        if not _is_int(crc) or not 0 <= crc <= _MAX_U32:
            raise damaged(path, f'{field}/"meta_crc32c" is {crc!r}, expected a 32-bit unsigned '
                                f"integer")
        if not _is_int(size) or size < 0:
            raise damaged(path, f'{field}/"data_bytes" is {size!r}, expected an integer >= 0')
        out[rank] = info
    return step, world_size, out


def _read_manifest_bytes(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file of sane size; CorruptCheckpointError
    otherwise. Never follows a symlink or blocks on a FIFO (O_NOFOLLOW | O_NONBLOCK)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing: the step was never committed or was "
                                     f"damaged; use an earlier step") from None
    except OSError as exc:
        what = "a symbolic link" if exc.errno == errno.ELOOP else f"unreadable ({exc})"
        raise damaged(str(path), f"it is {what}, not a regular file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise damaged(str(path), "it is not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise damaged(str(path), f"it is {st.st_size} bytes, a manifest is at most "
                                     f"{MAX_MANIFEST_BYTES}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_MANIFEST_BYTES + 1)
    except CorruptCheckpointError:
        raise
    except OSError as exc:
        raise damaged(str(path), f"it cannot be read ({exc})") from None
    finally:
        os.close(fd)


def read_manifest(step_path: Path) -> dict[str, Any]:
    """Parse ``step_path/manifest.json``; CorruptCheckpointError naming the file if bad.

    Checks the format only; ``ckpt.format.metadata.check_manifest`` checks the fields.
    """
    path = step_path / MANIFEST_NAME
    raw = _read_manifest_bytes(path)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CorruptCheckpointError(
            f"{path} has format {found!r}, this ckpt reads {MANIFEST_FORMAT!r}: written by "
            f"another tool or ckpt version")
    return manifest


def _write_synced(path: Path, data: bytes, flags: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            if is_full_error(exc):
                raise full_error(exc, path, len(data) - len(view), len(view)) from None
            raise
    finally:
        os.close(fd)


class FsStorage:
    """Checkpoint directory on a local or network filesystem. Safe for many writer processes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def staging_dir(self, step: int) -> Path:
        return self.root / STAGING_DIRNAME / step_dirname(step)

    def step_dir(self, step: int) -> Path:
        return self.root / step_dirname(step)

    def step_is_complete(self, step: int) -> bool:
        """True when ``step`` is committed here with a readable manifest of that step."""
        try:
            return read_manifest(self.step_dir(step)).get("step") == step
        except CorruptCheckpointError:
            return False

    def begin_step(self, step: int) -> Path:
        """Create (if needed) and return the staging directory of ``step``. Any rank may call."""
        path = self.staging_dir(step)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mark_rank_done(self, step: int, rank: int, info: dict[str, Any]) -> None:
        """Record that ``rank``'s files of ``step`` are written and fsynced (called last)."""
        staging = self.staging_dir(step)
        tmp = staging / (done_marker_name(rank) + ".tmp")
        _write_synced(tmp, json.dumps(info).encode(), os.O_TRUNC)
        os.rename(tmp, staging / done_marker_name(rank))
        fsync_dir(staging)

    def done_markers(self, step: int) -> dict[int, dict[str, Any]]:
        staging = self.staging_dir(step)
        markers: dict[int, dict[str, Any]] = {}
        try:
            names = os.listdir(staging)
        except FileNotFoundError:
            return markers
        for name in names:
            m = _DONE_RE.match(name)
            if m:
                try:
                    marker = json.loads((staging / name).read_text())
                except (OSError, ValueError):
                    continue  # renamed away by a committer, or unreadable: not done
                if isinstance(marker, dict):
                    markers[int(m.group(1))] = marker
        return markers

    def _take_lock(self, staging: Path) -> bool:
        lock = staging / LOCK_NAME
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        for _ in range(2):
            try:
                _write_synced(lock, owner, os.O_EXCL)
                return True
            except FileExistsError:
                try:
                    holder = json.loads(lock.read_text())
                except (OSError, ValueError):
                    return False  # being written right now, or gone with the rename
                if holder.get("host") != socket.gethostname() or pid_alive(int(holder["pid"])):
                    return False
                lock.unlink(missing_ok=True)  # its committer died before the rename
            except FileNotFoundError:
                return False  # the staging dir was renamed into place by another committer
        return False

    def commit_step(self, step: int, manifest: dict[str, Any]) -> Path | None:
        """Write the manifest and rename the staging dir into place, atomically.

        Returns the final path when this call committed the step or found it
        already committed; None when another process holds the lock (it commits).
        """
        staging, final = self.staging_dir(step), self.step_dir(step)
        if not self._take_lock(staging):
            return final if (final / MANIFEST_NAME).exists() else None
        try:
            _write_synced(staging / MANIFEST_NAME, json.dumps(manifest, indent=1).encode(),
                          os.O_TRUNC)
            fsync_dir(staging)
            if final.exists():
                read_manifest(final)  # raises if the existing dir is not a complete step
                self._remove(staging)
                return final
            os.rename(staging, final)
        except BaseException:
            (staging / LOCK_NAME).unlink(missing_ok=True)
            raise
        # The manifest holds what the markers said; they, the lock, and temporary files of
        # writers that died (".tmp-") are no longer needed.
        for name in os.listdir(final):
            if name == LOCK_NAME or _DONE_RE.match(name) or ".tmp-" in name:
                (final / name).unlink(missing_ok=True)
        fsync_dir(final)
        fsync_dir(self.root)
        fsync_dir(self.root / STAGING_DIRNAME)
        return final

    def abort_step(self, step: int) -> None:
        """Remove the staging directory of ``step`` (after a failed write)."""
        self._remove(self.staging_dir(step))

    def _remove(self, path: Path) -> None:
        """Make ``path`` disappear atomically (rename into .staging), then delete it."""
        if not path.exists():
            return
        trash_name = f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
        trash = self.root / STAGING_DIRNAME / trash_name
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def list_steps(self) -> list[StepInfo]:
        """Every step directory (complete, incomplete and staging), sorted by step then staging."""
        found: list[StepInfo] = []
        for parent, staging in ((self.root, False), (self.root / STAGING_DIRNAME, True)):
            try:
                entries = list(os.scandir(parent))
            except FileNotFoundError:
                continue
            for entry in entries:
                step = parse_step_dirname(entry.name)
                if step is None or not entry.is_dir(follow_symlinks=False):
                    continue
                found.append(self._step_info(step, Path(entry.path), staging))
        return sorted(found, key=lambda s: (s.step, s.staging))

    def _step_info(self, step: int, path: Path, staging: bool) -> StepInfo:
        size = 0
        world_size = None
        mtime = 0.0
        try:
            for f in os.scandir(path):
                if f.is_file(follow_symlinks=False):
                    st = f.stat(follow_symlinks=False)
                    size += st.st_size
                    mtime = max(mtime, st.st_mtime)
        except OSError:
            pass  # removed meanwhile, or unreadable: the size is a hint only
        complete = False
        problem = None
        if not staging:
            try:
                manifest = read_manifest(path)
                world_size = manifest.get("world_size")
                check_manifest(manifest, str(path / MANIFEST_NAME))
                complete = manifest.get("step") == step
                if not complete:
                    problem = (f"{path / MANIFEST_NAME} is of step {manifest.get('step')!r}, "
                               f"not {step}")
            except CorruptCheckpointError as exc:
                if os.path.lexists(path / MANIFEST_NAME):
                    problem = str(exc)  # else never committed: incomplete, not damaged
        else:
            markers = self.done_markers(step)
            if markers:
                world_size = next(iter(markers.values())).get("world_size")
        if not isinstance(world_size, int) or isinstance(world_size, bool):
            world_size = None  # a damaged manifest or marker: unknown
        return StepInfo(step, path, complete, staging, size, world_size, mtime, problem)

    def newest_complete(self) -> StepInfo | None:
        complete = [s for s in self.list_steps() if s.complete]
        return complete[-1] if complete else None

    def keep_newest(self, k: int) -> list[Path]:
        """Delete complete steps older than the newest ``k`` (k >= 1). Returns what was removed.

        Incomplete and foreign directories are left alone; the newest complete
        step is never deleted.
        """
        if k < 1:
            raise ConfigError(
                f"keep must be >= 1 (the newest complete step is always kept), got {k}")
        complete = [s for s in self.list_steps() if s.complete]
        removed = []
        for info in complete[:-k]:
            self._remove(info.path)
            removed.append(info.path)
        if removed:
            fsync_dir(self.root)
        return removed

    def clean_stale_staging(self) -> list[Path]:
        """Remove staging dirs of steps not newer than the newest complete step, and trash."""
        newest = self.newest_complete()
        removed = []
        staging_root = self.root / STAGING_DIRNAME
        try:
            entries = list(os.scandir(staging_root))
        except FileNotFoundError:
            return removed
        for entry in entries:
            step = parse_step_dirname(entry.name)
            if entry.name.startswith(".trash-step-"):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
            elif step is not None and newest is not None and step <= newest.step:
                self._remove(Path(entry.path))
                removed.append(Path(entry.path))
        return removed


def list_steps(root: str | os.PathLike[str]) -> list[StepInfo]:
    return FsStorage(root).list_steps()


def keep_newest(root: str | os.PathLike[str], k: int) -> list[Path]:
    return FsStorage(root).keep_newest(k)
