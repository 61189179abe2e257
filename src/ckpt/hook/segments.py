"""Getting a segment to write snapshots into: from the daemon, else by name.

The daemon creates segments (so they outlive the trainer). When no daemon can
be reached the trainer opens the newest generation of its (job, rank) segment
by its deterministic name (INTERNALS §2), or creates the next generation
itself; a daemon started later adopts it by scanning /dev/shm.
"""

from __future__ import annotations

import logging
from typing import Any

from ckpt.control.paths import segment_name
from ckpt.errors import CkptError, SegmentError
from ckpt.hook.daemon_link import DaemonLink
from ckpt.recovery.sources import break_dead_lock, segment_names

log = logging.getLogger("ckpt.hook")


def _open(name: str) -> Any:
    from ckpt import _C

    seg = _C.Segment.open(name)
    for slot in (0, 1):
        if break_dead_lock(seg, slot):  # a trainer killed mid-copy left its write lock
            log.warning("ckpt: broke the lock of slot %d of %s held by a dead process", slot, name)
    return seg


def acquire_segment(link: DaemonLink, job: str, rank: int, slot_bytes: int) -> Any:
    """An open ``_C.Segment`` of (job, rank) whose slots hold ``slot_bytes``."""
    try:
        grant = link.register(slot_bytes)
        seg = _open(grant.name)
        if seg.slot_bytes < slot_bytes:
            seg.close()
            raise SegmentError(f"the daemon granted {grant.name} with {grant.slot_bytes}-byte "
                               f"slots, {slot_bytes} were asked for")
        return seg
    except SegmentError:
        raise
    except CkptError as exc:
        log.warning("ckpt: no daemon (%s); using the segment of job %s rank %d directly",
                    exc, job, rank)
    from ckpt import _C

    existing = segment_names(job, rank)
    if existing:
        generation, name = existing[0]
        try:
            seg = _open(name)
            if seg.slot_bytes >= slot_bytes:
                return seg
            seg.close()
        except Exception as exc:  # damaged: leave it for inspection, write a new generation
            log.warning("ckpt: cannot open %s (%s); creating a new generation", name, exc)
        generation += 1
    else:
        generation = 0
    slot_bytes = -(-slot_bytes // 4096) * 4096
    return _C.Segment.create(segment_name(job, rank, generation), slot_bytes)
