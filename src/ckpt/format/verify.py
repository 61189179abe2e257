"""Check every chunk of every rank of a step against its crc32c."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ckpt.errors import CkptError
from ckpt.format.metadata import ChunkRef, TensorPiece
from ckpt.format.reader import StepReader
from ckpt.storage.fs import MANIFEST_NAME, parse_step_dirname

TABLE_DAMAGE = -1  # ChunkDamage.chunk_index when the damage is not in one chunk


@dataclass(frozen=True)
class ChunkDamage:
    """One damaged chunk, or (``chunk_index == TABLE_DAMAGE``) a damaged table or manifest."""

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
    (missing or damaged manifest, foreign directory, truncated or missing files).
    Everything after that is reported, not raised: a rank whose tensor table is
    damaged, each damaged chunk, a manifest whose step is not the directory's.
    ``progress(raw_bytes_done, raw_bytes_total)`` is called after each chunk.
    """
    with StepReader(path) as reader:
        damage: list[ChunkDamage] = []
        dir_step = parse_step_dirname(reader.path.name)
        if dir_step is not None and dir_step != reader.step:
            damage.append(ChunkDamage(
                str(reader.path / MANIFEST_NAME), "", TABLE_DAMAGE,
                f'"step" is {reader.step} but the directory is step {dir_step}: the step was '
                f"moved or the manifest is foreign; restore ignores it"))
        # A chunk that several ranks' rows point at (a tensor written once for all the
        # ranks holding it, ckpt.format.replicas) is read and counted once.
        work: dict[tuple[str, int], tuple[TensorPiece, ChunkRef]] = {}
        for rank in range(reader.world_size):
            try:
                pieces = reader.rank_pieces(rank)
                meta_step = reader.meta(rank).get("step")
            except (CkptError, OSError) as exc:
                damage.append(ChunkDamage(str(reader.table_path(rank)), "", TABLE_DAMAGE,
                                          str(exc)))
                continue
            if meta_step != reader.step:
                damage.append(ChunkDamage(
                    str(reader.table_path(rank)), "", TABLE_DAMAGE,
                    f"rank {rank}'s tensor table is of step {meta_step!r}, the manifest of "
                    f"step {reader.step}: the files come from different steps"))
            for piece in pieces:
                for chunk in piece.chunks:
                    work.setdefault((piece.file, chunk.stored_offset), (piece, chunk))
        total = sum(chunk.raw_bytes for _, chunk in work.values())
        done = 0
        checked = 0
        for piece, chunk in work.values():
            try:
                reader.read_chunk(piece, chunk)
            except (CkptError, OSError) as exc:
                message = str(exc)
                if not isinstance(exc, CkptError):  # an I/O error does not name the chunk
                    message = f"{reader.path / piece.file}: tensor {piece.name!r} chunk " \
                              f"{chunk.index}: cannot be read ({exc})"
                damage.append(ChunkDamage(str(reader.path / piece.file), piece.name,
                                          chunk.index, message))
            checked += 1
            done += chunk.raw_bytes
            if progress is not None:
                progress(done, total)
        return VerifyReport(reader.path, reader.step, reader.world_size, checked, done,
                            reader.bytes_read, tuple(damage))


__all__ = ["verify", "VerifyReport", "ChunkDamage", "TABLE_DAMAGE"]
