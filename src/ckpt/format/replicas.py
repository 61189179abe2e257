"""Write a tensor that several ranks hold identically once per step (DDP replicas).

Under DDP every rank holds the same parameters and optimizer state; writing each rank's
copy multiplies disk traffic and space by the number of ranks. When one process writes
several ranks of a step (the node daemon persisting its local ranks), the second and later
copies of a tensor are not written again: their rows in the rank's Parquet table point at
the chunks already written to the first rank's data file (the ``file`` column), and the
reader follows them like any other row.

Nothing is assumed about which tensors are replicated: two tensors are the same only when
name, dtype, shape, global shape, offsets, chunking and every chunk's crc32c match *and*
their bytes compare equal. Ranks written by different processes (other nodes) each write
their own first copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_COMPARE_BYTES = 16 << 20  # compare in windows: no full-size temporary


def _equal(a: memoryview, b: memoryview) -> bool:
    if len(a) != len(b):
        return False
    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    return all(np.array_equal(x[i:i + _COMPARE_BYTES], y[i:i + _COMPARE_BYTES])
               for i in range(0, len(x), _COMPARE_BYTES))


class ReplicaIndex:
    """The tensors written so far for one step by this process.

    ``find`` returns the row of an identical tensor already written (to point at), or
    None; ``add`` records a tensor after its row is final. The raw byte views passed to
    ``add`` must stay valid while the index is used (the payloads of one persist).
    Not thread-safe: one writer thread uses it.
    """

    def __init__(self) -> None:
        self._rows: dict[tuple, tuple[dict[str, Any], memoryview]] = {}
        self.bytes_deduplicated = 0

    @staticmethod
    def key(spec: Any, chunk_bytes: int, crcs: Any) -> tuple:
        return (spec.name, spec.dtype, tuple(spec.shape), tuple(spec.global_shape),
                tuple(spec.offsets), spec.nbytes, chunk_bytes,
                tuple(int(c) for c in crcs))

    def find(self, key: tuple, raw: memoryview) -> dict[str, Any] | None:
        hit = self._rows.get(key)
        if hit is None or not _equal(hit[1], raw):
            return None
        self.bytes_deduplicated += len(raw)
        return hit[0]

    def add(self, key: tuple, row: dict[str, Any], raw: memoryview) -> None:
        self._rows.setdefault(key, (row, raw))
