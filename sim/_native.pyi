"""Type stub of the simulator's native code (`csrc/sim/bindings.cpp`).

Step costs and the fast path that runs the replicas' steps in C++. They take and
return the control plane's own objects (`Scheduler`, `Plan`, `FinishedRequest` of
`controlplane._core`), passed between the two modules as they are.
"""

from typing import Sequence

import numpy as np
import numpy.typing as npt

from controlplane._core import FinishedRequest, Plan, Scheduler

class StepCost:
    """A step-cost formula (csrc/sim/step_cost.h): the one evaluator of sim/cost.py's models."""

    @staticmethod
    def roofline(
        overhead_s: float,
        swap_token_s: float,
        breaks: Sequence[float],
        pieces: Sequence[tuple[float, float]],
        head_flop_s: float,
        head_weight_s: float,
        head_act_s: float,
        attn_pair_s: float,
        attn_kv_s: float,
    ) -> StepCost: ...
    @staticmethod
    def profile(
        graph_terms: Sequence[tuple[str, float, float]],
        eager_terms: Sequence[tuple[str, float, float]],
        graph_limits: Sequence[tuple[str, float]],
        eager_limits: Sequence[tuple[str, float]],
        graph_observed: bool,
        eager_observed: bool,
        max_graph_batch: int,
    ) -> StepCost:
        """Terms are (basis, knot, coefficient) with a basis of sim/profile_cost.py PROFILE_BASIS; limits
        are the largest value of a basis profiled on the path (beyond: an extrapolated step)."""
    def seconds(
        self,
        num_tokens: float,
        num_reqs: float,
        num_sampled: float,
        attn_pairs: float,
        kv_read_tokens: float,
        num_swap_out_blocks: float,
        num_swap_in_blocks: float,
        block_size: float,
        num_decode_reqs: float = 0.0,
        decode_kv_tokens: float = 0.0,
        follows_decode: float = 0.0,
        continues_decode: float = 0.0,
        query_lens: Sequence[int] = (),
        cached_lens: Sequence[int] = (),
    ) -> float: ...
    def plan_seconds(self, plan: Plan) -> float: ...
    @property
    def num_steps(self) -> int:
        """Steps priced so far by this cost and every copy of it (the fast path holds a copy)."""
    @property
    def num_extrapolated(self) -> int:
        """Of those, steps beyond the profiled range (profile costs only)."""
    def reset_counts(self) -> None: ...
    def with_own_counts(self) -> StepCost:
        """A copy whose steps are counted apart."""

class LookaheadResult:
    steps: int
    tokens: int
    floor_tokens: int
    first_tokens: int
    ttft_sum: float
    waiting: int
    waiting_age_sum: float
    finished: int
    preemptions: int
    end: float

def run_lookahead(
    scheduler: Scheduler, cost: StepCost, now: float, horizon_s: float, floor_s: float, idle_s: float = 0.005
) -> LookaheadResult:
    """Steps `scheduler` (a snapshot: it is changed) from `now` for `horizon_s` on `cost`, no request arriving."""

class ClusterResult:
    """What one ClusterForward.advance did: the committed steps of all replicas, in commit order."""

    starts: npt.NDArray[np.float64]  # one entry per committed step (copies)
    seconds: npt.NDArray[np.float64]
    num_tokens: npt.NDArray[np.int32]
    num_reqs: npt.NDArray[np.int32]
    samples: list[tuple[float, int, int, int, int]]  # (step start, replica, used, cached, free blocks)
    num_steps: int
    stopped: int  # replica whose last commit needs Python at stop_time, or -1
    idle: bool  # it has nothing runnable (no unfinished request, or an empty plan)
    finished: list[FinishedRequest]  # finished by that commit
    stop_time: float
    stop_eid: int
    next_eid: int

class ClusterForward:
    """The simulator's fast path for several replicas (csrc/sim/cluster_forward.h): their steps merged in order."""

    def __init__(
        self,
        cost: StepCost,
        schedulers: Sequence[Scheduler],
        token_pools: list[npt.NDArray[np.integer]],
        sample_at: Sequence[float],
        sample_interval: float,
    ) -> None: ...
    def start(self, replica: int, now: float, eid: int) -> bool: ...
    def advance(self, h_time: float, h_priority: int, h_eid: int, next_eid: int) -> ClusterResult: ...
    def next(self) -> tuple[float, int]: ...
