"""bench/restore_read.py runs end to end on a small slot and reports both ways of reading it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "restore_read.py"


def test_small_restore_read_run_times_both_reads_and_their_ratio():
    proc = subprocess.run([sys.executable, str(BENCH), "--gib", "0.02", "--repeats", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["bench"] == "restore_read" and record["slot_bytes"] > 0
    for how in ("mapped", "read_file"):
        assert 0 < record[how]["copy_s"] <= record[how]["copy_close_s"]
    assert record["ratio_copy_close"] == (record["read_file"]["copy_close_s"]
                                          / record["mapped"]["copy_close_s"])
