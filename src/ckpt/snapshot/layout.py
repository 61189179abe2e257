"""The byte layout of one rank's snapshot payload (docs/INTERNALS.md §3).

A payload lives in a slot of a shared-memory segment and is also what
``ckpt.format`` persists. It is::

    [0, 64)                      header: magic, version, meta_bytes, num_chunks,
                                 chunk_bytes, data_offset
    [64, 64 + meta_bytes)        meta, UTF-8 JSON (may end in space padding)
    [crc_offset, +4*num_chunks)  crc32c per chunk, u32 little-endian
    [data_offset, ...)           tensor bytes, each tensor 64-byte aligned

Tensor offsets (``TensorPlacement.data_offset`` and the meta's per-tensor
``"data_offset"``) are relative to the start of the data section, so the
layout of the tensors does not depend on the length of the meta, and the
meta can hold those offsets without a circular dependency.

Chunk numbering matches ``ckpt._C.CopyEngine.submit`` with one job per
tensor: each tensor is cut into chunks of at most ``chunk_bytes``, numbered
in tensor order then position; a zero-byte tensor has no chunk.

This module must not import torch: the daemon reads payloads without it.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckpt import _C
from ckpt.errors import ConfigError, CorruptCheckpointError

MAGIC = b"CKPTPAY1"
VERSION = 1
HEADER_BYTES = 64
TENSOR_ALIGN_BYTES = 64
SLOT_ALIGN_BYTES = 4096
SNAPSHOT_FORMAT = "ckpt-snapshot/1"
# magic, version, reserved, meta_bytes, num_chunks, chunk_bytes, data_offset
_HEADER = struct.Struct("<8sIIQQQQ")

# torch dtype name (without "torch.") -> itemsize in bytes
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1,
    "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
    "bool": 1,
}
# torch dtype name -> numpy dtype name, where numpy has the same type
NUMPY_DTYPE: dict[str, str] = {
    "float64": "float64", "float32": "float32", "float16": "float16",
    "complex128": "complex128", "complex64": "complex64",
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8",
    "uint64": "uint64", "uint32": "uint32", "uint16": "uint16", "uint8": "uint8",
    "bool": "bool",
}
_BIT_CARRIER = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64", 16: "complex128"}


def itemsize_of(dtype: str) -> int:
    """Bytes per element of a torch dtype name such as ``"bfloat16"``."""
    try:
        return DTYPE_ITEMSIZE[dtype]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {dtype!r}: expected a torch dtype name without the 'torch.' "
            f"prefix, one of {sorted(DTYPE_ITEMSIZE)}") from None


def numpy_dtype_of(dtype: str) -> np.dtype:
    """The numpy dtype that holds ``dtype``'s bytes.

    The same type where numpy has it; otherwise an unsigned integer of the same
    itemsize carrying the bit pattern (bfloat16 -> uint16, float8_* -> uint8);
    view it back with ``torch.from_numpy(a).view(torch.bfloat16)``.
    """
    name = NUMPY_DTYPE.get(dtype) or _BIT_CARRIER[itemsize_of(dtype)]
    return np.dtype(name)


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class TensorSpec:
    """One tensor piece a rank holds: local ``shape`` at ``offsets`` in ``global_shape``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    nbytes: int

    def __post_init__(self) -> None:
        shape = _dims(self.shape)
        global_shape, offsets = _dims(self.global_shape), _dims(self.offsets)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "global_shape", global_shape)
        object.__setattr__(self, "offsets", offsets)
        if not self.name or type(self.name) is not str:
            raise ConfigError(f"tensor name must be a non-empty string, got {self.name!r}")
        itemsize = itemsize_of(self.dtype)
        if not (len(shape) == len(global_shape) == len(offsets)):
            raise ConfigError(
                f"tensor {self.name!r}: shape {shape}, global_shape {global_shape} "
                f"and offsets {offsets} must have the same number of dimensions")
        for dim, (n, g, o) in enumerate(zip(shape, global_shape, offsets)):
            if n < 0 or o < 0 or o + n > g:
                raise ConfigError(
                    f"tensor {self.name!r}: dimension {dim} piece [{o}, {o + n}) does not fit "
                    f"in the global size {g}")
        nbytes = self.nbytes if type(self.nbytes) is int else operator.index(self.nbytes)
        object.__setattr__(self, "nbytes", nbytes)
        expected = math.prod(shape) * itemsize
        if nbytes != expected:
            raise ConfigError(
                f"tensor {self.name!r}: nbytes {nbytes} != {expected} "
                f"(shape {shape} x {itemsize} bytes of {self.dtype})")


def _dims(values: Any) -> tuple[int, ...]:
    """``values`` as a tuple of ints; TypeError for anything that is not an integer
    (a float or a string in a damaged meta must not be truncated or parsed)."""
    dims = values if type(values) is tuple else tuple(values)
    for v in dims:
        if type(v) is not int:
            return tuple(operator.index(v) for v in dims)
    return dims


@dataclass(frozen=True)
class TensorPlacement:
    """Where a tensor's bytes and chunks are in the payload."""

    spec: TensorSpec
    data_offset: int  # relative to the data section
    first_chunk: int
    num_chunks: int

    def chunk_range(self, j: int, chunk_bytes: int) -> tuple[int, int]:
        """(start, nbytes) of the tensor's j-th chunk, relative to the data section."""
        start = j * chunk_bytes
        return self.data_offset + start, min(chunk_bytes, self.spec.nbytes - start)


@dataclass(frozen=True)
class PayloadLayout:
    """Placement of every tensor of one payload; sizes that depend on the meta are methods."""

    chunk_bytes: int
    tensors: tuple[TensorPlacement, ...]
    num_chunks: int
    data_bytes: int

    def crc_offset(self, meta_bytes: int) -> int:
        return align_up(HEADER_BYTES + meta_bytes, 8)

    def data_offset(self, meta_bytes: int) -> int:
        return align_up(self.crc_offset(meta_bytes) + 4 * self.num_chunks, TENSOR_ALIGN_BYTES)

    def payload_bytes(self, meta_bytes: int) -> int:
        """Total payload size when the meta JSON takes ``meta_bytes``."""
        return self.data_offset(meta_bytes) + self.data_bytes

    def tensor_entries(self) -> list[dict[str, Any]]:
        """The meta's ``"tensors"`` list for this layout."""
        return [{
            "name": t.spec.name, "dtype": t.spec.dtype, "shape": list(t.spec.shape),
            "global_shape": list(t.spec.global_shape), "offsets": list(t.spec.offsets),
            "data_offset": t.data_offset, "nbytes": t.spec.nbytes,
            "first_chunk": t.first_chunk, "num_chunks": t.num_chunks,
        } for t in self.tensors]

    @functools.cached_property
    def tensors_json(self) -> str:
        """``tensor_entries()`` as compact JSON, made once per layout (every snapshot of an
        unchanged state writes the same list: thousands of entries for a big model)."""
        return json.dumps(self.tensor_entries(), separators=(",", ":"), allow_nan=False)

    def chunk_sizes(self) -> list[int]:
        """Raw size of every chunk, in chunk order."""
        sizes: list[int] = []
        for t in self.tensors:
            sizes.extend(t.chunk_range(j, self.chunk_bytes)[1] for j in range(t.num_chunks))
        return sizes


def plan_layout(specs: list[TensorSpec] | tuple[TensorSpec, ...],
                chunk_bytes: int) -> PayloadLayout:
    """Place ``specs`` in order, 64-byte aligned, and number their chunks."""
    if chunk_bytes <= 0:
        raise ConfigError(f"chunk_bytes must be positive, got {chunk_bytes}")
    names: set[str] = set()
    placements: list[TensorPlacement] = []
    offset = 0
    chunk = 0
    for spec in specs:
        if spec.name in names:
            raise ConfigError(f"tensor name {spec.name!r} appears twice in one payload")
        names.add(spec.name)
        offset = align_up(offset, TENSOR_ALIGN_BYTES)
        n = -(-spec.nbytes // chunk_bytes)
        placements.append(TensorPlacement(spec, offset, chunk, n))
        offset += spec.nbytes
        chunk += n
    return PayloadLayout(chunk_bytes, tuple(placements), chunk, offset)


def slot_bytes_for(layout: PayloadLayout, meta_reserve_bytes: int) -> int:
    """Slot size for payloads of ``layout`` whose meta may grow to ``meta_reserve_bytes``.

    Adds slack of a quarter of the reserve (at least 4 KiB) so that a meta that
    grows a little (a longer step number, a new scalar in the state) still fits,
    and rounds up to 4096.
    """
    if meta_reserve_bytes < 0:
        raise ConfigError(f"meta_reserve_bytes must be >= 0, got {meta_reserve_bytes}")
    slack = max(SLOT_ALIGN_BYTES, meta_reserve_bytes // 4)
    return align_up(layout.payload_bytes(meta_reserve_bytes + slack), SLOT_ALIGN_BYTES)


class StateJson(str):
    """A meta's ``"state"`` already encoded as compact JSON: spliced in as it is."""


_STATE_TOKEN = "\x00ckpt:state\x00"


def encode_meta(layout: PayloadLayout, meta: dict[str, Any]) -> bytes:
    """The meta JSON that ``write_header_and_meta`` writes (its length is ``meta_bytes``).

    ``meta["state"]`` is the tree skeleton, or a :class:`StateJson` of it."""
    full = dict(meta)
    state = full.get("state")
    if isinstance(state, StateJson):
        full["state"] = _STATE_TOKEN
    full.setdefault("format", SNAPSHOT_FORMAT)
    for key, value in (("chunk_bytes", layout.chunk_bytes), ("tensors", None)):
        if key in full and full[key] != (value if value is not None else layout.tensor_entries()):
            raise ConfigError(f"meta[{key!r}] does not match the layout; leave it out and "
                              f"write_header_and_meta fills it in")
        full[key] = value
    del full["tensors"]
    # The tensor list, cached per layout, goes in last as JSON text.
    head = json.dumps(full, separators=(",", ":"), allow_nan=False)
    if isinstance(state, StateJson):
        token = json.dumps(_STATE_TOKEN)
        if head.count(token) != 1:
            raise ConfigError(f"meta holds the text {_STATE_TOKEN!r} outside its state")
        head = head.replace(token, state)
    return f'{head[:-1]},"tensors":{layout.tensors_json}}}'.encode("utf-8")


def write_header_and_meta(view: memoryview, layout: PayloadLayout, meta: dict[str, Any]) -> int:
    """Write the header, the meta JSON and a zeroed crc array into ``view``.

    ``meta`` holds the snapshot fields of §3 (job, rank, world_size, step,
    state); "format", "chunk_bytes" and "tensors" are filled in from
    ``layout``. Returns ``meta_bytes``; tensor bytes then go to
    ``layout.data_offset(meta_bytes) + placement.data_offset`` and crcs to
    ``layout.crc_offset(meta_bytes)``. Raises ConfigError when the payload does
    not fit in ``view``.
    """
    blob = encode_meta(layout, meta)
    meta_bytes = len(blob)
    need = layout.payload_bytes(meta_bytes)
    if need > len(view):
        raise ConfigError(
            f"payload needs {need} bytes (meta {meta_bytes}, data {layout.data_bytes}) but the "
            f"slot holds {len(view)}; recreate the segment with slot_bytes_for(layout, "
            f"{meta_bytes})")
    data_offset = layout.data_offset(meta_bytes)
    crc_offset = layout.crc_offset(meta_bytes)
    view[0:HEADER_BYTES] = _HEADER.pack(
        MAGIC, VERSION, 0, meta_bytes, layout.num_chunks, layout.chunk_bytes,
        data_offset).ljust(HEADER_BYTES, b"\0")
    view[HEADER_BYTES:HEADER_BYTES + meta_bytes] = blob
    view[HEADER_BYTES + meta_bytes:data_offset] = bytes(data_offset - HEADER_BYTES - meta_bytes)
    assert crc_offset + 4 * layout.num_chunks <= data_offset
    return meta_bytes


def _corrupt(what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"snapshot payload is corrupt: {what}")


_ENTRY_KEYS = frozenset({"name", "dtype", "shape", "global_shape", "offsets", "data_offset",
                         "nbytes", "first_chunk", "num_chunks"})


def _placed_as_planned(layout: PayloadLayout, entries: list[dict[str, Any]]) -> bool:
    """``layout.tensor_entries() == entries``, given that ``layout`` was planned from the
    entries' specs, without building the entries (a snapshot may hold 100k tensors)."""
    return all(e.keys() == _ENTRY_KEYS and e["data_offset"] == t.data_offset
               and e["first_chunk"] == t.first_chunk and e["num_chunks"] == t.num_chunks
               for t, e in zip(layout.tensors, entries, strict=True))


def _spec_from_entry(entry: dict[str, Any]) -> TensorSpec:
    try:
        return TensorSpec(entry["name"], entry["dtype"], entry["shape"], entry["global_shape"],
                          entry["offsets"], entry["nbytes"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise _corrupt(f"bad tensor entry {str(entry)[:200]}: {exc}") from None


def _header_fields(view: memoryview) -> tuple[int, int, int, int]:
    """(meta_bytes, num_chunks, chunk_bytes, data_offset) of a payload whose magic,
    version and meta extent check out; CorruptCheckpointError otherwise."""
    size = len(view)
    if size < HEADER_BYTES:
        raise _corrupt(f"{size} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, _, meta_bytes, num_chunks, chunk_bytes, data_offset = \
        _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise _corrupt(f"magic is {bytes(magic)!r}, expected {MAGIC!r} (not a ckpt payload, "
                       f"or the slot was never written)")
    if version != VERSION:
        raise _corrupt(f"version {version}, this ckpt reads version {VERSION}; use a matching ckpt")
    if HEADER_BYTES + meta_bytes > size:
        raise _corrupt(f"meta of {meta_bytes} bytes runs past the end of the {size}-byte payload")
    if chunk_bytes <= 0:
        raise _corrupt(f"chunk_bytes is {chunk_bytes}")
    return meta_bytes, num_chunks, chunk_bytes, data_offset


def _check_payload_crc(view: memoryview, data_offset: int, expected_crc: int) -> None:
    if data_offset > len(view):
        raise _corrupt(f"data offset {data_offset} is past the end of the {len(view)}-byte payload")
    actual = _C.crc32c(view[0:data_offset])
    if actual != expected_crc:
        raise _corrupt(f"header/meta/crc area crc32c is {actual:#010x}, the slot header "
                       f"recorded {expected_crc:#010x}")


def check_payload_seal(view: memoryview, expected_crc: int) -> None:
    """The cheap half of :func:`read_payload`: magic, version and the crc32c of
    ``[0, data_offset)`` against the slot header's ``expected_crc``, without parsing the
    meta (which costs seconds for 100k tensors). For listing sealed slots; a reader still
    calls read_payload, which checks the rest."""
    _check_payload_crc(view, _header_fields(view)[3], expected_crc)


def read_meta_head(view: memoryview) -> dict[str, Any]:
    """The meta's leading scalar fields (job, rank, world_size, step: the hook writes them
    first), without parsing the rest, which costs seconds for 100k tensors. Stops at the
    first field whose value is an object or array. For listing a slot whose seal was
    checked (``check_payload_seal``); CorruptCheckpointError when the text is not JSON."""
    meta_bytes = _header_fields(view)[0]
    text = bytes(view[HEADER_BYTES:HEADER_BYTES + min(meta_bytes, _META_HEAD_BYTES)]
                 ).decode("utf-8", errors="replace")
    decoder, head, i = json.JSONDecoder(), {}, 1
    if not text.startswith("{"):
        raise _corrupt("meta is not a JSON object")
    try:
        while i < len(text) and text[i] == '"':
            key, i = decoder.raw_decode(text, i)
            if text[i] != ":" or text[i + 1] in "{[":
                break
            head[key], i = decoder.raw_decode(text, i + 1)
            if text[i] != ",":
                break
            i += 1
    except (ValueError, IndexError):
        if len(text) == meta_bytes:  # the whole meta was there: it is not JSON
            raise _corrupt("meta is not valid JSON") from None
    return head


_META_HEAD_BYTES = 4096


def read_payload(view: memoryview, expected_crc: int | None = None
                 ) -> tuple[PayloadLayout, dict[str, Any], np.ndarray]:
    """Parse and validate a payload: returns (layout, meta, crc array copy as uint32).

    Checks magic, version, that meta, crc array and data lie inside ``view``,
    that the meta's tensors re-plan to the header's chunking, and, when
    ``expected_crc`` is given (the slot header's payload_crc), the crc of
    ``[0, data_offset)``. Raises CorruptCheckpointError saying what is wrong.
    """
    size = len(view)
    meta_bytes, num_chunks, chunk_bytes, data_offset = _header_fields(view)
    if expected_crc is not None:  # first: damage is then named as such, and cheaply
        _check_payload_crc(view, data_offset, expected_crc)
    try:
        meta = json.loads(bytes(view[HEADER_BYTES:HEADER_BYTES + meta_bytes]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(f"meta is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != SNAPSHOT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise _corrupt(f"meta format is {found!r}, expected {SNAPSHOT_FORMAT!r}")
    if meta.get("chunk_bytes") != chunk_bytes or not isinstance(meta.get("tensors"), list):
        raise _corrupt("meta chunk_bytes or tensors disagree with the header")
    layout = plan_layout([_spec_from_entry(e) for e in meta["tensors"]], chunk_bytes)
    if not _placed_as_planned(layout, meta["tensors"]):
        raise _corrupt("meta tensor offsets or chunk numbering do not match the planned layout")
    if layout.num_chunks != num_chunks or layout.data_offset(meta_bytes) != data_offset:
        raise _corrupt(f"header says {num_chunks} chunks at data offset {data_offset}, the meta "
                       f"plans {layout.num_chunks} chunks at {layout.data_offset(meta_bytes)}")
    if layout.payload_bytes(meta_bytes) > size:
        raise _corrupt(f"tensor data ends at {layout.payload_bytes(meta_bytes)}, past the end of "
                       f"the {size}-byte payload")
    crc_offset = layout.crc_offset(meta_bytes)
    crcs = np.frombuffer(view, dtype="<u4", count=num_chunks, offset=crc_offset).astype(np.uint32)
    return layout, meta, crcs


def payload_crc(view: memoryview, layout: PayloadLayout) -> int:
    """crc32c of ``[0, data_offset)``: header, meta and crc array (sealed into the slot)."""
    meta_bytes = _HEADER.unpack_from(view, 0)[3]
    return _C.crc32c(view[0:layout.data_offset(meta_bytes)])


def crc_array_view(view: memoryview, layout: PayloadLayout, meta_bytes: int) -> np.ndarray:
    """Writable uint32 view of the payload's crc array (for filling crcs in place)."""
    return np.frombuffer(view, dtype="<u4", count=layout.num_chunks,
                         offset=layout.crc_offset(meta_bytes))


def data_view(view: memoryview, layout: PayloadLayout, meta_bytes: int,
              placement: TensorPlacement) -> memoryview:
    """The bytes of one tensor inside the payload."""
    start = layout.data_offset(meta_bytes) + placement.data_offset
    return view[start:start + placement.spec.nbytes]
