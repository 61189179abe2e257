"""bench/restore_many_tensors.py runs end to end and leaves no daemon or segment behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from harness import child_env, kill_daemons_under, shm_names

BENCH = Path(__file__).resolve().parents[2] / "bench" / "restore_many_tensors.py"


def processes_under(path: Path) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if str(path) in " ".join(p.info.get("cmdline") or [])]


@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp2"])
def test_small_restore_run_reports_both_tiers_and_baselines_and_cleans_up(tmp_path, fsdp):
    before = shm_names()
    try:
        proc = subprocess.run([sys.executable, str(BENCH), "--layers", "4", "--workdir",
                               str(tmp_path), *(["--fsdp"] if fsdp else [])],
                              capture_output=True, text=True, timeout=240, env=child_env())
        assert proc.returncode == 0, proc.stderr[-4000:]
        # The bench stops its daemon itself (SIGTERM: it may take a moment to exit).
        _, alive = psutil.wait_procs(processes_under(tmp_path), timeout=10)
        assert alive == []
    finally:
        kill_daemons_under(tmp_path)
    (record,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert record["fsdp"] is fsdp and record["snapshot_tensors"] == 32
    for key in ("restore_memory_s", "restore_disk_s", "dcp_load_s", "persist_s", "dcp_save_s",
                "first_step_after_restore_s"):
        assert record[key] > 0, key
    assert record["restore_vs_dcp_load"] == record["dcp_load_s"] / record["restore_memory_s"]
    assert shm_names() - before == set()
