"""Where the daemon listens and how its shared-memory segments are named.

INTERNALS.md §5: the socket is ``$CKPT_DAEMON_SOCKET``, else
``$XDG_RUNTIME_DIR/ckpt/daemon.sock``, else ``/tmp/ckpt-<uid>/daemon.sock``. Its
directory is created 0700 and must belong to this user (a directory in /tmp that
someone else made first would let them intercept the socket); the socket is
chmod 0600 after bind. INTERNALS.md §2: segment names are
``/ckpt-<uid>-<job>-r<rank>-g<generation>``.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ckpt.errors import ConfigError

SOCKET_ENV = "CKPT_DAEMON_SOCKET"
SOCKET_NAME = "daemon.sock"

_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SEGMENT_RE = re.compile(r"^/?ckpt-(\d+)-(.+)-r(\d+)-g(\d+)$")


def default_socket_path() -> Path:
    """The socket a daemon of this user listens on when none is named."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "ckpt" / SOCKET_NAME
    return Path(f"/tmp/ckpt-{os.getuid()}") / SOCKET_NAME


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 (or check an existing one) and return it.

    Raises ConfigError when the directory belongs to another user; tightens the mode
    of our own directory when it is wider than 0700.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} must be a directory, found a link or a file; remove it or pick "
                          f"another socket path (--socket / ${SOCKET_ENV})")
    if st.st_uid != os.getuid():
        raise ConfigError(f"socket directory {path} belongs to uid {st.st_uid}, not to you "
                          f"(uid {os.getuid()}); refusing to use it. Pick another socket path "
                          f"(--socket / ${SOCKET_ENV})")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def sidecar_path(socket_path: Path, suffix: str) -> Path:
    """A file beside the socket: ``daemon.sock`` -> ``daemon.<suffix>`` (pid, log, lock)."""
    socket_path = Path(socket_path)
    return socket_path.with_name(f"{socket_path.stem}.{suffix}")


def check_job(job: str) -> str:
    """Validate a job id (it becomes part of shm and file names)."""
    if not isinstance(job, str) or not _JOB_RE.match(job):
        raise ConfigError(f"job id {job!r} is invalid: expected 1-128 characters of "
                          f"[A-Za-z0-9_.-] starting with a letter or digit")
    return job


def segment_name(job: str, rank: int, generation: int, uid: int | None = None) -> str:
    """The POSIX shm name of (job, rank)'s segment, with its leading slash."""
    check_job(job)
    if rank < 0 or generation < 0:
        raise ConfigError(f"rank and generation must be >= 0, got rank={rank}, "
                          f"generation={generation}")
    uid = os.getuid() if uid is None else uid
    return f"/ckpt-{uid}-{job}-r{rank}-g{generation}"


@dataclass(frozen=True)
class SegmentName:
    """A parsed segment name."""

    name: str  # with the leading slash
    uid: int
    job: str
    rank: int
    generation: int


def parse_segment_name(name: str) -> SegmentName | None:
    """Parse ``[/]ckpt-<uid>-<job>-r<rank>-g<gen>``; None when it is not one of ours."""
    m = _SEGMENT_RE.match(name)
    if not m or not _JOB_RE.match(m.group(2)):
        return None
    bare = name.lstrip("/")
    return SegmentName(name="/" + bare, uid=int(m.group(1)), job=m.group(2),
                       rank=int(m.group(3)), generation=int(m.group(4)))


def shm_file(name: str) -> Path:
    """Where Linux shows a POSIX shm object."""
    return Path("/dev/shm") / name.lstrip("/")
