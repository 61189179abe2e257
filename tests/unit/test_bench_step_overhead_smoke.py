"""bench/step_overhead.py runs end to end and leaves no daemon or segment behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import child_env, kill_daemons_under, shm_names

BENCH = Path(__file__).resolve().parents[2] / "bench" / "step_overhead.py"


@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp2"])
def test_small_step_overhead_run_reports_every_baseline_and_cleans_up(tmp_path, fsdp):
    before = shm_names()
    try:
        proc = subprocess.run([sys.executable, str(BENCH), "--layers", "3,6", "--steps", "2",
                               "--dcp-steps", "1", "--workdir", str(tmp_path),
                               *(["--fsdp"] if fsdp else [])],
                              capture_output=True, text=True, timeout=240, env=child_env())
    finally:
        kill_daemons_under(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["snapshot_tensors"] for r in records] == [24, 48]
    for r in records:
        assert r["fsdp"] is fsdp
        assert r["ckpt"]["snapshots_skipped"] == 0 and len(r["ckpt"]["step_call_s"]) == 2
        for key in ("state_dicts_s", "dcp_get_state_dict_s"):
            assert r[key] > 0
        assert r["ckpt_vs_dcp_async"] == r["ckpt"]["step_call_s_median"] / \
            r["dcp_async"]["stall_s_median"]
    assert shm_names() - before == set()
