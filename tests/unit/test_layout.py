"""Snapshot payload layout (docs/INTERNALS.md §3): planning, round trip, corruption."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from ckpt import _C
from ckpt.errors import ConfigError, CorruptCheckpointError
from ckpt.format.pack import ArrayPiece, pack_payload
from ckpt.snapshot import layout as L


def spec(name: str, shape: tuple[int, ...], dtype: str = "float32") -> L.TensorSpec:
    n = int(np.prod(shape)) * L.itemsize_of(dtype)
    return L.TensorSpec(name, dtype, shape, shape, (0,) * len(shape), n)


def test_plan_aligns_tensors_and_numbers_chunks_like_the_copy_engine():
    specs = [spec("a", (3,)), spec("empty", (0, 4)), spec("b", (1000,)),
             spec("c", (17,), "bfloat16")]
    layout = L.plan_layout(specs, chunk_bytes=1024)
    offsets = [t.data_offset for t in layout.tensors]
    assert all(o % 64 == 0 for o in offsets)
    assert offsets == [0, 64, 64, 4096]
    chunks = [(t.first_chunk, t.num_chunks) for t in layout.tensors]
    assert chunks == [(0, 1), (1, 0), (1, 4), (5, 1)]
    assert layout.num_chunks == 6 == _C.num_chunks([s.nbytes for s in specs], 1024)
    assert layout.chunk_sizes() == [12, 1024, 1024, 1024, 928, 34]


def test_crcs_match_the_copy_engine_for_every_chunk():
    rng = np.random.default_rng(1)
    arrays = {"w": rng.standard_normal((300, 7)).astype(np.float32),
              "z": np.zeros(0, np.float32), "b": rng.integers(0, 9, 999).astype(np.int64)}
    buf, layout = pack_payload(arrays, chunk_bytes=4096)
    _, _, crcs = L.read_payload(memoryview(buf))
    engine = _C.CopyEngine(2)
    out = np.zeros(layout.num_chunks, np.uint32)
    dst = [np.empty_like(a) for a in arrays.values()]
    jobs = [(a.ctypes.data, d.ctypes.data, a.nbytes) for a, d in zip(arrays.values(), dst)]
    assert engine.submit(jobs, 4096, out.ctypes.data).wait(10.0)
    assert out.tolist() == crcs.tolist()


def test_payload_round_trips_layout_meta_crcs_and_bytes():
    arr = np.arange(5000, dtype=np.float32).reshape(50, 100)
    state = {"step": 7, "model": {"w": {"__tensor__": 0}}}
    buf, layout = pack_payload({"model/w": ArrayPiece(arr, (100, 100), (50, 0))}, rank=1,
                               world_size=2, step=7, state=state, chunk_bytes=8192)
    view = memoryview(buf)
    got, meta, crcs = L.read_payload(view, expected_crc=L.payload_crc(view, layout))
    assert got == layout
    assert meta["rank"] == 1 and meta["step"] == 7 and meta["state"]["step"] == 7
    entry = meta["tensors"][0]
    assert entry["global_shape"] == [100, 100] and entry["offsets"] == [50, 0]
    assert len(crcs) == layout.num_chunks == 3
    meta_bytes = struct.unpack_from("<Q", buf, 16)[0]
    data = L.data_view(view, layout, meta_bytes, layout.tensors[0])
    assert np.array_equal(np.frombuffer(data, np.float32).reshape(50, 100), arr)


def test_slot_bytes_for_leaves_room_for_a_growing_meta():
    layout = L.plan_layout([spec("a", (1000,))], 4096)
    slot = L.slot_bytes_for(layout, meta_reserve_bytes=2000)
    assert slot % 4096 == 0
    assert slot >= layout.payload_bytes(2000 + 4096)
    view = memoryview(bytearray(slot))
    meta = {"job": "j", "rank": 0, "world_size": 1, "step": 10**12, "state": {"x": "y" * 3000}}
    assert L.write_header_and_meta(view, layout, meta) > 2000


def test_write_refuses_a_payload_larger_than_the_slot():
    layout = L.plan_layout([spec("a", (10000,))], 4096)
    with pytest.raises(ConfigError, match="slot holds 4096"):
        L.write_header_and_meta(memoryview(bytearray(4096)), layout, {"rank": 0})


def test_bad_magic_is_reported():
    buf, _ = pack_payload({"a": np.ones(4, np.float32)})
    buf[0:8] = b"GARBAGE!"
    with pytest.raises(CorruptCheckpointError, match="magic"):
        L.read_payload(memoryview(buf))


def test_unknown_version_is_reported():
    buf, _ = pack_payload({"a": np.ones(4, np.float32)})
    struct.pack_into("<I", buf, 8, 99)
    with pytest.raises(CorruptCheckpointError, match="version 99"):
        L.read_payload(memoryview(buf))


def test_meta_length_past_the_slot_is_reported():
    buf, _ = pack_payload({"a": np.ones(4, np.float32)})
    struct.pack_into("<Q", buf, 16, len(buf) * 2)
    with pytest.raises(CorruptCheckpointError, match="runs past the end"):
        L.read_payload(memoryview(buf))


def test_truncated_payload_is_reported():
    buf, _ = pack_payload({"a": np.ones(4000, np.float32)})
    with pytest.raises(CorruptCheckpointError, match="past the end"):
        L.read_payload(memoryview(buf)[: len(buf) - 100])


@pytest.mark.parametrize("field, value", [("first_chunk", 1), ("num_chunks", 5),
                                          ("data_offset", 8)])
def test_meta_that_disagrees_with_the_header_is_reported(field, value):
    buf, layout = pack_payload({"a": np.ones(4000, np.float32)}, chunk_bytes=4096)
    meta_bytes = struct.unpack_from("<Q", buf, 16)[0]
    meta = json.loads(bytes(buf[64:64 + meta_bytes]))
    assert len(str(meta["tensors"][0][field])) == len(str(value))  # the blob keeps its length
    meta["tensors"][0][field] = value
    blob = json.dumps(meta, separators=(",", ":")).encode()
    assert len(blob) == meta_bytes
    buf[64:64 + meta_bytes] = blob
    with pytest.raises(CorruptCheckpointError, match="chunk numbering"):
        L.read_payload(memoryview(buf))


def test_bad_payload_crc_is_reported():
    buf, layout = pack_payload({"a": np.ones(4, np.float32)})
    good = L.payload_crc(memoryview(buf), layout)
    with pytest.raises(CorruptCheckpointError, match="crc32c"):
        L.read_payload(memoryview(buf), expected_crc=good ^ 1)


def test_the_seal_check_passes_a_good_payload_and_names_damage_without_parsing_the_meta():
    buf, layout = pack_payload({"a": np.ones(4, np.float32)})
    good = L.payload_crc(memoryview(buf), layout)
    L.check_payload_seal(memoryview(buf), good)
    buf[70] ^= 1  # inside the meta JSON
    with pytest.raises(CorruptCheckpointError, match="crc32c"):
        L.check_payload_seal(memoryview(buf), good)
    with pytest.raises(CorruptCheckpointError, match="crc32c"):  # named as damage, not bad JSON
        L.read_payload(memoryview(buf), expected_crc=good)
    with pytest.raises(CorruptCheckpointError, match="past the end"):
        L.check_payload_seal(memoryview(buf)[:100], good)


@pytest.mark.parametrize("field, value", [("shape", [4.0]), ("shape", ["4"]), ("nbytes", 16.0),
                                          ("offsets", [0.0]), ("name", 7)])
def test_a_tensor_entry_with_a_non_integer_dimension_is_corrupt_not_truncated(field, value):
    buf, _ = pack_payload({"a": np.ones(4, np.float32)})
    meta_bytes = struct.unpack_from("<Q", buf, 16)[0]
    meta = json.loads(bytes(buf[64:64 + meta_bytes]))
    meta["tensors"][0][field] = value
    with pytest.raises(CorruptCheckpointError, match="bad tensor entry"):
        L._spec_from_entry(meta["tensors"][0])


def test_tensor_spec_rejects_wrong_nbytes_and_pieces_outside_the_global_shape():
    with pytest.raises(ConfigError, match="nbytes"):
        L.TensorSpec("a", "float32", (4,), (4,), (0,), 15)
    with pytest.raises(ConfigError, match="does not fit"):
        L.TensorSpec("a", "float32", (4,), (6,), (3,), 16)
    with pytest.raises(ConfigError, match="unknown dtype"):
        L.TensorSpec("a", "torch.float32", (4,), (4,), (0,), 16)


def test_dtypes_without_numpy_map_to_same_width_carriers():
    assert L.numpy_dtype_of("bfloat16") == np.uint16
    assert L.numpy_dtype_of("float8_e4m3fn") == np.uint8
    assert L.numpy_dtype_of("float32") == np.float32


def test_layout_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, ckpt.snapshot.layout, ckpt.format, ckpt.storage, ckpt.cli.main; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_meta_json_holds_the_layouts_tensor_entries_last_and_accepts_them_given():
    layout = L.plan_layout([spec("a", (3,)), spec("b", (2, 2), "int64")], chunk_bytes=64)
    meta = {"job": "j", "rank": 0, "world_size": 1, "step": 3, "state": {"x": 1.5}}
    blob = L.encode_meta(layout, meta)
    decoded = json.loads(blob)
    assert list(decoded) == [*meta, "format", "chunk_bytes", "tensors"]
    assert decoded["tensors"] == layout.tensor_entries()
    assert L.encode_meta(layout, {**meta, "tensors": layout.tensor_entries()}) == blob
    with pytest.raises(ConfigError, match="tensors"):
        L.encode_meta(layout, {**meta, "tensors": []})
