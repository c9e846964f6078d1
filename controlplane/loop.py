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


def run_loop(
    scheduler: _core.Scheduler,
    executor: Executor,
    clock: Clock,
    *,
    max_steps: int = 1_000_000,
    idle_advance: float = 0.0,
    on_step: Callable[[StepRecord, _core.Plan], None] | None = None,
) -> list[StepRecord]:
    """Runs `plan = step(now); tokens = run(plan); commit(plan, tokens, now)` until nothing is left.

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
        start = clock.now()
        plan = scheduler.step(start)
        if plan.is_empty:
            scheduler.commit(plan, np.empty(0, dtype=np.int64), start)
            if idle_advance <= 0:
                raise RuntimeError("scheduler made an empty plan with requests left and idle_advance=0")
            clock.advance(idle_advance)
            continue
        tokens, cost = executor.run(plan)
        clock.advance(cost)
        end = clock.now()
        finished = scheduler.commit(plan, tokens, end)
        record = StepRecord(plan.step_id, start, end, plan.num_reqs, plan.num_tokens, list(finished))
        records.append(record)
        if on_step is not None:
            on_step(record, plan)
    raise RuntimeError(f"loop did not finish within {max_steps} steps")


def batch_block_table(plan: _core.Plan) -> np.ndarray:
    """A copy of this plan's block-table rows, [num_reqs, widest row in the batch]."""
    if plan.num_reqs == 0:
        return np.empty((0, 0), dtype=np.int32)
    longest = int((np.asarray(plan.cached_lens) + np.asarray(plan.query_lens)).max())
    width = -(-longest // plan.block_size)
    return plan.block_table[plan.slots, :width].copy()


__all__: Sequence[str] = ["Clock", "Executor", "ManualClock", "StepRecord", "run_loop", "batch_block_table"]
