"""``ckpt daemon``: the per-node snapshot daemon process.

``main(argv)``::

    ckpt daemon [--socket PATH] [--listen-tcp HOST:PORT --token-file F]
                [--reclaim-orphans-after-s N] [--log-file F] [--watch-interval-s S]

Listens on a Unix socket (dir 0700, socket 0600; INTERNALS §5) and optionally on TCP,
which needs a token (``authorization: Bearer <token>``; the token file must be private).
Holds an flock on the pid file beside the socket for its whole life, so a second daemon
on the same socket refuses to start; a socket file left by a killed daemon is removed.
SIGTERM / SIGINT stop it cleanly; its segments stay in /dev/shm on purpose (a restarted
daemon adopts them). Does not import torch.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hmac
import logging
import os
import signal
import stat
import sys
from concurrent import futures
from pathlib import Path

import grpc

from ckpt.control import ckpt_pb2_grpc as pb_grpc
from ckpt.control.client import DaemonClient
from ckpt.control.paths import default_socket_path, ensure_private_dir, sidecar_path
from ckpt.control.servicer import SnapshotDaemonServicer
from ckpt.errors import CkptError, ConfigError

log = logging.getLogger("ckpt.daemon")

EXIT_OK, EXIT_ERROR, EXIT_ALREADY_RUNNING = 0, 1, 3


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (constant-time compare)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        got = metadata.get("authorization")
        if got is None:
            return _deny(grpc.StatusCode.UNAUTHENTICATED,
                         "missing 'authorization: Bearer <token>' metadata; this daemon's TCP "
                         "port needs the token from its --token-file")
        if not hmac.compare_digest(str(got).encode(), self._expected):
            return _deny(grpc.StatusCode.PERMISSION_DENIED,
                         "wrong token; use the content of the daemon's --token-file")
        return continuation(handler_call_details)


def _deny(code: grpc.StatusCode, message: str):
    def abort(request, context):
        context.abort(code, message)
    return grpc.unary_unary_rpc_method_handler(abort)


def read_token(path: str) -> str:
    """The token in ``path``; refuses an empty file or one others can read."""
    p = Path(path)
    try:
        st = p.stat()
        token = p.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read --token-file {path}: {e}") from e
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"--token-file {path} has mode {stat.S_IMODE(st.st_mode):o}; others "
                          f"could read the token. Run `chmod 600 {path}`")
    if not token:
        raise ConfigError(f"--token-file {path} is empty; put a random secret in it")
    return token


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckpt daemon", description="Per-node snapshot daemon.")
    p.add_argument("--socket", default=None,
                   help="Unix socket path (default: $CKPT_DAEMON_SOCKET, "
                        "$XDG_RUNTIME_DIR/ckpt/daemon.sock, /tmp/ckpt-<uid>/daemon.sock)")
    p.add_argument("--listen-tcp", default=None, metavar="HOST:PORT",
                   help="also listen on TCP (needs --token-file)")
    p.add_argument("--token-file", default=None, help="file holding the TCP token (mode 600)")
    p.add_argument("--reclaim-orphans-after-s", type=float, default=None, metavar="N",
                   help="unlink a segment whose trainer has been dead N seconds and whose "
                        "newest commit is persisted (default: never)")
    p.add_argument("--log-file", default=None, help="log here instead of stderr")
    p.add_argument("--state-dir", default=None,
                   help="daemon state (default: 'state' beside the socket)")
    p.add_argument("--watch-interval-s", type=float, default=1.0,
                   help="how often dead trainers and missed commits are checked")
    p.add_argument("--workers", type=int, default=16, help="gRPC worker threads")
    return p


def _setup_logging(log_file: str | None) -> None:
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s ckpt-daemon[%(process)d] "
                                           "%(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _lock_pid_file(pid_path: Path) -> int:
    """flock the pid file (held for the daemon's life) and write our pid into it."""
    fd = os.open(pid_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _AlreadyRunning(f"another ckpt daemon (pid {other}) holds {pid_path}") from e
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class _AlreadyRunning(CkptError):
    pass


def _check_no_live_daemon(socket_path: Path) -> None:
    """Refuse when a daemon answers on the socket; remove a stale socket file."""
    if not (socket_path.exists() or socket_path.is_symlink()):
        return
    with DaemonClient(socket_path, timeout_s=2.0) as client:
        if client.ping(timeout_s=1.0):
            raise _AlreadyRunning(f"a ckpt daemon already answers on {socket_path}")
    if not stat.S_ISSOCK(socket_path.lstat().st_mode):
        raise ConfigError(f"{socket_path} exists and is not a socket; remove it or pick "
                          f"another --socket")
    log.info("removing stale socket %s left by a daemon that is gone", socket_path)
    socket_path.unlink()


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def serve(args: argparse.Namespace) -> int:
    from ckpt.daemon.service import DaemonCore  # after argument checks: fast --help

    # Before any thread exists, so that every thread inherits the mask (see sigwait below).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    socket_path = Path(args.socket) if args.socket else default_socket_path()
    socket_path = socket_path.absolute()
    token = None
    if args.listen_tcp:
        if not args.token_file:
            raise ConfigError("--listen-tcp needs --token-file: the daemon never serves TCP "
                              "without a token. Create one with `head -c 32 /dev/urandom | "
                              "base64 > F; chmod 600 F`")
        token = read_token(args.token_file)
    ensure_private_dir(socket_path.parent)
    pid_fd = _lock_pid_file(sidecar_path(socket_path, "pid"))
    _check_no_live_daemon(socket_path)
    os.umask(0o077)
    state_dir = Path(args.state_dir) if args.state_dir else socket_path.parent / "state"
    core = DaemonCore(state_dir, str(socket_path), args.reclaim_orphans_after_s,
                      args.watch_interval_s)
    core.start()
    servicer = SnapshotDaemonServicer(core)
    options = [("grpc.max_send_message_length", 8 << 20)]
    servers = []
    unix_server = grpc.server(futures.ThreadPoolExecutor(args.workers, "ckpt-rpc"),
                              options=options)
    pb_grpc.add_SnapshotDaemonServicer_to_server(servicer, unix_server)
    unix_server.add_insecure_port(f"unix:{socket_path}")
    servers.append(unix_server)
    if args.listen_tcp:
        tcp_server = grpc.server(futures.ThreadPoolExecutor(args.workers, "ckpt-tcp"),
                                 interceptors=[TokenInterceptor(token)], options=options)
        pb_grpc.add_SnapshotDaemonServicer_to_server(servicer, tcp_server)
        port = tcp_server.add_insecure_port(args.listen_tcp)
        if port == 0:
            core.close()
            raise ConfigError(f"cannot listen on TCP {args.listen_tcp} (in use or invalid)")
        servers.append(tcp_server)
    for s in servers:
        s.start()
    os.chmod(socket_path, 0o600)
    log.info("ckpt daemon pid %d listening on unix:%s%s", os.getpid(), socket_path,
             f" and tcp:{args.listen_tcp}" if args.listen_tcp else "")
    # SIGTERM/SIGINT are blocked in every thread (serve's first line), so they stay
    # pending until this synchronous wait takes one. (A Python handler that sets an Event
    # deadlocks when the signal lands while the main thread holds that Event's lock.)
    sig = signal.sigwait(STOP_SIGNALS)
    log.info("%s: stopping (segments stay in /dev/shm)", signal.Signals(sig).name)
    for s in servers:
        s.stop(grace=2.0).wait(5.0)
    core.close()
    socket_path.unlink(missing_ok=True)
    sidecar_path(socket_path, "pid").unlink(missing_ok=True)
    os.close(pid_fd)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_file)
    try:
        return serve(args)
    except _AlreadyRunning as e:
        log.error("%s; not starting a second one", e)
        print(f"ckpt daemon: {e}; not starting a second one", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except CkptError as e:
        log.error("%s", e)
        print(f"ckpt daemon: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
