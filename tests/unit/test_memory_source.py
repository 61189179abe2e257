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


@pytest.fixture
def sealed(tmp_path):
    """A sealed snapshot of a 3-chunk weight (job private to the test)."""
    model = torch.nn.Linear(32, 96, bias=False)  # 12 KiB of float32: three 4 KiB chunks
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    job = f"memsrc-{tmp_path.name}"[:60]
    cp = Checkpointer(model, optimizer, dir=tmp_path, job=job, persist_every=0,
                      chunk_bytes=CHUNK_BYTES, start_daemon=False,
                      daemon_socket=tmp_path / "none.sock")
    cp.step(0)
    assert cp.wait(30)
    (candidate,) = memory_candidates(job, 0)[:1]
    yield candidate, model.weight.detach().clone()
    cp._committer.close(5)
    clean_up_job(tmp_path, job)


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
