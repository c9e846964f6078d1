"""The simulator's replica with the engine in place of the step-cost model: the twin's loop on a GPU.

    Simulation(cfg).run(env=simpy.rt.RealtimeEnvironment(strict=False),
                        replica_factory=engine_replicas(core, ...))

Everything but the executor is the simulator's: the workload's sessions and arrival process, the
router, the replica loop and its SimPy events, the metrics. A plan runs on the engine's model
runner (blocking, the GPU's real time passing), and the step then lasts, on the simulated clock,
exactly the wall time since it began, so the environment's clock stays the wall clock::

    start = env.now                    plan = scheduler.step(start)
    tokens = runner.run(plan)          seconds = wall() - start      (planning, the GPU, the host)
    yield env.timeout(seconds)         commit(plan, tokens, start + seconds)

A step's `seconds` is thus the loop's period: the host's work between two steps (the commit, the
sessions' next calls) is charged to the step after it, as a simulated step's cost must be. Fed
back as step costs (`ReplayCost`), the recorded seconds make a plain simulation reproduce every
plan and every time: the events are the same and happen in the same order.

This module imports both planes (engine/ and sim/): it belongs to experiments/, never to either.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import simpy
import simpy.rt

from controlplane.profile import plan_features
from sim.cluster import Replica


def plan_key(plan, start: float) -> tuple:
    """What identifies a plan's decisions: when, which requests, how many tokens, preemptions, KV copies."""
    return (
        start,
        tuple(plan.req_ids.tolist()),
        tuple(plan.query_lens.tolist()),
        tuple(plan.cached_lens.tolist()),
        tuple(plan.preempted_ids.tolist()),
        tuple(np.asarray(plan.kv_ops).reshape(-1).tolist()),
    )


@dataclass
class StepLog:
    """Every non-empty step a replica ran: its plan's features and key, start and seconds."""

    rows: list[dict] = field(default_factory=list)
    keys: list[tuple] = field(default_factory=list)

    def add(self, plan, start: float, seconds: float, **extra) -> None:
        self.rows.append({**plan_features(plan), "start": start, "seconds": seconds, **extra})
        self.keys.append(plan_key(plan, start))


class RecordingReplica(Replica):
    """A simulated replica that logs its plans (for the replay comparison and per-step errors)."""

    def __init__(self, *args, log: StepLog, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log = log

    def _execute(self, plan):
        seconds, tokens = super()._execute(plan)
        self.log.add(plan, self.env.now, seconds)
        return seconds, tokens


class ReplayCost:
    """A step-cost model replaying measured seconds in order, checking each plan's size on the way."""

    name = "replay"
    native = None

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows
        self.at = 0

    def step_seconds(self, plan) -> float:
        if self.at >= len(self.rows):
            raise RuntimeError(f"replay: the simulation ran more steps than the {len(self.rows)} recorded")
        row = self.rows[self.at]
        if (plan.num_tokens, plan.num_reqs) != (row["num_tokens"], row["num_reqs"]):
            raise RuntimeError(
                f"replay: step {self.at} plans {plan.num_reqs} requests / {plan.num_tokens} tokens; "
                f"the engine ran {row['num_reqs']} / {row['num_tokens']}"
            )
        self.at += 1
        return row["seconds"]

    def describe(self) -> str:
        return f"replay of {len(self.rows)} measured steps"


def wall_clock(env: simpy.rt.RealtimeEnvironment):
    """The wall time on a real-time environment's clock (its `now` is the time of the event in hand)."""

    def now() -> float:
        return (time.monotonic() - env.real_start) / env.factor + env.env_start

    return now


class EngineReplica(Replica):
    """A replica whose plans run on an `engine.core.EngineCore` (its scheduler, its runner), in real time.

    Args:
        env: a simpy.rt.RealtimeEnvironment (factor 1, strict=False).
        index: replica number.
        core: the engine, reset for this run (`EngineCore.reset`) with the simulation's scheduler config.
        metrics, idle_wait_s, seed: as `Replica`'s.
        sampling: the engine's sampling parameters for every request (max_tokens is each call's);
            no penalties (the runner is not given the prompts, to keep the host's work between steps small).
        log: receives each step's features, start, seconds and the runner's own measure of it.
    """

    def __init__(self, env, index: int, core, metrics, idle_wait_s: float, seed: int, sampling, log: StepLog) -> None:
        super().__init__(
            env,
            index,
            core.scheduler_config,
            None,
            metrics,
            idle_wait_s,
            seed,
            scheduler=core.scheduler,
        )
        if sampling.needs_penalties:
            raise ValueError("the engine replica runs without penalties (it keeps no prompt ids for them)")
        self.core, self.sampling, self.log = core, sampling, log
        self.wall = wall_clock(env)

    def submit(
        self,
        request_id: int,
        prompt: np.ndarray,
        max_new_tokens: int,
        session_id: str,
        after: int | None = None,
        new_tokens: np.ndarray | None = None,
    ) -> simpy.Event:
        from engine.sampling import SequenceState

        done = super().submit(request_id, prompt, max_new_tokens, session_id, after, new_tokens)
        params = dataclasses.replace(self.sampling, max_tokens=max_new_tokens)
        self.core.runner.add_sequence(request_id, SequenceState(params, [], [], None, (), max_new_tokens))
        return done

    def _execute(self, plan):
        start = self.env.now
        tokens, run_seconds = self.core.runner.run(plan)
        seconds = self.wall() - start
        self.log.add(plan, start, seconds, run_seconds=run_seconds)
        return seconds, np.asarray(tokens, dtype=np.int64)

    def _finish(self, finished) -> None:
        for f in finished:
            self.core.runner.remove_sequence(f.request_id)
        super()._finish(finished)


def engine_replicas(core, idle_wait_s: float, seed: int, sampling, log: StepLog):
    """A `Simulation.run` replica_factory of one EngineReplica on `core` (one engine, one replica)."""

    def factory(env, index, scheduler_config, collector):
        if index:
            raise ValueError("an engine run has one replica (cluster.num_replicas=1)")
        core.reset(scheduler_config)
        return EngineReplica(env, index, core, collector, idle_wait_s, seed, sampling, log)

    return factory


class CostClockEngineReplica(EngineReplica):
    """An EngineReplica on the simulated clock: each plan runs on the engine (its tokens are the engine's), and
    the step lasts what `cost_model` prices it at, so a plain simpy.Environment runs it and every decision
    can be compared with the twin's on the same scenario, plan for plan (tests/test_adversarial.py)."""

    def __init__(self, env, index: int, core, cost_model, metrics, idle_wait_s: float, seed: int, sampling, log):
        super().__init__(env, index, core, metrics, idle_wait_s, seed, sampling, log)
        self.step_cost = cost_model

    def _execute(self, plan):
        start = self.env.now
        tokens, run_seconds = self.core.runner.run(plan)
        seconds = self.step_cost.step_seconds(plan)
        self.log.add(plan, start, seconds, run_seconds=run_seconds)
        return seconds, np.asarray(tokens, dtype=np.int64)


def cost_clock_engine_replicas(core, cost_model, idle_wait_s: float, seed: int, sampling, log: StepLog):
    """A replica_factory of one CostClockEngineReplica on `core` (reset with the simulation's scheduler config)."""

    def factory(env, index, scheduler_config, collector):
        if index:
            raise ValueError("an engine run has one replica (cluster.num_replicas=1)")
        core.reset(scheduler_config)
        return CostClockEngineReplica(env, index, core, cost_model, collector, idle_wait_s, seed, sampling, log)

    return factory


def recording_replicas(cost_model, idle_wait_s: float, seed: int, log: StepLog):
    """A replica_factory of simulated replicas (step by step, `cost_model`'s seconds) logging their plans."""

    def factory(env, index, scheduler_config, collector):
        return RecordingReplica(env, index, scheduler_config, cost_model, collector, idle_wait_s, seed, log=log)

    return factory


def replay_replicas(rows: list[dict], idle_wait_s: float, seed: int, log: StepLog):
    """A replica_factory of simulated replicas stepping by the measured `rows`' seconds, logging their plans."""

    def factory(env, index, scheduler_config, collector):
        return RecordingReplica(env, index, scheduler_config, ReplayCost(rows), collector, idle_wait_s, seed, log=log)

    return factory


__all__ = [
    "CostClockEngineReplica",
    "EngineReplica",
    "RecordingReplica",
    "ReplayCost",
    "StepLog",
    "cost_clock_engine_replicas",
    "engine_replicas",
    "plan_key",
    "recording_replicas",
    "replay_replicas",
    "wall_clock",
]
