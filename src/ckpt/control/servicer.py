"""gRPC servicer: converts ``ckpt.proto`` messages to ``DaemonCore`` calls and back.

No decisions here. ckpt errors become status codes: ConfigError -> INVALID_ARGUMENT,
StepNotFoundError -> NOT_FOUND, SlotBusyError -> ABORTED (not UNAVAILABLE: the client
would report a dead daemon), other SegmentError -> FAILED_PRECONDITION, any other
CkptError -> INTERNAL; unexpected exceptions -> INTERNAL with their repr (and a log line).
"""

from __future__ import annotations

import functools
import logging

import grpc

from ckpt.control import ckpt_pb2 as pb
from ckpt.control import ckpt_pb2_grpc as pb_grpc
from ckpt.errors import CkptError, ConfigError, SegmentError, SlotBusyError, StepNotFoundError

log = logging.getLogger("ckpt.daemon")


def _code_for(e: BaseException) -> grpc.StatusCode:
    if isinstance(e, ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, StepNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, SlotBusyError):
        return grpc.StatusCode.ABORTED
    if isinstance(e, SegmentError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def _unary(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            if not isinstance(e, CkptError):
                log.exception("%s failed", method.__name__)
            context.abort(_code_for(e), str(e) if isinstance(e, CkptError) else repr(e))
    return wrapper


def _slot_msg(d: dict) -> pb.SlotStep:
    return pb.SlotStep(**d)


class SnapshotDaemonServicer(pb_grpc.SnapshotDaemonServicer):
    """Maps each RPC onto ``core`` (a ``ckpt.daemon.service.DaemonCore``)."""

    def __init__(self, core) -> None:
        self._core = core

    @_unary
    def Register(self, request, context):
        entry, existed = self._core.register(
            request.job, request.rank, request.world_size, request.pid, request.slot_bytes,
            request.persist_dir, request.persist_every, request.keep, request.chunk_bytes,
            request.local_world_size)
        return pb.RegisterReply(segment_name=entry.name, slot_bytes=entry.slot_bytes,
                                generation=entry.generation, existed=existed)

    @_unary
    def Commit(self, request, context):
        scheduled = self._core.commit(request.job, request.rank, request.slot, request.step,
                                      request.seq)
        return pb.CommitReply(persist_scheduled=scheduled)

    @_unary
    def Latest(self, request, context):
        slots, disk_steps, persist_dir = self._core.latest(request.job, request.rank)
        return pb.LatestReply(
            slots=[pb.SlotStep(slot=s, step=i["step"], seq=i["seq"], segment_name=e.name,
                               payload_bytes=i["payload_bytes"], payload_crc=i["payload_crc"],
                               generation=e.generation) for e, s, i in slots],
            disk_steps=disk_steps, persist_dir=persist_dir)

    def Fetch(self, request, context):
        try:
            for off, data, total, crc, seq in self._core.fetch(request.job, request.rank,
                                                               request.step):
                yield pb.FetchChunk(offset=off, data=data, total_bytes=total, payload_crc=crc,
                                    seq=seq)
        except Exception as e:  # noqa: BLE001
            if not isinstance(e, CkptError):
                log.exception("Fetch failed")
            context.abort(_code_for(e), str(e) if isinstance(e, CkptError) else repr(e))

    @_unary
    def Persist(self, request, context):
        out = self._core.persist(request.job, None if request.all_ranks else request.rank,
                                 request.step, request.wait, request.timeout_s)
        return pb.PersistReply(step=out.step, done=out.done, error=out.error)

    @_unary
    def Status(self, request, context):
        s = self._core.status()
        segments = [pb.SegmentStatus(**{**d, "slots": [_slot_msg(x) for x in d["slots"]]})
                    for d in s["segments"]]
        return pb.StatusReply(pid=s["pid"], version=s["version"], uptime_s=s["uptime_s"],
                              segments=segments, errors=s["errors"],
                              socket_path=s["socket_path"])

    @_unary
    def Release(self, request, context):
        unlinked, pending = self._core.release(request.job)
        return pb.ReleaseReply(unlinked=unlinked, pending=pending)
