"""The loop both execution planes run, and the interfaces it takes.

    +--------+   plan = step(now)   +----------+  tokens = run(plan)  +----------+
    | Clock  | -------------------> | Scheduler| -------------------> | Executor |
    +--------+ <-- advance(cost) -- +----------+ <-- commit(plan, ..) +----------+

The GPU engine passes a wall clock and a model runner; the simulator passes a
SimPy clock and a step-cost model. Neither plane re-implements a decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from controlplane import _core


class Executor(Protocol):
    """Runs one plan; returns one sampled token per sampling request and the step's cost in seconds."""

    def run(self, plan: _core.Plan) -> tuple[np.ndarray, float]: ...


class Clock(Protocol):
    """Time as the loop sees it: `now()` in seconds, `advance(seconds)` after a step."""

    def now(self) -> float: ...

    def advance(self, seconds: float) -> None: ...


class ManualClock:
    """A clock that only moves when told to: deterministic runs and tests."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot advance a clock by {seconds} s")
        self._now += seconds


@dataclass
class StepRecord:
    """What one iteration of the loop did."""

    step_id: int
    start: float
    end: float
    num_reqs: int
    num_tokens: int
    finished: list = field(default_factory=list)


class WallClock:
    """Real time since construction (the engine's clock); `advance` is a no-op since time passes by itself."""

    def __init__(self) -> None:
        import time

        self._perf = time.perf_counter
        self._t0 = self._perf()

    def now(self) -> float:
        return self._perf() - self._t0

    def advance(self, seconds: float) -> None:
        pass


@dataclass
class StepResult:
    """One iteration's plan, the tokens its executor produced, and what it finished."""

    record: StepRecord | None  # None for an empty plan
    plan: _core.Plan
    tokens: np.ndarray
    seconds: float


def plan_step(scheduler: _core.Scheduler, now: float) -> _core.Plan:
    """`plan = step(now)`, an empty plan (nothing runnable now) committed at once: the top of the loop
    both planes run (`loop_step`; the simulator's replica, sim/cluster.py)."""
    plan = scheduler.step(now)
    if plan.is_empty:
        scheduler.commit(plan, _NO_TOKENS, now)
    return plan


def loop_step(scheduler: _core.Scheduler, executor: Executor, clock: Clock, *, idle_advance: float = 0.0) -> StepResult:
    """One `plan = step(now); tokens, cost = run(plan); commit(plan, tokens, now)` iteration.

    An empty plan is committed at once and the clock moves by `idle_advance`
    (0 raises: nothing would ever change). Both the engine core and `run_loop` call this.
    """
    start = clock.now()
    plan = plan_step(scheduler, start)
    if plan.is_empty:
        if idle_advance <= 0:
            raise RuntimeError("scheduler made an empty plan with requests left and idle_advance=0")
        clock.advance(idle_advance)
        return StepResult(None, plan, _NO_TOKENS, 0.0)
    tokens, cost = executor.run(plan)
    clock.advance(cost)
    end = clock.now()
    finished = scheduler.commit(plan, tokens, end)
    record = StepRecord(plan.step_id, start, end, plan.num_reqs, plan.num_tokens, list(finished))
    return StepResult(record, plan, tokens, cost)


_NO_TOKENS = np.empty(0, dtype=np.int64)


def run_loop(
    scheduler: _core.Scheduler,
    executor: Executor,
    clock: Clock,
    *,
    max_steps: int = 1_000_000,
    idle_advance: float = 0.0,
    on_step: Callable[[StepRecord, _core.Plan], None] | None = None,
) -> list[StepRecord]:
    """Runs `loop_step` until nothing is left.

    Args:
        scheduler: the control plane.
        executor: runs plans; its reported cost advances the clock.
        clock: supplies `now`.
        max_steps: a bound; exceeding it raises RuntimeError (a livelock).
        idle_advance: seconds to advance when a plan is empty but requests
            remain (e.g. waiting for a retention pin to expire); 0 raises instead.
        on_step: called after every commit.

    Returns:
        One record per step.
    """
    records: list[StepRecord] = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return records
        result = loop_step(scheduler, executor, clock, idle_advance=idle_advance)
        if result.record is None:
            continue
        records.append(result.record)
        if on_step is not None:
            on_step(result.record, result.plan)
    raise RuntimeError(f"loop did not finish within {max_steps} steps")


def batch_block_table(plan: _core.Plan) -> np.ndarray:
    """A copy of this plan's block-table rows, [num_reqs, widest row in the batch]."""
    if plan.num_reqs == 0:
        return np.empty((0, 0), dtype=np.int32)
    longest = int((np.asarray(plan.cached_lens) + np.asarray(plan.query_lens)).max())
    width = -(-longest // plan.block_size)
    return plan.block_table[plan.slots, :width].copy()


__all__: Sequence[str] = [
    "Clock",
    "Executor",
    "ManualClock",
    "StepRecord",
    "StepResult",
    "WallClock",
    "loop_step",
    "plan_step",
    "run_loop",
    "batch_block_table",
]
