"""SlotStager.begin when starting the copies fails part-way: the copies already running
finish before the slot is unlocked, so none of their bytes land in a slot that the next
writer has taken."""

from __future__ import annotations

import os
import uuid
from dataclasses import replace

import pytest
import torch

from ckpt import _C
from ckpt.snapshot.geometry import geometries
from ckpt.snapshot.stager import CopyRun, SlotStager, plan_snapshot


class FailsOnSecondSubmit:
    """A CopyEngine whose second submit raises; it keeps the first ticket."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.tickets: list = []

    def submit(self, jobs, chunk_bytes, crc_out):
        if self.tickets:
            raise RuntimeError("submit failed")
        self.tickets.append(self.engine.submit(jobs, chunk_bytes, crc_out))
        return self.tickets[-1]


@pytest.fixture
def segment():
    name = f"/ckpt-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    seg = _C.Segment.create(name, 256 << 20)
    yield seg
    seg.close()
    _C.Segment.unlink(name)


def test_a_failed_start_waits_for_started_copies_before_unlocking(segment) -> None:
    big = torch.randn(48 << 20 >> 2)  # 48 MiB: its copy is still running when submit 2 fails
    small = torch.randn(1024)
    plan = plan_snapshot(geometries([("model/big", big), ("model/small", small)]), 4 << 20)
    # Two CPU runs instead of one, so that the second engine call is the one that fails.
    (run,) = plan.runs
    second = plan.layout.tensors[1]
    plan = replace(plan, runs=(CopyRun("cpu", 0, 1, run.first_chunk),
                               CopyRun("cpu", 1, 2, second.first_chunk)))
    engine = FailsOnSecondSubmit(_C.CopyEngine(1))
    stager = SlotStager(segment, engine)
    slot = stager.target_slot()
    with pytest.raises(RuntimeError, match="submit failed"):
        stager.begin(7, plan, [big, small], {"step": 7, "state": {}})
    (first,) = engine.tickets
    assert first.done(), "the slot was unlocked while the first copy was still writing into it"
    assert segment.lock_owner(slot) is None
    assert segment.slot_info(slot)["state"] == "WRITING"  # never sealed: not a valid snapshot
