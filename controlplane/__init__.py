"""Tandem's control plane: the one scheduler both execution planes drive.

The C++ core (`controlplane._core`, built at install time) owns request
lifecycles, the paged KV cache with its prefix index and policies, and batch
planning. This package re-exports it and adds the shared loop::

    plan = scheduler.step(now)
    tokens = executor.run(plan)
    finished = scheduler.commit(plan, tokens, now)
"""

from controlplane import policies
from controlplane._core import (
    FinishedRequest,
    InvariantError,
    Plan,
    RequestState,
    Stats,
    parse_policy_spec,
    policy_names,
    transition_allowed,
)
from controlplane.config import SchedulerConfig
from controlplane.loop import (
    Clock,
    Executor,
    ManualClock,
    StepRecord,
    StepResult,
    WallClock,
    loop_step,
    plan_step,
    run_loop,
)
from controlplane.policies import (
    EvictionPolicy,
    OrderingPolicy,
    PolicyError,
    PreemptionPolicy,
    RouterPolicy,
    import_policy_modules,
    register_policy,
)
from controlplane.scheduler import Scheduler

__all__ = [
    "Clock",
    "EvictionPolicy",
    "OrderingPolicy",
    "PolicyError",
    "PreemptionPolicy",
    "RouterPolicy",
    "import_policy_modules",
    "policies",
    "register_policy",
    "Executor",
    "FinishedRequest",
    "InvariantError",
    "ManualClock",
    "Plan",
    "RequestState",
    "Scheduler",
    "SchedulerConfig",
    "Stats",
    "StepRecord",
    "StepResult",
    "WallClock",
    "loop_step",
    "plan_step",
    "parse_policy_spec",
    "policy_names",
    "run_loop",
    "transition_allowed",
]
