"""bench/checkfree.py --quick runs end to end and reports every method of every scenario."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "checkfree.py"

SINGLE_METHODS = {
    "middle": {"none", "none_plus", "checkfree", "checkfree_uniform", "checkfree_plus", "copy", "random", "reset_only"},
    "first": {"none", "none_plus", "checkfree_plus", "copy", "random"},
}
CHURN_METHODS = {"none", "none_plus", "checkfree", "checkfree_plus", "copy", "random"}


def test_quick_checkfree_bench_prints_one_json_line_per_scenario_and_method(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--plot-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records and all(r["bench"] == "checkfree" for r in records)
    methods: dict[str, set[str]] = {}
    for r in records:
        methods.setdefault(r["scenario"], set()).add(r["method"])
        assert r["machine"]["cores"] >= 1 and r["versions"]["torch"] and r["versions"]["ckpt"]
    rollbacks = {m for m in methods["middle"] if m.startswith("rollback_")}
    assert len(rollbacks) == 2, methods["middle"]
    for scenario, expected in SINGLE_METHODS.items():
        assert methods[scenario] >= expected | rollbacks, (scenario, methods[scenario])
    churn = [s for s in methods if s.startswith("churn_")]
    assert sorted(churn) == ["churn_10", "churn_16", "churn_5"]
    for scenario in churn:
        assert methods[scenario] == CHURN_METHODS | rollbacks, (scenario, methods[scenario])

    refused = [r for r in records if r["scenario"] == "first" and r["method"] == "checkfree"]
    assert len(refused) == 1 and "edge stage" in refused[0]["refused"]
    for r in records:
        if "refused" in r:
            continue
        mean = r["mean"]
        assert mean["final_loss"] > 0 and mean["final_vs_no_failure"] > 0
        if r["method"] in ("none", "none_plus"):
            assert mean["final_vs_no_failure"] == 1.0
    assert "checks: the real single-failure rollbacks redo bitwise the no-failure run's losses: True" in proc.stdout
    assert "== claims" in proc.stdout
    for name in ("middle", "first", "churn"):
        png = tmp_path / f"checkfree_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
