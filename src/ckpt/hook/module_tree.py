"""``model.state_dict()``'s tensors without calling it, while the module tree stays as it was.

``state_dict()`` walks every module and detaches every parameter and buffer: ~15 us per
module on a plain model, and ~120 us per FSDP2 module (a DTensor's ``detach`` is a
dispatched op). A model of 2000 layers pays 30-250 ms for it on every snapshot, only for
the snapshot template to find the same tensors again.

A :class:`ModuleTree` records, once, the modules one ``state_dict()`` call visited and the
parameters and buffers it returned. :meth:`ModuleTree.tensors` then gives the same tensors
in the same key order -- or None -- by checking that every recorded module still has the
same parameter, buffer and child objects under the same names, and the same state-dict
hooks. It stands only for the default machinery, replicated from ``nn.Module``:

- every module's class uses ``nn.Module``'s ``state_dict`` and ``_save_to_state_dict``
  and has no ``get_extra_state``;
- no module has a state-dict post-hook, and its pre-hooks are FSDP2's ``to_sharded``
  hook at most. That hook moves the module to its sharded parameters; the tree was
  recorded after it ran, so while the recorded (sharded) parameters are the registered
  ones, it has nothing to do.

Anything else gets no tree, and the template calls ``state_dict()`` as before.
"""

from __future__ import annotations

from operator import is_
from typing import Any

import torch

from ckpt.snapshot.geometry import local_shard

_FSDP2_PRE_HOOK = "FSDPParamGroup._register_state_dict_hooks.<locals>.to_sharded_hook"


class _NotDefault(Exception):
    """A module whose state_dict() the tree cannot stand for."""


def _check_default(module: torch.nn.Module) -> None:
    cls = type(module)
    if (cls.state_dict is not torch.nn.Module.state_dict
            or cls._save_to_state_dict is not torch.nn.Module._save_to_state_dict
            or getattr(cls, "get_extra_state", torch.nn.Module.get_extra_state)
            is not torch.nn.Module.get_extra_state
            or module._state_dict_hooks
            or any(getattr(h, "__qualname__", None) != _FSDP2_PRE_HOOK
                   for h in module._state_dict_pre_hooks.values())):
        raise _NotDefault


def _members(module: torch.nn.Module) -> tuple[tuple[str, ...], list[Any]]:
    """(names, objects) of what decides the module's share of ``state_dict()``: its
    parameters, buffers, children and state-dict hooks, and which buffers persist."""
    params, buffers, children = module._parameters, module._buffers, module._modules
    names = (*params, "|", *buffers, "|", *children, "|", *module._non_persistent_buffers_set,
             "|", len(module._state_dict_hooks))
    return names, [*params.values(), *buffers.values(), *children.values(),
                   *module._state_dict_pre_hooks.values()]


def _detached_type(t: torch.Tensor) -> type:
    """The type of ``t.detach()``: a plain Parameter detaches to a Tensor, a DTensor
    parameter to a DTensor."""
    return torch.Tensor if type(t) is torch.nn.Parameter else type(t)


class ModuleTree:
    """The module tree behind one ``state_dict()`` call (see the module docstring)."""

    __slots__ = ("_modules", "_names", "_objects", "_tensors")

    def __init__(self, modules: list[torch.nn.Module], tensors: list[torch.Tensor]) -> None:
        self._modules = tuple(modules)
        members = [_members(m) for m in modules]
        self._names = tuple(names for names, _ in members)
        self._objects = tuple(obj for _, objects in members for obj in objects)
        self._tensors = tensors  # state_dict()'s values, undetached, in its key order

    @classmethod
    def record(cls, model: torch.nn.Module, state_dict: dict[str, Any]) -> "ModuleTree | None":
        """The tree of ``model``, given what its ``state_dict()`` just returned; None when
        the default machinery does not explain that result exactly."""
        modules: list[torch.nn.Module] = []
        keys: list[str] = []
        tensors: list[torch.Tensor] = []

        def visit(module: torch.nn.Module, prefix: str) -> None:
            _check_default(module)
            modules.append(module)
            for name, p in module._parameters.items():
                if p is not None:
                    keys.append(prefix + name)
                    tensors.append(p)
            for name, b in module._buffers.items():
                if b is not None and name not in module._non_persistent_buffers_set:
                    keys.append(prefix + name)
                    tensors.append(b)
            for name, child in module._modules.items():
                if child is not None:
                    visit(child, prefix + name + ".")

        try:
            visit(model, "")
        except (_NotDefault, RecursionError):
            return None
        if keys != list(state_dict) or not all(
                _detached_type(t) is type(v) and local_shard(v).is_set_to(local_shard(t))
                for v, t in zip(state_dict.values(), tensors)):
            return None
        return cls(modules, tensors)

    def tensors(self) -> list[torch.Tensor] | None:
        """``state_dict()``'s values (undetached: the parameters and buffers themselves) in
        its key order, or None when any recorded module changed."""
        names, objects = self._names, []
        for i, module in enumerate(self._modules):
            own_names, own_objects = _members(module)
            if own_names != names[i]:
                return None
            objects += own_objects
        if len(objects) != len(self._objects) or not all(map(is_, objects, self._objects)):
            return None
        return self._tensors
