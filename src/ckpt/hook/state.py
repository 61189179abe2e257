"""Gather the training state as live tensors, and put restored values back.

The state of one snapshot is a dict with the top-level keys of INTERNALS §3:
``model`` (:func:`model_state_dict`: what
``torch.distributed.checkpoint.state_dict.get_model_state_dict`` returns for plain modules,
DDP and FSDP2 -- the live tensors, not copies -- at a tenth of its cost),
``optim`` (:func:`optimizer_state`: the layout of DCP's optimizer state dict, read
straight from ``optimizer.state``), ``scheduler``, ``extra`` (each object's
``state_dict()``), ``rng`` (python, numpy, torch CPU, every CUDA device) and ``step``.

DCP's ``get_state_dict``/``get_optimizer_state_dict`` are not used for the optimizer:
while ``optimizer.state`` is empty and no parameter has a gradient they run a hidden
``optimizer.step()`` at lr 0 on zero gradients (``_init_optim_state``), which creates
state for every parameter, fires step hooks and shifts Adam's step count. Snapshotting
must never change training, and a restore must leave exactly the snapshot's per-parameter
state (none for a parameter that never had a gradient), so both sides read and shape
``optimizer.state`` themselves (:func:`fit_optimizer_state` on restore).
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
# _get_fqns is private, but it is the one rule by which DCP names parameters (DDP's
# ``module.``, torch.compile's ``_orig_mod.`` and activation-checkpoint prefixes
# dropped): optimizer FQNs must equal get_model_state_dict's keys.
# _state_dict_fn: model.state_dict, unless DCP's _patch_model_state_dict replaced it.
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.checkpoint.state_dict import _get_fqns, _state_dict_fn, \
    get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.nn.parallel import DistributedDataParallel as DDP

from ckpt.errors import ConfigError, LayoutMismatchError
from ckpt.snapshot.geometry import geometry_of, is_dtensor, local_shard
from ckpt.snapshot.tree import dtype_from_name, unflatten

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
    return {
        "model": model_state_dict(model),
        "optim": optimizer_state(model, optimizer),
        **small_state(scheduler, extras, step),
    }


def small_state(scheduler: Any, extras: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The state's keys after ``model`` and ``optim``, in the snapshot's order."""
    return {
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": {name: obj.state_dict() for name, obj in extras.items()},
        "rng": rng_state(),
        "step": int(step),
    }


@dataclass(frozen=True)
class _Renames:
    """How DCP names one model's ``state_dict()`` keys: for a tuple of keys seen before,
    the ``(key, fqn)`` pairs in the order get_model_state_dict returns them."""

    keys: tuple[str, ...]
    order: tuple[tuple[str, str], ...] | None  # None: this model takes DCP's own path


_RENAME_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, _Renames]" = \
    weakref.WeakKeyDictionary()


def model_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """``get_model_state_dict(model)`` (default options), without its per-call set-up.

    DCP re-derives every key's canonical FQN on each call (``_verify_options`` walks the
    module tree once per parameter): ~100 ms per step for a model of 2000 parameters.
    Here ``model.state_dict()`` is renamed with the FQNs DCP gave the same keys the last
    time; a new set of keys (a parameter or buffer added, the model re-wrapped) goes
    through DCP again, and the fast path is kept only if it then returns the same keys,
    in the same order, holding the same tensors as DCP. FSDP1 modules (which need DCP's
    state-dict-type context) always take DCP's path.
    """
    cached = _RENAME_CACHE.get(model)
    if cached is not None and cached.order is None:
        return get_model_state_dict(model)
    plain = plain_state_dict(model)
    keys = tuple(plain)
    if cached is not None and cached.keys == keys:
        return {fqn: plain[key] for key, fqn in cached.order}
    reference = get_model_state_dict(model)
    order = _renames(model, plain, reference)
    _RENAME_CACHE[model] = _Renames(keys, order)
    return reference


def plain_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` (the class's, if DCP's _patch_model_state_dict replaced it)."""
    return _state_dict_fn(model, "state_dict")()


def cached_renames(model: torch.nn.Module) -> _Renames | None:
    """How the last ``model_state_dict(model)`` renamed, when it did (not DCP's own path)."""
    renames = _RENAME_CACHE.get(model)
    return renames if renames is not None and renames.order is not None else None


def _names_are_fqns(model: torch.nn.Module) -> bool:
    """Whether DCP's ``_get_fqns`` maps every name of this model to itself: it renames
    only below a DDP, FSDP1 or ``torch.compile`` wrapper, a module with
    ``_fqn_modifiers`` and an activation-checkpoint wrapper (whose keys carry
    ``_CHECKPOINT_PREFIX``). One walk over the modules instead of ~17 us per name."""
    from torch._dynamo.eval_frame import OptimizedModule

    return not any(isinstance(m, (DDP, FSDP1, OptimizedModule)) or hasattr(m, "_fqn_modifiers")
                   for m in model.modules())


def _renames(model: torch.nn.Module, plain: Mapping[str, Any],
             reference: Mapping[str, Any]) -> tuple[tuple[str, str], ...] | None:
    """(key, fqn) pairs that turn ``plain`` into ``reference``, or None when renaming
    cannot reproduce it. The result is checked against ``reference`` either way."""
    if FSDP1.fsdp_modules(model):
        return None
    order = []
    identity = _names_are_fqns(model)
    for key in plain:
        if identity and _CHECKPOINT_PREFIX not in key:
            order.append((key, key))
            continue
        fqns = _get_fqns(model, key)
        if len(fqns) != 1:
            return None
        order.append((key, next(iter(fqns))))
    renamed = [pair for pair in order if pair[0] != pair[1]]
    # DCP pops each renamed key and re-inserts it: renamed keys end up last.
    order = [pair for pair in order if pair[0] == pair[1]] + renamed
    if [fqn for _, fqn in order] != list(reference):
        return None
    for key, fqn in order:
        a, b = plain[key], reference[fqn]
        if not (type(a) is type(b) and _same_tensor(a, b)):
            return None
    return tuple(order)


def _same_tensor(a: Any, b: Any) -> bool:
    if not isinstance(a, torch.Tensor):  # get_extra_state(): fresh per state_dict() call
        return True
    if is_dtensor(a):
        return a.placements == b.placements and _same_tensor(local_shard(a), local_shard(b))
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


_FQN_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, dict[int, str]]]" \
    = weakref.WeakKeyDictionary()


def parameter_fqns(model: torch.nn.Module) -> dict[int, str]:
    """``id(parameter)`` -> its canonical FQN (the key get_model_state_dict gives it).

    Cached per model while its parameters keep their names and objects: working them out
    takes ~17 us per parameter, and every snapshot needs them. A name that
    :func:`model_state_dict` already renamed (and checked against DCP) takes that FQN."""
    named = list(model.named_parameters())
    key = tuple((name, id(p)) for name, p in named)
    cached = _FQN_CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    renames = cached_renames(model)
    checked = dict(renames.order) if renames is not None else {}
    fqn_by_id: dict[int, str] = {}
    for name, param in named:
        if name in checked:
            fqn_by_id[id(param)] = checked[name]
            continue
        fqns = _get_fqns(model, name)
        if len(fqns) != 1:
            raise ConfigError(f"parameter {name!r} stands for {len(fqns)} parameters (an FSDP1 "
                              f"FlatParameter); ckpt supports FSDP2: wrap with fully_shard()")
        fqn_by_id[id(param)] = next(iter(fqns))
    _FQN_CACHE[model] = (key, fqn_by_id)
    return fqn_by_id


def _fqn_of(fqn_by_id: Mapping[int, str], param: Any) -> str:
    fqn = fqn_by_id.get(id(param))
    if fqn is None:
        raise ConfigError(f"the optimizer holds a parameter of shape {tuple(param.shape)} that "
                          f"is not in model.named_parameters(); give the Checkpointer the model "
                          f"whose parameters the optimizer trains")
    return fqn


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter FQN, holding the live tensors.

    ``{"state": {fqn: {key: value}}, "param_groups": [{..., "params": [fqn, ...]}]}``, the
    layout of DCP's optimizer state dict. Only reads: a parameter without state (not
    stepped yet, or never given a gradient) has no entry, and nothing is initialised.
    """
    fqn_by_id = parameter_fqns(model)
    groups = param_groups_state(optimizer, [[_fqn_of(fqn_by_id, p) for p in group["params"]]
                                            for group in optimizer.param_groups])
    # optimizer.state's order (first state first), as Optimizer.state_dict() keeps it.
    state = {_fqn_of(fqn_by_id, p): dict(entries) for p, entries in optimizer.state.items()}
    return {"state": state, "param_groups": groups}


def param_groups_state(optimizer: torch.optim.Optimizer,
                       fqns: list[list[str]]) -> list[dict[str, Any]]:
    """Each param group's hyperparameters, its ``params`` given as ``fqns[i]``."""
    return [{**{k: v for k, v in group.items() if k != "params"}, "params": names}
            for group, names in zip(optimizer.param_groups, fqns, strict=True)]


def parameter_locals(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """data_ptr -> local tensor of every parameter (what only optimizer.step() mutates)."""
    return {local.data_ptr(): local for local in map(local_shard, model.parameters())}


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


class _StoredTensor:
    """Stands for tensor ``index`` of a snapshot while its skeleton is decoded."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def fit_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        meta: Mapping[str, Any], where: str) -> None:
    """Give ``optimizer`` per-parameter state shaped exactly like the snapshot ``meta``'s,
    so that a tier can copy the stored bytes into live tensors.

    A parameter without state in the snapshot ends without state (an uninterrupted run
    has none for a parameter that never had a gradient, or before the first step). A
    stored tensor keeps the live tensor where that has its dtype and layout; else a new,
    uninitialised one (the tier overwrites every byte) goes in through
    ``optimizer.load_state_dict``, whose policy puts it where the optimizer keeps it
    (Adam's ``step`` on the CPU unless capturable or fused, the rest like the parameter;
    a DTensor with the parameter's placements). No optimizer step runs. Values that are
    not tensors are set by :func:`apply_optimizer_scalars`.

    Raises LayoutMismatchError when the snapshot has state for a parameter that no param
    group holds; the optimizer may then be left half-shaped, and restore fails.
    """
    entries = meta["tensors"]
    stored = unflatten(meta["state"]["optim"]["state"],
                       [_StoredTensor(i) for i in range(len(entries))])
    fqn_by_id = parameter_fqns(model)
    param_by_fqn: dict[str, torch.Tensor] = {}
    pid_by_fqn: dict[str, int] = {}
    groups: list[dict[str, Any]] = []
    position = 0  # ids as Optimizer.state_dict() numbers parameters: by position
    for group in optimizer.param_groups:
        ids = []
        for param in group["params"]:
            fqn = _fqn_of(fqn_by_id, param)
            param_by_fqn.setdefault(fqn, param)
            ids.append(pid_by_fqn.setdefault(fqn, position))
            position += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    live = {_fqn_of(fqn_by_id, p): live_entries for p, live_entries in optimizer.state.items()}
    changed = set(live) != set(stored)
    state: dict[int, Any] = {}
    for fqn, stored_entries in stored.items():
        param = param_by_fqn.get(fqn)
        if param is None:
            raise LayoutMismatchError(f"{where}: the snapshot has optimizer state for {fqn!r}, "
                                      f"which no param group of the optimizer holds; restore "
                                      f"into the model and optimizer that wrote it")
        state[pid_by_fqn[fqn]], fresh = _fit(stored_entries, live.get(fqn), param, entries)
        changed |= fresh
    if changed:
        optimizer.load_state_dict({"state": state, "param_groups": groups})


def _fit(value: Any, live: Any, param: torch.Tensor,
         entries: list[Mapping[str, Any]]) -> tuple[Any, bool]:
    """``value`` (decoded stored state) with live tensors in place of stored ones, and
    whether anything differs from ``live`` in structure or layout."""
    if isinstance(value, _StoredTensor):
        entry = entries[value.index]
        if isinstance(live, torch.Tensor) and _has_layout(live, entry):
            return live, False
        return _new_state_tensor(param, entry), True
    if isinstance(value, dict):
        same = isinstance(live, dict) and set(live) == set(value)
        fitted = {k: _fit(v, live.get(k) if isinstance(live, dict) else None, param, entries)
                  for k, v in value.items()}
        return ({k: v for k, (v, _) in fitted.items()},
                not same or any(fresh for _, fresh in fitted.values()))
    if isinstance(value, (list, tuple)):
        same = isinstance(live, (list, tuple)) and len(live) == len(value)
        items = [_fit(v, live[i] if same else None, param, entries) for i, v in enumerate(value)]
        return type(value)(v for v, _ in items), not same or any(fresh for _, fresh in items)
    return value, False


def _has_layout(tensor: torch.Tensor, entry: Mapping[str, Any]) -> bool:
    if type(tensor) is torch.Tensor:  # the common case without a geometry: whole, at 0
        shape = list(tensor.shape)
        return (str(tensor.dtype).removeprefix("torch.") == entry["dtype"]
                and shape == list(entry["shape"]) == list(entry["global_shape"])
                and not any(entry["offsets"]))
    g = geometry_of(entry["name"], tensor)
    return (g.dtype_name == entry["dtype"] and list(g.shape) == list(entry["shape"])
            and list(g.global_shape) == list(entry["global_shape"])
            and list(g.offsets) == list(entry["offsets"]))


def _new_state_tensor(param: torch.Tensor, entry: Mapping[str, Any]) -> torch.Tensor:
    dtype = dtype_from_name(entry["dtype"])
    if list(entry["global_shape"]) == list(param.shape) and (is_dtensor(param) or param.dim()):
        # exp_avg and friends: like the parameter (device, strides, DTensor placements).
        return torch.empty_like(param, dtype=dtype)
    # Scalars (Adam's step) and other shapes: load_state_dict's policy moves them.
    return torch.empty(entry["shape"], dtype=dtype)
