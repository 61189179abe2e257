"""Turn the live training state into what one snapshot copies: plan, meta and sources.

Two paths give the same result (the same meta bytes, the same source tensors):

- the full path reads the whole state (:func:`ckpt.hook.state.collect_state`),
  flattens it, and works out every tensor's geometry and source;
- the template path, taken while a :class:`~ckpt.hook.template.BulkTemplate` of the
  previous snapshot still holds, reads and flattens only the small rest of the state.

``CKPT_CHECK_SNAPSHOT_TEMPLATE=1`` makes every template snapshot also take the full
path and compare the two (the test suite sets it): a mismatch raises.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ckpt.hook.state import collect_state, param_groups_state, parameter_locals, \
    small_state
from ckpt.hook.template import BulkTemplate
from ckpt.snapshot.geometry import TensorGeometry, eager_copy, geometries
from ckpt.snapshot.layout import StateJson, encode_meta
from ckpt.snapshot.stager import SnapshotPlan, plan_snapshot, signature_of
from ckpt.snapshot.tree import flatten

# After this many templates in a row that did not hold even once, build one only every
# _RETRY_EVERY full snapshots (state that changes every step, e.g. an int step counter
# kept by a third-party optimizer, would otherwise pay for a template per step).
_GIVE_UP_AFTER = 2
_RETRY_EVERY = 16


@dataclass(frozen=True)
class Collected:
    plan: SnapshotPlan
    meta: dict[str, Any]  # meta["state"]: the skeleton, or a StateJson of it
    sources: list[torch.Tensor]  # sources[i] -> plan.layout.tensors[i]; stable until copied
    from_template: bool


class SnapshotCollector:
    """Collects the snapshots of one Checkpointer (its training thread only)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, extras: Mapping[str, Any], chunk_bytes: int) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.extras = extras
        self.chunk_bytes = chunk_bytes
        self.plan: SnapshotPlan | None = None
        self._template: BulkTemplate | None = None
        self._template_used = False
        self._unused_templates = 0
        self._full_since_give_up = 0
        self.check = os.environ.get("CKPT_CHECK_SNAPSHOT_TEMPLATE") == "1"
        self.template_snapshots = 0  # snapshots collected from a template (for tests, benches)

    def collect(self, step: int, header: Mapping[str, Any],
                extra_top: Mapping[str, Any] | None = None) -> Collected:
        """``header``: the meta's job, rank, world_size; ``extra_top``: keys appended to
        the state (the pipeline stage's)."""
        template = self._template
        if template is not None and template.holds(self.model, self.optimizer):
            self._template_used = True
            self.template_snapshots += 1
            got = self._from_template(template, step, header, extra_top)
            if self.check:
                self._compare(got, self._full(step, header, extra_top, build=False))
            return got
        if template is not None:
            self._unused_templates = 0 if self._template_used else self._unused_templates + 1
            self._template = None
        return self._full(step, header, extra_top, build=self._should_build())

    def _should_build(self) -> bool:
        if self._unused_templates < _GIVE_UP_AFTER:
            return True
        self._full_since_give_up += 1
        return self._full_since_give_up % _RETRY_EVERY == 0

    def _full(self, step: int, header: Mapping[str, Any], extra_top: Mapping[str, Any] | None,
              build: bool) -> Collected:
        state = collect_state(self.model, self.optimizer, self.scheduler, self.extras, step)
        if extra_top:
            state.update(extra_top)
        tensors, skeleton = flatten(state)
        geoms = geometries(tensors)
        sources, copied = stable_sources(self.model, geoms)
        signature = signature_of(geoms)
        plan = self._plan_for(signature, geoms)
        if build:
            self._template = BulkTemplate.build(self.model, self.optimizer, state, skeleton,
                                                geoms, signature, sources, copied)
            self._template_used = False
        return Collected(plan, {**header, "step": step, "state": skeleton}, sources, False)

    def _from_template(self, template: BulkTemplate, step: int, header: Mapping[str, Any],
                       extra_top: Mapping[str, Any] | None) -> Collected:
        rest = {"optim": {"param_groups": param_groups_state(self.optimizer,
                                                             list(template.group_fqns))},
                **small_state(self.scheduler, self.extras, step), **(extra_top or {})}
        tensors, skeleton = flatten(rest, first_index=template.count)
        geoms = geometries(tensors)
        # None of these is a parameter or optimizer state: all are copied now.
        sources = template.sources() + [eager_copy(g.local) for g in geoms]
        plan = self._plan_for(template.signature + signature_of(geoms),
                              [*template.geoms, *geoms])
        meta = {**header, "step": step, "state": StateJson(template.state_json(skeleton))}
        return Collected(plan, meta, sources, True)

    def _plan_for(self, signature: tuple, geoms: list[TensorGeometry]) -> SnapshotPlan:
        if self.plan is None or self.plan.signature != signature:
            self.plan = plan_snapshot(geoms, self.chunk_bytes)
        return self.plan

    def _compare(self, got: Collected, full: Collected) -> None:
        fast_meta = encode_meta(got.plan.layout, got.meta)
        full_meta = encode_meta(full.plan.layout, full.meta)
        if fast_meta != full_meta:
            raise AssertionError(f"snapshot template: the meta differs from the full path's "
                                 f"({len(fast_meta)} vs {len(full_meta)} bytes)")
        for i, (a, b) in enumerate(zip(got.sources, full.sources, strict=True)):
            if (a.dtype, a.shape, a.stride()) != (b.dtype, b.shape, b.stride()) \
                    or (a.data_ptr() != b.data_ptr() and not torch.equal(a, b)):
                raise AssertionError(f"snapshot template: source {i} "
                                     f"({got.plan.layout.tensors[i].spec.name}) differs")


def stable_sources(model: torch.nn.Module, geoms: list[TensorGeometry]
                   ) -> tuple[list[torch.Tensor], list[bool]]:
    """The tensors to copy from, and which of them are copies made now.

    The live ones where only optimizer.step() mutates them (parameters and
    ``optim/state/``, which its pre-hook guards: the big ones); eager copies of everything
    else -- model buffers, a tensor lr (schedulers ``fill_`` it), extras' and scheduler
    tensors, non-contiguous views -- which may change at any time after step() returns
    and are small."""
    params = parameter_locals(model)
    sources, copied = [], []
    for g in geoms:
        t = g.local
        guarded = g.name.startswith("optim/state/")
        if not guarded:
            live = params.get(t.data_ptr())
            guarded = live is not None
            if guarded and live.shape == t.shape and live.stride() == t.stride() \
                    and live.dtype == t.dtype:
                t = live  # long-lived, unlike state_dict()'s per-call view (gc_pause)
        copy = not guarded or not t.is_contiguous()
        if copy:
            t = eager_copy(t)
        sources.append(t)
        copied.append(copy)
    return sources, copied
