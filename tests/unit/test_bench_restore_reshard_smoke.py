"""bench/restore_reshard.py runs end to end (both directions) and leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from harness import child_env, kill_daemons_under, shm_names

BENCH = Path(__file__).resolve().parents[2] / "bench" / "restore_reshard.py"


@pytest.mark.parametrize("from_ranks,to_ranks", [(2, 1)])
def test_a_small_reshard_run_checks_itself_against_dcp_and_cleans_up(tmp_path, from_ranks,
                                                                     to_ranks):
    before = shm_names()
    try:
        proc = subprocess.run([sys.executable, str(BENCH), "--gib", "0.002", "--layers", "2",
                               "--from-ranks", str(from_ranks), "--to-ranks", str(to_ranks),
                               "--no-same-layout", "--workdir", str(tmp_path)],
                              capture_output=True, text=True, timeout=240, env=child_env())
        assert proc.returncode == 0, proc.stderr[-4000:]
        leftovers = [p for p in psutil.process_iter(["cmdline"])
                     if str(tmp_path) in " ".join(p.info.get("cmdline") or [])]
        _, alive = psutil.wait_procs(leftovers, timeout=10)  # the daemon gets SIGTERM
        assert alive == []
    finally:
        kill_daemons_under(tmp_path)
    (record,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert (record["from_ranks"], record["to_ranks"]) == (from_ranks, to_ranks)
    assert record["bit_equal_to_dcp_load"] is True  # the script exits non-zero otherwise
    for tier in ("memory", "disk"):  # each reader checked the tier its restore used
        assert record[f"reshard_{tier}_vs_dcp_load"] == \
            record[f"reshard_{tier}_dcp_load_s"] / record[f"reshard_{tier}_ckpt_restore_s"]
    assert shm_names() - before == set()
