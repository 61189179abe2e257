"""ckpt.snapshot.tree: a JSON-safe, pickle-free encoding of nested state."""

from __future__ import annotations

import json
import math
from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import torch

from ckpt.errors import UnsupportedStateError
from ckpt.snapshot.tree import flatten, unflatten


def roundtrip(obj):
    tensors, skeleton = flatten(obj)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))  # must be strict JSON
    return unflatten(skeleton, [t for _, t in tensors]), tensors


def test_scalars_and_containers_round_trip_exactly():
    obj = {"a": 1, "big": 2**100, "neg": -(2**70), "f": 0.1, "t": True, "n": None, "s": "é",
           "b": b"\x00\xff", "l": [1, [2, (3, 4)]], "tup": (1, "x"), "dt": torch.bfloat16,
           "int_keys": {0: "a", 5: "b"}, "tuple_key": {(1, 2): 3}, "__tag_like": 1,
           "empty": {}, "empty_l": [], "nested_tag": {"__tensor__": 7}}
    out, _ = roundtrip(obj)
    assert out == obj
    assert type(out["tup"]) is tuple and type(out["l"][1][1]) is tuple
    assert out["dt"] is torch.bfloat16


def test_special_floats_round_trip_bit_exactly():
    out, _ = roundtrip([float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1.7976931348623157e308])
    assert math.isnan(out[0]) and out[1] == math.inf and out[2] == -math.inf
    assert math.copysign(1.0, out[3]) == -1.0
    assert out[4] == 5e-324 and out[5] == 1.7976931348623157e308


def test_tensors_become_references_in_order_with_paths():
    w, b = torch.randn(3, 2), torch.zeros(2)
    tensors, skeleton = flatten({"model": {"0.weight": w, "0.bias": b}, "step": torch.tensor(3.0)})
    assert [p for p, _ in tensors] == ["model/0.weight", "model/0.bias", "step"]
    assert tensors[0][1] is w  # no copy
    assert skeleton["model"]["0.weight"] == {"__tensor__": 0}
    out = unflatten(skeleton, [t for _, t in tensors])
    assert out["model"]["0.bias"] is b


def test_numpy_arrays_and_scalars_round_trip():
    obj = {"rng": np.random.get_state(), "s32": np.float32(1.5), "i64": np.int64(-7),
           "arr": np.arange(6, dtype=np.int16).reshape(2, 3)[:, ::2]}
    out, tensors = roundtrip(obj)
    assert [p for p, _ in tensors] == ["rng/1", "arr"]
    np.testing.assert_array_equal(out["rng"][1], obj["rng"][1])
    assert out["rng"][0] == "MT19937" and out["rng"][1].dtype == np.uint32
    assert out["s32"] == obj["s32"] and out["s32"].dtype == np.float32
    assert out["i64"].dtype == np.int64
    np.testing.assert_array_equal(out["arr"], obj["arr"])


@pytest.mark.parametrize("value, kind", [
    (object(), "builtins.object"),
    (lambda: 0, "function"),
    ({1, 2}, "builtins.set"),
    (namedtuple("P", "x")(1), "P"),
    (np.array([object()]), "numpy.ndarray"),
])
def test_unsupported_values_are_refused_naming_path_and_type(value, kind):
    with pytest.raises(UnsupportedStateError) as info:
        flatten({"extra": {"loader": [1, value]}})
    msg = str(info.value)
    assert "'extra/loader/1'" in msg and kind in msg and "state_dict()" in msg


def test_reference_cycle_is_refused():
    a: list = []
    a.append(a)
    with pytest.raises(UnsupportedStateError, match="cycle"):
        flatten(a)


def test_ordered_dict_round_trips_as_dict_with_order():
    od = OrderedDict([("b", 1), ("a", 2)])
    out, _ = roundtrip(od)
    assert list(out.items()) == [("b", 1), ("a", 2)]


class Key(str):
    """A str subclass as a dict key (an enum-like name a user's state_dict may use)."""


def test_str_subclass_keys_and_parameters_encode_like_their_plain_forms():
    p = torch.nn.Parameter(torch.ones(2))
    tensors, skeleton = flatten({"model": {Key("w"): p, "b": torch.zeros(1)}})
    assert [path for path, _ in tensors] == ["model/w", "model/b"]
    assert tensors[0][1] is p
    assert skeleton == {"model": {"w": {"__tensor__": 0}, "b": {"__tensor__": 1}}}


def test_sparse_and_lazily_conjugated_tensors_are_refused_in_any_container():
    for bad in (torch.zeros(2).to_sparse(), torch.zeros(2, dtype=torch.complex64).conj()):
        with pytest.raises(UnsupportedStateError):
            flatten({"state": [bad]})
