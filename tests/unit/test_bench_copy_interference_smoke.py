"""bench/copy_interference.py runs end to end on a small state and reports every phase of
every mode for each torch thread count it was given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "copy_interference.py"


def test_small_copy_interference_run_reports_each_phase_per_mode_and_thread_count():
    proc = subprocess.run([sys.executable, str(BENCH), "--state-gib", "0.02", "--steps", "1",
                           "--rounds", "1", "--threads", "2,1"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["bench"] == "copy_interference"
    assert [r["torch_threads"] for r in record["runs"]] == [2, 1]
    for run in record["runs"]:
        assert run["state_bytes"] > 0 and run["copy_crc_alone_s"] > 0
        assert set(run["median_s"]) == {"none", "copy_crc", "copy_plain"}
        for phases in run["median_s"].values():
            assert set(phases) == {"forward", "backward", "copy_wait", "optimizer"}
            assert phases["forward"] > 0 and phases["optimizer"] > 0
        assert set(run["added_s"]) == {"none", "copy_crc", "copy_plain"}
