"""Damaged, crafted and foreign checkpoint files: a typed error naming the file (and the
tensor and chunk), restore falls back to the previous step, nothing damaged reaches the model.

"Crafted" tables are rewritten with their crc recomputed into the manifest, as a foreign
or buggy writer would leave them: the crc check passes, so only the row checks stand
between the table and the reader.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from harness import clean_up_job

from ckpt import _C
from ckpt.cli.main import main as ckpt_main
from ckpt.errors import (ConfigError, CorruptCheckpointError, CorruptChunkError,
                         StorageFullError)
from ckpt.format import StepReader, persist_payloads, verify
from ckpt.format.metadata import build_table_bytes
from ckpt.format.pack import pack_payload
from ckpt.format.writer import _SyncedFile
from ckpt.hook.checkpointer import Checkpointer
from ckpt.storage import list_steps

CHUNK = 4096


# -- building steps, then damaging them ---------------------------------------------------
def make_step(root: Path, step: int = 3, world: int = 1) -> Path:
    rng = np.random.default_rng(step)
    arrays = {"model/w": rng.standard_normal((64, 40)).astype(np.float32),
              "model/zeros": np.zeros(5000, np.float32)}
    payloads = {r: memoryview(pack_payload(arrays, rank=r, world_size=world, step=step,
                                           state={"model": {}}, chunk_bytes=CHUNK)[0])
                for r in range(world)}
    return persist_payloads(root, step, world, payloads)


def edit_manifest(step_dir: Path, edit: Callable[[dict], object]) -> None:
    manifest = json.loads((step_dir / "manifest.json").read_text())
    edit(manifest)
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def rewrite_table(step_dir: Path, rank: int, edit: Callable[[list[dict]], object]) -> None:
    """Rewrite rank's table with ``edit(rows)`` applied and its crc put in the manifest."""
    path = step_dir / ("rank-%05d.parquet" % rank)
    table = pq.read_table(path)
    kv = table.schema.metadata
    rows = table.to_pylist()
    edit(rows)
    blob = build_table_bytes(rows, json.loads(kv[b"ckpt.state"]), json.loads(kv[b"ckpt.meta"]))
    path.write_bytes(blob)
    edit_manifest(step_dir, lambda m: m["ranks"][str(rank)].update(meta_crc32c=_C.crc32c(blob)))


def row(rows: list[dict], name: str = "model/w") -> dict:
    return next(r for r in rows if r["name"] == name)


def flip_zstd_frame_header(step_dir: Path, tensor: str) -> tuple[str, int]:
    """Flip the top bit of the frame header descriptor of ``tensor``'s first chunk: the
    frame then claims an 8-byte content size read from the bytes that follow."""
    with StepReader(step_dir) as reader:
        piece = next(p for p in reader.tensors() if p.name == tensor)
    chunk = piece.chunks[0]
    assert chunk.compressed
    data = step_dir / piece.file
    buf = bytearray(data.read_bytes())
    buf[chunk.stored_offset + 4] ^= 0x80
    data.write_bytes(buf)
    return piece.file, chunk.index


def read_everything(step_dir: Path) -> None:
    with StepReader(step_dir) as reader:
        for piece in reader.tensors():
            reader.read_tensor_into(piece.name, piece.rank, np.empty(piece.raw_bytes, np.uint8))


# -- tensor tables ------------------------------------------------------------------------
def _oversize(rows: list[dict]) -> None:
    r = row(rows)
    r.update(raw_bytes=r["raw_bytes"] + 4096, chunk_stored_offsets=r["chunk_stored_offsets"]
             + [0], chunk_stored_bytes=r["chunk_stored_bytes"] + [4096],
             chunk_compression=r["chunk_compression"] + ["none"],
             chunk_crc32c=r["chunk_crc32c"] + [0])


CRAFTED_ROWS = {
    "raw_bytes_larger_than_shape_times_itemsize": (_oversize, "raw_bytes is 14336"),
    "no_chunks_for_a_nonempty_tensor": (
        lambda rows: row(rows).update(chunk_raw_bytes=0, chunk_stored_offsets=[],
                                      chunk_stored_bytes=[], chunk_compression=[],
                                      chunk_crc32c=[]),
        "chunk_raw_bytes is 0"),
    "negative_chunk_offset": (lambda rows: row(rows)["chunk_stored_offsets"].__setitem__(0, -5),
                              r"chunk 0 is damaged: its stored bytes \[-5,"),
    "chunk_past_the_end_of_the_file": (
        lambda rows: row(rows)["chunk_stored_offsets"].__setitem__(0, 1 << 62),
        "chunk 0 is damaged: its stored bytes"),
    "huge_stored_bytes": (lambda rows: row(rows)["chunk_stored_bytes"].__setitem__(0, 1 << 62),
                          "chunk 0 is damaged: its stored bytes"),
    "file_of_another_step": (lambda rows: row(rows).update(file="rank-00009.data"),
                             "'rank-00009.data' is not a data file of this step"),
    "file_outside_the_step_dir": (lambda rows: row(rows).update(file="../../../etc/hostname"),
                                  "is not a data file of this step"),
    "null_chunk_list": (lambda rows: row(rows).update(chunk_crc32c=None),
                        "column 'chunk_crc32c' holds a null"),
    "unknown_dtype": (lambda rows: row(rows).update(dtype="object"), "unknown dtype 'object'"),
    "shape_that_does_not_match_raw_bytes": (lambda rows: row(rows).update(shape=[3, 3]),
                                            r"raw_bytes is 10240, but shape \[3, 3\]"),
    "unknown_compression": (lambda rows: row(rows)["chunk_compression"].__setitem__(0, "lz4"),
                            "unknown compression 'lz4'"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_ROWS))
def test_crafted_table_row_is_refused_naming_table_and_tensor_and_verify_reports_it(
        tmp_path, case):
    edit, why = CRAFTED_ROWS[case]
    step_dir = make_step(tmp_path)
    rewrite_table(step_dir, 0, edit)
    with pytest.raises(CorruptCheckpointError,
                       match=rf"rank-00000\.parquet.*tensor 'model/w'.*{why}.*older step"):
        read_everything(step_dir)
    report = verify(step_dir)  # reported, not raised
    assert not report.ok
    assert [(Path(d.file).name, d.chunk_index) for d in report.damage] == [
        ("rank-00000.parquet", -1)]


def test_flipped_bit_in_a_zstd_frame_header_is_a_corrupt_chunk_not_a_memory_error(tmp_path):
    step_dir = make_step(tmp_path)
    file, index = flip_zstd_frame_header(step_dir, "model/zeros")
    with StepReader(step_dir) as reader, pytest.raises(
            CorruptChunkError, match=rf"{file}: tensor 'model/zeros' chunk {index}: zstd frame "
                                     rf"header says \d+ bytes, the chunk holds 4096"):
        reader.read_tensor_into("model/zeros", 0, np.empty(20000, np.uint8))
    report = verify(step_dir)
    assert [(d.tensor, d.chunk_index) for d in report.damage] == [("model/zeros", index)]


# -- manifests ----------------------------------------------------------------------------
MANIFEST_EDITS = {
    "ranks_is_a_list": (lambda m: m.update(ranks=[]), '"ranks" is a list'),
    "rank_entry_is_a_string": (lambda m: m["ranks"].update({"0": "x"}), '"ranks"/"0" is a str'),
    "data_name_missing": (lambda m: m["ranks"]["0"].pop("data"), '"ranks"/"0"/"data" is None'),
    "data_name_is_a_number": (lambda m: m["ranks"]["0"].update(data=5),
                              '"ranks"/"0"/"data" is 5'),
    "data_is_an_absolute_path": (lambda m: m["ranks"]["0"].update(data="/etc/hostname"),
                                 "\"ranks\"/\"0\"/\"data\" is '/etc/hostname', expected the name "
                                 "of a file"),
    "data_escapes_the_step_dir": (lambda m: m["ranks"]["0"].update(data="../../etc/hostname"),
                                  "\"ranks\"/\"0\"/\"data\" is '../../etc/hostname'"),
    "meta_crc_is_a_string": (lambda m: m["ranks"]["0"].update(meta_crc32c="abc"),
                             '"ranks"/"0"/"meta_crc32c" is \'abc\''),
    "world_size_zero": (lambda m: m.update(world_size=0, ranks={}), '"world_size" is 0'),
    "world_size_huge": (lambda m: m.update(world_size=10**12),
                        '"ranks" lists 1 ranks for "world_size" 1000000000000'),
    "step_null": (lambda m: m.update(step=None), '"step" is None'),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_manifest_field_of_the_wrong_type_or_range_is_named(tmp_path, case):
    edit, why = MANIFEST_EDITS[case]
    step_dir = make_step(tmp_path)
    edit_manifest(step_dir, edit)
    for attempt in (StepReader, verify):
        with pytest.raises(CorruptCheckpointError,
                           match=rf"manifest\.json is damaged: {re.escape(why)}.*older step"):
            attempt(step_dir)
    [info] = list_steps(tmp_path)
    assert not info.complete and "manifest.json is damaged" in info.problem


def _manifest_is_a_directory(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _manifest_links_to_dev_zero(p: Path) -> None:
    p.unlink()
    p.symlink_to("/dev/zero")


def _manifest_is_a_fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p)


NOT_REGULAR = {"directory": _manifest_is_a_directory, "symlink_to_dev_zero":
               _manifest_links_to_dev_zero, "fifo": _manifest_is_a_fifo}


@pytest.mark.parametrize("case", sorted(NOT_REGULAR))
def test_manifest_that_is_not_a_regular_file_is_a_damaged_step_and_never_read(tmp_path, case):
    make_step(tmp_path, step=3)
    bad = make_step(tmp_path, step=4)
    NOT_REGULAR[case](bad / "manifest.json")
    with pytest.raises(CorruptCheckpointError, match=r"step-00000004/manifest\.json is damaged"):
        StepReader(bad)
    infos = {s.step: s for s in list_steps(tmp_path)}
    assert infos[3].complete and infos[3].problem is None
    assert not infos[4].complete and "not a regular file" in infos[4].problem


def test_ls_shows_a_step_with_a_fifo_manifest_as_damaged_without_hanging(tmp_path):
    make_step(tmp_path, step=3)
    _manifest_is_a_fifo(make_step(tmp_path, step=4) / "manifest.json")
    res = subprocess.run([sys.executable, "-m", "ckpt.cli", "ls", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    status = {line.split()[0]: line.split()[1] for line in res.stdout.splitlines()[1:]}
    assert status == {"3": "complete", "4": "DAMAGED"}
    assert "manifest.json is damaged" in res.stderr and "Traceback" not in res.stderr


def test_verify_reports_a_manifest_whose_step_is_not_the_directorys(tmp_path):
    step_dir = make_step(tmp_path, step=3)
    moved = step_dir.rename(tmp_path / "step-00000005")
    report = verify(moved)
    assert [(Path(d.file).name, d.chunk_index) for d in report.damage] == [("manifest.json", -1)]
    assert '"step" is 3 but the directory is step 5' in report.damage[0].message


def test_verify_reports_a_damaged_table_and_still_checks_the_other_rank(tmp_path):
    step_dir = make_step(tmp_path, world=2)
    # rank 1's rows are its own (different bytes would be written once per rank otherwise)
    rewrite_table(step_dir, 0, lambda rows: row(rows).update(dtype="object"))
    with StepReader(step_dir) as reader:
        piece = next(p for p in reader.rank_pieces(1) if p.name == "model/w")
    data = step_dir / piece.file
    buf = bytearray(data.read_bytes())
    buf[piece.chunks[1].stored_offset + 7] ^= 1
    data.write_bytes(buf)
    report = verify(step_dir)
    assert [(Path(d.file).name, d.tensor, d.chunk_index) for d in report.damage] == [
        ("rank-00000.parquet", "", -1), (piece.file, "model/w", 1)]


# -- the writer ---------------------------------------------------------------------------
def test_persist_with_world_size_zero_is_refused_and_keeps_the_steps(tmp_path):
    make_step(tmp_path, step=1)
    make_step(tmp_path, step=2)
    with pytest.raises(ConfigError, match="world_size must be an integer >= 1, got 0"):
        persist_payloads(tmp_path, 99, 0, {}, keep=1)
    assert [s.step for s in list_steps(tmp_path) if s.complete] == [1, 2]


def test_odirect_write_cut_by_an_unaligned_file_size_limit_is_storage_full(tmp_path):
    make_step(tmp_path, step=1)
    arrays = {"a": np.random.default_rng(1).integers(0, 256, 40 << 20, dtype=np.uint8)}
    buf, _ = pack_payload(arrays, step=2, chunk_bytes=1 << 20)
    probe = _SyncedFile(tmp_path / "probe", 40 << 20)
    direct = probe._direct
    probe.close(sync=False)
    if not direct:
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, ((20 << 20) + 123, old_limit[1]))
    try:
        with pytest.raises(StorageFullError, match=r"file size limit reached writing .*"
                                                   r"rank-00000\.data"):
            persist_payloads(tmp_path, 2, 1, {0: memoryview(buf)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert [s.step for s in list_steps(tmp_path)] == [1]
    assert not list((tmp_path / ".staging").iterdir())


# -- the CLI ------------------------------------------------------------------------------
def test_cli_on_a_manifest_with_a_renamed_key_prints_one_line_and_exits_1(tmp_path, capsys):
    step_dir = make_step(tmp_path)
    edit_manifest(step_dir, lambda m: m["ranks"]["0"].update(dath=m["ranks"]["0"].pop("data")))
    for command in ("verify", "inspect"):
        assert ckpt_main([command, *(["-q"] if command == "verify" else []),
                          str(step_dir)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("ckpt: error: ") and len(err.strip().splitlines()) == 1
        assert 'manifest.json is damaged: "ranks"/"0"/"data"' in err


def test_cli_verify_of_a_zstd_header_flip_names_file_and_chunk_and_exits_1(tmp_path, capsys):
    step_dir = make_step(tmp_path)
    file, index = flip_zstd_frame_header(step_dir, "model/zeros")
    assert ckpt_main(["verify", "-q", str(step_dir)]) == 1
    err = capsys.readouterr().err
    assert f"{file} tensor 'model/zeros' chunk {index}: " in err and "Traceback" not in err


def test_cli_verify_of_a_huge_world_size_is_one_line(tmp_path, capsys):
    step_dir = make_step(tmp_path)
    edit_manifest(step_dir, lambda m: m.update(world_size=10**12))
    assert ckpt_main(["verify", "-q", str(step_dir)]) == 1
    assert '"world_size" 1000000000000' in capsys.readouterr().err


# -- restore ------------------------------------------------------------------------------
def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    model.register_buffer("mask", torch.zeros(16384))  # compresses: a zstd chunk
    return model


def _checkpointer(model: torch.nn.Module, directory: Path, job: str) -> Checkpointer:
    return Checkpointer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), dir=directory,
                        job=job, start_daemon=False, persist_every=0,
                        daemon_socket=directory / "x.sock", chunk_bytes=CHUNK, keep=10)


@pytest.fixture(scope="module")
def two_torch_steps(tmp_path_factory) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """Steps 1 and 2 of a small model persisted to disk (each by its own job), and the
    model's state at each; tests copy the directory before damaging it."""
    root = tmp_path_factory.mktemp("torch_steps")
    model = make_model()
    saved = {}
    for step in (1, 2):
        job = "h" + uuid.uuid4().hex[:10]
        cp = _checkpointer(model, root, job)
        try:
            model(torch.randn(4, 8)).pow(2).mean().backward()
            cp.optimizer.step()
            cp.optimizer.zero_grad()
            cp.step(step)
            assert cp.wait(30)
        finally:
            cp.close()
            clean_up_job(root, job)
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return root, saved


def restore_copy(two_torch_steps, tmp_path: Path, damage: Callable[[Path], object]):
    """Damage step 2 of a copy of the two steps; restore into a fresh model."""
    root, saved = two_torch_steps
    directory = tmp_path / "ckpt"
    shutil.copytree(root, directory, symlinks=True)
    damage(directory / "step-00000002")
    model = make_model(seed=9)
    job = "r" + uuid.uuid4().hex[:10]
    cp = _checkpointer(model, directory, job)
    try:
        return cp.restore(), model.state_dict(), saved
    finally:
        cp.close()
        clean_up_job(directory, job)


def _oversized_bias_row(step_dir: Path) -> None:
    """A row claiming 1 MiB more than the live tensor holds, with valid chunks for it: an
    unchecked restore copies it past the end of the tensor's memory."""
    data = step_dir / "rank-00000.data"
    old_size = data.stat().st_size
    payload = np.random.default_rng(0).integers(0, 256, 64 + (1 << 20), np.uint8).tobytes()
    with open(data, "ab") as f:
        f.write(payload)

    def edit(rows):
        row(rows, "model/0.bias").update(
            raw_bytes=len(payload), stored_bytes=len(payload), byte_offset=old_size,
            chunk_raw_bytes=len(payload), chunk_stored_offsets=[old_size],
            chunk_stored_bytes=[len(payload)], chunk_compression=["none"],
            chunk_crc32c=[_C.crc32c(payload)], compression="none")

    rewrite_table(step_dir, 0, edit)
    edit_manifest(step_dir, lambda m: m["ranks"]["0"].update(data_bytes=data.stat().st_size))


def _bias_row_without_chunks(step_dir: Path) -> None:
    rewrite_table(step_dir, 0, lambda rows: row(rows, "model/0.bias").update(
        chunk_raw_bytes=0, chunk_stored_offsets=[], chunk_stored_bytes=[],
        chunk_compression=[], chunk_crc32c=[]))


RESTORE_DAMAGE = {
    "row_larger_than_the_live_tensor": _oversized_bias_row,
    "row_without_chunks": _bias_row_without_chunks,
    "zstd_frame_header_flip": lambda d: flip_zstd_frame_header(d, "model/mask"),
    "rank_entry_is_a_string": lambda d: edit_manifest(d, lambda m: m["ranks"].update({"0": "x"})),
    "ranks_is_a_list": lambda d: edit_manifest(d, lambda m: m.update(ranks=[])),
    "data_name_is_a_number": lambda d: edit_manifest(d, lambda m: m["ranks"]["0"].update(data=5)),
    "manifest_is_a_directory": lambda d: _manifest_is_a_directory(d / "manifest.json"),
    "manifest_links_to_dev_zero": lambda d: _manifest_links_to_dev_zero(d / "manifest.json"),
    "manifest_is_a_fifo": lambda d: _manifest_is_a_fifo(d / "manifest.json"),
}


@pytest.mark.parametrize("case", sorted(RESTORE_DAMAGE))
def test_restore_falls_back_to_the_previous_step_past_a_damaged_one(two_torch_steps, tmp_path,
                                                                    case, caplog):
    start, state, saved = restore_copy(two_torch_steps, tmp_path, RESTORE_DAMAGE[case])
    assert start == 2  # the step after step 1
    for name, value in saved[1].items():
        assert torch.equal(state[name], value), name
    assert "step-00000002" in caplog.text


def test_loader_refuses_a_snapshot_whose_tensor_size_disagrees_with_its_shape(tmp_path):
    from ckpt.recovery.restore import RestoreTarget, _Loader

    model = make_model()
    target = RestoreTarget(model, torch.optim.AdamW(model.parameters()), None, {}, "job",
                           tmp_path, 0, 1, None, None)
    loader = _Loader(target)
    loader._read_live()  # the live tensors, as check() reads them
    entries = [{"name": g.name, "dtype": g.dtype_name, "global_shape": list(g.global_shape),
                "shape": list(g.shape), "offsets": list(g.offsets), "nbytes": g.nbytes}
               for g in loader.live.values()]
    state = {"optim": {"state": {}, "param_groups": []}}  # no optimizer step taken yet
    source = SimpleNamespace(meta={"tensors": entries, "state": state}, where="snapshot",
                             reshards=False)
    loader.check(source)  # consistent: accepted
    entries[0]["nbytes"] += 1 << 20  # copying this many bytes would overrun the live tensor
    with pytest.raises(CorruptCheckpointError, match=rf"snapshot: tensor '{entries[0]['name']}' "
                                                     rf"records \d+ bytes.*damaged"):
        loader.check(source)
