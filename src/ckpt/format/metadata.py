"""The Parquet tensor table of one rank, and the step manifest (docs/INTERNALS.md §4).

One row per tensor piece. Chunk lists are parallel: chunk j of a piece has
``chunk_stored_offsets[j]`` (absolute offset in the data file),
``chunk_stored_bytes[j]``, ``chunk_compression[j]`` ("zstd" or "none") and
``chunk_crc32c[j]`` (crc32c of its raw, uncompressed bytes); its raw size is
``chunk_raw_bytes`` except the last, which holds the rest of ``raw_bytes``.
"""

from __future__ import annotations

import json
import math
import operator
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import ckpt
from ckpt.errors import CorruptCheckpointError
from ckpt.snapshot.layout import DTYPE_ITEMSIZE
from ckpt.storage.fs import MANIFEST_FORMAT, damaged

STATE_KEY = b"ckpt.state"
META_KEY = b"ckpt.meta"
FORMAT_KEY = b"ckpt.format"
TABLE_FORMAT = "ckpt-table/1"

SCHEMA = pa.schema([
    ("name", pa.string()), ("rank", pa.int32()), ("dtype", pa.string()),
    ("global_shape", pa.list_(pa.int64())), ("offsets", pa.list_(pa.int64())),
    ("shape", pa.list_(pa.int64())), ("file", pa.string()), ("byte_offset", pa.int64()),
    ("stored_bytes", pa.int64()), ("raw_bytes", pa.int64()), ("compression", pa.string()),
    ("first_chunk", pa.int64()), ("chunk_raw_bytes", pa.int64()),
    ("chunk_stored_offsets", pa.list_(pa.int64())), ("chunk_stored_bytes", pa.list_(pa.int64())),
    ("chunk_compression", pa.list_(pa.string())), ("chunk_crc32c", pa.list_(pa.uint32())),
])


@dataclass(frozen=True)
class ChunkRef:
    """One stored chunk of a tensor piece."""

    index: int            # position within the piece
    stored_offset: int    # absolute offset in the data file
    stored_bytes: int
    raw_offset: int       # offset of its raw bytes within the piece
    raw_bytes: int
    compressed: bool
    crc32c: int


@dataclass(frozen=True)
class PieceGeometry:
    """Which box of which global tensor one rank stores (what a tiling groups)."""

    name: str
    rank: int
    dtype: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorPiece(PieceGeometry):
    """One rank's piece of one tensor, as recorded in the rank's Parquet table."""

    file: str
    byte_offset: int
    stored_bytes: int
    raw_bytes: int
    compression: str
    first_chunk: int
    chunks: tuple[ChunkRef, ...]

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0


def build_table_bytes(rows: list[dict[str, Any]], state: Any, meta: dict[str, Any]) -> bytes:
    """Serialize a rank's rows (dicts keyed by SCHEMA names) as a Parquet file."""
    columns = {field.name: [row[field.name] for row in rows] for field in SCHEMA}
    table = pa.table(columns, schema=SCHEMA)
    table = table.replace_schema_metadata({
        FORMAT_KEY: TABLE_FORMAT.encode(),
        STATE_KEY: json.dumps(state, separators=(",", ":")).encode(),
        META_KEY: json.dumps(meta, separators=(",", ":")).encode(),
    })
    # Arrow-native sinks and sources only: a Python file object makes Arrow's worker
    # threads call back into Python, and one still doing so at interpreter exit aborts
    # the process ("terminate called without an active exception").
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


_CODECS = frozenset(("zstd", "none"))


def parse_table_bytes(blob: bytes, path: str, *, rank: int, data_files: dict[str, int]
                      ) -> tuple[list[TensorPiece], Any, dict[str, Any]]:
    """Parse rank ``rank``'s Parquet file: (pieces, state skeleton, meta).

    Every row is checked against itself and the step (``data_files``: the manifest's
    data file names and sizes) before a piece is built: its size matches shape x dtype,
    its chunks cover it and lie inside a data file of the step. Per-row metadata only,
    never per byte. Raises CorruptCheckpointError naming ``path`` (and tensor, chunk).
    """
    try:
        # ParquetFile.read without pre-buffering reads on this thread. pq.read_table scans
        # through Arrow's I/O thread pool even with use_threads=False, and a pool thread
        # may drop the last reference to ``blob`` (a Python object, so it takes the GIL)
        # after the interpreter began to exit: that aborts the process (seen in `ckpt
        # inspect`, about 1 run in 100).
        table = pq.ParquetFile(pa.BufferReader(blob), pre_buffer=False).read(use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptCheckpointError(f"{path} is not a readable Parquet file: {exc}") from None
    kv = table.schema.metadata or {}
    if kv.get(FORMAT_KEY) != TABLE_FORMAT.encode():
        raise CorruptCheckpointError(f"{path} is not a ckpt tensor table (format "
                                     f"{kv.get(FORMAT_KEY)!r}, expected {TABLE_FORMAT!r})")
    missing = set(SCHEMA.names) - set(table.column_names)
    if missing:
        raise CorruptCheckpointError(f"{path} lacks columns {sorted(missing)}")
    try:
        state = json.loads(kv[STATE_KEY])
        meta = json.loads(kv[META_KEY])
    except (KeyError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: bad key-value metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise damaged(path, f"its ckpt.meta is a {type(meta).__name__}, expected an object")
    table = _typed_table(table, path)
    pieces = [_piece_from_row(row, path, rank, data_files) for row in table.to_pylist()]
    if len({p.name for p in pieces}) != len(pieces):
        raise damaged(path, "it lists a tensor name more than once")
    return pieces, state, meta


def _typed_table(table: pa.Table, path: str) -> pa.Table:
    """``table``'s SCHEMA columns, refused unless each has exactly the SCHEMA type.

    No cast and no Arrow compute kernel: they may start Arrow's thread pool, and a pool
    thread alive at interpreter exit aborts the process (see build_table_bytes).
    """
    table = table.select(SCHEMA.names)
    for field in SCHEMA:
        found = table.schema.field(field.name).type
        if found != field.type:
            raise damaged(path, f"column {field.name!r} has type {found}, expected {field.type}")
    return table


_LIST_COLUMNS = tuple(f.name for f in SCHEMA if pa.types.is_list(f.type))


def _piece_from_row(row: dict[str, Any], path: str, rank: int,
                    data_files: dict[str, int]) -> TensorPiece:
    where = f"{path}: tensor {row['name']!r}"
    if None in row.values() or any(None in row[k] for k in _LIST_COLUMNS):
        column = next(k for k, v in row.items() if v is None or (k in _LIST_COLUMNS
                                                                 and None in v))
        raise damaged(where, f"column {column!r} holds a null value")
    if row["rank"] != rank:
        raise damaged(where, f"its row says rank {row['rank']}, the table is rank {rank}'s")
    dtype, shape, global_shape, piece_offsets = (row[k] for k in ("dtype", "shape",
                                                                  "global_shape", "offsets"))
    itemsize = DTYPE_ITEMSIZE.get(dtype)
    if itemsize is None:
        raise damaged(where, f"unknown dtype {dtype!r}")
    if not (len(shape) == len(global_shape) == len(piece_offsets)) or any(
            n < 0 or o < 0 or o + n > g for n, o, g in zip(shape, piece_offsets, global_shape)):
        raise damaged(where, f"a piece of shape {shape} at offsets {piece_offsets} does not fit "
                             f"its global shape {global_shape}")
    raw_total, nominal = row["raw_bytes"], row["chunk_raw_bytes"]
    if raw_total != math.prod(shape) * itemsize:
        raise damaged(where, f"raw_bytes is {raw_total}, but shape {shape} of {dtype} holds "
                             f"{math.prod(shape) * itemsize} bytes")
    if raw_total and nominal <= 0:
        raise damaged(where, f"chunk_raw_bytes is {nominal} for {raw_total} raw bytes")
    offsets, sizes = row["chunk_stored_offsets"], row["chunk_stored_bytes"]
    codecs, crcs = row["chunk_compression"], row["chunk_crc32c"]
    n = len(offsets)
    expected_n = -(-raw_total // nominal) if raw_total else 0
    if not (len(sizes) == len(codecs) == len(crcs) == n == expected_n):
        raise damaged(where, f"its chunk lists have lengths {n}, {len(sizes)}, {len(codecs)}, "
                             f"{len(crcs)}; {raw_total} bytes in chunks of {nominal} need "
                             f"{expected_n}")
    file_bytes = data_files.get(row["file"])
    if file_bytes is None:
        raise damaged(where, f"its file {row['file']!r} is not a data file of this step "
                             f"({sorted(data_files)[:4]})")
    if n and (min(offsets) < 0 or min(sizes) < 0
              or max(map(operator.add, offsets, sizes)) > file_bytes):
        j = next(j for j in range(n)
                 if offsets[j] < 0 or sizes[j] < 0 or offsets[j] + sizes[j] > file_bytes)
        raise damaged(f"{where} chunk {j}",
                      f"its stored bytes [{offsets[j]}, {offsets[j] + sizes[j]}) are not inside "
                      f"{row['file']} ({file_bytes} bytes)")
    if n and not _CODECS.issuperset(codecs):
        j = next(j for j in range(n) if codecs[j] not in _CODECS)
        raise damaged(f"{where} chunk {j}", f"unknown compression {codecs[j]!r}")
    chunks = tuple(
        ChunkRef(j, offsets[j], sizes[j], j * nominal, min(nominal, raw_total - j * nominal),
                 codecs[j] == "zstd", crcs[j])
        for j in range(n))
    return TensorPiece(row["name"], rank, dtype, tuple(global_shape), tuple(piece_offsets),
                       tuple(shape), row["file"], row["byte_offset"], row["stored_bytes"],
                       raw_total, row["compression"], row["first_chunk"], chunks)


def build_manifest(step: int, world_size: int, ranks: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The manifest.json of a complete step, from each rank's done-marker info."""
    return {
        "format": MANIFEST_FORMAT, "step": step, "world_size": world_size,
        "ranks": {str(r): {k: ranks[r][k] for k in ("meta", "meta_crc32c", "data", "data_bytes")}
                  for r in sorted(ranks)},
        "created_unix_s": time.time(), "ckpt_version": ckpt.__version__,
    }
