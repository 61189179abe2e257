"""Per-stage gradient norms, after clipping: the weights of the CheckFree rule.

Each stage clips its own gradients (max norm 1.0 by default) after backward and before
``optimizer.step()``, then records the L2 norm of its whole gradient *after* clipping,
recomputed from the clipped gradients (``clip_grad_norm_`` returns the norm before
clipping). A stage whose norm was clipped thus records about ``max_norm``; one below the
threshold records its own norm. Recovery reads the norms of the last completed step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ckpt.errors import ConfigError

DEFAULT_MAX_NORM = 1.0


def gradient_norm(parameters: Iterable[torch.Tensor] | torch.Tensor) -> float:
    """L2 norm of the concatenation of every ``.grad`` (parameters without one count as 0).

    Each gradient's norm is taken in float32 (float64 when every gradient is float64) and
    the norm of those norms is returned, which equals the norm of the concatenation
    without building it.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    dtype = torch.float64 if all(g.dtype == torch.float64 for g in grads) else torch.float32
    device = grads[0].device
    # One host sync for the whole stage, not one per tensor.
    norms = [torch.linalg.vector_norm(g, 2, dtype=_accumulate_dtype(g)).to(device, dtype) for g in grads]
    return float(torch.linalg.vector_norm(torch.stack(norms), 2))


def _accumulate_dtype(grad: torch.Tensor) -> torch.dtype:
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


def _check_max_norm(max_norm: float | None) -> None:
    if max_norm is not None and not (max_norm > 0 and math.isfinite(max_norm)):
        raise ConfigError(f"max_norm must be a finite number > 0 or None (no clipping), found {max_norm!r}")


def clip_and_measure(
    parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float | None = DEFAULT_MAX_NORM
) -> float:
    """Clip the gradients of ``parameters`` to total L2 norm ``max_norm`` (in place, as
    ``torch.nn.utils.clip_grad_norm_``) and return the norm *after* clipping.

    ``max_norm=None`` measures without clipping. Under AMP, unscale the gradients first
    (``scaler.unscale_(optimizer)``). Non-finite gradients are left to the caller (the
    returned norm is then inf or nan).
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    _check_max_norm(max_norm)
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    return gradient_norm(params)


class GradNormTracker:
    """The post-clipping gradient norm of the last completed step, per stage.

    Single-process pipelines record every stage in one tracker; a stage process records
    its own stage and sends the value to its neighbours' rebuilders when needed. Call
    :meth:`clip_and_record` once per step, after backward (and after gradient averaging
    across data-parallel replicas, when there are any) and before ``optimizer.step()``.
    A non-finite norm (an overflowed step, which an AMP GradScaler skips) is returned but
    not recorded, so the tracker keeps the last usable one. Not thread-safe.
    """

    def __init__(self, max_norm: float | None = DEFAULT_MAX_NORM) -> None:
        _check_max_norm(max_norm)
        self.max_norm = max_norm
        self._norms: dict[int, float] = {}
        self._steps: dict[int, int | None] = {}

    def clip_and_record(
        self, stage: int, parameters: Iterable[torch.Tensor], step: int | None = None
    ) -> float:
        """Clip ``parameters``' gradients to ``max_norm``, record and return the norm after clipping."""
        norm = clip_and_measure(parameters, self.max_norm)
        self.record(stage, norm, step)
        return norm

    def record(self, stage: int, norm: float, step: int | None = None) -> None:
        """Record a norm measured elsewhere (e.g. received from a neighbour's process)."""
        if not math.isfinite(norm):
            return
        if norm < 0:
            raise ConfigError(f"a gradient norm is >= 0, found {norm!r} for stage {stage}")
        self._norms[int(stage)] = float(norm)
        self._steps[int(stage)] = None if step is None else int(step)

    def norm(self, stage: int) -> float:
        """The last recorded norm of ``stage``; KeyError naming the stage if none was."""
        try:
            return self._norms[stage]
        except KeyError:
            raise KeyError(
                f"no gradient norm recorded for stage {stage} (recorded: {sorted(self._norms)}); "
                "record it after each step with clip_and_record(), or pass the norms to "
                "rebuild_stage() yourself"
            ) from None

    def step_of(self, stage: int) -> int | None:
        """The step given with ``stage``'s last recorded norm (None if none was given)."""
        self.norm(stage)
        return self._steps[stage]

    def __contains__(self, stage: object) -> bool:
        return stage in self._norms

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, floats and strings only, so a snapshot can hold it without pickle."""
        return {
            "max_norm": self.max_norm,
            "norms": {str(s): n for s, n in self._norms.items()},
            "steps": {str(s): t for s, t in self._steps.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace every recorded norm with ``state``'s (``max_norm`` is restored too)."""
        max_norm = state["max_norm"]
        _check_max_norm(max_norm)
        norms = {int(s): float(n) for s, n in state["norms"].items()}
        steps = {int(s): (None if t is None else int(t)) for s, t in state.get("steps", {}).items()}
        self.max_norm = max_norm
        self._norms = norms
        self._steps = {s: steps.get(s) for s in norms}
