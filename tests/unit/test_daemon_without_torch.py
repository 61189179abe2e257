"""The daemon and the offline CLI run where torch is not installed (the daemon image of
docker/Dockerfile leaves torch out): a real daemon process whose torch import is blocked
persists a step, and `ckpt verify` / `ckpt ls` check it, also with torch blocked."""

from __future__ import annotations

import os
import subprocess
import sys

from ckpt.control.client import DaemonClient
from test_daemon_persist import complete_steps
from test_daemon_rpc import Trainer, job, wait_until  # noqa: F401

# `import torch` raises ImportError in these processes.
NO_TORCH = "import sys; sys.modules['torch'] = None; import runpy; sys.argv[0] = {mod!r}; " \
           "runpy.run_module({mod!r}, run_name='__main__', alter_sys=True)"


def run_without_torch(module: str, *args: str, **popen_kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", NO_TORCH.format(mod=module), *args],
                            env=env, **popen_kw)


def test_daemon_persists_and_cli_verifies_without_torch(tmp_path, job):
    sock = tmp_path / "run" / "daemon.sock"
    daemon = run_without_torch("ckpt.daemon.server", "--socket", str(sock),
                               "--state-dir", str(tmp_path / "state"),
                               stderr=subprocess.PIPE, text=True)
    try:
        client = DaemonClient(sock, timeout_s=5)
        wait_until(lambda: daemon.poll() is not None or client.ping(0.5), timeout_s=30,
                   what="daemon up")
        assert daemon.poll() is None, daemon.stderr.read()
        out = tmp_path / "ckpts"
        t = Trainer(client, job, persist_dir=out, persist_every=2)
        for step in (1, 2):
            t.snapshot(step)
        wait_until(lambda: complete_steps(out) == [2], timeout_s=30, what="step 2 on disk")
        t.close()
        client.close()
    finally:
        daemon.terminate()
        _, err = daemon.communicate(timeout=30)
    assert "ModuleNotFoundError" not in err and "ImportError" not in err, err
    for argv in (["verify", "-q", str(out / "step-00000002")], ["ls", str(out)]):
        cli = run_without_torch("ckpt.cli.main", *argv, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        stdout, stderr = cli.communicate(timeout=60)
        assert cli.returncode == 0, f"ckpt {' '.join(argv)}: {stderr}"
    assert "2" in stdout
