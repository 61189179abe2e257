"""What does losing a pipeline stage cost when CheckFree rebuilds it, next to the alternatives?

The comparison of the CheckFree paper (arXiv 2506.15461) at CPU scale, in one run: a tiny
LLaMA-style model (:mod:`ckpt.testing.tiny_llama`: RMSNorm, RoPE, SwiGLU; stage 0 = embedding
+ final norm + head, body stages 1..S = one block each, S = 6) trained on generated data, with
its pipeline simulated in one process (the stages applied in order: the same math as a real
pipeline). One AdamW per stage, constant learning rate (as the reference's LLaMA configs),
per-stage gradient clipping at 1.0 with the post-clip norm recorded by ``GradNormTracker``,
two micro-batches per step.

Failures destroy a stage's weights (overwritten with noise), which each method then recovers:

- ``checkfree``: the gradient-weighted average of the two neighbours (``plan_recovery`` /
  ``execute_rebuild``); ``checkfree_uniform``: the same with equal weights (plain average);
- ``checkfree_plus``: training runs the CheckFree+ swapped micro-batch order
  (``microbatch_stage_order``) from step 0; an edge stage is a copy of its swap partner;
- ``copy``: a copy of the previous body stage (stage 2 for stage 1), no swaps in training;
- ``random``: a fresh random initialisation of the stage;
- ``rollback_K``: every stage and optimizer restored from an in-memory copy taken K steps
  before, and those steps redone (counted as compute and wall-clock);
- ``reset_only`` (control, middle stage): no weights lost, only the stage's optimizer reset as
  the rebuilding methods do, to show what the reset alone costs.

The four rebuilding methods reset the rebuilt stage's optimizer (``reset_optimizer``, lr x 1.1).
Scenarios: one failure of a middle stage (3) and one of the first body stage (1), at 60 % of
the run; and churn, where every body stage fails independently at each step with the
per-step probability the reference code uses for 5 / 10 / 16 % per hour (see CHURN_P_PER_STEP).
Stage 0 never fails (as in the reference's simulation). Methods are compared at equal compute
(x = steps computed, redone ones included) and at equal wall-clock: compute steps times the
median measured step (every method computes the same FLOPs per step; per-job step times on a
shared machine differ by load, not by method) plus each method's measured overheads (rebuild,
in-memory restore, snapshot). Rollback under churn is replayed from the no-failure run, which
is exact because training is deterministic (checked bitwise against the real single-failure
rollbacks, printed under "checks").

    python bench/checkfree.py [--seeds 0,1,2] [--steps 500] [--workers 2] [--plot-dir bench] [--quick]

Prints the plan and assumptions, a table per scenario, the paper's claims with verdicts, and
one JSON line per (scenario, method) with the machine and the versions; writes
``checkfree_{middle,first,churn}.png`` into ``--plot-dir``. Each worker process runs torch on
one thread (with 2 cores, more threads per process slow every step down by ~10x).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ckpt.errors import ConfigError, StageRebuildError
from ckpt.recovery.checkfree import (
    DEFAULT_LR_SCALE,
    GradNormTracker,
    execute_rebuild,
    microbatch_stage_order,
    neighbour_weights,
    plan_recovery,
    rebuild_stage,
    reset_optimizer,
)
from ckpt.testing.tiny_llama import (
    SyntheticCorpus,
    TinyLlamaConfig,
    build_stage,
    build_stages,
    derive_seed,
    lm_loss,
)

LR = 6e-3
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
MICROBATCHES = 2
COPY_FRACTION = 1.0  # every sequence's second half repeats its first (the corpus default is 0.5)
MIDDLE_STAGE = 3
FIRST_STAGE = 1
SMOOTH_STEPS = 10  # trailing mean used for steps-to-target and for the plots
FINAL_STEPS = 10  # "final loss" = mean of the last FINAL_STEPS computed steps

# Per-stage, per-step failure probability for each hourly rate: the values of the reference
# code's 500M configuration (gensyn-ai/CheckFree simulate_training/500M_config.json, S = 6 body
# stages like here; each body stage fails with this probability at each iteration). The paper's
# iteration time is not stated; these values imply one through p = 1 - (1 - h) ** (t / 3600)
# (implied_step_time_s), about 63-83 s per iteration.
CHURN_P_PER_STEP = {5: 0.0009, 10: 0.002, 16: 0.004}

PLAIN_METHODS_MIDDLE = ("none", "checkfree", "checkfree_uniform", "copy", "random", "reset_only")
PLUS_METHODS_MIDDLE = ("none_plus", "checkfree_plus")
PLAIN_METHODS_FIRST = ("copy", "random")
PLUS_METHODS_FIRST = ("checkfree_plus",)
CHURN_PLAIN_METHODS = ("checkfree", "copy", "random")
CHURN_PLUS_METHODS = ("checkfree_plus",)

LABELS = {
    "none": "no failure",
    "none_plus": "no failure, CheckFree+ order",
    "checkfree": "CheckFree",
    "checkfree_uniform": "CheckFree, plain average",
    "checkfree_plus": "CheckFree+",
    "copy": "copy of neighbour",
    "random": "random re-init",
    "reset_only": "optimizer reset only (control)",
}


COLOURS = {
    "none": "black", "none_plus": "grey", "checkfree": "tab:blue", "checkfree_uniform": "tab:cyan",
    "checkfree_plus": "tab:green", "copy": "tab:orange", "random": "tab:red", "reset_only": "tab:olive",
}
ROLLBACK_COLOURS = ("tab:purple", "tab:brown", "tab:pink")


def colour(method: str, rollbacks: Sequence[int]) -> str:
    """The same colour for a method in every plot."""
    if method.startswith("rollback_"):
        return ROLLBACK_COLOURS[list(rollbacks).index(int(method.split("_")[1])) % len(ROLLBACK_COLOURS)]
    return COLOURS[method]


def label(method: str) -> str:
    """Human name of a method key (``rollback_50`` -> ``rollback 50``)."""
    if method.startswith("rollback_"):
        return f"rollback {method.split('_')[1]}"
    return LABELS[method]


def is_plus(method: str) -> bool:
    """Whether the method trains in the CheckFree+ swapped order."""
    return method in ("none_plus", "checkfree_plus")


def baseline_of(method: str) -> str:
    """The no-failure run with the same training order."""
    return "none_plus" if is_plus(method) else "none"


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class BenchPlan:
    """Sizes and schedule of one benchmark run; every step count is in optimizer steps."""

    cfg: TinyLlamaConfig
    steps: int  # length of a no-failure run
    fail_step: int  # the single failure happens just before this step is computed
    churn_start: int  # churn runs compute steps churn_start .. steps-1
    rollbacks: tuple[int, ...]  # how far back a rollback goes (single failure) / checkpoint interval (churn)
    windows: tuple[tuple[int, int], ...]  # (first, last) step after the failure, 1-based, inclusive
    batch_size: int  # sequences per micro-batch
    churn_rates: tuple[int, ...]  # % per hour
    churn_scale: float  # multiplies CHURN_P_PER_STEP (1 = the paper's rates)
    seeds: tuple[int, ...]

    @property
    def after_steps(self) -> int:
        """Compute steps run after the single failure (the same for every method)."""
        return self.steps - self.fail_step

    @property
    def num_stages(self) -> int:
        return self.cfg.num_body_stages

    def p_per_step(self, rate: int) -> float:
        return CHURN_P_PER_STEP[rate] * self.churn_scale


def make_plan(steps: int, seeds: Sequence[int], quick: bool) -> BenchPlan:
    """The full plan (or the tiny --quick one), derived from the run length ``steps``."""
    if steps < 40:
        raise ConfigError(f"--steps must be >= 40 (failure at 60 %, windows, rollbacks), found {steps}")
    if not seeds:
        raise ConfigError("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    cfg = (TinyLlamaConfig(vocab_size=64, dim=16, num_heads=2, ffn_dim=32, seq_len=16, num_body_stages=6)
           if quick else TinyLlamaConfig())
    fail_step = round(steps * 0.6)
    after = steps - fail_step
    first_window = max(1, after // 20)
    windows = ((1, first_window), (first_window + 1, after // 4), (after // 4 + 1, after))
    rollbacks = (after // 4, after // 2)
    if fail_step < max(rollbacks):
        raise ConfigError(f"the failure step {fail_step} must be >= the longest rollback {max(rollbacks)}")
    return BenchPlan(cfg=cfg, steps=steps, fail_step=fail_step, churn_start=steps // 5, rollbacks=rollbacks,
                     windows=windows, batch_size=4 if quick else 8, churn_rates=tuple(CHURN_P_PER_STEP),
                     churn_scale=10.0 if quick else 1.0, seeds=tuple(seeds))


def implied_step_time_s(rate_pct: float, p_per_step: float) -> float:
    """The iteration time t at which a per-hour failure probability ``rate_pct`` % becomes
    ``p_per_step`` per iteration: 1 - p = (1 - h) ** (t / 3600)."""
    return 3600.0 * math.log1p(-p_per_step) / math.log1p(-rate_pct / 100.0)


# ----------------------------------------------------------------------------- the pipeline


class Pipeline:
    """Stage 0 and the S body stages of one model, each with its own AdamW, run in order in
    one process (``checkfree_plus``: odd micro-batches in the swapped CheckFree+ order)."""

    def __init__(self, plan: BenchPlan, seed: int, checkfree_plus: bool) -> None:
        self.plan, self.seed, self.checkfree_plus = plan, seed, checkfree_plus
        self.stages = build_stages(plan.cfg, seed)
        self.corpus = SyntheticCorpus(plan.cfg, seed, copy_fraction=COPY_FRACTION)
        self.optimizers = [torch.optim.AdamW(s.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
                           for s in self.stages]
        self.tracker = GradNormTracker(max_norm=MAX_GRAD_NORM)

    def microbatch_loss(self, step: int, microbatch: int) -> torch.Tensor:
        """Mean cross-entropy of one micro-batch through the pipeline."""
        tokens, targets = self.corpus.batch(step, microbatch, self.plan.batch_size)
        order = microbatch_stage_order(self.plan.num_stages, microbatch, self.checkfree_plus)
        h = self.stages[0].embed_tokens(tokens)
        for position in range(1, self.plan.num_stages + 1):
            h = self.stages[order[position]](h)
        return lm_loss(self.stages[0].logits(h), targets)

    def train_step(self, step: int) -> float:
        """One optimizer step on every stage; returns the step's loss (mean over micro-batches)."""
        total = 0.0
        for microbatch in range(MICROBATCHES):
            loss = self.microbatch_loss(step, microbatch) / MICROBATCHES
            loss.backward()
            total += loss.item()
        for index, stage in enumerate(self.stages):
            self.tracker.clip_and_record(index, stage.parameters(), step)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return total

    @torch.no_grad()
    def eval_loss(self, step: int) -> float:
        """The loss step ``step`` would report, without training."""
        return sum(self.microbatch_loss(step, mb).item() for mb in range(MICROBATCHES)) / MICROBATCHES

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of every stage's weights, every optimizer's state and the norms."""
        return copy.deepcopy({"stages": [s.state_dict() for s in self.stages],
                              "optimizers": [o.state_dict() for o in self.optimizers],
                              "tracker": self.tracker.state_dict()})

    def restore(self, state: dict[str, Any]) -> None:
        """Load a :meth:`snapshot` (copied in, so the snapshot stays usable)."""
        for stage, sd in zip(self.stages, state["stages"]):
            stage.load_state_dict(sd)
        for optimizer, sd in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(copy.deepcopy(sd))
        self.tracker.load_state_dict(state["tracker"])


# ----------------------------------------------------------------------------- failures and recovery


@dataclass
class RecoveryLog:
    """What a recovery did: one line per rebuilt stage, the neighbour weights used by
    averaging rebuilds, and how many stages needed a fallback (refused by the planner)."""

    lines: list[str] = field(default_factory=list)
    weights: list[tuple[float, float]] = field(default_factory=list)
    norms: list[tuple[float, float]] = field(default_factory=list)  # the neighbours' post-clip norms
    fallbacks: int = 0


def destroy_stages(pipe: Pipeline, lost: Sequence[int], noise_seed: int) -> None:
    """The failure: the lost stages' weights are overwritten with N(0, 1) noise."""
    gen = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for stage in lost:
            for param in pipe.stages[stage].parameters():
                param.copy_(torch.randn(param.shape, generator=gen))


def nearest_intact_body_stage(stage: int, num_stages: int, lost: set[int]) -> int:
    """The body stage a ``copy`` takes: the previous one (the next for stage 1), else the
    nearest body stage that is not lost."""
    preferred = [stage - 1 if stage > 1 else 2]
    preferred += sorted(range(1, num_stages + 1), key=lambda s: (abs(s - stage), s))
    for candidate in preferred:
        if candidate != stage and 1 <= candidate <= num_stages and candidate not in lost:
            return candidate
    raise StageRebuildError(f"every body stage is lost; stage {stage} has nothing to be copied from")


def install_stage(pipe: Pipeline, stage: int, state: dict[str, Any]) -> None:
    """Load rebuilt weights into the live module and give it a fresh optimizer (lr x 1.1)."""
    pipe.stages[stage].load_state_dict(state)
    reset_optimizer(pipe.optimizers[stage], lr_scale=DEFAULT_LR_SCALE)


def recover(pipe: Pipeline, method: str, lost: Sequence[int], event_seed: int) -> RecoveryLog:
    """Rebuild every ``lost`` stage by ``method`` (not the rollbacks, which restore everything)."""
    log = RecoveryLog()
    if method == "reset_only":
        for stage in lost:
            reset_optimizer(pipe.optimizers[stage], lr_scale=DEFAULT_LR_SCALE)
            log.lines.append(f"stage {stage}: weights kept, optimizer reset (control)")
        return log
    if method in ("copy", "random"):
        still_lost = set(lost)
        for stage in sorted(lost):
            if method == "copy":
                source = nearest_intact_body_stage(stage, pipe.plan.num_stages, still_lost)
                state = {k: v.clone() for k, v in pipe.stages[source].state_dict().items()}
                log.lines.append(f"stage {stage}: copy of stage {source}")
            else:
                fresh = build_stage(pipe.plan.cfg, stage, derive_seed("bench.reinit", pipe.seed, event_seed, stage))
                state = fresh.state_dict()
                log.lines.append(f"stage {stage}: random re-initialisation")
            install_stage(pipe, stage, state)
            still_lost.discard(stage)
        return log
    if method not in ("checkfree", "checkfree_uniform", "checkfree_plus"):
        raise ConfigError(f"unknown recovery method {method!r}")
    plus = method == "checkfree_plus"
    try:
        rebuilds = list(plan_recovery(pipe.plan.num_stages, lost, checkfree_plus=plus).rebuilds)
    except StageRebuildError:
        rebuilds = []  # rebuilt one at a time below, with fallbacks
    if rebuilds:
        for rebuild in rebuilds:
            _execute(pipe, rebuild, method, log)
        return log
    still_lost = set(lost)
    for stage in sorted(lost):
        available = set(range(pipe.plan.num_stages + 1)) - still_lost
        try:
            rebuild = plan_recovery(pipe.plan.num_stages, [stage], checkfree_plus=plus,
                                    available=available).for_stage(stage)
            _execute(pipe, rebuild, method, log)
        except StageRebuildError:
            # An edge stage without CheckFree+, or two adjacent stages lost together: the
            # checkpoint-free fallback is a copy of the nearest intact body stage.
            source = nearest_intact_body_stage(stage, pipe.plan.num_stages, still_lost)
            install_stage(pipe, stage, {k: v.clone() for k, v in pipe.stages[source].state_dict().items()})
            log.lines.append(f"stage {stage}: refused by plan_recovery, fallback copy of stage {source}")
            log.fallbacks += 1
        still_lost.discard(stage)
    return log


def _execute(pipe: Pipeline, rebuild: Any, method: str, log: RecoveryLog) -> None:
    sources = {s: pipe.stages[s].state_dict() for s in rebuild.sources}
    if rebuild.method == "average":
        prev, nxt = rebuild.sources
        log.norms.append((pipe.tracker.norm(prev), pipe.tracker.norm(nxt)))
    if rebuild.method == "average" and method == "checkfree_uniform":
        prev, nxt = rebuild.sources
        state = rebuild_stage(sources[prev], sources[nxt], 1.0, 1.0)
        log.weights.append((0.5, 0.5))
        log.lines.append(f"stage {rebuild.stage}: plain average of stages {prev} and {nxt}")
    else:
        state = execute_rebuild(rebuild, sources, pipe.tracker)
        if rebuild.method == "average":
            prev, nxt = rebuild.sources
            log.weights.append(neighbour_weights(pipe.tracker.norm(prev), pipe.tracker.norm(nxt)))
        log.lines.append(rebuild.describe())
    install_stage(pipe, rebuild.stage, state)


# ----------------------------------------------------------------------------- jobs (worker processes)


def worker_init() -> None:
    """One torch thread per process: with 2 cores and 2 workers, more threads oversubscribe."""
    torch.set_num_threads(1)


def timed_step(pipe: Pipeline, step: int) -> tuple[float, float]:
    """(loss, seconds) of one training step, batch generation included."""
    start = time.perf_counter()
    loss = pipe.train_step(step)
    return loss, time.perf_counter() - start


def job_pretrain(plan: BenchPlan, seed: int, checkfree_plus: bool) -> dict[str, Any]:
    """Train steps 0 .. fail_step-1 without failure; keep the snapshots later jobs start from."""
    pipe = Pipeline(plan, seed, checkfree_plus)
    keep = {plan.churn_start, *(plan.fail_step - back for back in plan.rollbacks)}
    losses, step_s, snapshots, snapshot_s = [], [], {}, []
    for step in range(plan.fail_step):
        if step in keep:
            start = time.perf_counter()
            snapshots[step] = pipe.snapshot()
            snapshot_s.append(time.perf_counter() - start)
        loss, seconds = timed_step(pipe, step)
        losses.append(loss)
        step_s.append(seconds)
    snapshots[plan.fail_step] = pipe.snapshot()
    return {"losses": losses, "step_s": step_s, "snapshots": snapshots,
            "snapshot_s": statistics.median(snapshot_s) if snapshot_s else 0.0}


def job_single_failure(plan: BenchPlan, seed: int, method: str, lost: int,
                       state: dict[str, Any], snapshot_s: float) -> dict[str, Any]:
    """Run ``after_steps`` compute steps after a failure of stage ``lost`` recovered by ``method``
    (``state``: the snapshot at fail_step, or fail_step - K for ``rollback_K``)."""
    pipe = Pipeline(plan, seed, is_plus(method))
    start_step, recovery_s, destroyed_loss, log = plan.fail_step, 0.0, None, RecoveryLog()
    if method.startswith("rollback_"):
        back = int(method.split("_")[1])
        start = time.perf_counter()
        pipe.restore(state)
        recovery_s = time.perf_counter() - start
        start_step = plan.fail_step - back
    else:
        pipe.restore(state)
        if method not in ("none", "none_plus"):
            if method != "reset_only":
                destroy_stages(pipe, [lost], derive_seed("bench.noise", seed, lost))
                destroyed_loss = pipe.eval_loss(plan.fail_step)
            start = time.perf_counter()
            log = recover(pipe, method, [lost], plan.fail_step)
            recovery_s = time.perf_counter() - start
    losses, step_s, overhead_s, train_steps = [], [], [], []
    for j in range(plan.after_steps):
        step = start_step + j
        loss, seconds = timed_step(pipe, step)
        overhead = recovery_s if j == 0 else 0.0
        if method.startswith("rollback_") and (step + 1 - start_step) % int(method.split("_")[1]) == 0:
            overhead += snapshot_s  # the rollback's periodic in-memory checkpoint
        losses.append(loss)
        step_s.append(seconds)
        overhead_s.append(overhead)
        train_steps.append(step)
    return {"losses": losses, "step_s": step_s, "overhead_s": overhead_s, "train_steps": train_steps,
            "recovery_s": recovery_s, "destroyed_loss": destroyed_loss, "log": asdict(log)}


def job_churn(plan: BenchPlan, seed: int, method: str, state: dict[str, Any],
              schedule: dict[int, list[int]]) -> dict[str, Any]:
    """Compute steps churn_start .. steps-1; before step c the stages ``schedule[c]`` fail and
    are rebuilt by ``method``."""
    pipe = Pipeline(plan, seed, is_plus(method))
    pipe.restore(state)
    losses, step_s, overhead_s, events = [], [], [], []
    for step in range(plan.churn_start, plan.steps):
        extra_s = 0.0
        if step in schedule:
            lost = schedule[step]
            destroy_stages(pipe, lost, derive_seed("bench.noise", seed, step))
            start = time.perf_counter()
            log = recover(pipe, method, lost, step)
            extra_s = time.perf_counter() - start
            events.append({"step": step, "lost": lost, **asdict(log)})
        loss, seconds = timed_step(pipe, step)
        losses.append(loss)
        step_s.append(seconds)
        overhead_s.append(extra_s)
    return {"losses": losses, "step_s": step_s, "overhead_s": overhead_s, "events": events}


# ----------------------------------------------------------------------------- churn schedule


def churn_schedule(plan: BenchPlan, seed: int, rate: int) -> dict[int, list[int]]:
    """Compute step -> body stages that fail just before it; each body stage fails
    independently with ``plan.p_per_step(rate)`` at every step. The same schedule (it is a
    function of wall-clock time, counted in compute steps) applies to every method."""
    gen = torch.Generator().manual_seed(derive_seed("bench.churn", seed, rate))
    draws = torch.rand(plan.steps, plan.num_stages, generator=gen, dtype=torch.float64)
    schedule = {}
    for step in range(plan.churn_start, plan.steps):
        lost = [s + 1 for s in range(plan.num_stages) if draws[step, s] < plan.p_per_step(rate)]
        if lost:
            schedule[step] = lost
    return schedule


def replay_rollback(plan: BenchPlan, schedule: dict[int, list[int]], interval: int,
                    base_losses: Sequence[float], snapshot_s: float, restore_s: float) -> dict[str, Any]:
    """Rollback under churn, from the no-failure run: in-memory checkpoints every ``interval``
    steps of progress from churn_start; a failure sends every stage back to the last one.

    Training is deterministic (same batches, same weights, same optimizer state, one thread),
    so the steps it redoes are exactly the no-failure run's: the loss at progress p is
    ``base_losses[p]``; its overheads are the measured snapshot and restore times. The
    single-failure rollbacks, run for real, check this replay bitwise.
    """
    progress = last_checkpoint = plan.churn_start
    losses, overhead_s, redone = [], [], 0
    for step in range(plan.churn_start, plan.steps):
        extra_s = 0.0
        if step in schedule:
            redone += progress - last_checkpoint
            progress = last_checkpoint
            extra_s += restore_s
        losses.append(base_losses[progress])
        progress += 1
        if (progress - plan.churn_start) % interval == 0:
            last_checkpoint = progress
            extra_s += snapshot_s
        overhead_s.append(extra_s)
    return {"losses": losses, "overhead_s": overhead_s, "redone_steps": redone, "final_progress": progress}


# ----------------------------------------------------------------------------- metrics


def trailing_mean(values: Sequence[float], window: int = SMOOTH_STEPS) -> list[float]:
    """out[j] = mean of values[max(0, j-window+1) .. j]."""
    out, total = [], 0.0
    for j, value in enumerate(values):
        total += value
        if j >= window:
            total -= values[j - window]
        out.append(total / min(j + 1, window))
    return out


def cumulative(values: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for value in values:
        total += value
        out.append(total)
    return out


def steps_to_reach(losses: Sequence[float], step_s: Sequence[float], target: float) -> tuple[int | None, float | None]:
    """(compute steps, seconds) until the trailing mean of ``losses`` is <= ``target``; (None, None)
    when it never is within the run."""
    times = cumulative(step_s)
    for j, value in enumerate(trailing_mean(losses)):
        if value <= target:
            return j + 1, times[j]
    return None, None


def mean_gap(losses: Sequence[float], base: Sequence[float], first: int, last: int) -> float:
    """Mean of losses - base over steps first..last after the failure (1-based, inclusive)."""
    return statistics.fmean(losses[first - 1:last]) - statistics.fmean(base[first - 1:last])


def final_loss(losses: Sequence[float]) -> float:
    return statistics.fmean(losses[-FINAL_STEPS:])


def summary(values: Sequence[float | None]) -> dict[str, Any]:
    """mean / std / min / max over seeds of the values that exist, and how many did not."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "min": None, "max": None, "missing": len(values)}
    return {"mean": statistics.fmean(present), "std": statistics.pstdev(present) if len(present) > 1 else 0.0,
            "min": min(present), "max": max(present), "missing": len(values) - len(present)}


# ----------------------------------------------------------------------------- running everything


class Runner:
    """Schedules the jobs on a process pool: each seed's two pre-training runs first, then
    every run that starts from their snapshots."""

    def __init__(self, plan: BenchPlan, workers: int) -> None:
        self.plan = plan
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=worker_init)
        self.pretrain: dict[tuple[int, bool], dict[str, Any]] = {}
        self.single: dict[tuple[str, int, str], dict[str, Any]] = {}  # (scenario, seed, method)
        self.churn: dict[tuple[int, int, str], dict[str, Any]] = {}  # (rate, seed, method)
        self.schedules = {(rate, seed): churn_schedule(plan, seed, rate)
                          for rate in plan.churn_rates for seed in plan.seeds}
        self.started = time.perf_counter()
        self.pending: list[tuple[Future, Callable[[Any], None], str]] = []

    def submit(self, name: str, done: Callable[[Any], None], fn: Callable[..., Any], *args: Any) -> None:
        self.pending.append((self.pool.submit(fn, *args), done, name))

    def run(self) -> None:
        for seed in self.plan.seeds:
            for plus in (False, True):
                self.submit(f"pretrain seed {seed} {'plus' if plus else 'plain'}",
                            lambda r, s=seed, p=plus: self._pretrained(s, p, r), job_pretrain, self.plan, seed, plus)
        while self.pending:
            future, done, name = self.pending.pop(0)
            done(future.result())
            print(f"[{time.perf_counter() - self.started:7.1f} s] {name}", file=sys.stderr, flush=True)
        self.pool.shutdown()

    def _pretrained(self, seed: int, plus: bool, result: dict[str, Any]) -> None:
        plan = self.plan
        self.pretrain[(seed, plus)] = result
        snaps = result["snapshots"]
        churn_methods = CHURN_PLUS_METHODS if plus else CHURN_PLAIN_METHODS
        for rate in plan.churn_rates:  # the longest jobs first
            for method in churn_methods:
                self.submit(f"churn {rate}%/h seed {seed} {method}",
                            lambda r, k=(rate, seed, method): self.churn.__setitem__(k, r),
                            job_churn, plan, seed, method, snaps[plan.churn_start], self.schedules[(rate, seed)])
        jobs = ([("middle", m, MIDDLE_STAGE) for m in (PLUS_METHODS_MIDDLE if plus else PLAIN_METHODS_MIDDLE)]
                + [("first", m, FIRST_STAGE) for m in (PLUS_METHODS_FIRST if plus else PLAIN_METHODS_FIRST)])
        if not plus:
            jobs += [(scenario, f"rollback_{back}", stage) for scenario, stage in
                     (("middle", MIDDLE_STAGE), ("first", FIRST_STAGE)) for back in plan.rollbacks]
        for scenario, method, stage in jobs:
            start = plan.fail_step - int(method.split("_")[1]) if method.startswith("rollback_") else plan.fail_step
            self.submit(f"{scenario} seed {seed} {method}",
                        lambda r, k=(scenario, seed, method): self.single.__setitem__(k, r),
                        job_single_failure, plan, seed, method, stage, snaps[start], result["snapshot_s"])


# ----------------------------------------------------------------------------- analysis


@dataclass
class MethodResult:
    """One (scenario, method) over every seed: per-seed metrics and curves for the plots."""

    scenario: str
    method: str
    per_seed: dict[str, list[Any]]
    curves: list[list[float]]  # loss per compute step, one list per seed
    times: list[list[float]]  # cumulative seconds at each compute step, one list per seed
    extra: dict[str, Any] = field(default_factory=dict)

    def stat(self, key: str) -> dict[str, Any]:
        return summary(self.per_seed[key])


def no_failure_losses(runner: Runner, seed: int, plus: bool) -> list[float]:
    """The loss at every step 0 .. steps-1 of the no-failure run of that order."""
    pre = runner.pretrain[(seed, plus)]
    tail = runner.single[("middle", seed, "none_plus" if plus else "none")]
    return pre["losses"] + tail["losses"]


def common_step_s(runner: Runner) -> float:
    """The median measured training step over every job of the run.

    Every method computes the same FLOPs per step (the swapped order included), so the
    wall-clock of a run is modelled as compute steps x this one step time + the overheads
    each method measured (rebuild, restore, snapshot). Step times measured in different
    jobs differ only by what else the shared machine ran at the time (see measured_step_s).
    """
    times = [t for r in runner.pretrain.values() for t in r["step_s"]]
    times += [t for r in (*runner.single.values(), *runner.churn.values()) for t in r["step_s"]]
    return statistics.median(times)


def wall_s(step_s: float, overhead_s: Sequence[float]) -> list[float]:
    """Seconds of each compute step: the common step time plus that step's overheads."""
    return [step_s + o for o in overhead_s]


def analyse_single(runner: Runner, scenario: str) -> tuple[list[MethodResult], dict[str, Any]]:
    """Metrics of every method after the single failure of ``scenario``."""
    plan, step_s = runner.plan, common_step_s(runner)
    methods = ["none", "none_plus"] + [m for m in ("checkfree", "checkfree_uniform", "checkfree_plus", "copy", "random",
                                                   "reset_only") if (scenario, plan.seeds[0], m) in runner.single]
    methods += [f"rollback_{back}" for back in plan.rollbacks]
    checks: dict[str, Any] = {"rollback_replay_exact": True}
    context = min(plan.after_steps // 4, plan.fail_step)  # steps of no-failure run shown before the failure
    results = []
    for method in methods:
        per_seed: dict[str, list[Any]] = {k: [] for k in (
            "spike", "destroyed_spike", "steps_to_pre_failure", "seconds_to_pre_failure",
            "steps_to_no_failure_final", "seconds_to_no_failure_final", "final_loss",
            "final_vs_no_failure", "final_vs_plain_no_failure", "excess_loss_area", "recovery_s",
            "measured_step_s", "weights", "neighbour_norms")}
        for first, last in plan.windows:
            per_seed[f"gap_{first}_{last}"] = []
        curves, times = [], []
        for seed in plan.seeds:
            key = ("middle", seed, method) if method in ("none", "none_plus") else (scenario, seed, method)
            run = runner.single[key]
            full_base = no_failure_losses(runner, seed, is_plus(method))
            base = full_base[plan.fail_step:]
            plain_base = no_failure_losses(runner, seed, False)[plan.fail_step:]
            losses, seconds_per_step = run["losses"], wall_s(step_s, run["overhead_s"])
            if method.startswith("rollback_"):
                replayed = [full_base[s] for s in run["train_steps"]]
                checks["rollback_replay_exact"] &= replayed == losses
            pre_target = statistics.fmean(full_base[plan.fail_step - SMOOTH_STEPS:plan.fail_step])
            per_seed["spike"].append(losses[0] - base[0])
            per_seed["destroyed_spike"].append(None if run["destroyed_loss"] is None else run["destroyed_loss"] - base[0])
            for first, last in plan.windows:
                per_seed[f"gap_{first}_{last}"].append(mean_gap(losses, base, first, last))
            steps, seconds = steps_to_reach(losses, seconds_per_step, pre_target)
            per_seed["steps_to_pre_failure"].append(steps)
            per_seed["seconds_to_pre_failure"].append(seconds)
            steps, seconds = steps_to_reach(losses, seconds_per_step, final_loss(plain_base))
            per_seed["steps_to_no_failure_final"].append(steps)
            per_seed["seconds_to_no_failure_final"].append(seconds)
            per_seed["final_loss"].append(final_loss(losses))
            per_seed["final_vs_no_failure"].append(final_loss(losses) / final_loss(base))
            per_seed["final_vs_plain_no_failure"].append(final_loss(losses) / final_loss(plain_base))
            per_seed["excess_loss_area"].append(sum(a - b for a, b in zip(losses, base)))
            per_seed["recovery_s"].append(run["recovery_s"])
            per_seed["measured_step_s"].append(statistics.median(run["step_s"]))
            per_seed["weights"].append(run["log"]["weights"][0] if run["log"]["weights"] else None)
            per_seed["neighbour_norms"].append(run["log"]["norms"][0] if run["log"]["norms"] else None)
            curves.append(full_base[plan.fail_step - context:plan.fail_step] + losses)
            times.append([step_s * (j - context + 1) for j in range(context)]
                         + cumulative(seconds_per_step))
        results.append(MethodResult(scenario, method, per_seed, curves, times,
                                    {"context_steps": context, "step_s": step_s}))
    return results, checks


def analyse_churn(runner: Runner, rate: int) -> list[MethodResult]:
    """Metrics of every method under the churn schedule of ``rate`` % per hour."""
    plan, step_s = runner.plan, common_step_s(runner)
    methods = ["none", "none_plus", "checkfree", "checkfree_plus", "copy", "random"]
    methods += [f"rollback_{back}" for back in plan.rollbacks]
    results = []
    for method in methods:
        keys = ("failures", "stage_failures", "fallbacks", "mean_gap", "final_loss", "final_vs_no_failure",
                "final_vs_plain_no_failure", "steps_to_target", "seconds_to_target", "mean_spike", "redone_steps",
                "overhead_s", "total_s")
        per_seed: dict[str, list[Any]] = {k: [] for k in keys}
        curves, times = [], []
        for seed in plan.seeds:
            schedule = runner.schedules[(rate, seed)]
            base = no_failure_losses(runner, seed, is_plus(method))[plan.churn_start:]
            plain_full = no_failure_losses(runner, seed, False)
            plain = plain_full[plan.churn_start:]
            redone, fallbacks = 0, 0
            if method in ("none", "none_plus"):
                losses, overhead_s = base, [0.0] * len(base)
            elif method.startswith("rollback_"):
                restore_s = statistics.fmean(runner.single[(sc, seed, method)]["recovery_s"] for sc in ("middle", "first"))
                run = replay_rollback(plan, schedule, int(method.split("_")[1]), plain_full,
                                      runner.pretrain[(seed, False)]["snapshot_s"], restore_s)
                losses, overhead_s, redone = run["losses"], run["overhead_s"], run["redone_steps"]
            else:
                run = runner.churn[(rate, seed, method)]
                losses, overhead_s = run["losses"], run["overhead_s"]
                fallbacks = sum(e["fallbacks"] for e in run["events"])
            seconds_per_step = wall_s(step_s, overhead_s)
            # The target: where the no-failure run (plain order) is at 3/4 of the churn window.
            target = trailing_mean(plain)[(len(plain) * 3) // 4]
            steps, seconds = steps_to_reach(losses, seconds_per_step, target)
            failed = method not in ("none", "none_plus")
            spikes = [losses[s - plan.churn_start] - base[s - plan.churn_start] for s in schedule] if failed else []
            per_seed["failures"].append(len(schedule) if failed else 0)
            per_seed["stage_failures"].append(sum(len(v) for v in schedule.values()) if failed else 0)
            per_seed["fallbacks"].append(fallbacks)
            per_seed["mean_gap"].append(statistics.fmean(losses) - statistics.fmean(base))
            per_seed["final_loss"].append(final_loss(losses))
            per_seed["final_vs_no_failure"].append(final_loss(losses) / final_loss(base))
            per_seed["final_vs_plain_no_failure"].append(final_loss(losses) / final_loss(plain))
            per_seed["steps_to_target"].append(steps)
            per_seed["seconds_to_target"].append(seconds)
            per_seed["mean_spike"].append(statistics.fmean(spikes) if spikes else None)
            per_seed["redone_steps"].append(redone)
            per_seed["overhead_s"].append(sum(overhead_s))
            per_seed["total_s"].append(sum(seconds_per_step))
            curves.append(list(losses))
            times.append(cumulative(seconds_per_step))
        results.append(MethodResult(f"churn_{rate}", method, per_seed, curves, times,
                                    {"rate_pct_per_hour": rate, "p_per_step": plan.p_per_step(rate),
                                     "step_s": step_s, "schedules": {str(seed): {str(k): v for k, v in
                                     runner.schedules[(rate, seed)].items()} for seed in plan.seeds}}))
    return results


# ----------------------------------------------------------------------------- report


def fmt(stat: dict[str, Any], digits: int = 3, spread: bool = True) -> str:
    if stat["mean"] is None:
        return "never"
    text = f"{stat['mean']:.{digits}f}"
    if spread and stat["std"]:
        text += f"±{stat['std']:.{digits}f}"
    if stat["missing"]:
        text += f" ({stat['missing']} never)"
    return text


def seconds_text(stat: dict[str, Any]) -> str:
    """'12.3 s', '12.3 s (1 never)' or 'never'."""
    if stat["mean"] is None:
        return "never"
    return f"{stat['mean']:.1f} s" + (f" ({stat['missing']} never)" if stat["missing"] else "")


def print_single_table(plan: BenchPlan, scenario: str, results: list[MethodResult], refused: str | None) -> None:
    stage = MIDDLE_STAGE if scenario == "middle" else FIRST_STAGE
    print(f"\n== single failure of stage {stage} ({'middle' if scenario == 'middle' else 'first body'} stage) "
          f"before step {plan.fail_step}; {plan.after_steps} compute steps after it; mean±std over seeds "
          f"{list(plan.seeds)} ==")
    gaps = [f"gap +{a}..+{b}" for a, b in plan.windows]
    head = (f"{'method':30s} {'spike':>13s} " + " ".join(f"{g:>13s}" for g in gaps)
            + f" {'steps->pre':>11s} {'s->pre':>9s} {'final loss':>13s} {'vs no-fail':>10s} {'vs plain':>9s}")
    print(head)
    for r in results:
        cells = [fmt(r.stat("spike"))] + [fmt(r.stat(f"gap_{a}_{b}")) for a, b in plan.windows]
        print(f"{label(r.method):30s} {cells[0]:>13s} " + " ".join(f"{c:>13s}" for c in cells[1:])
              + f" {fmt(r.stat('steps_to_pre_failure'), 1, False):>11s}"
              f" {fmt(r.stat('seconds_to_pre_failure'), 2, False):>9s} {fmt(r.stat('final_loss')):>13s}"
              f" {fmt(r.stat('final_vs_no_failure'), 4, False):>10s} {fmt(r.stat('final_vs_plain_no_failure'), 4, False):>9s}")
    if refused:
        print(f"{label('checkfree'):30s} refused by plan_recovery: {refused.splitlines()[-1].lstrip('- ')}")
    destroyed = next(r for r in results if r.method == "copy").stat("destroyed_spike")
    print(f"loss with the destroyed stage left in place, minus no failure: {fmt(destroyed)}. "
          f"steps->pre: compute steps until the {SMOOTH_STEPS}-step trailing mean is back at the "
          f"no-failure loss of the {SMOOTH_STEPS} steps before the failure; final = mean of the last "
          f"{FINAL_STEPS} steps; 'vs no-fail' = ratio to the no-failure run of the same order, "
          "'vs plain' = to the plain-order one.")


def print_churn_table(plan: BenchPlan, rate: int, results: list[MethodResult]) -> None:
    p = plan.p_per_step(rate)
    accel = f" (accelerated x{plan.churn_scale:g})" if plan.churn_scale != 1 else ""
    print(f"\n== churn {rate} %/h per stage -> p = {p:.4g} per stage per step{accel}; compute steps "
          f"{plan.churn_start}..{plan.steps - 1}; mean±std over seeds {list(plan.seeds)} ==")
    print(f"{'method':30s} {'failures':>8s} {'mean spike':>12s} {'mean gap':>13s} {'final loss':>13s} "
          f"{'vs no-fail':>10s} {'vs plain':>9s} {'steps->tgt':>10s} {'s->tgt':>8s} {'redone':>7s} {'fallbk':>6s}")
    for r in results:
        print(f"{label(r.method):30s} {fmt(r.stat('stage_failures'), 1, False):>8s} {fmt(r.stat('mean_spike')):>12s}"
              f" {fmt(r.stat('mean_gap')):>13s} {fmt(r.stat('final_loss')):>13s}"
              f" {fmt(r.stat('final_vs_no_failure'), 4, False):>10s} {fmt(r.stat('final_vs_plain_no_failure'), 4, False):>9s}"
              f" {fmt(r.stat('steps_to_target'), 1, False):>10s} {fmt(r.stat('seconds_to_target'), 1, False):>8s}"
              f" {fmt(r.stat('redone_steps'), 1, False):>7s} {fmt(r.stat('fallbacks'), 1, False):>6s}")
    print(f"target = the plain no-failure run's {SMOOTH_STEPS}-step trailing mean at 3/4 of the window; "
          "failures = stage failures per seed; rollbacks replayed from the no-failure run (exact, see checks); "
          "plain CheckFree's edge stages (refused by plan_recovery) fall back to a copy of their neighbour.")


def by_method(results: list[MethodResult]) -> dict[str, MethodResult]:
    return {r.method: r for r in results}


def seeds_where(a: Sequence[float | None], b: Sequence[float | None], better: Callable[[float, float], bool]) -> int:
    """On how many seeds ``better(a[i], b[i])`` (seeds where either is missing do not count)."""
    return sum(1 for x, y in zip(a, b) if x is not None and y is not None and better(x, y))


def lower(x: float, y: float) -> bool:
    return x < y


def verdict(ok: bool) -> str:
    return "HOLDS" if ok else "DOES NOT HOLD"


def pre_failure_loss(results: dict[str, MethodResult]) -> float:
    """The no-failure loss over the SMOOTH_STEPS steps before the failure, mean over seeds."""
    base = results["none"]
    context = base.extra["context_steps"]
    return statistics.fmean(statistics.fmean(c[max(0, context - SMOOTH_STEPS):context]) for c in base.curves)


def claim_middle(plan: BenchPlan, mid: dict[str, MethodResult]) -> list[str]:
    """Claim 1: a middle-stage failure rebuilt by CheckFree costs a small spike and training
    returns to the no-failure loss; and how far the toy separates it from copy / random."""
    n, last = len(plan.seeds), plan.windows[-1]
    cf = mid["checkfree"]
    loss = pre_failure_loss(mid)
    spike = cf.stat("spike")
    gap = cf.stat(f"gap_{last[0]}_{last[1]}")
    small = spike["mean"] <= 0.1 * loss
    back = gap["mean"] <= 0.01 * loss
    others = ", ".join(f"{label(m)} {mid[m].stat('spike')['mean']:+.3f}" for m in
                       ("copy", "random", *(f"rollback_{b}" for b in plan.rollbacks)))
    lines = [f"1. middle stage ({MIDDLE_STAGE}) lost, CheckFree: spike {spike['mean']:+.3f} nats (seeds "
             f"{spike['min']:+.3f}..{spike['max']:+.3f}) = {spike['mean'] / loss:.1%} of the loss before the failure "
             f"({loss:.3f}); stage left destroyed {cf.stat('destroyed_spike')['mean']:+.3f}; {others}. "
             f"Small (<= 10 % of the loss): {verdict(small)}.",
             f"   gap to no failure over +{last[0]}..+{last[1]}: {gap['mean']:+.4f} (seeds {gap['min']:+.4f}.."
             f"{gap['max']:+.4f}) = {gap['mean'] / loss:+.2%} of the loss; final loss "
             f"{cf.stat('final_vs_no_failure')['mean']:.4f}x no failure's. Returns to the no-failure loss "
             f"(last-window gap <= 1 % of the loss): {verdict(back)}."]
    finals = {m: mid[m].per_seed["final_loss"] for m in ("checkfree", "copy", "random")}
    wins = {m: seeds_where(finals["checkfree"], finals[m], lower) for m in ("copy", "random")}
    spike_wins = {m: seeds_where(cf.per_seed["spike"], mid[m].per_seed["spike"], lower) for m in ("copy", "random")}
    spread = statistics.pstdev(mid["none"].per_seed["final_loss"]) if n > 1 else float("nan")
    reset = mid["reset_only"]
    lines.append(f"   control, weights intact and only the optimizer reset (lr x {DEFAULT_LR_SCALE}): spike "
                 f"{reset.stat('spike')['mean']:+.3f}, gap over +{last[0]}..+{last[1]} "
                 f"{reset.stat(f'gap_{last[0]}_{last[1]}')['mean']:+.4f}, final {reset.stat('final_vs_no_failure')['mean']:.4f}x "
                 "no failure's: the part of the gap that no rebuild rule can remove.")
    lines.append("   vs the checkpoint-free baselines, final loss: "
                 + ", ".join(f"{label(m)} {statistics.fmean(v):.4f}" for m, v in finals.items())
                 + f"; CheckFree lower than copy on {wins['copy']}/{n} seeds, than random re-init on "
                 f"{wins['random']}/{n} (spike lower: {spike_wins['copy']}/{n}, {spike_wins['random']}/{n}); "
                 f"seed-to-seed std of the no-failure final loss {spread:.4f}.")
    return lines


def claim_rollback(plan: BenchPlan, mid: dict[str, MethodResult], churn: dict[int, list[MethodResult]]) -> list[str]:
    """Claim 2: at equal compute CheckFree ends below a rollback to an old checkpoint."""
    n = len(plan.seeds)
    cases = [("middle-stage failure", mid, "checkfree")]
    cases += [(f"churn {rate} %/h", by_method(results), method)
              for rate, results in churn.items() for method in ("checkfree", "checkfree_plus")]
    lines, held, total, held_rel = [], 0, 0, 0
    for name, results, method in cases:
        mine = results[method].per_seed["final_loss"]
        mine_rel = results[method].per_seed["final_vs_no_failure"]
        parts = []
        for back in plan.rollbacks:
            rb = results[f"rollback_{back}"].per_seed["final_loss"]
            rb_rel = results[f"rollback_{back}"].per_seed["final_vs_no_failure"]
            wins = seeds_where(mine, rb, lower)
            wins_rel = seeds_where(mine_rel, rb_rel, lower)
            held += wins == n
            held_rel += wins_rel == n
            total += 1
            parts.append(f"rollback {back} {statistics.fmean(rb):.4f} = {statistics.fmean(rb_rel):.4f}x "
                         f"({wins}/{n} seeds lower, {wins_rel}/{n} relative)")
        lines.append(f"   {name}: {label(method)} {statistics.fmean(mine):.4f} = {statistics.fmean(mine_rel):.4f}x its "
                     "no-failure run vs " + ", ".join(parts))
    return [f"2. equal compute, final loss (mean of the last {FINAL_STEPS} steps): CheckFree below rollback on every "
            f"seed in {held} of {total} comparisons ({held_rel} of {total} relative to each method's own no-failure "
            f"run, which removes the effect of the swapped order itself): {verdict(held == total)}"
            + ("" if held == total else " everywhere") + "."] + lines


def claim_first_stage(plan: BenchPlan, mid: dict[str, MethodResult], first: dict[str, MethodResult]) -> list[str]:
    """Claim 3: CheckFree+ makes a first-stage failure far cheaper than without the swaps."""
    n = len(plan.seeds)
    plus, plain = first["checkfree_plus"], first["copy"]
    area_ratio = plus.stat("excess_loss_area")["mean"] / plain.stat("excess_loss_area")["mean"]
    spike_ratio = plus.stat("spike")["mean"] / plain.stat("spike")["mean"]
    wins = seeds_where(plus.per_seed["excess_loss_area"], plain.per_seed["excess_loss_area"], lower)
    far = area_ratio <= 0.5 and spike_ratio <= 0.5 and wins == n
    swap_cost = mid["none_plus"].stat("final_vs_plain_no_failure")["mean"]
    return [f"3. first body stage ({FIRST_STAGE}) lost: CheckFree+ (copy of stage 2 after swapped training) spike "
            f"{plus.stat('spike')['mean']:+.3f}, excess loss summed over the {plan.after_steps} steps "
            f"{plus.stat('excess_loss_area')['mean']:.2f}, back at the pre-failure loss after "
            f"{fmt(plus.stat('steps_to_pre_failure'), 1, False)} steps; the same copy without swaps: spike "
            f"{plain.stat('spike')['mean']:+.3f}, excess {plain.stat('excess_loss_area')['mean']:.2f}, "
            f"{fmt(plain.stat('steps_to_pre_failure'), 1, False)} steps (random re-init "
            f"{first['random'].stat('spike')['mean']:+.3f} / {first['random'].stat('excess_loss_area')['mean']:.2f}). "
            f"Ratios spike {spike_ratio:.2f}, excess {area_ratio:.2f}, CheckFree+ lower on {wins}/{n} seeds. "
            f"Far cheaper (both ratios <= 0.5, every seed): {verdict(far)}.",
            f"   price of the swapped order without failures: final loss {swap_cost:.4f}x the plain order's."]


def claim_weighting(plan: BenchPlan, mid: dict[str, MethodResult]) -> list[str]:
    """Claim 4 (the issue asks): does gradient weighting beat the plain average at this scale?"""
    n = len(plan.seeds)
    cf, uni = mid["checkfree"], mid["checkfree_uniform"]
    diff_final = [a - b for a, b in zip(cf.per_seed["final_loss"], uni.per_seed["final_loss"])]
    diff_spike = [a - b for a, b in zip(cf.per_seed["spike"], uni.per_seed["spike"])]
    same_sign = all(d < 0 for d in diff_final) or all(d > 0 for d in diff_final)
    spread = statistics.pstdev(diff_final) if n > 1 else float("inf")
    separated = n > 1 and same_sign and abs(statistics.fmean(diff_final)) > 2 * spread
    weights = ", ".join(f"({w[0]:.3f}, {w[1]:.3f})" for w in cf.per_seed["weights"] if w)
    norms = ", ".join(f"({a:.3f}, {b:.3f})" for a, b in (x for x in cf.per_seed["neighbour_norms"] if x))
    return [f"4. gradient-weighted vs plain average (middle stage): weights (prev, next) {weights} from post-clip "
            f"norms {norms} (clip at {MAX_GRAD_NORM}); spike difference {statistics.fmean(diff_spike):+.4f}, final-loss "
            f"difference {statistics.fmean(diff_final):+.4f} (per seed {', '.join(f'{d:+.4f}' for d in diff_final)}) "
            f"-> {'separated' if separated else 'NOT separated at this scale'} (separated = same sign on every seed "
            "and |mean| > 2 std)."]


def claim_wall_clock(plan: BenchPlan, churn: dict[int, list[MethodResult]]) -> list[str]:
    """Claim 5 (paper): under churn CheckFree reaches a given loss sooner in wall-clock time."""
    n = len(plan.seeds)
    lines = []
    for rate, results in churn.items():
        ch = by_method(results)
        parts = []
        for method in ("checkfree", "checkfree_plus"):
            mine = ch[method].stat("seconds_to_target")
            for back in plan.rollbacks:
                rb = ch[f"rollback_{back}"].stat("seconds_to_target")
                text = f"{label(method)} {seconds_text(mine)} vs rollback {back} {seconds_text(rb)}"
                if not mine["missing"] and not rb["missing"]:
                    text += f" ({1 - mine['mean'] / rb['mean']:+.0%})"
                parts.append(text)
        lines.append(f"   {rate} %/h: " + "; ".join(parts))
    return [f"5. churn, wall-clock to the target loss (paper: > 12 % sooner than checkpointing at 5-10 %/h; "
            f"'never' = not reached within the run by that many of {n} seeds):"] + lines


def claims(plan: BenchPlan, single: dict[str, list[MethodResult]], churn: dict[int, list[MethodResult]]) -> list[str]:
    """The paper's claims (as the issue states them) with the numbers and a verdict each."""
    mid, first = by_method(single["middle"]), by_method(single["first"])
    return (claim_middle(plan, mid) + claim_rollback(plan, mid, churn) + claim_first_stage(plan, mid, first)
            + claim_weighting(plan, mid) + claim_wall_clock(plan, churn))


def machine_info() -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "arch": platform.machine(), "cores": os.cpu_count(),
            "loadavg_start": round(os.getloadavg()[0], 2)}


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("ckpt", "numpy", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def json_record(plan: BenchPlan, r: MethodResult, machine: dict[str, Any], vers: dict[str, Any]) -> str:
    stats = {key: r.stat(key) for key, values in r.per_seed.items()
             if key != "weights" and all(v is None or isinstance(v, (int, float)) for v in values)}
    record = {"bench": "checkfree", "scenario": r.scenario, "method": r.method, "label": label(r.method),
              "baseline": baseline_of(r.method), "seeds": list(plan.seeds),
              "mean": {k: v["mean"] for k, v in stats.items()}, "per_seed": r.per_seed, **r.extra,
              "model": asdict(plan.cfg), "steps": plan.steps, "fail_step": plan.fail_step,
              "churn_start": plan.churn_start, "windows": plan.windows, "lr": LR,
              "microbatches": MICROBATCHES, "batch_size": plan.batch_size, "machine": machine, "versions": vers}
    return json.dumps(record)


def refused_first_stage(plan: BenchPlan) -> str:
    try:
        plan_recovery(plan.num_stages, [FIRST_STAGE], checkfree_plus=False)
    except StageRebuildError as err:
        return str(err)
    raise AssertionError("plain CheckFree unexpectedly rebuilt an edge stage")


# ----------------------------------------------------------------------------- plots


def mean_curve_over_time(times: list[list[float]], curves: list[list[float]], points: int = 300) -> tuple[list[float], list[float]]:
    """The mean over seeds of each seed's smoothed curve, on a common wall-clock grid."""
    import numpy as np

    start = max(t[0] for t in times)
    end = min(t[-1] for t in times)
    grid = np.linspace(start, end, points)
    values = [np.interp(grid, t, trailing_mean(c)) for t, c in zip(times, curves)]
    return grid.tolist(), np.mean(values, axis=0).tolist()


def mean_curve(curves: list[list[float]]) -> list[float]:
    smoothed = [trailing_mean(c) for c in curves]
    return [statistics.fmean(column) for column in zip(*smoothed)]


def plot_single(plan: BenchPlan, results: list[MethodResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    base = {r.method: mean_curve(r.curves) for r in results if r.method in ("none", "none_plus")}
    for r in results:
        context = r.extra["context_steps"]
        xs = list(range(-context + 1, len(r.curves[0]) - context + 1))
        ys = mean_curve(r.curves)
        style = {"linestyle": "--" if r.method.startswith("none") else "-", "linewidth": 1.2,
                 "color": colour(r.method, plan.rollbacks), "label": label(r.method)}
        axes[0].plot(xs, ys, **style)
        t, y = mean_curve_over_time(r.times, r.curves)
        axes[1].plot(t, y, **style)
        gap = [a - b for a, b in zip(ys, base[baseline_of(r.method)])]
        axes[2].plot(xs, gap, **style)
    axes[0].set_xlabel("compute steps since the failure (redone steps count)")
    axes[1].set_xlabel("wall-clock seconds since the failure (steps x median step + measured overheads)")
    axes[2].set_xlabel("compute steps since the failure")
    axes[0].set_ylabel(f"training loss (nats, {SMOOTH_STEPS}-step trailing mean, mean over seeds)")
    axes[2].set_ylabel("loss minus the no-failure run of the same order")
    axes[2].axhline(0.0, color="grey", linewidth=0.5)
    for ax in axes:
        ax.axvline(0.0, color="grey", linewidth=0.5)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_churn(plan: BenchPlan, churn: dict[int, list[MethodResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(churn), 2, figsize=(14, 4.5 * len(churn)), squeeze=False)
    for row, (rate, results) in enumerate(churn.items()):
        for r in results:
            style = {"linestyle": "--" if r.method.startswith("none") else "-", "linewidth": 1.2,
                     "color": colour(r.method, plan.rollbacks), "label": label(r.method)}
            xs = list(range(plan.churn_start, plan.churn_start + len(r.curves[0])))
            axes[row][0].plot(xs, mean_curve(r.curves), **style)
            t, y = mean_curve_over_time(r.times, r.curves)
            axes[row][1].plot(t, y, **style)
        p = plan.p_per_step(rate)
        for col, xlabel in enumerate(("compute steps (redone steps count)",
                                      "wall-clock seconds since churn start (steps x median step + overheads)")):
            axes[row][col].set_title(f"churn {rate} %/h per stage (p = {p:.4g} per stage per step)")
            axes[row][col].set_xlabel(xlabel)
            axes[row][col].set_ylabel("training loss (smoothed, mean over seeds)")
            axes[row][col].grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, e.g. 0,1,2; found {text!r}") from None


def print_plan(plan: BenchPlan, workers: int) -> None:
    cfg = plan.cfg
    params = [sum(p.numel() for p in build_stage(cfg, i, 0).parameters()) for i in (0, 1)]
    corpus = SyntheticCorpus(cfg, plan.seeds[0], copy_fraction=COPY_FRACTION)
    print(f"model: {asdict(cfg)}; stage 0 {params[0]} parameters, each body stage {params[1]}; "
          f"{MICROBATCHES} micro-batches x {plan.batch_size} sequences per step; AdamW lr {LR} constant, "
          f"weight decay {WEIGHT_DECAY}; clip {MAX_GRAD_NORM} per stage; rebuilt stages' optimizers reset "
          f"with lr x {DEFAULT_LR_SCALE}")
    print(f"data: sparse Markov chain (4 successors per token; next-token entropy "
          f"{corpus.markov_entropy_nats():.3f} nats for seed {plan.seeds[0]}) with every sequence's second "
          "half repeating its first half")
    print(f"run: {plan.steps} steps without failure; single failure before step {plan.fail_step}, "
          f"{plan.after_steps} compute steps after; rollbacks go back {list(plan.rollbacks)} steps; churn over "
          f"compute steps {plan.churn_start}..{plan.steps - 1} (rollback = in-memory checkpoints every "
          f"{list(plan.rollbacks)} steps); seeds {list(plan.seeds)}; {workers} worker processes, 1 torch thread each")
    scale = f" x {plan.churn_scale:g} (accelerated for --quick)" if plan.churn_scale != 1 else ""
    rates = ", ".join(f"{rate} %/h -> p = {CHURN_P_PER_STEP[rate]:.4g}{scale} (implied step time "
                      f"{implied_step_time_s(rate, CHURN_P_PER_STEP[rate]):.0f} s)" for rate in plan.churn_rates)
    print(f"churn: per body stage, per step: {rates}. These are the per-iteration probabilities of the "
          "reference code's 500M configuration (6 body stages); the paper does not state its iteration time, "
          "the implied one follows from p = 1 - (1 - h)^(t / 3600). Stage 0 never fails (as in the reference).")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    ap.add_argument("--steps", type=int, default=None, help="steps of a no-failure run (default 500; --quick: 50)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes (default: 2, one per core of the bench machine)")
    ap.add_argument("--plot-dir", type=Path, default=Path(__file__).resolve().parent,
                    help="where checkfree_{middle,first,churn}.png go (default: bench/)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: a 16-wide model, 50 steps, 1 seed, churn accelerated x10 (< 30 s)")
    args = ap.parse_args(argv)
    steps = args.steps if args.steps is not None else (50 if args.quick else 500)
    seeds = parse_seeds(args.seeds if args.seeds is not None else ("0" if args.quick else "0,1,2"))
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, found {args.workers}")
    plan = make_plan(steps, seeds, args.quick)
    torch.set_num_threads(1)
    started = time.perf_counter()
    machine, vers = machine_info(), versions()
    print(f"machine: {machine}\nversions: {vers}")
    print_plan(plan, args.workers)

    runner = Runner(plan, args.workers)
    runner.run()

    single, checks = {}, {}
    for scenario in ("middle", "first"):
        single[scenario], checks[scenario] = analyse_single(runner, scenario)
    churn = {rate: analyse_churn(runner, rate) for rate in plan.churn_rates}
    refused = refused_first_stage(plan)
    for scenario in ("middle", "first"):
        print_single_table(plan, scenario, single[scenario], refused if scenario == "first" else None)
    for rate in plan.churn_rates:
        print_churn_table(plan, rate, churn[rate])
    measured = [m for r in single["middle"] + single["first"] for m in r.per_seed["measured_step_s"]]
    print(f"\nwall-clock: every method computes the same FLOPs per step, so seconds = compute steps x "
          f"{common_step_s(runner) * 1e3:.1f} ms (the median training step over all jobs) + the overheads each "
          f"method measured (rebuild, restore, snapshot); per-job median steps ranged "
          f"{min(measured) * 1e3:.1f}..{max(measured) * 1e3:.1f} ms on this shared machine. Rebuilds took "
          + ", ".join(f"{label(r.method)} {statistics.fmean(r.per_seed['recovery_s']) * 1e3:.1f} ms"
                      for r in single["middle"] if r.method not in ("none", "none_plus"))
          + " (rollback = in-memory restore: the cheapest a checkpoint restore can be).")
    exact = all(c["rollback_replay_exact"] for c in checks.values())
    print(f"\nchecks: the real single-failure rollbacks redo bitwise the no-failure run's losses: {exact}"
          + ("" if exact else " (the churn rollbacks, replayed from it, are then approximate)"))
    print("\n== claims (paper, as stated in issue 4) ==")
    for line in claims(plan, single, churn):
        print(line)

    args.plot_dir.mkdir(parents=True, exist_ok=True)
    plot_single(plan, single["middle"], args.plot_dir / "checkfree_middle.png",
                f"single failure of stage {MIDDLE_STAGE} (middle) before step {plan.fail_step}")
    plot_single(plan, single["first"], args.plot_dir / "checkfree_first.png",
                f"single failure of stage {FIRST_STAGE} (first body stage) before step {plan.fail_step}")
    plot_churn(plan, churn, args.plot_dir / "checkfree_churn.png")
    print(f"\nplots: {', '.join(str(args.plot_dir / f'checkfree_{n}.png') for n in ('middle', 'first', 'churn'))}")
    print(f"wall time {time.perf_counter() - started:.1f} s; load average at the end {os.getloadavg()[0]:.2f}")
    print()
    for scenario in ("middle", "first"):
        for r in single[scenario]:
            print(json_record(plan, r, machine, vers))
        if scenario == "first":
            print(json.dumps({"bench": "checkfree", "scenario": "first", "method": "checkfree", "label": "CheckFree",
                              "refused": refused, "seeds": list(plan.seeds), "machine": machine, "versions": vers}))
    for rate in plan.churn_rates:
        for r in churn[rate]:
            print(json_record(plan, r, machine, vers))


if __name__ == "__main__":
    main()
