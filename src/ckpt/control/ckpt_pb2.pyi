from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("job", "rank", "world_size", "pid", "slot_bytes", "persist_dir", "persist_every", "keep", "chunk_bytes", "local_world_size")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PERSIST_DIR_FIELD_NUMBER: _ClassVar[int]
    PERSIST_EVERY_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    world_size: int
    pid: int
    slot_bytes: int
    persist_dir: str
    persist_every: int
    keep: int
    chunk_bytes: int
    local_world_size: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., pid: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., persist_dir: _Optional[str] = ..., persist_every: _Optional[int] = ..., keep: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., local_world_size: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("segment_name", "slot_bytes", "generation", "existed")
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    segment_name: str
    slot_bytes: int
    generation: int
    existed: bool
    def __init__(self, segment_name: _Optional[str] = ..., slot_bytes: _Optional[int] = ..., generation: _Optional[int] = ..., existed: _Optional[bool] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("job", "rank", "slot", "step", "seq")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    slot: int
    step: int
    seq: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., slot: _Optional[int] = ..., step: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("persist_scheduled",)
    PERSIST_SCHEDULED_FIELD_NUMBER: _ClassVar[int]
    persist_scheduled: bool
    def __init__(self, persist_scheduled: _Optional[bool] = ...) -> None: ...

class SlotStep(_message.Message):
    __slots__ = ("slot", "step", "seq", "segment_name", "payload_bytes", "payload_crc", "generation")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_CRC_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    slot: int
    step: int
    seq: int
    segment_name: str
    payload_bytes: int
    payload_crc: int
    generation: int
    def __init__(self, slot: _Optional[int] = ..., step: _Optional[int] = ..., seq: _Optional[int] = ..., segment_name: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., payload_crc: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class LatestRequest(_message.Message):
    __slots__ = ("job", "rank")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class LatestReply(_message.Message):
    __slots__ = ("slots", "disk_steps", "persist_dir")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    DISK_STEPS_FIELD_NUMBER: _ClassVar[int]
    PERSIST_DIR_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[SlotStep]
    disk_steps: _containers.RepeatedScalarFieldContainer[int]
    persist_dir: str
    def __init__(self, slots: _Optional[_Iterable[_Union[SlotStep, _Mapping]]] = ..., disk_steps: _Optional[_Iterable[int]] = ..., persist_dir: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("job", "rank", "step")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    step: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class FetchChunk(_message.Message):
    __slots__ = ("offset", "data", "total_bytes", "payload_crc", "seq")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_CRC_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_bytes: int
    payload_crc: int
    seq: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., payload_crc: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class PersistRequest(_message.Message):
    __slots__ = ("job", "rank", "all_ranks", "step", "wait", "timeout_s")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALL_RANKS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    all_ranks: bool
    step: int
    wait: bool
    timeout_s: float
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., all_ranks: _Optional[bool] = ..., step: _Optional[int] = ..., wait: _Optional[bool] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class PersistReply(_message.Message):
    __slots__ = ("step", "done", "error")
    STEP_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step: int
    done: bool
    error: str
    def __init__(self, step: _Optional[int] = ..., done: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SegmentStatus(_message.Message):
    __slots__ = ("job", "rank", "world_size", "generation", "segment_name", "owner_pid", "owner_alive", "slots", "size_bytes", "slot_bytes", "last_persisted_step", "persist_queue", "errors", "persist_dir", "adopted", "released", "persist_step", "persist_done_bytes", "persist_total_bytes")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_PID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ALIVE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_PERSISTED_STEP_FIELD_NUMBER: _ClassVar[int]
    PERSIST_QUEUE_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    PERSIST_DIR_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    PERSIST_STEP_FIELD_NUMBER: _ClassVar[int]
    PERSIST_DONE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PERSIST_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    world_size: int
    generation: int
    segment_name: str
    owner_pid: int
    owner_alive: bool
    slots: _containers.RepeatedCompositeFieldContainer[SlotStep]
    size_bytes: int
    slot_bytes: int
    last_persisted_step: int
    persist_queue: int
    errors: _containers.RepeatedScalarFieldContainer[str]
    persist_dir: str
    adopted: bool
    released: bool
    persist_step: int
    persist_done_bytes: int
    persist_total_bytes: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., generation: _Optional[int] = ..., segment_name: _Optional[str] = ..., owner_pid: _Optional[int] = ..., owner_alive: _Optional[bool] = ..., slots: _Optional[_Iterable[_Union[SlotStep, _Mapping]]] = ..., size_bytes: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., last_persisted_step: _Optional[int] = ..., persist_queue: _Optional[int] = ..., errors: _Optional[_Iterable[str]] = ..., persist_dir: _Optional[str] = ..., adopted: _Optional[bool] = ..., released: _Optional[bool] = ..., persist_step: _Optional[int] = ..., persist_done_bytes: _Optional[int] = ..., persist_total_bytes: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("pid", "version", "uptime_s", "segments", "errors", "socket_path")
    PID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    pid: int
    version: str
    uptime_s: float
    segments: _containers.RepeatedCompositeFieldContainer[SegmentStatus]
    errors: _containers.RepeatedScalarFieldContainer[str]
    socket_path: str
    def __init__(self, pid: _Optional[int] = ..., version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., segments: _Optional[_Iterable[_Union[SegmentStatus, _Mapping]]] = ..., errors: _Optional[_Iterable[str]] = ..., socket_path: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("unlinked", "pending")
    UNLINKED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    unlinked: _containers.RepeatedScalarFieldContainer[str]
    pending: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, unlinked: _Optional[_Iterable[str]] = ..., pending: _Optional[_Iterable[str]] = ...) -> None: ...
