"""Parity: one trace through the engine (CPU, a real model) and through the simulator gives the same plans.

The engine runs on a manual clock advanced by each step's measured seconds;
the simulator's replica then prices its steps with exactly those seconds. The
scheduler is the same C++ code on both sides, so every plan (which requests,
how many query tokens, how many cached) and every step time must coincide,
prefix-cache hits and preemptions included.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import controlplane as cp

from engine_helpers import tiny_config

# (arrival s, prompt prefix id or -1, prompt tokens, max new tokens)
TRACE = [
    (0.0, 0, 90, 12),
    (0.0, -1, 30, 20),
    (0.05, 0, 110, 8),
    (0.4, 1, 60, 16),
    (0.4, 0, 95, 10),
    (0.9, -1, 200, 6),
    (1.5, 1, 75, 18),
    (1.5, -1, 12, 30),
    (2.2, 0, 130, 9),
]


def trace_prompts(vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    prefixes = {0: rng.integers(0, vocab, 64), 1: rng.integers(0, vocab, 40)}
    prompts = []
    for _, prefix, n, _ in TRACE:
        own = rng.integers(0, vocab, n)
        prompts.append(np.concatenate([prefixes[prefix], own]) if prefix >= 0 else own)
    return [p.astype(np.int32) for p in prompts]


class ReplayCost:
    """A step-cost model that replays measured step seconds in order (checking the plan is the same size)."""

    def __init__(self, steps: list[dict]) -> None:
        self.steps = list(steps)
        self.at = 0

    def step_seconds(self, plan) -> float:
        row = self.steps[self.at]
        self.at += 1
        assert (plan.num_tokens, plan.num_reqs) == (row["num_tokens"], row["num_reqs"]), (self.at, row)
        return row["seconds"]


def plan_key(plan, start: float):
    return (
        start,
        tuple(plan.req_ids.tolist()),
        tuple(plan.query_lens.tolist()),
        tuple(plan.cached_lens.tolist()),
        tuple(plan.preempted_ids.tolist()),
        tuple(plan.kv_ops.tolist()),
    )


def run_engine(tmp_path, scheduler_options):
    from engine import SamplingParams
    from engine.config import EngineConfig
    from engine.core import EngineCore

    config = tiny_config("Qwen3ForCausalLM", vocab_size=1024)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_hf()))
    clock = cp.ManualClock()
    core = EngineCore(
        EngineConfig.from_dict(dict(model=str(path), load_format="dummy", device="cpu", **scheduler_options)),
        clock=clock,
    )
    plans = []
    step = core.runner.run

    def recording_run(plan):
        plans.append(plan_key(plan, clock.now()))
        return step(plan)

    core.runner.run = recording_run
    prompts = trace_prompts(config.vocab_size)
    pending = list(range(len(TRACE)))
    while pending or core.has_unfinished():
        while pending and TRACE[pending[0]][0] <= clock.now():
            i = pending.pop(0)
            core.add_request(
                i,
                prompts[i],
                SamplingParams(temperature=1.0, seed=i, max_tokens=TRACE[i][3], ignore_eos=True),
                arrival_time=TRACE[i][0],
                session_id=f"s{i}",
            )
        if not core.has_unfinished():
            clock.advance(TRACE[pending[0]][0] - clock.now())
            continue
        # Blocked (e.g. on pinned KV), the engine re-plans after 1 ms or at the next arrival,
        # whichever is first, as a simulated replica does (sim/cluster.py, Replica._idle).
        arrival = TRACE[pending[0]][0] if pending else float("inf")
        before = clock.now()
        idle = 1e-3 if before + 1e-3 <= arrival else arrival - before
        ran = len(plans)
        core.step(idle_advance=idle)
        if len(plans) == ran and idle < 1e-3:  # an empty plan: the clock moved by `idle`
            clock._now = arrival  # exactly, as SimPy's arrival timeout fires
    run_engine.last_core = core
    return plans, core.profile, core.scheduler_config


def run_simulator(scheduler_config, profile):
    import simpy

    from sim.cluster import Replica

    env = simpy.Environment()
    plans = []

    class Recorder(Replica):  # the reference loop, recording each plan at its start time
        def _execute(self, plan):
            plans.append(plan_key(plan, env.now))
            return super()._execute(plan)

    class NoMetrics:
        sample_interval_s = float("inf")

        def on_steps(self, run):
            pass

    replica = Recorder(env, 0, scheduler_config, ReplayCost(profile), NoMetrics(), 1e-3, 0)
    prompts = trace_prompts(scheduler_config.vocab_size)

    def arrive(i):
        yield env.timeout(TRACE[i][0])
        yield replica.submit(i, prompts[i], TRACE[i][3], f"s{i}")

    for i in range(len(TRACE)):
        env.process(arrive(i))
    env.run()
    return plans


@pytest.mark.parametrize(
    "options",
    [
        dict(num_gpu_blocks=64, chunk_size=48, max_num_batched_tokens=64),
        dict(num_gpu_blocks=24, chunk_size=64, max_num_batched_tokens=96, preemption="recompute"),
        dict(
            num_gpu_blocks=20,
            chunk_size=32,
            max_num_batched_tokens=64,
            preemption="swap",
            swap_space_gb=0.01,
            ordering="longest_prefix_match",
        ),
        # Python-defined policies, selected by name through the same config keys (tests/parity_policies.py,
        # controlplane.examples), and the agent-aware ones (C++ and Python)
        dict(
            num_gpu_blocks=16,
            chunk_size=32,
            max_num_batched_tokens=64,
            preemption="swap_long:min_blocks=2",
            swap_space_gb=0.01,
            ordering="newest_first",
            eviction="hit_weighted_lru",
            policy_modules=("parity_policies", "controlplane.examples"),
        ),
        dict(
            num_gpu_blocks=48,
            chunk_size=48,
            max_num_batched_tokens=64,
            ordering="cache_credit:tokens_per_s=500",
            eviction="pause_aware:reload_s_per_token=1",
        ),
        dict(num_gpu_blocks=28, chunk_size=48, max_num_batched_tokens=64, ordering="session_las:quantum=32"),
        # overlapped decode (engine/overlap.py): the scheduler holds a block ahead (num_lookahead_tokens=1),
        # which the simulator's replica runs with too; the plans stay the strict loop's
        dict(num_gpu_blocks=64, chunk_size=48, max_num_batched_tokens=64, overlap_decode=True),
        dict(
            num_gpu_blocks=20,
            chunk_size=32,
            max_num_batched_tokens=64,
            preemption="swap",
            swap_space_gb=0.01,
            overlap_decode=True,
        ),
    ],
    ids=[
        "prefix-cache",
        "preempt-recompute",
        "preempt-swap-lpm",
        "python-policies",
        "cache-credit-pause-aware",
        "session-las",
        "overlap-prefix-cache",
        "overlap-preempt-swap",
    ],
)
def test_engine_and_simulator_make_identical_plans(tmp_path, options):
    engine_plans, profile, sched_cfg = run_engine(tmp_path, options)
    sim_plans = run_simulator(sched_cfg, profile)
    assert len(engine_plans) == len(sim_plans) > 10
    assert sim_plans == engine_plans
    assert any(any(c > 0 for c in key[3]) for key in engine_plans)  # prefix hits happened
    if options.get("policy_modules"):
        assert any(key[4] for key in engine_plans)  # the Python preemption policy decided something
    if options.get("overlap_decode"):
        runner = run_engine.last_core.runner
        assert sched_cfg.num_lookahead_tokens == 1 and runner.num_guesses_used > 20, runner.num_guesses_used
