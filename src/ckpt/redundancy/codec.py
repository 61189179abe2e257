"""Reed–Solomon erasure codec: k data shards -> m parity shards, any k rebuild the rest.

The code is systematic over GF(2^8) with polynomial 0x11d. The default parity
matrix is Cauchy, ``C[i][j] = inv((k + i) XOR j)``: MDS for every k + m <= 256 and
byte-identical to Intel ISA-L's ``gf_gen_cauchy1_matrix`` (so parity written here
is interchangeable with ISA-L based tools). The byte work runs in ``ckpt._ec``
(docs/INTERNALS.md, "Erasure codec") with the GIL released, on the fastest kernel
this CPU offers (chosen once at import; ``CKPT_EC_ISA`` caps it).

Shards are any C-contiguous buffer-protocol objects (bytes, bytearray,
memoryview, numpy arrays) or torch tensors: CPU tensors are read and written in
place through numpy, CUDA tensors are coded on their GPU (``ckpt._ec_cuda``) on
the current stream. Nothing is copied on the way in.
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ckpt import _ec
from ckpt.errors import CodecError

ISA_LEVELS = ("scalar", "ssse3", "avx2", "avx512", "gfni", "neon")

# A caller-supplied matrix is checked exhaustively (every square submatrix of C)
# when that takes at most this many small determinants (e.g. every k <= 32 with
# m <= 4); beyond, each erasure pattern is checked when it is first decoded.
MDS_CHECK_MAX_DETS = 1 << 20
# Recovery plans kept per codec, one per (survivors, lost) pattern.
RECOVERY_CACHE_SIZE = 256

_PLAIN = (bytes, bytearray, memoryview, np.ndarray)  # exact types the native call takes as is


def available_isas() -> list[str]:
    """Kernel levels this CPU and build can run, best last (``"scalar"`` always)."""
    return list(_ec.available_isas())


def default_isa() -> str:
    """The level codecs use by default: the best available at or below ``CKPT_EC_ISA``.

    Raises CodecError when ``CKPT_EC_ISA`` names no level.
    """
    return _ec.default_isa()


def cauchy_matrix(k: int, m: int) -> bytes:
    """The default m x k parity matrix, row-major: ``C[i][j] = inv((k + i) ^ j)``."""
    return _ec.cauchy_matrix(k, m)


class RSCodec:
    """Systematic RS(k, m) over GF(2^8): ``encode``, ``decode``, ``update``, ``fold``.

    Shards 0..k-1 are the data, k..k+m-1 the parity. Every call takes shards of
    one length; outputs are new numpy arrays or the caller's writable buffers
    (``out=``), filled in place. Thread-safe: calls may run concurrently (each
    splits big buffers over up to ``threads`` cores, 64-byte aligned ranges).

    Args:
        k: data shards, >= 1.
        m: parity shards, >= 1; k + m <= 256.
        matrix: parity matrix C (m rows x k columns): m*k bytes row-major, m
            sequences of k ints, or an (m, k) integer array. Default: Cauchy.
            It must be MDS (every k x k submatrix of [I; C] invertible): checked here
            when that is small (MDS_CHECK_MAX_DETS), else per erasure pattern at decode.
        threads: cores to use on big buffers (None: every core this process may run on).
        isa: kernel level for this codec (``available_isas()``); None: ``default_isa()``.
    """

    def __init__(self, k: int, m: int, matrix: Any = None, threads: int | None = None,
                 isa: str | None = None) -> None:
        for name, v in (("k", k), ("m", m)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise CodecError(f"RSCodec: {name} must be an int, got {type(v).__name__}")
        k, m = int(k), int(m)
        if k < 1 or m < 1:
            raise CodecError(f"RSCodec: k={k}, m={m}; both must be at least 1")
        if k + m > 256:
            raise CodecError(f"RSCodec: k + m = {k + m} shards; GF(2^8) codes hold at most 256 "
                             "(use fewer shards per group)")
        self.k, self.m = k, m
        self.threads = _thread_count(threads)
        self.isa = _choose_isa(isa)
        default = _ec.cauchy_matrix(k, m)
        self.matrix: bytes = default if matrix is None else _matrix_bytes(matrix, k, m)
        if self.matrix != default:
            _check_mds(self.matrix, k, m)
        self._encoder = _ec.Plan(self.matrix, m, k, self.isa)
        self._column_plans: dict[tuple[str, int], Any] = {}
        # (missing shards, lost or None) -> (lost list, survivor getter, plan, survivors)
        self._patterns: dict[tuple, tuple] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RSCodec(k={self.k}, m={self.m}, isa={self.isa!r}, threads={self.threads})"

    # -- encode ---------------------------------------------------------------------

    def encode(self, data_shards: Sequence[Any], out: Sequence[Any] | None = None) -> list:
        """Parity of k equal-length data shards: m numpy uint8 arrays, or ``out`` filled in place.

        ``out``: m writable buffers of the shard length, sharing no memory with the data.
        """
        if len(data_shards) != self.k:
            raise CodecError(f"RSCodec.encode: got {len(data_shards)} data shards; expected k={self.k}")
        if out is not None and len(out) != self.m:
            raise CodecError(f"RSCodec.encode: out has {len(out)} buffers; expected m={self.m}")
        return self._apply(self._encoder, data_shards, out, False, "RSCodec.encode", None, "out")

    # -- decode ---------------------------------------------------------------------

    def decode(self, shards: Sequence[Any], lost: Sequence[int] | None = None,
               out: Sequence[Any] | None = None) -> list:
        """Rebuild shards from any k of them.

        ``shards``: k + m entries (data then parity), None where a shard is missing.
        ``lost``: indices to rebuild, in the order returned (default: every None entry);
        only these are computed. ``out``: len(lost) writable buffers, filled in place.
        Uses the first k present shards that are not in ``lost`` (data first).
        """
        n = self.k + self.m
        if len(shards) != n:
            raise CodecError(f"RSCodec.decode: got {len(shards)} shards; expected k + m = {n} "
                             "(None for the missing ones)")
        missing = _ec.none_indices(shards)
        try:
            key = (missing, None if lost is None else tuple(lost))
            pattern = self._patterns.get(key)
        except TypeError:
            raise CodecError(f"RSCodec.decode: lost must be a sequence of shard indices, got {lost!r}") from None
        if pattern is None:
            pattern = self._new_pattern(key, missing, lost)
        wanted, take_survivors, plan, survivors = pattern
        if out is not None and len(out) != len(wanted):
            raise CodecError(f"RSCodec.decode: out has {len(out)} buffers; expected {len(wanted)} "
                             "(one per lost shard)")
        if plan is None:
            return [] if out is None else list(out)
        return self._apply(plan, take_survivors(shards), out, False, "RSCodec.decode", survivors, "out")

    def _new_pattern(self, key: tuple, missing: tuple[int, ...], lost: Sequence[int] | None) -> tuple:
        """Survivors, rows and plan for one (missing shards, lost) pattern; cached per codec."""
        n = self.k + self.m
        wanted = list(missing) if lost is None else self._check_lost(lost)
        if not wanted:
            return wanted, None, None, None
        present = [i for i in range(n) if i not in missing]
        if len(present) < self.k:
            raise CodecError(f"RSCodec.decode: {len(present)} of {n} shards present (missing "
                             f"{list(missing)}); at least k={self.k} are needed to rebuild any shard")
        wanted_set = set(wanted)
        survivors = [i for i in present if i not in wanted_set][: self.k]
        if len(survivors) < self.k:  # some shards to rebuild are present: use them too
            survivors = sorted(survivors + [i for i in present if i in wanted_set][: self.k - len(survivors)])
        rows = _ec.recovery_matrix(self.matrix, self.k, self.m, survivors, wanted)
        plan = _ec.Plan(rows, len(wanted), self.k, self.isa)
        getter = operator.itemgetter(*survivors)
        take = getter if self.k > 1 else (lambda shards: (getter(shards),))
        pattern = (wanted, take, plan, survivors)
        with self._lock:
            self._patterns[key] = pattern
            while len(self._patterns) > RECOVERY_CACHE_SIZE:
                self._patterns.pop(next(iter(self._patterns)))
        return pattern

    def _check_lost(self, lost: Sequence[int]) -> list[int]:
        n = self.k + self.m
        out = []
        for i in lost:
            if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < n:
                raise CodecError(f"RSCodec.decode: lost index {i!r} is not a shard index in [0, {n})")
            out.append(int(i))
        if len(set(out)) != len(out):
            raise CodecError(f"RSCodec.decode: lost {out} names a shard twice")
        return out

    # -- incremental ----------------------------------------------------------------

    def update(self, parity: Sequence[Any], index: int, old: Any, new: Any) -> None:
        """Data shard ``index`` changed from ``old`` to ``new``: fold the change into ``parity``.

        ``parity[i] ^= C[i][index] * (old XOR new)`` for each of the m parity buffers,
        in place, in one pass over old and new. Equal to re-encoding with the new shard.
        """
        self._check_parity(parity, "RSCodec.update")
        plan = self._column_plan("update", index)
        self._apply(plan, (old, new), parity, True, "RSCodec.update", ("old", "new"), "parity")

    def fold(self, parity: Sequence[Any], index: int, shard: Any) -> None:
        """Add data shard ``index`` to ``parity``: ``parity[i] ^= C[i][index] * shard``.

        Starting from zeroed parity and folding every data shard in (any order, e.g.
        as they arrive over the network) gives ``encode``'s parity.
        """
        self._check_parity(parity, "RSCodec.fold")
        plan = self._column_plan("fold", index)
        self._apply(plan, (shard,), parity, True, "RSCodec.fold", (f"data shard {index}",), "parity")

    def _check_parity(self, parity: Sequence[Any], call: str) -> None:
        if len(parity) != self.m:
            raise CodecError(f"{call}: parity has {len(parity)} buffers; expected m={self.m}")

    def _column_plan(self, kind: str, index: int) -> Any:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not 0 <= index < self.k:
            raise CodecError(f"RSCodec.{kind}: index {index!r} is not a data shard index in [0, {self.k})")
        key = (kind, int(index))
        plan = self._column_plans.get(key)
        if plan is None:
            column = self.matrix[int(index):: self.k]
            coefs = bytes(c for c in column for _ in range(2)) if kind == "update" else column
            plan = _ec.Plan(coefs, self.m, 2 if kind == "update" else 1, self.isa)
            self._column_plans[key] = plan
        return plan

    # -- the byte work --------------------------------------------------------------

    def _apply(self, plan: Any, srcs: Sequence[Any], out: Sequence[Any] | None, accumulate: bool,
               call: str, labels: Sequence[Any] | None, out_label: str) -> list:
        first = srcs[0]
        if type(first) not in _PLAIN and _is_cuda(first):
            from ckpt.redundancy import codec_cuda

            return codec_cuda.apply(plan.coefs, plan.rows, plan.cols, srcs, out, accumulate, call)
        if out is None:
            nbytes = _nbytes(first, call)
            out = [np.empty(nbytes, dtype=np.uint8) for _ in range(plan.rows)]
        try:  # fast path: plain buffers go straight to the native call
            plan.apply(srcs, out, accumulate, self.threads, call, labels, out_label)
        except CodecError:
            # Tensors (and other objects numpy can view) are converted, then tried again;
            # anything else was a real error.
            srcs2, out2 = [_as_buffer(s) for s in srcs], [_as_buffer(o) for o in out]
            if all(a is b for a, b in zip(srcs2, srcs)) and all(a is b for a, b in zip(out2, out)):
                raise
            plan.apply(srcs2, out2, accumulate, self.threads, call, labels, out_label)
        return out if type(out) is list else list(out)


def _thread_count(threads: int | None) -> int:
    if threads is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or threads < 1:
        raise CodecError(f"RSCodec: threads must be an int >= 1 or None, got {threads!r}")
    return int(threads)


def _choose_isa(isa: str | None) -> str:
    if isa is None:
        return _ec.default_isa()
    usable = _ec.available_isas()
    if isa not in usable:
        what = "is not a kernel level" if isa not in ISA_LEVELS else "is not usable on this CPU/build"
        raise CodecError(f"RSCodec: isa={isa!r} {what}; available here: {', '.join(usable)}")
    return isa


def _matrix_bytes(matrix: Any, k: int, m: int) -> bytes:
    if isinstance(matrix, (bytes, bytearray, memoryview)):
        mat = bytes(matrix)
        if len(mat) != m * k:
            raise CodecError(f"RSCodec: matrix has {len(mat)} bytes; expected m*k = {m * k} "
                             f"({m} rows of {k} coefficients, row-major)")
        return mat
    arr = np.asarray(matrix)
    if arr.shape != (m, k):
        raise CodecError(f"RSCodec: matrix has shape {arr.shape}; expected (m, k) = ({m}, {k})")
    if arr.dtype.kind not in "iu" or arr.size and (arr.min() < 0 or arr.max() > 255):
        raise CodecError("RSCodec: matrix entries must be integers in [0, 255] (GF(2^8) elements)")
    return arr.astype(np.uint8).tobytes()


def _check_mds(matrix: bytes, k: int, m: int) -> None:
    """Raises CodecError when the matrix is not MDS (or passes when too big to check here)."""
    status, rows, cols = _ec.check_mds(matrix, k, m, MDS_CHECK_MAX_DETS)
    if status == 0:
        raise CodecError(f"RSCodec: the matrix is not MDS: its submatrix on parity rows {rows} and data "
                         f"columns {cols} is singular, so losing data shards {cols} and every parity "
                         f"shard but {[k + r for r in rows]} is undecodable; use the Cauchy default "
                         "(matrix=None)")


def _nbytes(x: Any, call: str) -> int:
    if isinstance(x, (bytes, bytearray)):
        return len(x)
    if isinstance(x, np.ndarray):
        return x.nbytes
    try:
        return memoryview(_as_buffer(x)).nbytes
    except TypeError:
        raise CodecError(f"{call}: shard is a {type(x).__name__}, not a bytes-like buffer; pass bytes, "
                         "bytearray, memoryview, a numpy array or a tensor") from None


def _is_cuda(x: Any) -> bool:
    return getattr(x, "is_cuda", False) is True


def _as_buffer(x: Any) -> Any:
    """A buffer-protocol view of x with no copy: torch CPU tensors through numpy."""
    if isinstance(x, _PLAIN) or not hasattr(x, "untyped_storage"):
        return x
    if x.device.type != "cpu":
        raise CodecError(f"shard is a tensor on {x.device}; CPU shards and CUDA shards cannot be mixed")
    if not x.is_contiguous():
        raise CodecError("shard is a non-contiguous tensor; pass a contiguous one (tensor.contiguous())")
    import torch

    return x.detach().reshape(-1).view(torch.uint8).numpy()
