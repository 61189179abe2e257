"""Split a nested state (dicts, lists, scalars, tensors) into tensors and a JSON skeleton.

``flatten(obj)`` returns ``(tensors, skeleton)``: ``tensors`` is a list of
``(path, tensor)`` in a deterministic depth-first order, ``skeleton`` a JSON-safe
value in which every tensor is replaced by ``{"__tensor__": i}`` (its index in
``tensors``). ``unflatten(skeleton, tensors)`` rebuilds the object. Nothing is
pickled: a value this encoding does not know raises :class:`UnsupportedStateError`.

The encoding (tags are one-key dicts whose key starts with ``"__"``):

- ``None``, ``bool``, ``str``, and ``int`` in the int64 range: themselves.
  Larger ints: ``{"__int__": "<decimal>"}``.
- finite ``float``: itself (Python's JSON writes the shortest repr, which round-trips
  exactly, ``-0.0`` included); nan/inf: ``{"__float__": "nan" | "inf" | "-inf"}``.
- ``list``: a JSON array; ``tuple``: ``{"__tuple__": [...]}``.
- ``dict`` whose keys are all ``str`` not starting with ``"__"``: a JSON object;
  any other dict: ``{"__dict__": [[key, value], ...]}`` (keys encoded like values,
  so int and tuple keys round-trip).
- ``bytes``: ``{"__bytes__": "<base64>"}``; ``torch.dtype``: ``{"__dtype__": "float32"}``.
- ``torch.Tensor``: ``{"__tensor__": i}``; ``numpy.ndarray``: ``{"__ndarray__": i}``
  (stored as a tensor; unflatten returns a numpy array again);
  numpy scalar: ``{"__npscalar__": [dtype, "<base64 of its bytes>"]}``.

Paths are the keys and list indices joined by ``"/"`` (``model/0.weight``,
``optim/state/0.weight/exp_avg``), so a tensor's name says where it lives.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import torch

from ckpt.errors import UnsupportedStateError

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_TAGS = frozenset({"__tensor__", "__ndarray__", "__npscalar__", "__int__", "__float__",
                   "__tuple__", "__dict__", "__bytes__", "__dtype__"})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; raises UnsupportedStateError for unknown names."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UnsupportedStateError(f"{name!r} is not a torch dtype known to torch "
                                    f"{torch.__version__}; restore with the torch that wrote it")
    return dtype


def _unsupported(path: str, value: Any, why: str = "") -> UnsupportedStateError:
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    return UnsupportedStateError(
        f"state at {path or '<root>'!r} holds a {kind}, which ckpt cannot store without "
        f"pickle{': ' + why if why else ''}. Supported: dict, list, tuple, int, float, bool, "
        f"None, str, bytes, torch.dtype, torch tensors, numpy arrays and scalars. Convert it in "
        f"your object's state_dict() (e.g. to a tensor, a list or a str) and back in "
        f"load_state_dict().")


# Exact types encoded as a plain tensor without the isinstance chain (subclasses and
# DTensor take it: DTensor is a torch.Tensor too).
_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
_ITSELF = frozenset({str, bool, type(None)})


def _plain_keys(value: dict) -> bool:
    """Every key a str not starting with "__" (str subclasses included)."""
    return all(isinstance(k, str) and not k.startswith("__") for k in value)


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


class _Flattener:
    def __init__(self, first_index: int = 0) -> None:
        self.first_index = first_index
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self._active: set[int] = set()  # containers on the current path (cycle check)

    def encode(self, value: Any, path: str) -> Any:
        kind = type(value)
        # The common cases of a training state first, by exact type (one dict lookup).
        if kind in _PLAIN_TENSORS:
            return self._tensor(value, path, "__tensor__")
        if kind is dict or kind is list:
            return self._guarded(value, path)
        # bool before int: bool is an int subclass.
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            value = int(value)  # IntEnum and friends become plain ints
            if _INT64_MIN <= value <= _INT64_MAX:
                return value
            return {"__int__": str(value)}
        if isinstance(value, float):
            value = float(value)
            if math.isfinite(value):
                return value
            return {"__float__": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path, "__tensor__")
        if isinstance(value, np.ndarray):
            return self._ndarray(value, path)
        if isinstance(value, np.generic):
            return self._npscalar(value, path)
        if isinstance(value, bytes):
            return {"__bytes__": base64.b64encode(value).decode("ascii")}
        if isinstance(value, torch.dtype):
            return {"__dtype__": _dtype_name(value)}
        if isinstance(value, (dict, list, tuple)):
            return self._guarded(value, path)
        raise _unsupported(path, value)

    def _guarded(self, value: dict | list | tuple, path: str) -> Any:
        if id(value) in self._active:
            raise _unsupported(path, value, "it contains itself (a reference cycle)")
        self._active.add(id(value))
        try:
            return self._container(value, path)
        finally:
            self._active.discard(id(value))

    def _container(self, value: dict | list | tuple, path: str) -> Any:
        if isinstance(value, dict):
            if all(type(k) is str and k[:2] != "__" for k in value):
                return self._plain_dict(value, f"{path}/" if path else "")
            if _plain_keys(value):  # str subclasses among the keys
                return {k: self.encode(v, _join(path, k)) for k, v in value.items()}
            items = []
            for k, v in value.items():
                if not isinstance(k, (str, int, float, bool, tuple, type(None), bytes)):
                    raise _unsupported(_join(path, k), k, "dict keys must be str, int, float, "
                                       "bool, None, bytes or tuples of those")
                items.append([self.encode(k, _join(path, "<key>")), self.encode(v, _join(path, k))])
            return {"__dict__": items}
        # str, bool and None encode as themselves (a param group's FQN list: thousands).
        encoded = [v if type(v) in _ITSELF else self.encode(v, _join(path, i))
                   for i, v in enumerate(value)]
        # Subclasses (namedtuple, custom lists) would come back as their base: refuse them
        # rather than return something of another type.
        if type(value) is tuple:
            return {"__tuple__": encoded}
        if type(value) is list:
            return encoded
        raise _unsupported(path, value, "subclasses of list/tuple (e.g. namedtuple) would not "
                           "come back as the same type")

    def _plain_dict(self, value: dict, prefix: str) -> dict:
        """A dict with plain str keys; its plain tensors (a state dict's values) inline."""
        out = {}
        tensors, encode, strided = self.tensors, self.encode, torch.strided
        for k, v in value.items():
            if type(v) in _PLAIN_TENSORS and v.layout is strided and not v.is_conj():
                tensors.append((prefix + k, v))
                out[k] = {"__tensor__": self.first_index + len(tensors) - 1}
            else:
                out[k] = encode(v, prefix + k)
        return out

    def _tensor(self, tensor: torch.Tensor, path: str, tag: str) -> dict:
        if tensor.layout is not torch.strided:
            raise _unsupported(path, tensor, f"layout {tensor.layout} is not supported; "
                               f"store .to_dense()")
        if tensor.is_conj():
            raise _unsupported(path, tensor, "a lazily conjugated tensor; call .resolve_conj()")
        self.tensors.append((path, tensor))
        return {tag: self.first_index + len(self.tensors) - 1}

    def _ndarray(self, array: np.ndarray, path: str) -> dict:
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(array))
        except TypeError as exc:
            raise _unsupported(path, array, f"numpy dtype {array.dtype} has no torch "
                               f"equivalent ({exc})") from None
        return self._tensor(tensor, path, "__ndarray__")

    def _npscalar(self, scalar: np.generic, path: str) -> dict:
        if scalar.dtype.hasobject or scalar.dtype.kind in "OV":
            raise _unsupported(path, scalar, f"numpy dtype {scalar.dtype} holds Python objects")
        return {"__npscalar__": [scalar.dtype.str,
                                 base64.b64encode(scalar.tobytes()).decode("ascii")]}


def flatten(obj: Any, first_index: int = 0) -> tuple[list[tuple[str, torch.Tensor]], Any]:
    """Split ``obj`` into ``(tensors, skeleton)``; see the module docstring.

    Tensors are returned as they are (no copy): the caller decides when to copy
    their bytes. ``first_index``: the index the first tensor gets in the skeleton (when
    ``obj`` continues a state whose first tensors were flattened before). Raises
    UnsupportedStateError naming the path and type of the first value it cannot store.
    """
    flattener = _Flattener(first_index)
    skeleton = flattener.encode(obj, "")
    return flattener.tensors, skeleton


def _decode_tag(tag: str, payload: Any, tensors: list[Any]) -> Any:
    if tag == "__tensor__":
        return tensors[payload]
    if tag == "__ndarray__":
        value = tensors[payload]
        return value.numpy().copy() if isinstance(value, torch.Tensor) else value
    if tag == "__npscalar__":
        dtype, data = payload
        return np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype))[0]
    if tag == "__int__":
        return int(payload)
    if tag == "__float__":
        return float(payload)
    if tag == "__tuple__":
        return tuple(_decode(v, tensors) for v in payload)
    if tag == "__dict__":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in payload}
    if tag == "__bytes__":
        return base64.b64decode(payload)
    if tag == "__dtype__":
        return dtype_from_name(payload)
    raise AssertionError(tag)


def _decode(node: Any, tensors: list[Any]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if isinstance(node, dict):
        if len(node) == 1:
            (key, payload), = node.items()
            if key in _TAGS:
                return _decode_tag(key, payload, tensors)
        return {k: _decode(v, tensors) for k, v in node.items()}
    return node


def unflatten(skeleton: Any, tensors: list[Any]) -> Any:
    """Rebuild the object ``flatten`` split; ``tensors[i]`` replaces ``{"__tensor__": i}``.

    ``tensors`` may be the original tensors or their restored copies (any objects:
    the caller may pass placeholders and fill them in later).
    """
    return _decode(skeleton, tensors)


def tensor_indices(skeleton: Any) -> list[int]:
    """Indices of every tensor reference in ``skeleton``, in flatten order."""
    out: list[int] = []

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, dict):
            if len(node) == 1:
                (key, payload), = node.items()
                if key in ("__tensor__", "__ndarray__"):
                    out.append(payload)
                    return
                if key in _TAGS:
                    if key in ("__tuple__",):
                        walk(payload)
                    elif key == "__dict__":
                        for k, v in payload:
                            walk(k)
                            walk(v)
                    return
            for v in node.values():
                walk(v)

    walk(skeleton)
    return out
