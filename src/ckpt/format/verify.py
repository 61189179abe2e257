"""Check every chunk of every rank of a step against its crc32c."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ckpt.errors import CorruptChunkError
from ckpt.format.reader import StepReader


@dataclass(frozen=True)
class ChunkDamage:
    file: str
    tensor: str
    chunk_index: int
    message: str


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found. ``ok`` when every chunk decoded and matched its crc32c."""

    path: Path
    step: int
    world_size: int
    chunks_checked: int
    raw_bytes_checked: int
    stored_bytes_checked: int
    damage: tuple[ChunkDamage, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.damage


def verify(path: str | os.PathLike[str],
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Decode and crc-check every chunk of the step at ``path``; collects all damage.

    Raises CorruptCheckpointError when the step cannot be opened at all
    (missing manifest, foreign directory, truncated or missing files).
    ``progress(raw_bytes_done, raw_bytes_total)`` is called after each chunk.
    """
    with StepReader(path) as reader:
        # A chunk that several ranks' rows point at (a tensor written once for all the
        # ranks holding it, ckpt.format.replicas) is read and counted once.
        work: dict[tuple[str, int], tuple] = {}
        for piece in reader.tensors():
            for chunk in piece.chunks:
                work.setdefault((piece.file, chunk.stored_offset), (piece, chunk))
        total = sum(chunk.raw_bytes for _, chunk in work.values())
        done = 0
        checked = 0
        damage: list[ChunkDamage] = []
        for piece, chunk in work.values():
            try:
                reader.read_chunk(piece, chunk)
            except CorruptChunkError as exc:
                damage.append(ChunkDamage(str(reader.path / piece.file), piece.name,
                                          chunk.index, str(exc)))
            checked += 1
            done += chunk.raw_bytes
            if progress is not None:
                progress(done, total)
        return VerifyReport(reader.path, reader.step, reader.world_size, checked, done,
                            reader.bytes_read, tuple(damage))


__all__ = ["verify", "VerifyReport", "ChunkDamage"]
