"""``DaemonClient``: the trainer's (and the CLI's) handle on a snapshot daemon.

One method per RPC of ``ckpt.proto``. Every call has a deadline (``timeout_s``). gRPC
failures become ckpt errors: UNAVAILABLE / DEADLINE_EXCEEDED ->
:class:`DaemonUnavailableError` (names the address and how to start a daemon),
UNAUTHENTICATED / PERMISSION_DENIED -> :class:`DaemonAuthError`, NOT_FOUND ->
:class:`StepNotFoundError`, INVALID_ARGUMENT -> :class:`ConfigError`,
FAILED_PRECONDITION / RESOURCE_EXHAUSTED -> :class:`SegmentError`, ABORTED ->
:class:`SlotBusyError`, anything else ->
:class:`CkptError`. Thread-safe (a gRPC channel is); ``close()`` is idempotent.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import grpc

from ckpt.control import ckpt_pb2 as pb
from ckpt.control import ckpt_pb2_grpc as pb_grpc
from ckpt.errors import (CkptError, ConfigError, DaemonAuthError, DaemonUnavailableError,
                         SegmentError, SlotBusyError, StepNotFoundError)


@dataclass(frozen=True)
class Registration:
    segment_name: str
    slot_bytes: int
    generation: int
    existed: bool


@dataclass(frozen=True)
class SealedSlot:
    slot: int
    step: int
    seq: int
    segment_name: str
    payload_bytes: int
    payload_crc: int
    generation: int


@dataclass(frozen=True)
class LatestSteps:
    slots: tuple[SealedSlot, ...]  # newest first
    disk_steps: tuple[int, ...]    # ascending
    persist_dir: str

    @property
    def newest_in_memory(self) -> SealedSlot | None:
        return self.slots[0] if self.slots else None


@dataclass(frozen=True)
class PersistOutcome:
    step: int
    done: bool
    error: str


def _slot(m: pb.SlotStep) -> SealedSlot:
    return SealedSlot(slot=m.slot, step=m.step, seq=m.seq, segment_name=m.segment_name,
                      payload_bytes=m.payload_bytes, payload_crc=m.payload_crc,
                      generation=m.generation)


def _target(address: str | Path) -> tuple[str, bool]:
    """(grpc target, is_tcp). A path (anything with a '/') or 'unix:...' is a Unix socket."""
    address = str(address)
    if address.startswith("unix:"):
        return address, False
    if "/" in address or address.endswith(".sock"):
        return "unix:" + str(Path(address).absolute()), False
    return address, True


class DaemonClient:
    """Client of one daemon at ``address`` (a Unix socket path, or ``host:port`` + token)."""

    def __init__(self, address: str | Path, token: str | None = None,
                 timeout_s: float = 10.0) -> None:
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        self.address = str(address)
        self.timeout_s = timeout_s
        target, is_tcp = _target(address)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if is_tcp and not token:
            # The daemon refuses TCP without a token; failing here gives the clearer message.
            raise ConfigError(f"connecting to the daemon over TCP ({self.address}) needs a token; "
                              f"pass token= (the content of the daemon's --token-file)")
        # Short reconnect backoff: after a failed connect gRPC waits (1 s by default) before
        # trying again, and a daemon that has just started would look dead meanwhile.
        options = [("grpc.max_receive_message_length", 8 << 20),
                   ("grpc.enable_retries", 0),
                   ("grpc.initial_reconnect_backoff_ms", 50),
                   ("grpc.min_reconnect_backoff_ms", 50),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.SnapshotDaemonStub(self._channel)
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------------

    def _call(self, name: str, request, timeout_s: float | None = None):
        if self._closed:
            raise CkptError(f"DaemonClient for {self.address} is closed")
        try:
            return getattr(self._stub, name)(request, timeout=timeout_s or self.timeout_s,
                                             metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._translate(name, e) from None

    def _translate(self, rpc: str, e: grpc.RpcError) -> CkptError:
        code = e.code() if hasattr(e, "code") else None
        details = (e.details() if hasattr(e, "details") else "") or ""
        where = f"daemon at {self.address}"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return DaemonUnavailableError(
                f"no ckpt daemon answered {rpc} on {self.address} ({code.name}: {details}). "
                f"Start one with `ckpt daemon --socket {self.address}` or let "
                f"ckpt.daemon.spawn.ensure_daemon() start it")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return DaemonAuthError(f"{where} refused {rpc} ({code.name}): {details}. Pass the "
                                   f"token from the daemon's --token-file")
        if code == grpc.StatusCode.ABORTED:
            return SlotBusyError(f"{where}: {rpc}: {details}")
        if code == grpc.StatusCode.NOT_FOUND:
            return StepNotFoundError(f"{where}: {rpc}: {details}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ConfigError(f"{where} rejected {rpc}: {details}")
        if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return SegmentError(f"{where}: {rpc} failed: {details}")
        name = code.name if code is not None else "UNKNOWN"
        return CkptError(f"{where}: {rpc} failed ({name}): {details}")

    # -- RPCs -------------------------------------------------------------------------------

    def register(self, job: str, rank: int, world_size: int, pid: int, slot_bytes: int,
                 persist_dir: str | Path | None = None, persist_every: int = 0, keep: int = 0,
                 chunk_bytes: int = 0, local_world_size: int = 0,
                 timeout_s: float | None = None) -> Registration:
        """Get (job, rank)'s segment: existing if big enough, else a new one or generation.

        ``local_world_size``: how many ranks of the job run on this node (0: not known);
        the daemon schedules a periodic persist only once that many have registered.

        A new segment is created and pre-faulted inside the call: give big ones a longer
        ``timeout_s`` (default: the client's)."""
        r = self._call("Register", pb.RegisterRequest(
            job=job, rank=rank, world_size=world_size, pid=pid, slot_bytes=slot_bytes,
            persist_dir=str(persist_dir) if persist_dir else "", persist_every=persist_every,
            keep=keep, chunk_bytes=chunk_bytes, local_world_size=local_world_size),
            timeout_s=timeout_s)
        return Registration(r.segment_name, r.slot_bytes, r.generation, r.existed)

    def commit(self, job: str, rank: int, slot: int, step: int, seq: int) -> bool:
        """Tell the daemon a slot was sealed. Returns whether a persist was scheduled."""
        return self._call("Commit", pb.CommitRequest(job=job, rank=rank, slot=slot, step=step,
                                                     seq=seq)).persist_scheduled

    def latest(self, job: str, rank: int) -> LatestSteps:
        r = self._call("Latest", pb.LatestRequest(job=job, rank=rank))
        return LatestSteps(tuple(_slot(s) for s in r.slots), tuple(r.disk_steps), r.persist_dir)

    def iter_fetch(self, job: str, rank: int, step: int,
                   timeout_s: float | None = None) -> Iterator[pb.FetchChunk]:
        """Stream the sealed payload of ``step`` as FetchChunk messages (<= 1 MiB each)."""
        if self._closed:
            raise CkptError(f"DaemonClient for {self.address} is closed")
        stream = self._stub.Fetch(pb.FetchRequest(job=job, rank=rank, step=step),
                                  timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        try:
            yield from stream
        except grpc.RpcError as e:
            raise self._translate("Fetch", e) from None

    def fetch(self, job: str, rank: int, step: int, timeout_s: float | None = None) -> bytes:
        """The whole sealed payload of ``step`` (checked for length; the caller verifies crcs)."""
        out = bytearray()
        total = None
        for chunk in self.iter_fetch(job, rank, step, timeout_s):
            total = chunk.total_bytes
            if chunk.offset != len(out):
                raise CkptError(f"Fetch of {job} rank {rank} step {step} from {self.address}: "
                                f"chunk at offset {chunk.offset}, expected {len(out)}")
            out += chunk.data
        if total is None or len(out) != total:
            raise CkptError(f"Fetch of {job} rank {rank} step {step} from {self.address} ended "
                            f"after {len(out)} of {total} bytes")
        return bytes(out)

    def persist(self, job: str, rank: int | None = None, step: int = -1, wait: bool = False,
                timeout_s: float = 0.0,
                progress: Callable[[int, int], None] | None = None) -> PersistOutcome:
        """Persist ``step`` (-1: the newest step every local rank has) of ``rank`` or all ranks.

        With ``wait`` and ``progress``, the call runs on a helper thread while this one polls
        Status every ``PROGRESS_POLL_S`` and reports ``progress(done_bytes, total_bytes)``
        of the job's persist in progress (for a progress bar).
        """
        if progress is not None and wait:
            return self._persist_reporting(job, rank, step, timeout_s, progress)
        rpc_timeout = (timeout_s + self.timeout_s) if wait and timeout_s else None
        if wait and not timeout_s:
            rpc_timeout = max(self.timeout_s, 120.0)
        r = self._call("Persist", pb.PersistRequest(
            job=job, rank=rank if rank is not None else -1, all_ranks=rank is None, step=step,
            wait=wait, timeout_s=timeout_s), timeout_s=rpc_timeout)
        return PersistOutcome(r.step, r.done, r.error)

    PROGRESS_POLL_S = 0.25

    def _persist_reporting(self, job: str, rank: int | None, step: int, timeout_s: float,
                           progress: Callable[[int, int], None]) -> PersistOutcome:
        total = 0
        with ThreadPoolExecutor(1, thread_name_prefix="ckpt-persist-rpc") as pool:
            fut = pool.submit(self.persist, job, rank, step, True, timeout_s)
            while True:
                try:
                    outcome = fut.result(timeout=self.PROGRESS_POLL_S)
                    break
                except FutureTimeout:
                    pass
                try:
                    segments = self.status(timeout_s=self.PROGRESS_POLL_S * 4).segments
                except CkptError:
                    continue  # the Persist call itself will report a dead daemon
                now = next((s for s in segments if s.job == job and s.persist_step >= 0
                            and s.persist_total_bytes), None)
                if now is not None and (step < 0 or now.persist_step == step):
                    total = now.persist_total_bytes
                    progress(now.persist_done_bytes, total)
        if outcome.done and total:
            progress(total, total)
        return outcome

    def status(self, timeout_s: float | None = None) -> pb.StatusReply:
        """The daemon's StatusReply message (see ckpt.proto)."""
        return self._call("Status", pb.StatusRequest(), timeout_s=timeout_s)

    def release(self, job: str) -> pb.ReleaseReply:
        return self._call("Release", pb.ReleaseRequest(job=job))

    def ping(self, timeout_s: float = 1.0) -> bool:
        """True when a daemon answers Status within ``timeout_s``."""
        try:
            self.status(timeout_s=timeout_s)
            return True
        except DaemonUnavailableError:
            return False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> "DaemonClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
