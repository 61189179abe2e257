"""The Parquet tensor table of one rank, and the step manifest (docs/INTERNALS.md §4).

One row per tensor piece. Chunk lists are parallel: chunk j of a piece has
``chunk_stored_offsets[j]`` (absolute offset in the data file),
``chunk_stored_bytes[j]``, ``chunk_compression[j]`` ("zstd" or "none") and
``chunk_crc32c[j]`` (crc32c of its raw, uncompressed bytes); its raw size is
``chunk_raw_bytes`` except the last, which holds the rest of ``raw_bytes``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import ckpt
from ckpt.errors import CorruptCheckpointError
from ckpt.storage.fs import MANIFEST_FORMAT

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
class TensorPiece:
    """One rank's piece of one tensor, as recorded in the rank's Parquet table."""

    name: str
    rank: int
    dtype: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
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


def parse_table_bytes(blob: bytes, path: str) -> tuple[list[TensorPiece], Any, dict[str, Any]]:
    """Parse a rank's Parquet file: (pieces, state skeleton, meta). Raises naming ``path``."""
    try:
        table = pq.read_table(pa.BufferReader(blob), use_threads=False)
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
    pieces = [_piece_from_row(row, path) for row in table.to_pylist()]
    return pieces, state, meta


def _piece_from_row(row: dict[str, Any], path: str) -> TensorPiece:
    offsets, sizes = row["chunk_stored_offsets"], row["chunk_stored_bytes"]
    codecs, crcs = row["chunk_compression"], row["chunk_crc32c"]
    raw_total, nominal = row["raw_bytes"], row["chunk_raw_bytes"]
    n = len(offsets)
    expected_n = -(-raw_total // nominal) if nominal > 0 else 0
    if not (len(sizes) == len(codecs) == len(crcs) == n == expected_n):
        raise CorruptCheckpointError(
            f"{path}: tensor {row['name']!r} chunk lists have inconsistent lengths")
    chunks = tuple(
        ChunkRef(j, offsets[j], sizes[j], j * nominal, min(nominal, raw_total - j * nominal),
                 codecs[j] == "zstd", crcs[j])
        for j in range(n))
    return TensorPiece(row["name"], row["rank"], row["dtype"], tuple(row["global_shape"]),
                       tuple(row["offsets"]), tuple(row["shape"]), row["file"],
                       row["byte_offset"], row["stored_bytes"], raw_total, row["compression"],
                       row["first_chunk"], chunks)


def build_manifest(step: int, world_size: int, ranks: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The manifest.json of a complete step, from each rank's done-marker info."""
    return {
        "format": MANIFEST_FORMAT, "step": step, "world_size": world_size,
        "ranks": {str(r): {k: ranks[r][k] for k in ("meta", "meta_crc32c", "data", "data_bytes")}
                  for r in sorted(ranks)},
        "created_unix_s": time.time(), "ckpt_version": ckpt.__version__,
    }
