"""Gather the training state as live tensors, and put restored values back.

The state of one snapshot is a dict with the top-level keys of INTERNALS §3:
``model``, ``optim`` (from ``torch.distributed.checkpoint.state_dict.get_state_dict``,
which handles plain modules, DDP and FSDP2 and returns the live tensors, not
copies), ``scheduler``, ``extra`` (each object's ``state_dict()``), ``rng``
(python, numpy, torch CPU, every CUDA device) and ``step``.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from ckpt.errors import ConfigError, LayoutMismatchError

STATE_KEYS = ("model", "optim", "scheduler", "extra", "rng", "step")


def check_extras(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate ``extra``: a mapping of str names to objects with state_dict/load_state_dict."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"extra must be a dict of name -> object with state_dict() and "
                          f"load_state_dict(), got {type(extra).__name__}")
    for name, obj in extra.items():
        if not isinstance(name, str) or "/" in name or not name:
            raise ConfigError(f"extra names must be non-empty str without '/', got {name!r}")
        if not (callable(getattr(obj, "state_dict", None))
                and callable(getattr(obj, "load_state_dict", None))):
            raise ConfigError(f"extra[{name!r}] ({type(obj).__name__}) needs state_dict() and "
                              f"load_state_dict() methods")
    return dict(extra)


def rng_state() -> dict[str, Any]:
    """Every RNG stream a training loop draws from (each call returns fresh copies)."""
    state: dict[str, Any] = {
        "python": _python_rng_state(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # Generator states live on the host; reading them creates no context per device.
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_python_rng(state["python"]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch_cpu"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise LayoutMismatchError(
                f"the snapshot holds the RNG state of {len(cuda)} CUDA devices, this process "
                f"sees {torch.cuda.device_count()}; restore with the same visible devices")
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])


def _python_rng_state() -> dict[str, Any]:
    # 625 words as one small tensor rather than 625 JSON ints: flatten stays cheap per step.
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": np.asarray(internal, dtype=np.int64), "gauss": gauss}


def _as_python_rng(value: Any) -> tuple:
    internal = value["internal"]
    words = tuple(int(v) for v in (internal.tolist() if hasattr(internal, "tolist") else internal))
    return (value["version"], words, value["gauss"])


def collect_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any, extras: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The state to snapshot, holding live tensors (the caller must copy before mutation).

    Cheap: no tensor bytes are copied except the small RNG states.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": {name: obj.state_dict() for name, obj in extras.items()},
        "rng": rng_state(),
        "step": int(step),
    }


def parameter_storage_ptrs(model: torch.nn.Module) -> set[int]:
    """data_ptrs of every parameter's local tensor (what only optimizer.step() mutates)."""
    ptrs: set[int] = set()
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        ptrs.add(local.data_ptr())
    return ptrs


def apply_optimizer_scalars(optimizer: torch.optim.Optimizer, live_optim: Mapping[str, Any],
                            stored_optim: Mapping[str, Any]) -> None:
    """Set what an in-place tensor copy does not: param-group hyperparameters and
    non-tensor per-parameter state (e.g. a float ``step``)."""
    live_groups = live_optim.get("param_groups", [])
    stored_groups = stored_optim.get("param_groups", [])
    if len(live_groups) != len(stored_groups):
        raise LayoutMismatchError(f"the snapshot has {len(stored_groups)} optimizer param groups, "
                                  f"the optimizer has {len(live_groups)}")
    fqn_to_param: dict[str, torch.Tensor] = {}
    for gi, (group, live_group, stored_group) in enumerate(
            zip(optimizer.param_groups, live_groups, stored_groups)):
        if list(live_group["params"]) != list(stored_group["params"]):
            raise LayoutMismatchError(
                f"optimizer param group {gi} holds parameters {list(stored_group['params'])[:4]}... "
                f"in the snapshot and {list(live_group['params'])[:4]}... in the optimizer")
        for fqn, param in zip(live_group["params"], group["params"]):
            fqn_to_param[fqn] = param
        for key, value in stored_group.items():
            if key == "params":
                continue
            current = group.get(key)
            if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
                current.copy_(value)
            else:
                group[key] = value
    for fqn, entries in stored_optim.get("state", {}).items():
        param = fqn_to_param.get(fqn)
        if param is None:
            raise LayoutMismatchError(f"the snapshot has optimizer state for {fqn!r}, which no "
                                      f"param group of the optimizer holds")
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                optimizer.state[param][key] = value
