"""A writer SIGKILLed mid-write leaves the committed slot intact and its lock breakable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid

from ckpt import _C

SLOT_BYTES = 4 << 20

CHILD = textwrap.dedent(
    """
    import os, sys
    from ckpt import _C
    seg = _C.Segment.open(sys.argv[1])
    slot = 1 - seg.committed()[0]
    assert seg.try_lock(slot, os.getpid(), "write")
    seg.mark_writing(slot)
    view = seg.slot_view(slot)
    view[:1024] = b"x" * 1024
    print("writing", flush=True)
    i = 0
    while True:  # keep writing until killed
        view[i % len(view)] = i & 0xFF
        i += 1
    """
)


def test_sigkill_mid_write_leaves_committed_slot_intact_and_lock_breakable() -> None:
    name = f"/ckpt-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    seg = _C.Segment.create(name, SLOT_BYTES)
    try:
        payload = os.urandom(SLOT_BYTES // 2)
        me = os.getpid()
        assert seg.try_lock(0, me, "write")
        seg.mark_writing(0)
        seg.slot_view(0)[: len(payload)] = payload
        seq = seg.seal(0, 41, len(payload), _C.crc32c(payload))
        seg.unlock(0, me)

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        child = subprocess.Popen([sys.executable, "-c", CHILD, name], stdout=subprocess.PIPE, env=env, text=True)
        try:
            assert child.stdout.readline().strip() == "writing"
            assert seg.lock_owner(1) == ("write", child.pid)
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=30) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)

        # The committed slot is untouched and verifiable from a fresh mapping.
        fresh = _C.Segment.open(name)
        assert fresh.committed() == (0, 41, seq)
        info = fresh.slot_info(0)
        assert info["state"] == "SEALED" and info["payload_bytes"] == len(payload)
        assert _C.crc32c(fresh.slot_view(0)[: len(payload)]) == info["payload_crc"]
        # The half-written slot is invalid, and its lock names the dead writer.
        assert fresh.slot_info(1)["state"] == "WRITING"
        assert fresh.lock_owner(1) == ("write", child.pid)
        assert not fresh.try_lock(1, me, "write")
        fresh.break_lock(1)  # we checked: the owner is dead
        assert fresh.try_lock(1, me, "write")
        fresh.close()
    finally:
        seg.close()
        _C.Segment.unlink(name)
