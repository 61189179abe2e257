"""bench/erasure.py --quick runs end to end: every codec's output is checked inside the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "erasure.py"


def test_quick_erasure_bench_checks_outputs_and_prints_one_json_line_per_measurement():
    proc = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    ckpt = {(r["codec"], r["threads"], r["op"]) for r in records if r["codec"].startswith("ckpt ")}
    assert {op for _, _, op in ckpt} == {"encode", "decode", "call_overhead"}
    assert {t for _, t, _ in ckpt} == {1, 2}
    assert any(r["op"] == "copy" for r in records), "memcpy baseline missing"
    for r in records:
        assert r["gbps"] > 0 and r["code"] == "RS(4,2)" and r["place"] == "cache"
        assert r["machine"]["cores"] >= 1 and r["versions"]["ckpt"]
        if r["op"] in ("encode", "decode"):
            assert r["vs_memcpy"] > 0
    assert "== targets (issue 3) ==" in proc.stdout
