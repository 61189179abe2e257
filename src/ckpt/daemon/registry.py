"""The daemon's segments: one per (job, rank) and generation, created or adopted.

The daemon creates every segment (``ckpt._C.Segment.create``, mode 0600) and keeps it
mapped; trainers map it by name and seal slots themselves (INTERNALS.md §2). A segment
outlives the daemon on purpose: a restarted daemon *adopts* the segments of its uid by
scanning /dev/shm. Each segment has a small JSON sidecar in the daemon's state dir
(job config, owner pid, last persisted step) so an adopted segment keeps its persist
settings. Foreign (another owner) or damaged segments are reported and left alone.

Thread-safety: every public method may be called from any thread (one RLock). Read
pins are reference counted, so the persister and several Fetch streams can read one slot
while the native read lock (one owner word per slot) is taken once by the daemon's pid.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ckpt.control.paths import check_job, parse_segment_name, segment_name, shm_file
from ckpt.errors import (ConfigError, NativeError, SegmentError, SlotBusyError,
                         StepNotFoundError)

log = logging.getLogger("ckpt.daemon")

PAGE_BYTES = 4096
SEGMENT_HEADER_BYTES = 4096
MAX_ERRORS_KEPT = 20


def _native():
    try:
        from ckpt import _C
    except ImportError as e:  # pragma: no cover - depends on the build
        raise NativeError(f"the native module ckpt._C is not built ({e}); run "
                          f"`python setup.py build_ext --inplace` or reinstall ckpt") from e
    return _C


def is_sealed(info: dict) -> bool:
    """Whether a ``slot_info`` dict describes a SEALED slot (state as name or number)."""
    state = info.get("state")
    return str(state).upper() in ("SEALED", "2")


@dataclass(frozen=True)
class JobConfig:
    """What Register said about a job; persisted in the sidecar."""

    world_size: int = 1
    persist_dir: str = ""
    persist_every: int = 0
    keep: int = 0
    chunk_bytes: int = 0
    local_world_size: int = 0  # ranks of the job on this node; 0 = not known


@dataclass(eq=False)
class SegmentEntry:
    """One mapped segment and what the daemon knows about it (mutated under the lock)."""

    job: str
    rank: int
    generation: int
    name: str
    segment: object  # ckpt._C.Segment
    config: JobConfig
    owner_pid: int = 0
    adopted: bool = False
    released: bool = False
    last_commit: tuple[int, int, int] | None = None  # (slot, step, seq) recorded
    last_commit_scheduled: bool = False  # whether recording last_commit scheduled a persist
    last_persisted_step: int = -1
    owner_dead_since_s: float | None = None
    errors: collections.deque = field(default_factory=lambda: collections.deque(
        maxlen=MAX_ERRORS_KEPT))

    @property
    def slot_bytes(self) -> int:
        return self.segment.slot_bytes

    @property
    def size_bytes(self) -> int:
        return self.segment.size_bytes

    def sealed_slots(self) -> list[tuple[int, dict]]:
        """[(slot, slot_info)] of the SEALED slots, newest seq first."""
        out = []
        for i in (0, 1):
            info = self.segment.slot_info(i)
            if is_sealed(info):
                out.append((i, info))
        return sorted(out, key=lambda p: p[1]["seq"], reverse=True)

    def newest_commit_step(self) -> int | None:
        c = self.segment.committed()
        return None if c is None else c[1]


class SegmentRegistry:
    """Segments per (job, rank), every generation, current = highest."""

    def __init__(self, state_dir: Path, shm_dir: Path = Path("/dev/shm")) -> None:
        self._state_dir = Path(state_dir)
        self._state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._shm_dir = shm_dir
        self._lock = threading.RLock()
        self._by_key: dict[tuple[str, int], list[SegmentEntry]] = {}
        # The world size of each job's newest Register: a job relaunched on fewer ranks
        # leaves the segments of its old ranks >= that size here, which are no part of it.
        self._world_size: dict[str, int] = {}
        self._pins: dict[tuple[str, int], int] = {}
        self._pid = os.getpid()
        self.problems: collections.deque = collections.deque(maxlen=MAX_ERRORS_KEPT)

    # -- queries ----------------------------------------------------------------------------

    def entries(self) -> list[SegmentEntry]:
        with self._lock:
            return [e for gens in self._by_key.values() for e in gens]

    def generations(self, job: str, rank: int) -> list[SegmentEntry]:
        with self._lock:
            gens = list(self._by_key.get((job, rank), ()))
        if not gens:
            raise StepNotFoundError(f"the daemon holds no segment for job {job!r} rank {rank}; "
                                    f"the trainer must Register first")
        return gens

    def current(self, job: str, rank: int) -> SegmentEntry:
        return self.generations(job, rank)[-1]

    def job_entries(self, job: str) -> list[SegmentEntry]:
        """The current generation of every rank of ``job`` held here, by rank: the ranks
        below the world size of the job's newest Register (before any, since a restart of
        the daemon, the smallest world size its sidecars record)."""
        with self._lock:
            keys = sorted(k for k in self._by_key if k[0] == job)
            world = self._world_size.get(job)
            if world is None and keys:
                world = min(self._by_key[k][-1].config.world_size for k in keys)
            return [self._by_key[k][-1] for k in keys if world is None or k[1] < world]

    def registered_world_size(self, job: str) -> int | None:
        """The world size of ``job``'s newest Register since this daemon started, if any."""
        with self._lock:
            return self._world_size.get(job)

    def find_step(self, job: str, rank: int, step: int) -> tuple[SegmentEntry, int, dict]:
        """The (entry, slot, slot_info) holding a sealed ``step`` of (job, rank), newest first."""
        for entry in reversed(self.generations(job, rank)):
            for slot, info in entry.sealed_slots():
                if info["step"] == step:
                    return entry, slot, info
        raise StepNotFoundError(f"job {job!r} rank {rank}: step {step} is not sealed in daemon "
                                f"memory (it was overwritten by newer steps or never committed)")

    # -- register / adopt / remove ----------------------------------------------------------

    def register(self, job: str, rank: int, pid: int, slot_bytes: int,
                 config: JobConfig) -> tuple[SegmentEntry, bool]:
        """(entry, existed): the current segment if big enough, else a new generation."""
        check_job(job)
        if rank < 0 or rank >= max(config.world_size, 1):
            raise ConfigError(f"rank {rank} is outside world_size {config.world_size}")
        if slot_bytes <= 0:
            raise ConfigError(f"slot_bytes must be > 0, got {slot_bytes}")
        slot_bytes = -(-slot_bytes // PAGE_BYTES) * PAGE_BYTES
        with self._lock:
            self._world_size[job] = config.world_size
            gens = self._by_key.get((job, rank), [])
            if gens and gens[-1].slot_bytes >= slot_bytes:
                entry = gens[-1]
                entry.config, entry.owner_pid, entry.released = config, pid, False
                entry.owner_dead_since_s = None
                self._write_sidecar(entry)
                return entry, True
            generation = gens[-1].generation + 1 if gens else 0
            entry = self._create(job, rank, generation, slot_bytes, config, pid)
            self._by_key.setdefault((job, rank), []).append(entry)
            self._write_sidecar(entry)
            return entry, False

    def _create(self, job: str, rank: int, generation: int, slot_bytes: int,
                config: JobConfig, pid: int) -> SegmentEntry:
        name = segment_name(job, rank, generation)
        need = SEGMENT_HEADER_BYTES + 2 * slot_bytes
        st = os.statvfs(self._shm_dir)
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise SegmentError(f"segment {name} needs {need} bytes but {self._shm_dir} has "
                               f"{free} free; free shared memory (`ckpt status`, Release "
                               f"finished jobs) or raise the size of /dev/shm")
        C = _native()
        if C.Segment.exists(name):
            # A leftover this registry does not hold (e.g. a damaged one): never overwrite it.
            raise SegmentError(f"segment {name} already exists but is not held by this daemon "
                               f"(damaged or foreign, see `ckpt status`); remove "
                               f"{shm_file(name)} if it is not needed")
        try:
            seg = C.Segment.create(name, slot_bytes)
        except Exception as e:
            raise SegmentError(f"creating segment {name} ({need} bytes) failed: {e}") from e
        return SegmentEntry(job=job, rank=rank, generation=generation, name=name, segment=seg,
                            config=config, owner_pid=pid)

    def adopt_existing(self) -> list[SegmentEntry]:
        """Map this uid's segments found in /dev/shm; report foreign or damaged ones."""
        uid = os.getuid()
        adopted = []
        try:
            names = sorted(os.listdir(self._shm_dir))
        except OSError as e:
            self._problem(f"cannot list {self._shm_dir}: {e}")
            return adopted
        for bare in names:
            parsed = parse_segment_name(bare)
            if parsed is None or parsed.uid != uid:
                continue
            path = self._shm_dir / bare
            try:
                owner_uid = path.stat().st_uid
            except OSError:
                continue
            if owner_uid != uid:
                self._problem(f"foreign segment {path} (owner uid {owner_uid}) carries this "
                              f"user's name; left alone")
                continue
            with self._lock:
                if any(e.name == parsed.name for e in self._by_key.get(
                        (parsed.job, parsed.rank), ())):
                    continue
            try:
                seg = _native().Segment.open(parsed.name)
            except Exception as e:
                self._problem(f"damaged segment {path} left alone: {e}")
                continue
            entry = SegmentEntry(job=parsed.job, rank=parsed.rank, generation=parsed.generation,
                                 name=parsed.name, segment=seg, config=JobConfig(),
                                 adopted=True)
            self._read_sidecar(entry)
            c = seg.committed()
            entry.last_commit = tuple(c) if c is not None else None
            with self._lock:
                gens = self._by_key.setdefault((parsed.job, parsed.rank), [])
                gens.append(entry)
                gens.sort(key=lambda e: e.generation)
            adopted.append(entry)
            log.info("adopted segment %s (step %s)", parsed.name,
                     None if c is None else c[1])
        return adopted

    def remove(self, entry: SegmentEntry, unlink: bool) -> None:
        """Forget ``entry``; with ``unlink`` also remove the segment and its sidecar."""
        with self._lock:
            gens = self._by_key.get((entry.job, entry.rank), [])
            if entry in gens:
                gens.remove(entry)
            if not gens:
                self._by_key.pop((entry.job, entry.rank), None)
        try:
            entry.segment.close()
        except Exception:  # noqa: BLE001 - closing a mapping must not stop a removal
            pass
        if unlink:
            try:
                _native().Segment.unlink(entry.name)
            except Exception as e:  # noqa: BLE001
                self._problem(f"unlinking {entry.name} failed: {e}")
            self._sidecar(entry).unlink(missing_ok=True)
            log.info("unlinked segment %s", entry.name)

    def close_all(self) -> None:
        """Unmap every segment (they stay in /dev/shm)."""
        for entry in self.entries():
            try:
                entry.segment.close()
            except Exception:  # noqa: BLE001
                pass

    def remove_orphan(self, entry: SegmentEntry, dead_for_s: float, now: float) -> bool:
        """Unlink ``entry`` if its owner has still been dead for ``dead_for_s`` at ``now``
        and nothing reads it. Checked and removed under the lock that ``register`` takes,
        so a trainer re-registering meanwhile keeps its segment. True if removed."""
        with self._lock:
            since = entry.owner_dead_since_s
            if since is None or now - since < dead_for_s or self.has_pins(entry):
                return False
            self.remove(entry, unlink=True)
            return True

    def has_pins(self, entry: SegmentEntry) -> bool:
        """Whether a persist or Fetch is reading one of ``entry``'s slots right now."""
        with self._lock:
            return any(self._pins.get((entry.name, s), 0) for s in (0, 1))

    # -- read pins --------------------------------------------------------------------------

    def pin(self, entry: SegmentEntry, slot: int, step: int, seq: int | None = None) -> dict:
        """Take (or share) ``slot``'s read lock and return its slot_info, re-checked to hold
        sealed ``step`` (and ``seq``). Every successful ``pin`` needs one ``unpin``.

        Raises SlotBusyError when the trainer holds the write lock, StepNotFoundError
        when the slot no longer holds ``step`` (overwritten between lookup and lock).
        """
        key = (entry.name, slot)
        with self._lock:
            n = self._pins.get(key, 0)
            if n == 0 and not entry.segment.try_lock(slot, self._pid, "read"):
                owner = entry.segment.lock_owner(slot)
                raise SlotBusyError(f"slot {slot} of {entry.name} is locked by {owner}; step "
                                    f"{step} is being overwritten")
            self._pins[key] = n + 1
        try:
            info = entry.segment.slot_info(slot)
            if not is_sealed(info) or info["step"] != step or (seq is not None
                                                               and info["seq"] != seq):
                raise StepNotFoundError(f"slot {slot} of {entry.name} no longer holds step "
                                        f"{step} (now step {info['step']}, state "
                                        f"{info['state']})")
        except BaseException:
            self.unpin(entry, slot)
            raise
        return info

    def unpin(self, entry: SegmentEntry, slot: int) -> None:
        """Release one ``pin`` of ``slot``; the read lock goes with the last one."""
        key = (entry.name, slot)
        with self._lock:
            n = self._pins[key] - 1
            if n > 0:
                self._pins[key] = n
                return
            del self._pins[key]
            try:
                entry.segment.unlock(slot, self._pid)
            except Exception as e:  # noqa: BLE001 - a broken lock is reported, not fatal
                self._problem(f"unlocking slot {slot} of {entry.name}: {e}")

    @contextmanager
    def read_pinned(self, entry: SegmentEntry, slot: int, step: int,
                    seq: int | None = None) -> Iterator[dict]:
        """``pin`` for the duration of a ``with`` block; yields the slot_info."""
        info = self.pin(entry, slot, step, seq)
        try:
            yield info
        finally:
            self.unpin(entry, slot)

    # -- sidecars ---------------------------------------------------------------------------

    def _sidecar(self, entry: SegmentEntry) -> Path:
        return self._state_dir / (entry.name.lstrip("/") + ".json")

    def save_sidecar(self, entry: SegmentEntry) -> None:
        with self._lock:
            self._write_sidecar(entry)

    def _write_sidecar(self, entry: SegmentEntry) -> None:
        c = entry.config
        data = {"job": entry.job, "rank": entry.rank, "generation": entry.generation,
                "owner_pid": entry.owner_pid, "world_size": c.world_size,
                "persist_dir": c.persist_dir, "persist_every": c.persist_every, "keep": c.keep,
                "chunk_bytes": c.chunk_bytes, "local_world_size": c.local_world_size,
                "last_persisted_step": entry.last_persisted_step,
                "released": entry.released}
        path = self._sidecar(entry)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        except OSError as e:
            self._problem(f"cannot write daemon state {path}: {e}")

    def _read_sidecar(self, entry: SegmentEntry) -> None:
        path = self._sidecar(entry)
        try:
            data = json.loads(path.read_text())
            entry.config = JobConfig(world_size=int(data["world_size"]),
                                     persist_dir=str(data["persist_dir"]),
                                     persist_every=int(data["persist_every"]),
                                     keep=int(data["keep"]),
                                     chunk_bytes=int(data["chunk_bytes"]),
                                     local_world_size=int(data.get("local_world_size", 0)))
            entry.owner_pid = int(data["owner_pid"])
            entry.last_persisted_step = int(data["last_persisted_step"])
            entry.released = bool(data.get("released", False))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._problem(f"daemon state {path} is unreadable ({e}); segment {entry.name} "
                          f"adopted without its persist settings")

    def _problem(self, message: str) -> None:
        log.warning("%s", message)
        self.problems.append(message)
