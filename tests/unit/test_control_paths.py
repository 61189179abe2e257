"""Socket and segment naming, private directories, and the client's error translation."""

from __future__ import annotations

import os
import stat

import pytest

from ckpt.control.client import DaemonClient
from ckpt.control.paths import (default_socket_path, ensure_private_dir, parse_segment_name,
                                segment_name)
from ckpt.errors import ConfigError, DaemonUnavailableError


def test_segment_names_round_trip_and_reject_bad_job_ids():
    name = segment_name("llm-7b.run_2", 3, 1, uid=1000)
    assert name == "/ckpt-1000-llm-7b.run_2-r3-g1"
    parsed = parse_segment_name(name.lstrip("/"))
    assert (parsed.uid, parsed.job, parsed.rank, parsed.generation) == (1000, "llm-7b.run_2", 3, 1)
    assert parse_segment_name("psm_123") is None
    for bad in ("", "a/b", "-lead", "x" * 200, "sp ace"):
        with pytest.raises(ConfigError, match="job id"):
            segment_name(bad, 0, 0)


def test_default_socket_prefers_env_then_runtime_dir_then_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv("CKPT_DAEMON_SOCKET", str(tmp_path / "x.sock"))
    assert default_socket_path() == tmp_path / "x.sock"
    monkeypatch.delenv("CKPT_DAEMON_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path() == tmp_path / "ckpt" / "daemon.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert str(default_socket_path()) == f"/tmp/ckpt-{os.getuid()}/daemon.sock"


def test_private_dir_is_created_0700_and_a_loose_one_is_tightened(tmp_path):
    d = ensure_private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    d.chmod(0o755)
    ensure_private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown a directory to another user")
def test_socket_dir_owned_by_another_user_is_refused(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 12345, -1)
    with pytest.raises(ConfigError, match="belongs to uid 12345"):
        ensure_private_dir(d)


def test_client_without_daemon_says_which_socket_and_how_to_start_one(tmp_path):
    sock = tmp_path / "none.sock"
    with DaemonClient(sock, timeout_s=1) as client:
        assert not client.ping(0.5)
        with pytest.raises(DaemonUnavailableError) as e:
            client.latest("job", 0)
    assert str(sock) in str(e.value) and "ckpt daemon --socket" in str(e.value)
    assert isinstance(e.value, ConnectionError)


def test_tcp_client_without_token_is_refused_before_connecting():
    with pytest.raises(ConfigError, match="needs a token"):
        DaemonClient("127.0.0.1:5555")


def test_closing_a_client_twice_is_harmless(tmp_path):
    client = DaemonClient(tmp_path / "x.sock")
    client.close()
    client.close()
