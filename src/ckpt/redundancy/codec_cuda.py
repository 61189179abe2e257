"""RSCodec's path for shards that are CUDA tensors: the same bytes, computed on their GPU.

The kernel (``ckpt._ec_cuda``, csrc/ec/ec_cuda.cu) is enqueued on the current
stream of the shards' device, so it is ordered after the work that produced
them and before whatever the caller queues next; the host does not wait.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ckpt.errors import CodecError


def apply(coefs: bytes, rows: int, cols: int, srcs: Sequence[Any], out: Sequence[Any] | None,
          accumulate: bool, call: str) -> list:
    """out[r] (^)= XOR_j coefs[r*cols + j] * srcs[j] for CUDA tensors; allocates out when None."""
    try:
        from ckpt import _ec_cuda
    except ImportError:
        raise CodecError(f"{call}: shards are CUDA tensors but ckpt was built without CUDA "
                         "(ckpt._ec_cuda is missing); move them to the CPU or rebuild with nvcc") from None
    import torch

    device = srcs[0].device
    nbytes = _check(srcs, device, call, "shard")
    if out is None:
        out = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(rows)]
    elif _check(out, device, call, "out") != nbytes:
        raise CodecError(f"{call}: out buffers have {_nbytes(out[0])} bytes; expected {nbytes} (the shard length)")
    src_ptrs = [t.data_ptr() for t in srcs]
    dst_ptrs = [t.data_ptr() for t in out]
    for r, d in enumerate(dst_ptrs):
        for j, s in enumerate(src_ptrs):
            if nbytes and s < d + nbytes and d < s + nbytes:
                raise CodecError(f"{call}: out[{r}] shares memory with shard {j}; outputs must not overlap inputs")
    stream = torch.cuda.current_stream(device).cuda_stream
    _ec_cuda.dot(coefs, rows, cols, src_ptrs, dst_ptrs, nbytes, stream, accumulate, device.index)
    return list(out)


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size()


def _check(tensors: Sequence[Any], device: Any, call: str, what: str) -> int:
    nbytes = None
    for i, t in enumerate(tensors):
        if not getattr(t, "is_cuda", False) or t.device != device:
            where = getattr(t, "device", type(t).__name__)
            raise CodecError(f"{call}: {what} {i} is on {where}, not {device}; all shards of a call "
                             "must be CUDA tensors on one device")
        if not t.is_contiguous():
            raise CodecError(f"{call}: {what} {i} is not contiguous; pass tensor.contiguous()")
        n = _nbytes(t)
        if nbytes is None:
            nbytes = n
        elif n != nbytes:
            raise CodecError(f"{call}: {what} {i} has {n} bytes but {what} 0 has {nbytes}; "
                             "all shards must have the same length")
    return nbytes or 0
