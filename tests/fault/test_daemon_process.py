"""The daemon as a real process: start, refuse, SIGKILL + adopt, SIGTERM, spawn, TCP auth."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_daemon_rpc import Trainer, make_payload, wait_until  # noqa: E402

from ckpt.control import ckpt_pb2 as pb  # noqa: E402
from ckpt.control import ckpt_pb2_grpc as pb_grpc  # noqa: E402
from ckpt.control.client import DaemonClient  # noqa: E402
from ckpt.control.paths import shm_file  # noqa: E402
from ckpt.daemon.spawn import ensure_daemon  # noqa: E402
from ckpt.errors import DaemonAuthError, DaemonUnavailableError  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.fixture
def job():
    name = f"p{uuid.uuid4().hex[:10]}"
    yield name
    for p in Path("/dev/shm").glob(f"ckpt-{os.getuid()}-{name}-r*"):
        p.unlink(missing_ok=True)


@pytest.fixture
def sock(tmp_path):
    path = tmp_path / "run" / "daemon.sock"
    yield path
    for proc in psutil.process_iter(["pid", "cmdline"]):  # daemons this test started
        if str(path) in " ".join(proc.info["cmdline"] or []):
            proc.kill()


def start(sock: Path, *args: str, wait: bool = True) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "ckpt.daemon.server", "--socket", str(sock),
                             "--watch-interval-s", "0.1", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        with DaemonClient(sock, timeout_s=2) as c:
            wait_until(lambda: c.ping(0.5) or proc.poll() is not None, 10, "daemon up")
        assert proc.poll() is None, proc.communicate()
    return proc


def test_socket_is_owner_only_in_a_private_dir_and_a_second_daemon_refuses(sock):
    first = start(sock)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    second = start(sock, wait=False)
    _, err = second.communicate(timeout=10)
    assert second.returncode == 3 and "another ckpt daemon" in err
    assert first.poll() is None
    first.terminate()
    first.wait(10)


def test_sigkilled_daemon_is_replaced_and_adopts_sealed_steps(sock, job):
    daemon = start(sock)
    with DaemonClient(sock, timeout_s=5) as client:
        t = Trainer(client, job)
        t.snapshot(10)
        t.snapshot(11)
        before = client.latest(job, 0)
    daemon.kill()
    daemon.wait(5)
    assert sock.exists()  # stale socket left behind by the killed daemon
    with pytest.raises(DaemonUnavailableError, match=str(sock)):
        DaemonClient(sock, timeout_s=1).status()
    # The trainer keeps its own mapping: it seals step 12 while no daemon runs.
    t.write(12, make_payload(12, job=job))
    restarted = start(sock)
    with DaemonClient(sock, timeout_s=5) as client:
        after = client.latest(job, 0)
        assert [s.step for s in after.slots] == [12, 11]
        assert after.slots[1] == before.slots[0]
        seg = next(s for s in client.status().segments if s.job == job)
        assert seg.adopted and seg.owner_alive
        # The restarted trainer finds its snapshots through Register.
        again = client.register(job, 0, 1, os.getpid(), 1 << 20)
        assert again.existed and again.segment_name == t.reg.segment_name
    t.close()
    restarted.terminate()
    restarted.wait(10)


def test_sigterm_stops_cleanly_and_keeps_segments(sock, job):
    daemon = start(sock)
    with DaemonClient(sock, timeout_s=5) as client:
        t = Trainer(client, job)
        t.snapshot(1)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert not sock.exists() and shm_file(t.reg.segment_name).exists()
    assert t.seg.slot_info(0)["step"] == 1
    t.close()


def test_concurrent_ensure_daemon_calls_start_exactly_one_daemon(sock):
    pids, errors = [], []

    def call():
        try:
            with ensure_daemon(sock, timeout_s=15) as client:
                pids.append(client.status().pid)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    code = ("import sys; from ckpt.daemon.spawn import ensure_daemon; "
            f"print(ensure_daemon({str(sock)!r}, timeout_s=15).status().pid)")
    other = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE,
                             text=True)
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    out, _ = other.communicate(timeout=20)
    assert not errors, errors
    pids.append(int(out))
    assert len(set(pids)) == 1
    # Daemons only (cmdline "python -m ckpt.daemon.server ..."), not the launcher exiting.
    daemons = [p for p in psutil.process_iter(["cmdline"])
               if (p.info["cmdline"] or [])[1:3] == ["-m", "ckpt.daemon.server"]
               and str(sock) in p.info["cmdline"]]
    assert [p.pid for p in daemons] == [pids[0]]
    assert "second one" not in sock.with_name("daemon.log").read_text()  # none was refused
    assert psutil.Process(pids[0]).ppid() != os.getpid()  # detached: not our child
    daemons[0].terminate()
    daemons[0].wait(10)


def test_tcp_needs_a_private_token_file_and_rejects_a_wrong_token(sock, tmp_path):
    refused = start(sock, "--listen-tcp", "127.0.0.1:0", wait=False)
    _, err = refused.communicate(timeout=10)
    assert refused.returncode == 1 and "--token-file" in err
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o644)
    loose = start(sock, "--listen-tcp", "127.0.0.1:0", "--token-file", str(token), wait=False)
    _, err = loose.communicate(timeout=10)
    assert loose.returncode == 1 and "chmod 600" in err
    token.chmod(0o600)
    port = _free_port()
    daemon = start(sock, "--listen-tcp", f"127.0.0.1:{port}", "--token-file", str(token))
    with DaemonClient(f"127.0.0.1:{port}", token="s3cret", timeout_s=5) as good:
        assert good.status().pid == daemon.pid
    with DaemonClient(f"127.0.0.1:{port}", token="wrong", timeout_s=5) as bad:
        with pytest.raises(DaemonAuthError, match="PERMISSION_DENIED"):
            bad.status()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.SnapshotDaemonStub(ch).Status(pb.StatusRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    daemon.terminate()
    daemon.wait(10)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_cli_prints_a_table_or_fails_clearly_without_daemon(sock, job):
    cmd = [sys.executable, "-m", "ckpt.daemon.status_cli", "--socket", str(sock)]
    none = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=30)
    assert none.returncode == 1 and "ckpt daemon --socket" in none.stderr
    daemon = start(sock)
    with DaemonClient(sock, timeout_s=5) as client:
        t = Trainer(client, job)
        t.snapshot(42)
    table = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=30)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith(job))
    assert "0:42" in row and "alive" in row
    as_json = subprocess.run(cmd + ["--json"], env=ENV, capture_output=True, text=True,
                             timeout=30)
    assert f'"job": "{job}"' in as_json.stdout
    t.close()
    daemon.terminate()
    daemon.wait(10)
