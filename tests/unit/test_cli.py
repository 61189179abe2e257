"""The ``ckpt`` command (ls, inspect, verify, dispatch), run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ckpt.format import StepReader, persist_payloads
from ckpt.format.pack import ArrayPiece, pack_payload


def ckpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for step in (10, 20):
        payloads = {}
        for rank in range(2):
            arrays = {"model/w": ArrayPiece(rng.standard_normal((8, 1000)).astype(np.float32),
                                            (16, 1000), (8 * rank, 0)),
                      "model/b": np.zeros(3000, np.float32)}
            payloads[rank] = memoryview(pack_payload(arrays, rank=rank, world_size=2, step=step,
                                                     chunk_bytes=8192)[0])
        persist_payloads(tmp_path, step, 2, payloads)
    return tmp_path


def test_ls_lists_steps_with_status_size_and_world_size(ckpt_dir):
    (ckpt_dir / ".staging" / "step-00000030").mkdir(parents=True)
    res = ckpt("ls", str(ckpt_dir))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["step", "status", "size", "world", "age", "dir"]
    assert lines[1].split()[:2] == ["10", "complete"] and lines[1].split()[4] == "2"
    assert lines[3].split()[:2] == ["30", "staging"]
    data = json.loads(ckpt("ls", "--json", str(ckpt_dir)).stdout)
    assert [(d["step"], d["complete"]) for d in data] == [(10, True), (20, True), (30, False)]


def test_inspect_prints_the_tensor_table_and_json(ckpt_dir):
    res = ckpt("inspect", str(ckpt_dir / "step-00000010"))
    assert res.returncode == 0, res.stderr
    assert "step 10, world size 2, 2 tensors" in res.stdout
    row = next(line for line in res.stdout.splitlines() if line.startswith("model/w"))
    assert row.split()[:4] == ["model/w", "float32", "16x1000", "2"]
    data = json.loads(ckpt("inspect", "--json", str(ckpt_dir)).stdout)  # DIR: the newest step
    assert data["step"] == 20
    b = next(t for t in data["tensors"] if t["name"] == "model/b")
    assert b["pieces"] == 2 and b["raw_bytes"] == 24000 and b["compression_ratio"] > 10


def test_verify_exits_0_on_a_clean_step(ckpt_dir):
    res = ckpt("verify", str(ckpt_dir / "step-00000010"))
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


def test_verify_exits_1_and_names_file_tensor_and_chunk_on_damage(ckpt_dir):
    step_dir = ckpt_dir / "step-00000020"
    with StepReader(step_dir) as reader:
        chunk = next(p for p in reader.tensors() if p.rank == 1 and p.name == "model/w").chunks[2]
    with open(step_dir / "rank-00001.data", "r+b") as f:
        f.seek(chunk.stored_offset + 3)
        byte = f.read(1)
        f.seek(chunk.stored_offset + 3)
        f.write(bytes([byte[0] ^ 1]))
    res = ckpt("verify", str(ckpt_dir))  # DIR: checks the newest step, the damaged one
    assert res.returncode == 1
    assert "rank-00001.data tensor 'model/w' chunk 2" in res.stderr
    assert "Traceback" not in res.stderr


def test_verify_of_an_uncommitted_step_is_one_error_line(ckpt_dir):
    (ckpt_dir / "step-00000010" / "manifest.json").unlink()
    res = ckpt("verify", "-q", str(ckpt_dir / "step-00000010"))
    assert res.returncode == 1
    assert res.stderr.startswith("ckpt: error: ") and "manifest.json is missing" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2(tmp_path):
    assert ckpt("verify", str(tmp_path / "nope")).returncode == 2
    assert ckpt("verify", str(tmp_path)).returncode == 2  # no steps in an empty dir
    assert ckpt("frobnicate").returncode == 2
    assert ckpt().returncode == 2
    res = ckpt("inspect")
    assert res.returncode == 2 and "usage:" in res.stderr


def test_dispatch_reports_a_missing_module_in_one_line(capsys):
    from ckpt.cli import main as cli

    cli._DISPATCH["nothing"] = ("ckpt.cli.no_such_module", "test")
    try:
        assert cli.main(["nothing", "--x"]) == 1
    finally:
        del cli._DISPATCH["nothing"]
    err = capsys.readouterr().err
    assert err == ("ckpt: error: 'ckpt nothing' is not available in this installation "
                   "(ckpt.cli.no_such_module is missing)\n")
