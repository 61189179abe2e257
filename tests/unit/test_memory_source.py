"""Restore from shared memory: one pass copies and checksums; a damaged chunk never stays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness import clean_up_job

from ckpt import _C
from ckpt.errors import CorruptChunkError
from ckpt.hook.checkpointer import Checkpointer
from ckpt.recovery.sources import MemorySource, memory_candidates

CHUNK_BYTES = 4096


def _sealed_snapshot(tmp_path, model: torch.nn.Module, job: str):
    """Yields the candidate of a sealed snapshot of ``model`` (job private to the test)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cp = Checkpointer(model, optimizer, dir=tmp_path, job=job, persist_every=0,
                      chunk_bytes=CHUNK_BYTES, start_daemon=False,
                      daemon_socket=tmp_path / "none.sock")
    cp.step(0)
    assert cp.wait(30)
    (candidate,) = memory_candidates(job, 0)[:1]
    yield candidate
    cp._committer.close(5)
    clean_up_job(tmp_path, job)


@pytest.fixture
def sealed(tmp_path):
    """A sealed snapshot of a 3-chunk weight."""
    model = torch.nn.Linear(32, 96, bias=False)  # 12 KiB of float32: three 4 KiB chunks
    for candidate in _sealed_snapshot(tmp_path, model, f"memsrc-{tmp_path.name}"[:60]):
        yield candidate, model.weight.detach().clone()


def _weight_index(source: MemorySource) -> int:
    return next(i for i, e in enumerate(source.meta["tensors"]) if e["name"] == "model/weight")


def test_a_clean_slot_is_copied_bit_for_bit(sealed):
    candidate, weight = sealed
    with _C.CopyEngine(2) as engine:
        source = MemorySource(candidate, engine)
        dst = np.full(weight.numel(), np.nan, dtype=np.float32)
        source.load_verified({_weight_index(source): dst.ctypes.data})
        source.close()
    assert np.array_equal(dst, weight.numpy().ravel())


def test_a_flipped_byte_names_its_chunk_and_that_chunk_is_zeroed(sealed):
    candidate, weight = sealed
    seg = _C.Segment.open(candidate.segment_name, populate=False)
    with _C.CopyEngine(2) as engine:
        source = MemorySource(candidate, engine)
        i = _weight_index(source)
        # A byte of the weight's chunk 1, at its offset in the slot (both mappings agree).
        offset = (source.tensor_addr(i) - source._seg.slot_address(candidate.slot)
                  + CHUNK_BYTES + 100)
        view = np.frombuffer(seg.slot_view(candidate.slot), dtype=np.uint8)
        view[offset] ^= 0x40
        dst = np.full(weight.numel(), np.nan, dtype=np.float32)
        with pytest.raises(CorruptChunkError, match=r"tensor 'model/weight' chunk 1 "):
            source.load_verified({i: dst.ctypes.data})
        source.close()
    view[offset] ^= 0x40
    seg.close()
    per_chunk = CHUNK_BYTES // 4
    want = weight.numpy().ravel()
    assert np.array_equal(dst[:per_chunk], want[:per_chunk])            # chunk 0: copied
    assert not dst[per_chunk:2 * per_chunk].any()                       # chunk 1: zeroed
    assert np.array_equal(dst[2 * per_chunk:], want[2 * per_chunk:])    # chunk 2: copied


@pytest.fixture
def sealed_layers(tmp_path):
    """A sealed snapshot of two Linear layers: weights of three chunks, biases of one."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.Linear(96, 32))
    for candidate in _sealed_snapshot(tmp_path, model, f"memsrc-l-{tmp_path.name}"[:60]):
        yield candidate, {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("damaged", ["model/1.weight", "model/0.bias"])
def test_tensors_copied_and_checked_in_place_in_one_pass_name_the_damaged_one(sealed_layers,
                                                                               damaged):
    # Copies and in-place checks interleave in the layout (0.bias is not copied): each run
    # of one kind is one engine batch, and a damaged chunk is still named and zeroed.
    candidate, want = sealed_layers
    seg = _C.Segment.open(candidate.segment_name, populate=False)
    with _C.CopyEngine(2) as engine:
        source = MemorySource(candidate, engine)
        index = {e["name"]: i for i, e in enumerate(source.meta["tensors"])}
        chunk = 2 if damaged == "model/1.weight" else 0
        offset = (source.tensor_addr(index[damaged]) - source._seg.slot_address(candidate.slot)
                  + chunk * CHUNK_BYTES + 8)
        view = np.frombuffer(seg.slot_view(candidate.slot), dtype=np.uint8)
        copied = ["model/0.weight", "model/1.weight", "model/1.bias"]
        dst = {name: np.full(want[name].numel(), np.nan, dtype=np.float32) for name in copied}
        source.load_verified({index[n]: d.ctypes.data for n, d in dst.items()})  # clean
        assert all(np.array_equal(dst[n], want[n].numpy().ravel()) for n in copied)
        view[offset] ^= 0x01
        dst = {name: np.full(want[name].numel(), np.nan, dtype=np.float32) for name in copied}
        with pytest.raises(CorruptChunkError, match=rf"tensor '{damaged}' chunk {chunk} .*"
                                                    rf"1 damaged chunk"):
            source.load_verified({index[n]: d.ctypes.data for n, d in dst.items()})
        source.close()
    view[offset] ^= 0x01
    seg.close()
    per_chunk = CHUNK_BYTES // 4
    for name in copied:
        got, expect = dst[name], want[name].numpy().ravel()
        if name == damaged:
            assert not got[chunk * per_chunk:(chunk + 1) * per_chunk].any()
            got, expect = np.delete(got, np.s_[chunk * per_chunk:]), expect[:chunk * per_chunk]
        assert np.array_equal(got, expect), name
