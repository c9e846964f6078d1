"""Small drivers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

import controlplane as cp
from controlplane.testing import ToyModel


def make(**overrides) -> tuple[cp.Scheduler, ToyModel]:
    """A scheduler with small defaults and a toy model of the same cache shape."""
    base = dict(
        num_blocks=32,
        block_size=4,
        vocab_size=97,
        max_model_len=128,
        max_num_batched_tokens=64,
        chunk_size=64,
        max_num_seqs=8,
    )
    base.update(overrides)
    sched = cp.Scheduler(**base)
    return sched, ToyModel.for_scheduler(sched.config)


def step(sched, model, now: float, check: bool = True, inspect=None):
    """One step and commit at the same `now`; returns (plan, finished by id).

    `inspect(plan)` runs before the commit, while the plan's block table is valid.
    """
    plan = sched.step(now)
    if inspect is not None:
        inspect(plan)
    tokens, _ = model.run(plan) if not plan.is_empty else (np.empty(0, np.int64), 0.0)
    if check:
        sched.check_invariants()
    finished = sched.commit(plan, tokens, now)
    if check:
        sched.check_invariants()
    return plan, {f.request_id: f for f in finished}


def drain(sched, model, now: float = 0.0, dt: float = 1.0, max_steps: int = 10_000, idle_dt: float = 1e4):
    """Steps until nothing is left; returns finished requests by id and the final time."""
    done = {}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return done, now
        plan, fin = step(sched, model, now)
        done.update(fin)
        now += dt if not plan.is_empty else idle_dt
    raise AssertionError("requests left after max_steps: livelock")


def run_simulate_app(tmp_path, *args) -> subprocess.CompletedProcess:
    """`python -m experiments.simulate ARGS` in tmp_path, wandb silent and Hydra's errors short; not checked."""
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.simulate", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
