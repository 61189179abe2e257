"""The CheckFree rebuild rule: a lost stage's weights from its two neighbours' weights.

    W_i = (a * W_{i+1} + b * W_{i-1}) / (a + b),   a = |g_{i+1}| + eps,   b = |g_{i-1}| + eps

where |g_j| is the L2 norm of stage j's whole gradient, after clipping, from the last
completed step (:mod:`ckpt.recovery.checkfree.gradnorm`). The neighbour that is still
learning faster weighs more. No renormalisation follows (norm weights are averaged like
any other tensor), as in the reference code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ckpt.errors import ConfigError, StageRebuildError

DEFAULT_EPS = 1e-4



def neighbour_weights(
    prev_grad_norm: float, next_grad_norm: float, eps: float = DEFAULT_EPS
) -> tuple[float, float]:
    """(weight of the previous stage, weight of the next stage), summing to 1."""
    a, b = _raw_weights(prev_grad_norm, next_grad_norm, eps)
    return b / (a + b), a / (a + b)


def _raw_weights(prev_grad_norm: float, next_grad_norm: float, eps: float) -> tuple[float, float]:
    """(a, b) of the rule, after checking the norms and eps."""
    for name, value in (("prev_grad_norm", prev_grad_norm), ("next_grad_norm", next_grad_norm)):
        if not math.isfinite(value) or value < 0:
            raise StageRebuildError(
                f"{name} must be a finite gradient norm >= 0, found {value!r}: a non-finite norm "
                "means that step's gradients overflowed; use the norm of an earlier step "
                "(GradNormTracker keeps the last finite one per stage)"
            )
    if not math.isfinite(eps) or eps <= 0:
        raise ConfigError(
            f"eps must be a finite number > 0 (it keeps a + b > 0 when both norms are 0), found {eps!r}"
        )
    return float(next_grad_norm) + eps, float(prev_grad_norm) + eps


def rebuild_stage(
    prev_state: Mapping[str, Any],
    next_state: Mapping[str, Any],
    prev_grad_norm: float,
    next_grad_norm: float,
    eps: float = DEFAULT_EPS,
) -> dict[str, Any]:
    """The rebuilt stage's state dict: the gradient-weighted average of its neighbours'.

    ``prev_state`` and ``next_state`` are the state dicts of stages i-1 and i+1
    (``module.state_dict()``); they must have the same keys and, per key, the same
    shape and dtype, else :class:`StageRebuildError` names the first key that differs.
    The inputs are not modified; every output tensor is new, on ``prev_state``'s device.

    Per entry:

    - floating-point and complex tensors (parameters and buffers alike, norm weights
      included): ``(a * next + b * prev) / (a + b)``, computed in float32 for fp16, bf16
      and fp8, and in the tensor's own dtype otherwise, then cast back to that dtype;
    - integer and bool tensors (counters such as ``num_batches_tracked``, index tables)
      and non-tensor entries (module extra state): an average means nothing, so they are
      copied from the neighbour with the larger weight (the next stage on a tie).
    """
    a, b = _raw_weights(prev_grad_norm, next_grad_norm, eps)
    _check_same_structure(prev_state, next_state)
    dominant = next_state if a >= b else prev_state
    out: dict[str, Any] = {}
    with torch.no_grad():
        for key, prev in prev_state.items():
            nxt = next_state[key]
            if isinstance(prev, torch.Tensor) and (prev.is_floating_point() or prev.is_complex()):
                out[key] = _weighted_average(prev, nxt, a, b)
            else:
                out[key] = _copy_entry(dominant[key], prev)
    return out


def copy_stage(source_state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``source_state`` (tensors cloned): the rebuild of an edge stage from its
    CheckFree+ swap partner, or of stage 0 from an embedding replica."""
    with torch.no_grad():
        return {key: _copy_entry(value, value) for key, value in source_state.items()}


def _weighted_average(prev: torch.Tensor, nxt: torch.Tensor, a: float, b: float) -> torch.Tensor:
    # Floats narrower than float32 (fp16, bf16, fp8) are averaged in float32 and cast back:
    # averaging in their own dtype would round every product and the sum, not just the result.
    narrow = prev.is_floating_point() and prev.dtype.itemsize < 4
    compute_dtype = torch.float32 if narrow else prev.dtype
    p = prev.detach().to(dtype=compute_dtype)
    n = nxt.detach().to(device=prev.device, dtype=compute_dtype)
    # Written as the formula, (a*n + b*p) / (a+b), so that equal neighbours give back
    # their weights up to one rounding.
    avg = torch.add(n * a, p * b).div_(a + b)
    return avg.to(dtype=prev.dtype)


def _copy_entry(value: Any, like: Any) -> Any:
    if isinstance(value, torch.Tensor):
        device = like.device if isinstance(like, torch.Tensor) else value.device
        return value.detach().to(device=device, copy=True)
    return value


def _check_same_structure(prev_state: Mapping[str, Any], next_state: Mapping[str, Any]) -> None:
    prev_keys, next_keys = set(prev_state), set(next_state)
    if prev_keys != next_keys:
        only_prev = sorted(prev_keys - next_keys)
        only_next = sorted(next_keys - prev_keys)
        raise StageRebuildError(
            "the two neighbours' state dicts have different keys, so their stages have different "
            f"structures and cannot be averaged: only in the previous stage: {only_prev[:5]}"
            f"{' ...' if len(only_prev) > 5 else ''}; only in the next stage: {only_next[:5]}"
            f"{' ...' if len(only_next) > 5 else ''}. CheckFree needs identical neighbouring "
            "stages (e.g. one transformer block each); restore this stage from a checkpoint instead"
        )
    for key, prev in prev_state.items():
        nxt = next_state[key]
        if isinstance(prev, torch.Tensor) != isinstance(nxt, torch.Tensor):
            raise StageRebuildError(
                f"state dict entry {key!r} is a tensor in one neighbour and not in the other "
                f"({type(prev).__name__} vs {type(nxt).__name__}); the stages differ in structure "
                "and cannot be averaged: restore this stage from a checkpoint instead"
            )
        if not isinstance(prev, torch.Tensor):
            continue
        if prev.shape != nxt.shape or prev.dtype != nxt.dtype:
            raise StageRebuildError(
                f"state dict entry {key!r} differs between the neighbours: previous stage has "
                f"{tuple(prev.shape)} {prev.dtype}, next stage has {tuple(nxt.shape)} {nxt.dtype}; "
                "stages of different shapes or dtypes cannot be averaged: cast both neighbours to "
                "one dtype first, or restore this stage from a checkpoint"
            )
