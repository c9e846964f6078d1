"""Look-ahead policy choice: the scheduler's snapshot, its policies switched between steps, candidates run
forward in the twin (sim/lookahead.py), in the simulator and in the engine."""

from __future__ import annotations

import numpy as np
import pytest

import controlplane as cp
from sim import _native
from sim.lookahead import Lookahead, LookaheadConfig, score
from sim.simulation import Simulation

COST = _native.StepCost.roofline(0.0, 0.0, [], [(0.005, 5e-5)], 0.0, 0.0, 0.0, 0.0, 1e-8)


def busy_scheduler(**config) -> tuple[cp.Scheduler, float]:
    """Eight requests of mixed lengths on a KV cache too small for all, a few steps in."""
    s = cp.Scheduler(num_blocks=96, chunk_size=128, max_num_batched_tokens=256, **config)
    rng = np.random.default_rng(0)
    for i in range(8):
        n = int(rng.integers(20, 400))
        s.add_request(
            i,
            [int(t) for t in rng.integers(0, 1000, n)],
            max_new_tokens=int(rng.integers(5, 60)),
            ignore_eos=True,
            arrival_time=0.001 * i,
            priority=i % 3,
            session_id=f"s{i % 3}",
        )
    now = 0.01
    for _ in range(6):
        plan = s.step(now)
        s.commit(plan, [7] * plan.num_sampled, now)
        now += 0.01
    return s, now


def run_keys(s, now: float, steps: int) -> list[tuple]:
    keys = []
    for _ in range(steps):
        plan = s.step(now)
        keys.append(
            (plan.req_ids.tolist(), plan.query_lens.tolist(), plan.cached_lens.tolist(), plan.preempted_ids.tolist())
        )
        s.commit(plan, [7] * plan.num_sampled, now)
        now += 0.01
    return keys


def test_a_snapshot_plans_exactly_as_the_scheduler_would_and_changes_nothing_in_it():
    s, now = busy_scheduler()
    before = s.stats().as_dict()
    snap = s.snapshot()
    snap.check_invariants()
    ahead = run_keys(snap, now, 60)  # the snapshot runs first: the original must not notice
    assert s.stats().as_dict() == before
    assert run_keys(s, now, 60) == ahead
    assert any(k[3] for k in ahead) and max(len(k[0]) for k in ahead) > 4  # a busy scene: a preemption, batches
    assert snap.stats().as_dict() == s.stats().as_dict()
    s.check_invariants()


def test_no_snapshot_while_a_plan_is_in_flight():
    s, now = busy_scheduler()
    s.step(now)
    with pytest.raises(ValueError, match="in flight"):
        s.snapshot()
    with pytest.raises(ValueError, match="has not been committed"):
        s.set_policy("ordering", "priority")


def test_set_policy_switches_between_steps_and_refuses_eviction():
    s, now = busy_scheduler()
    s.set_policy("ordering", "priority")
    with pytest.raises(ValueError, match="give the scheduler a step cost"):
        s.set_policy("admission", "tps_floor:tok_s=50")
    s.set_step_cost(COST)
    s.set_policy("admission", "tps_floor:tok_s=50")
    s.set_policy("preemption", "swap")
    assert s.policies == {
        "ordering": "priority",
        "eviction": "lru",
        "preemption": "swap",
        "admission": "tps_floor:tok_s=50",
    }
    assert s.admission == "tps_floor" and s.config.ordering == "priority" and s.config.admission.startswith("tps")
    with pytest.raises(ValueError, match="fixed for a scheduler's life"):
        s.set_policy("eviction", "ttl")
    with pytest.raises(ValueError, match="unknown policy"):
        s.set_policy("ordering", "nope")
    s.set_policy("admission", "all")
    s.check_invariants()
    # the switched ordering decides: priority 0 first among the waiting (ids 0, 3, 6 have priority 0)
    fresh = cp.Scheduler(num_blocks=8, max_num_seqs=1)
    for i, prio in enumerate([2, 1, 0]):
        fresh.add_request(i, [1, 2, 3], max_new_tokens=1, priority=prio, arrival_time=0.0)
    fresh.set_policy("ordering", "priority")
    assert fresh.step(0.0).req_ids.tolist() == [2]


def test_a_forward_run_counts_what_it_delivers():
    s = cp.Scheduler(num_blocks=256)
    s.add_request(0, list(range(100)), max_new_tokens=20, ignore_eos=True, arrival_time=0.0)
    s.add_request(1, list(range(50)), max_new_tokens=10, ignore_eos=True, arrival_time=0.0)
    snap = s.snapshot()
    r = _native.run_lookahead(snap, COST, 0.0, 10.0, 1.0)
    assert (r.tokens, r.first_tokens, r.finished, r.waiting) == (30, 2, 2, 0)
    assert r.floor_tokens == 28  # every later token within a second of its request's previous one
    assert r.ttft_sum > 0 and r.end > 0 and r.steps == 20
    assert s.stats().num_steps == 0 and s.has_unfinished()  # the original untouched
    long = cp.Scheduler(num_blocks=512)
    long.add_request(0, [t % 1000 for t in range(5000)], max_new_tokens=3, ignore_eos=True, arrival_time=0.0)
    short = _native.run_lookahead(long.snapshot(), COST, 0.0, 0.004, 1.0)  # one step: a 2,048-token chunk
    assert (short.steps, short.tokens, short.waiting) == (1, 0, 1)
    assert score("ttft", short, 0.004) == -short.waiting_age_sum < 0


def test_config_is_checked():
    ok = {"candidates": ["ordering=fcfs;admission=all", {"ordering": "priority", "admission": "tps_floor"}]}
    cfg = LookaheadConfig.from_dict(ok)
    assert (
        cfg.candidates[0] == {"ordering": "fcfs", "admission": "all"} and cfg.candidates[1]["admission"] == "tps_floor"
    )
    for bad, words in [
        ({"candidates": ["ordering=fcfs"]}, "at least two"),
        ({"candidates": ["ordering=fcfs", "admission=all"]}, "must all set the same kinds"),
        ({"candidates": ["eviction=lru", "eviction=ttl"]}, "is not one of"),
        ({"candidates": ["ordering=fcfs", "ordering=nope"]}, "unknown policy"),
        ({**ok, "objective": "speed"}, "objective must be one of"),
        ({**ok, "every_s": 0}, "every_s must be a number > 0"),
        ({**ok, "when": 1}, "unknown lookahead keys"),
        ({}, "needs `candidates`"),
        ({"candidates": ["fcfs", "priority"]}, "write kind=spec"),
    ]:
        with pytest.raises(ValueError, match=words):
            LookaheadConfig.from_dict(bad)


def _swe(lookahead=None, admission="all", sessions=6):
    sim = {"mode": "closed", "concurrency": 8, "num_sessions": sessions, "seed": 0, "progress": False}
    if lookahead:
        sim["lookahead"] = lookahead
    cfg = {
        "workload": {"name": "swe_smith", "params": {"turns_min": 2, "turns_max": 2}},
        "scheduler": {"admission": admission},
        "sim": sim,
        "wandb": {"mode": "disabled"},
    }
    return Simulation(cfg).run().summary


def test_the_twin_chooses_the_candidate_its_objective_prefers():
    """all vs tps_floor for tokens within the floor: the look-ahead takes tps_floor whenever it matters, and
    keeps the floor as tps_floor alone does (all alone breaks it)."""
    la = {"candidates": ["admission=all", "admission=tps_floor:tok_s=70"], "every_s": 0.5, "horizon_s": 2.0}
    chosen = _swe(la)
    plain, floor = _swe(), _swe(admission="tps_floor:tok_s=70")
    assert chosen["lookahead_decisions"] > 10 and chosen["lookahead_share_1"] > 0.5
    assert plain["floor_token_share"] < 0.5 <= floor["floor_token_share"]
    assert chosen["floor_token_share"] > 0.9
    assert chosen["lookahead_forward_ms"] > 0 and chosen["lookahead_snapshot_ms"] > 0
    assert chosen["cost_steps"] == chosen["num_steps"]  # the look-ahead's own steps are counted apart


def test_a_controller_applies_its_choice_between_steps_threaded_or_not():
    cfg = LookaheadConfig.from_dict(
        {"candidates": ["ordering=fcfs", "ordering=priority"], "every_s": 0.01, "horizon_s": 0.5, "objective": "ttft"}
    )
    for threaded in (False, True):
        s, now = busy_scheduler()
        la = Lookahead(cfg, COST.with_own_counts(), threaded=threaded)
        for _ in range(200):
            plan = s.step(now)
            s.commit(plan, [7] * plan.num_sampled, now)
            now += 0.005
            la.on_step(s, now)
            if not s.has_unfinished():
                break
        la.settle(s)
        la.close()
        assert la.decisions and s.policies["ordering"] == ["fcfs", "priority"][la.current]
        assert all(len(d.scores) == 2 and d.snapshot_s >= 0 for d in la.decisions)
        s.check_invariants()


def test_the_engine_runs_a_lookahead_on_its_own_thread(tmp_path):
    from engine import LLM, SamplingParams
    from experiments.adversary import write_tiny_model

    config, spec = write_tiny_model(tmp_path)
    llm = LLM(
        config,
        load_format="dummy",
        device="cpu",
        num_gpu_blocks=128,
        seed=1,
        chunk_size=64,
        step_cost={"model": spec, "hardware": "cpu"},
        lookahead={"candidates": ["ordering=fcfs", "ordering=priority"], "every_s": 0.005, "horizon_s": 0.2},
    )
    prompts = [{"prompt_token_ids": [3 + (i * 7 + k) % 500 for k in range(100 + 60 * i)]} for i in range(6)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [40] * 6
    la = llm.engine.lookahead
    assert la is not None and la.decisions and la.summary()["lookahead_decisions"] == len(la.decisions)
    llm.engine.close()
    with pytest.raises(ValueError, match="give step_cost too"):
        LLM(config, load_format="dummy", device="cpu", lookahead={"candidates": ["ordering=fcfs", "ordering=priority"]})


def test_the_simulate_app_takes_a_lookahead_and_the_floor_and_says_what_they_did(tmp_path):
    from helpers import run_simulate_app

    done = run_simulate_app(
        tmp_path,
        "policy=tps_floor",
        "workload=swe_smith",
        "sim=closed",
        "sim.num_sessions=8",
        "wandb.mode=disabled",
        "output.plots=false",
        'sim.lookahead={candidates:["ordering=fcfs","ordering=session_las"],every_s:2,horizon_s:4}',
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "tokens at the floor 100.0%" in log and "look-ahead: " in log and "admission: " in log
