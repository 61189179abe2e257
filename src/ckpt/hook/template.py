"""Reuse the bulk of the previous snapshot's bookkeeping while the same tensors hold it.

The state of a snapshot starts with ``model`` (one tensor per parameter and buffer) and
``optim/state`` (a few per parameter): nearly every tensor, and nearly all of the
per-step work -- flattening, geometries, sources, the plan's signature, the skeleton's
JSON. Between two optimizer steps none of that changes: the same parameters, the same
optimizer-state tensors, updated in place. A :class:`BulkTemplate` keeps that part of a
snapshot, and :meth:`BulkTemplate.holds` checks, per tensor and in one C call each, that
the live state still is exactly it:

- ``model.state_dict()`` has the same keys, and each value is a plain tensor that
  ``is_set_to`` the one recorded (same storage, offset, sizes and strides) with the same
  dtype: a parameter replaced, re-assigned through ``.data`` or resized, a buffer
  re-registered, a module added -- any of these fails it. Where the model uses
  ``nn.Module``'s own state-dict code, a :class:`~ckpt.hook.module_tree.ModuleTree`
  answers "same keys, same tensors" without calling ``state_dict()`` (its cost was half
  of the check, and most of it under FSDP2);
- ``optimizer.state`` holds the same parameters in the same order, each with the same
  keys, the same tensor objects (still set to the same memory, same dtype) and equal
  scalars; the param groups hold the same parameter objects.

A DTensor (FSDP2, tensor parallel) is checked through its local shard, plus its sharding
spec (mesh, placements, global shape): the full path's geometry of one costs ~160 us (the
shard's offsets), which the template pays once.

Only then is the bulk reused; the rest of the state (param-group hyperparameters,
scheduler, extras, RNG, step) is small and is flattened anew every snapshot. Anything
else -- non-tensor model state, tensor subclasses, a model that DCP itself must name --
gets no template, and every snapshot takes the full path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from operator import attrgetter, is_
from typing import Any

import torch

from ckpt.hook.module_tree import ModuleTree
from ckpt.hook.state import cached_renames, plain_state_dict
from ckpt.snapshot.geometry import DTensor, TensorGeometry, eager_copy, local_shard

_SCALARS = (type(None), bool, int, float, str)


_TENSOR_TYPES = (torch.Tensor,) if DTensor is None else (torch.Tensor, DTensor)
_DTYPE = attrgetter("dtype")


def _alias(t: torch.Tensor) -> torch.Tensor:
    return local_shard(t).detach()


def _spec_of(t: torch.Tensor) -> Any:
    return t._spec if type(t) is not torch.Tensor else None


def _same_tensors(tensors, aliases, specs, dtypes) -> bool:
    """Each tensor (its local shard, for a DTensor) is set to its alias's memory (storage,
    offset, sizes, strides), has its dtype, and a DTensor its sharding spec (mesh,
    placements, global shape)."""
    if not all(map(is_, map(_DTYPE, tensors), dtypes)):
        return False
    if not any(specs):  # all plain tensors: the common case, without a per-tensor call
        return all(map(torch.Tensor.is_set_to, tensors, aliases))
    return all(map(torch.Tensor.is_set_to, map(local_shard, tensors), aliases)) and \
        all(spec is None or t._spec is spec or t._spec == spec for t, spec in zip(tensors, specs))


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class BulkTemplate:
    """``model`` and ``optim/state`` of one snapshot: tensors ``[0, count)``."""

    count: int
    model_keys: tuple[str, ...]  # model.state_dict()'s keys, in its order
    model_order: tuple[str, ...]  # the same keys in the snapshot's (DCP's) order
    model_types: tuple[type, ...]  # in the snapshot's order, as the three below
    model_aliases: tuple[torch.Tensor, ...]  # local tensors, metadata frozen at build time
    model_specs: tuple[Any, ...]  # a DTensor's sharding spec, None for a plain tensor
    model_dtypes: tuple[torch.dtype, ...]
    optim_params: tuple[torch.Tensor, ...]  # optimizer.state's keys, in its order
    optim_keys: tuple[tuple[str, ...], ...]  # each parameter's state keys
    optim_values: tuple[Any, ...]  # every value, flattened in that order
    optim_tensors: tuple[torch.Tensor, ...]  # the tensor values among them
    optim_aliases: tuple[torch.Tensor, ...]  # their local tensors' metadata, frozen
    optim_specs: tuple[Any, ...]
    optim_dtypes: tuple[torch.dtype, ...]
    group_params: tuple[tuple[torch.Tensor, ...], ...]
    group_fqns: tuple[list[str], ...]
    # The parameters and buffers behind model.state_dict(), in model_order, and the tree
    # that says they still are (None: holds() calls state_dict(), see hook.module_tree).
    model_tree: ModuleTree | None
    model_tensors: tuple[torch.Tensor, ...] | None
    geoms: tuple[TensorGeometry, ...]
    signature: tuple
    fixed_sources: tuple[torch.Tensor | None, ...]  # None: copied afresh per snapshot
    model_json: str
    optim_state_json: str

    @classmethod
    def build(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              state: dict[str, Any], skeleton: dict[str, Any], geoms: list[TensorGeometry],
              signature: tuple, sources: list[torch.Tensor], copied: list[bool]
              ) -> "BulkTemplate | None":
        """The template of a snapshot the full path just collected, or None when its
        state is not one a template can stand for (see the module docstring)."""
        renames = cached_renames(model)
        model_sd, optim_sd = state["model"], state["optim"]
        if renames is None or list(model_sd) != [fqn for _, fqn in renames.order]:
            return None
        if any(type(t) not in _TENSOR_TYPES for t in model_sd.values()):
            return None
        values = [v for live in optimizer.state.values() for v in live.values()]
        if any(type(v) not in _TENSOR_TYPES and type(v) not in _SCALARS for v in values):
            return None
        tensors = tuple(v for v in values if type(v) in _TENSOR_TYPES)
        names = [*(f"model/{fqn}" for fqn in model_sd),
                 *(f"optim/state/{fqn}/{key}" for fqn, live in optim_sd["state"].items()
                   for key, v in live.items() if type(v) in _TENSOR_TYPES)]
        count = len(names)
        if len(geoms) < count or any(g.name != name for g, name in zip(geoms, names)):
            return None  # not the prefix the full path flattened: no template
        groups = optimizer.param_groups
        # model_sd is state_dict()'s result renamed: the same tensors, keyed as it keyed them.
        fqn_of = dict(renames.order)
        tree = ModuleTree.record(model, {key: model_sd[fqn_of[key]] for key in renames.keys})
        by_key = dict(zip(renames.keys, tree.tensors())) if tree is not None else {}
        return cls(
            count=count, model_keys=renames.keys,
            model_order=tuple(key for key, _ in renames.order),
            model_types=tuple(map(type, model_sd.values())),
            model_aliases=tuple(map(_alias, model_sd.values())),
            model_specs=tuple(map(_spec_of, model_sd.values())),
            model_dtypes=tuple(t.dtype for t in model_sd.values()),
            optim_params=tuple(optimizer.state), optim_values=tuple(values),
            optim_keys=tuple(tuple(live) for live in optimizer.state.values()),
            optim_tensors=tensors, optim_aliases=tuple(map(_alias, tensors)),
            optim_specs=tuple(map(_spec_of, tensors)),
            optim_dtypes=tuple(t.dtype for t in tensors),
            group_params=tuple(tuple(g["params"]) for g in groups),
            group_fqns=tuple(list(g["params"]) for g in optim_sd["param_groups"]),
            model_tree=tree,
            model_tensors=tuple(by_key[key] for key, _ in renames.order) if tree else None,
            geoms=tuple(geoms[:count]), signature=signature[:count],
            fixed_sources=tuple(None if c else s for s, c in zip(sources[:count], copied)),
            model_json=_dumps(skeleton["model"]),
            optim_state_json=_dumps(skeleton["optim"]["state"]))

    def holds(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the live model and optimizer still are exactly this template's state."""
        groups = optimizer.param_groups
        if len(groups) != len(self.group_params):
            return False
        for group, params in zip(groups, self.group_params):
            live = group["params"]
            if len(live) != len(params) or not all(map(is_, live, params)):
                return False
        state = optimizer.state
        if len(state) != len(self.optim_params) or not all(map(is_, state, self.optim_params)):
            return False
        if tuple(map(tuple, state.values())) != self.optim_keys:
            return False
        values = [v for live in state.values() for v in live.values()]
        if not all(map(is_, values, self.optim_values)):
            # Scalars may be equal without being the same object; tensors may not.
            if any(type(a) is not type(b) or (a is not b if type(a) in _TENSOR_TYPES else a != b)
                   for a, b in zip(values, self.optim_values)):
                return False
        if not _same_tensors(self.optim_tensors, self.optim_aliases, self.optim_specs,
                             self.optim_dtypes):
            return False
        if self.model_tree is not None:  # the same modules, parameters and buffers
            return self.model_tree.tensors() is not None and _same_tensors(
                self.model_tensors, self.model_aliases, self.model_specs, self.model_dtypes)
        plain = plain_state_dict(model)
        if tuple(plain) != self.model_keys:
            return False
        tensors = [plain[key] for key in self.model_order]
        return all(map(is_, map(type, tensors), self.model_types)) and \
            _same_tensors(tensors, self.model_aliases, self.model_specs, self.model_dtypes)

    def sources(self) -> list[torch.Tensor]:
        """The bulk's tensors to copy from: the live ones, fresh copies where the full path
        copies (buffers, non-contiguous tensors)."""
        return [s if s is not None else eager_copy(g.local)
                for s, g in zip(self.fixed_sources, self.geoms)]

    def state_json(self, rest_skeleton: dict[str, Any]) -> str:
        """The snapshot's whole skeleton as JSON, ``rest_skeleton`` being the flattened
        ``{"optim": {"param_groups": ...}, "scheduler": ..., ...}`` after the bulk."""
        parts = [f'{{"model":{self.model_json},"optim":{{"state":{self.optim_state_json},'
                 f'"param_groups":{_dumps(rest_skeleton["optim"]["param_groups"])}}}']
        parts.extend(f",{_dumps(k)}:{_dumps(v)}" for k, v in rest_skeleton.items()
                     if k != "optim")
        parts.append("}")
        return "".join(parts)
