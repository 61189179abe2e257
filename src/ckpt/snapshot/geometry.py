"""Where each state tensor's local piece sits in its global tensor.

A rank snapshots only what it holds. For a plain tensor (a single process, or a
DDP replica) that is the whole tensor at offsets 0. For a DTensor (FSDP2
``fully_shard``, tensor parallel) it is the local shard: its shape, the global
shape, and the offsets of the shard in the global tensor, as DCP records them.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from ckpt.errors import UnsupportedStateError

try:  # torch.distributed may be built without DTensor support
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - every supported torch has them
    DTensor = None  # type: ignore[assignment,misc]
    compute_local_shape_and_global_offset = None  # type: ignore[assignment]


class TensorGeometry(NamedTuple):
    """One tensor piece: ``local`` is the live tensor whose bytes this rank stores.

    A named tuple (not a dataclass): one is made per state tensor per snapshot, and a
    model with thousands of tensors makes that a cost of every ``step()``."""

    name: str
    local: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def dtype_name(self) -> str:
        return str(self.local.dtype).removeprefix("torch.")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.local.shape)

    @property
    def nbytes(self) -> int:
        return self.local.numel() * self.local.element_size()


def eager_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy made now: the source of a tensor that may change after step()."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def is_dtensor(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (its live storage, no copy); any other tensor itself.

    Reads ``DTensor._local_tensor``: ``to_local()`` is an autograd Function call of
    10-30 us, which thousands of tensors per step() or restore() add up to seconds."""
    if not is_dtensor(tensor):
        return tensor
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor.to_local()


def geometry_of(name: str, tensor: torch.Tensor) -> TensorGeometry:
    """The local piece of ``tensor``, its global shape and this rank's offsets.

    DTensor: the local shard (a view of the live storage, not a copy) at the
    offsets torch computes for this rank's mesh coordinate; replicated
    placements give offsets 0 on every rank. Other tensors: themselves at 0.
    """
    if is_dtensor(tensor):
        local = local_shard(tensor)
        spec = getattr(tensor, "_spec", None)
        rank = torch.distributed.get_rank()
        if spec is not None:  # hashed once per spec by torch: the cheap key
            global_shape, local_shape, offsets = _geometry_of_spec(spec, rank)
        else:
            global_shape = tuple(int(s) for s in tensor.shape)
            local_shape, offsets = _shard_of(global_shape, tensor.device_mesh, tensor.placements,
                                             rank)
        if local.shape != local_shape:
            raise UnsupportedStateError(
                f"tensor {name!r}: the local shard has shape {tuple(local.shape)} but its "
                f"placements {tensor.placements} on mesh {tensor.device_mesh} give "
                f"{tuple(local_shape)}; ckpt stores only evenly described shards (padded or "
                f"strided shards are not supported yet)")
        # A rank that holds nothing of a dim-0 shard gets offsets == global size; keep them.
        return TensorGeometry(name, local, global_shape, offsets)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
    shape = tuple(int(s) for s in tensor.shape)
    return TensorGeometry(name, tensor, shape, (0,) * len(shape))


@functools.lru_cache(maxsize=8192)
def _shard_of(global_shape: tuple[int, ...], mesh, placements, rank: int
              ) -> tuple[tuple, tuple]:
    """This rank's (local shape, offsets) for a DTensor of ``global_shape``: a pure function
    of the shape, mesh, placements and this process's rank (in the key, in case a process
    re-joins as another rank), and ~150 us to compute (a model's many same-shaped
    parameters and moments share one result)."""
    local_shape, offsets = compute_local_shape_and_global_offset(global_shape, mesh, placements)
    return tuple(int(n) for n in local_shape), tuple(int(o) for o in offsets)


@functools.lru_cache(maxsize=8192)
def _geometry_of_spec(spec: Any, rank: int) -> tuple[tuple, tuple, tuple]:
    """(global shape, local shape, offsets) of a DTensor with ``spec`` (a DTensorSpec: its
    mesh, placements and global shape) on ``rank``."""
    global_shape = tuple(int(s) for s in spec.shape)
    return (global_shape, *_shard_of(global_shape, spec.mesh, spec.placements, rank))


# Offsets of a whole tensor, by number of dimensions.
_ZEROS = tuple((0,) * n for n in range(65))
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def geometries(tensors: list[tuple[str, torch.Tensor]]) -> list[TensorGeometry]:
    """``geometry_of`` for each ``(name, tensor)`` in order."""
    out = []
    for name, t in tensors:
        if type(t) in _PLAIN and t.dim() < len(_ZEROS):  # the common case, inlined
            shape = tuple(t.shape)
            out.append(TensorGeometry(name, t, shape, _ZEROS[len(shape)]))
        else:
            out.append(geometry_of(name, t))
    return out
