"""Process liveness, the one test every lock breaker and watcher uses."""

from __future__ import annotations

import psutil


def pid_alive(pid: int) -> bool:
    """True when ``pid`` names a running process (a zombie counts as dead; another
    user's live process, which we may not signal, counts as alive)."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
