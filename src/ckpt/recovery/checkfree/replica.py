"""Copies of stage 0 (embedding, final norm, head) kept by its neighbours' holders.

Stage 0 has no neighbour of its own structure, so neither rule can rebuild it. Under
CheckFree+ its weights are copied to the holders of stage 1 (which receives the
embedding's output) and stage S (which feeds the head): a few tensors, small next to a
body stage. A lost stage 0 is then restored from either copy. A copy is as fresh as its
last refresh; refresh it every step (or as often as a stale embedding is acceptable).
The paper describes this replication; its reference code never fails stage 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ckpt.errors import ConfigError, StageRebuildError
from ckpt.recovery.checkfree.schedule import check_num_stages


def embedding_replica_holders(num_stages: int) -> tuple[int, ...]:
    """The stages whose holders keep a copy of stage 0: (1, S), or (1,) when S = 1."""
    check_num_stages(num_stages, checkfree_plus=False)
    return (1,) if num_stages == 1 else (1, num_stages)


def extract_embedding_replica(
    stage0_state: Mapping[str, Any],
    prefixes: Sequence[str] | None = None,
    device: torch.device | str | None = "cpu",
) -> dict[str, Any]:
    """A detached copy of stage 0's state dict (``module.state_dict()``) to send to the holders.

    ``prefixes`` keeps only the keys that start with one of them (e.g. ``("embed.",
    "norm.", "head.")`` when stage 0 also holds things that need no replica); None keeps
    every key. Tensors are copied to ``device`` (default CPU, so the copy costs no
    accelerator memory; None keeps each tensor's device). The copy never aliases the live
    weights, so later optimizer steps do not change it.
    """
    if prefixes is not None and isinstance(prefixes, str):
        raise ConfigError(
            f"prefixes must be a sequence of strings, not the string {prefixes!r}; wrap it in a tuple"
        )
    replica: dict[str, Any] = {}
    with torch.no_grad():
        for key, value in stage0_state.items():
            if prefixes is not None and not any(key.startswith(p) for p in prefixes):
                continue
            if isinstance(value, torch.Tensor):
                value = value.detach().to(device=value.device if device is None else device, copy=True)
            replica[key] = value
    if not replica:
        raise ConfigError(
            f"no key of stage 0's state dict starts with any of {list(prefixes or [])}; nothing to replicate"
        )
    return replica


def install_embedding_replica(
    module: torch.nn.Module, replica: Mapping[str, Any], require_complete: bool = True
) -> None:
    """Load ``replica`` into a newly built stage-0 ``module``.

    Every replica key must exist in the module with the same shape and dtype
    (StageRebuildError names the first that does not). With ``require_complete`` every
    key of the module must also be in the replica, so nothing is left at its random
    initialisation; pass False when the replica was extracted with ``prefixes`` and the
    rest of stage 0 is restored some other way.
    """
    own = module.state_dict()
    unknown = [k for k in replica if k not in own]
    if unknown:
        raise StageRebuildError(
            f"the embedding replica holds keys stage 0 does not have: {unknown[:5]}; "
            "it was taken from a different model: restore stage 0 from a checkpoint instead"
        )
    missing = [k for k in own if k not in replica]
    if require_complete and missing:
        raise StageRebuildError(
            f"the embedding replica lacks stage 0 keys {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            "restore those from a checkpoint and pass require_complete=False, or replicate all of stage 0"
        )
    for key, value in replica.items():
        mine = own[key]
        if isinstance(mine, torch.Tensor) and isinstance(value, torch.Tensor):
            if mine.shape != value.shape or mine.dtype != value.dtype:
                raise StageRebuildError(
                    f"embedding replica entry {key!r} is {tuple(value.shape)} {value.dtype} but stage 0 "
                    f"has {tuple(mine.shape)} {mine.dtype}: the replica is from a different model "
                    "configuration; restore stage 0 from a checkpoint instead"
                )
    module.load_state_dict(dict(replica), strict=False)
