"""``ensure_daemon``: reach this node's daemon, starting one if none answers.

Used by the Checkpointer (the embedded default) and by tests. Several ranks of a node
may call it at once: they serialise on an flock beside the socket, re-check, and only
the first one starts a daemon. The daemon is started through a short-lived launcher
process so that it is not our child (no zombie when it dies, and it outlives the
trainer): ``python -m ckpt.daemon.server --socket PATH`` in a new session, stdin from
/dev/null, stdout and stderr appended to ``daemon.log`` beside the socket.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import ckpt
from ckpt.control.client import DaemonClient
from ckpt.control.paths import default_socket_path, ensure_private_dir, sidecar_path
from ckpt.errors import DaemonUnavailableError
from ckpt.procs import pid_alive

_POLL_S = 0.05

# Runs in the launcher: start the daemon detached, print its pid, exit at once.
_LAUNCHER = """
import subprocess, sys
log = open(sys.argv[1], "ab", buffering=0)
p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                     start_new_session=True, close_fds=True)
print(p.pid, flush=True)
"""


def _log_tail(path: Path, nbytes: int = 2000) -> str:
    try:
        data = path.read_bytes()[-nbytes:]
    except OSError:
        return "(no log)"
    return data.decode(errors="replace").strip() or "(empty log)"


def _src_root() -> str:
    return str(Path(ckpt.__file__).absolute().parent.parent)


def _launch(socket_path: Path, extra_args: tuple[str, ...]) -> tuple[int, Path]:
    log_path = sidecar_path(socket_path, "log")
    cmd = [sys.executable, "-m", "ckpt.daemon.server", "--socket", str(socket_path),
           *extra_args]
    env = dict(os.environ)
    # The daemon must import this same ckpt (an in-place build, a checkout on PYTHONPATH).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_src_root(), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, str(log_path), *cmd], env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False,
                         cwd="/")
    if out.returncode != 0:
        raise DaemonUnavailableError(f"could not launch a ckpt daemon for {socket_path}: "
                                     f"{out.stderr.decode(errors='replace').strip()}")
    return int(out.stdout.split()[0]), log_path


def _other_daemon_running(socket_path: Path) -> bool:
    """Whether the pid file names a live process (a daemon that may still be starting).

    Reads the pid rather than probing the daemon's flock: a probe could make a daemon that
    is taking its lock at that instant believe another one runs.
    """
    try:
        pid = int(sidecar_path(socket_path, "pid").read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    return pid > 0 and pid_alive(pid)


def ensure_daemon(socket_path: str | Path | None = None, timeout_s: float = 10.0,
                  extra_args: tuple[str, ...] = (), client_timeout_s: float = 10.0
                  ) -> DaemonClient:
    """A client of the daemon on ``socket_path``, started (detached) if none answers.

    Blocks at most ``timeout_s``. Raises DaemonUnavailableError (with the tail of the
    daemon's log) when no daemon answers in time or the one started exits.
    ``extra_args`` are passed to ``ckpt daemon`` when this call starts it.
    """
    socket_path = Path(socket_path) if socket_path else default_socket_path()
    socket_path = socket_path.absolute()
    deadline = time.monotonic() + timeout_s
    client = DaemonClient(socket_path, timeout_s=client_timeout_s)
    if client.ping(timeout_s=min(1.0, timeout_s)):
        return client
    ensure_private_dir(socket_path.parent)
    lock_fd = os.open(sidecar_path(socket_path, "spawn.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    client.close()
                    raise DaemonUnavailableError(
                        f"timed out after {timeout_s} s waiting for another process to start "
                        f"the ckpt daemon on {socket_path}") from None
                time.sleep(_POLL_S)
        # Someone may have started it while we waited for the lock.
        if client.ping(timeout_s=0.5):
            return client
        # A live daemon that is slow to answer (starting, or a loaded machine): wait for it
        # rather than start a second one.
        while _other_daemon_running(socket_path) and time.monotonic() < deadline:
            if client.ping(timeout_s=0.5):
                return client
            time.sleep(_POLL_S)
        if _other_daemon_running(socket_path):
            client.close()
            raise DaemonUnavailableError(
                f"the ckpt daemon named by {sidecar_path(socket_path, 'pid')} is running but did "
                f"not answer on {socket_path} within {timeout_s} s; see "
                f"{sidecar_path(socket_path, 'log')}, or stop it and remove the pid file")
        pid, log_path = _launch(socket_path, tuple(extra_args))
        while time.monotonic() < deadline:
            if client.ping(timeout_s=0.5):
                return client
            if not pid_alive(pid) and not _other_daemon_running(socket_path):
                if client.ping(timeout_s=0.5):
                    return client
                client.close()
                raise DaemonUnavailableError(
                    f"the ckpt daemon started for {socket_path} (pid {pid}) exited; its log "
                    f"{log_path} ends with:\n{_log_tail(log_path)}")
            time.sleep(_POLL_S)
        client.close()
        raise DaemonUnavailableError(
            f"the ckpt daemon started for {socket_path} (pid {pid}) did not answer within "
            f"{timeout_s} s; its log {log_path} ends with:\n{_log_tail(log_path)}")
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
