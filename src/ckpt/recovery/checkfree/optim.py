"""A fresh optimizer for a rebuilt stage, with its learning rate scaled.

The rebuilt stage's weights are new (an average or a copy), so its optimizer state
(Adam's moments, step count) no longer describes them: the reference code builds a new
optimizer at ``lr_scale * lr`` for the rebuilt stage and leaves the neighbours' alone.
Here the existing optimizer object is reset in place, so that whatever holds a reference
to it (an LR scheduler, a Checkpointer, a GradScaler) keeps working.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ckpt.errors import ConfigError

DEFAULT_LR_SCALE = 1.1

# Param-group keys that hold a learning rate. "lr" is the optimizer's own; the others
# are written by torch's LR schedulers (every scheduler: "initial_lr"; OneCycleLR:
# "max_lr", "min_lr"; CyclicLR: "max_lr", and its base "initial_lr").
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")

# Where the scale in force is remembered, inside the param group so that it travels with
# optimizer.state_dict(): a second rebuild of the same stage then sets the scale again
# instead of compounding it (the reference rebuilds from the base lr each time).
SCALE_KEY = "checkfree_lr_scale"


def reset_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    lr_scale: float = DEFAULT_LR_SCALE,
    scheduler: Any | None = None,
) -> None:
    """Give ``optimizer`` the state of a newly built one, with learning rates times ``lr_scale``.

    After the call the optimizer behaves exactly as ``type(optimizer)(same param groups,
    lr = lr_scale * lr)`` would: moments are zero (created lazily by the next ``step()``,
    or at once for optimizers that create state in their constructor, such as Adagrad),
    the step count restarts (so Adam's bias correction starts over), and every param
    group keeps its other options (betas, weight decay, ...) and its parameters.

    The learning rate is scaled relative to the stage's unscaled rate: resetting a stage
    twice with 1.1 leaves 1.1, not 1.21. Every group's ``lr`` is scaled, and the keys LR
    schedulers keep in param groups (``initial_lr``, ``max_lr``, ``min_lr``).

    LR schedulers: pass the stage's ``scheduler`` so that its ``base_lrs`` are scaled too
    and the scale survives its next ``step()`` (LambdaLR, LinearLR, CosineAnnealingLR and
    most others recompute the lr from ``base_lrs`` or ``initial_lr``). Its position in the
    schedule (``last_epoch``) is kept: the rebuilt stage continues at the job's step, as in
    the reference code. Without it, a scheduler that recomputes from ``base_lrs`` drops
    the scale at its next step; chainable ones (StepLR, ExponentialLR) keep it.

    Call it after the rebuilt weights are loaded into the module (``load_state_dict``
    copies into the existing parameters, which the optimizer still holds).
    """
    if not (math.isfinite(lr_scale) and lr_scale > 0):
        raise ConfigError(f"lr_scale must be a finite number > 0, found {lr_scale!r}")
    fresh_state = _fresh_state(optimizer)
    optimizer.state.clear()
    optimizer.state.update(fresh_state)
    factors = []
    for group in optimizer.param_groups:
        factor = lr_scale / float(group.get(SCALE_KEY, 1.0))
        factors.append(factor)
        for key in _LR_KEYS:
            if key in group:
                group[key] = _scaled(group[key], factor, in_place=key == "lr")
        group[SCALE_KEY] = lr_scale
    if scheduler is not None:
        _scale_scheduler(scheduler, optimizer, factors)


def _fresh_state(optimizer: torch.optim.Optimizer) -> dict[Any, Any]:
    """The state a new optimizer of the same class would start with (usually empty)."""
    groups = [dict(group) for group in optimizer.param_groups]
    # Constructor options first: some state is built from them, not from the group
    # (Adagrad's initial_accumulator_value). Some classes do not take back their own
    # defaults as keywords (AdamW's decoupled_weight_decay), hence the second try.
    for kwargs in (dict(optimizer.defaults), {}):
        try:
            fresh = type(optimizer)(groups, **kwargs)
        except (TypeError, ValueError):
            continue
        return dict(fresh.state)
    # A custom optimizer whose constructor needs more than its param groups: assume it
    # creates its state lazily in step(), as every torch optimizer but Adagrad does.
    return {}


def _scaled(value: Any, factor: float, in_place: bool = False) -> Any:
    if isinstance(value, torch.Tensor):
        if in_place:
            # A tensor lr (capturable optimizers, CUDA graphs) is read by address.
            return value.mul_(factor)
        # Others get a new tensor: schedulers share one tensor between "initial_lr" and
        # base_lrs, which must not be scaled twice.
        return value * factor
    return value * factor


def _scale_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, factors: list[float]) -> None:
    if getattr(scheduler, "optimizer", optimizer) is not optimizer:
        raise ConfigError("the scheduler passed to reset_optimizer() belongs to another optimizer")
    base_lrs = getattr(scheduler, "base_lrs", None)
    if base_lrs is not None:
        if len(base_lrs) != len(factors):
            raise ConfigError(
                f"the scheduler has {len(base_lrs)} base learning rates but the optimizer has "
                f"{len(factors)} param groups; build the scheduler after the last add_param_group()"
            )
        scheduler.base_lrs = [_scaled(lr, f) for lr, f in zip(base_lrs, factors)]
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [
            group["lr"].clone() if isinstance(group["lr"], torch.Tensor) else group["lr"]
            for group in optimizer.param_groups
        ]
