"""The simulator's fast path (csrc/sim/cluster_forward.h) against the reference loop: identical runs.

Every figure a run produces (each step's start, cost, tokens and requests, every KV sample,
every request's lifecycle times, every session, the ITL histogram, the summary) must be equal,
not close: the fast path runs the same scheduler calls at the same simulated times.
"""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest

import controlplane as cp
from sim import _native
from sim.cost import PlanFeatures, ProfileCost, RooflineCost
from sim.profile_cost import KNOTS, PROFILE_BASIS, ProfilePath
from sim.simulation import Simulation
from sim.specs import load_hardware_spec, load_model_spec

WALL_CLOCK = ("wall_seconds", "steps_per_wall_s", "requests_per_wall_min")


def run(cfg: dict, fast_forward: bool):
    cfg = copy.deepcopy(cfg)
    cfg.setdefault("sim", {})["fast_forward"] = fast_forward
    result = Simulation(cfg).run()
    c = result.collector
    summary = {k: v for k, v in result.summary.items() if k not in WALL_CLOCK}
    log = {
        "step_start": c.step_start,
        "step_seconds": c.step_seconds,
        "step_tokens": c.step_tokens,
        "step_reqs": c.step_reqs,
        "kv_samples": c.kv_samples,
        "requests": c.requests,
        "sessions": c.sessions,
        "itl_counts": c.itl_counts.tolist(),
        "itl_sum": c.itl_sum,
    }
    return log, summary


def same(a, b) -> bool:
    """Equal, NaN equal to NaN (a summary's undefined percentiles)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def scenario(workload="agentic_coding", sessions=12, **sections):
    sim = {"num_sessions": sessions, "progress": False, **sections.pop("sim", {})}
    return {"workload": {"name": workload, "params": {}}, "sim": sim, "wandb": {"mode": "disabled"}, **sections}


SCENARIOS = {
    "agentic_coding": (scenario(), None),
    "agentic_coding_busy": (scenario(sim={"session_rate": 0.5}), None),
    "chat": (scenario("chat", sessions=120), None),
    "swe_smith_recompute": (scenario("swe_smith", sessions=16), "num_preemptions_recompute"),
    "swe_smith_swap_ttl": (
        scenario(
            "swe_smith",
            sessions=16,
            sim={"session_rate": 0.5},
            scheduler={"eviction": "ttl:ttl=30", "preemption": "swap"},
            engine={"host_kv_gb": 20.0},
        ),
        "num_preemptions_swap",
    ),
    # chunked prefill by what else runs (scheduler.idle_chunk_size): lone prompts in 16K chunks, swapped decodes
    "agentic_coding_idle_chunks": (scenario(scheduler={"idle_chunk_size": 16384}), None),
    "swe_smith_swap_idle_chunks": (
        scenario(
            "swe_smith",
            sessions=16,
            sim={"session_rate": 0.5},
            scheduler={"eviction": "ttl:ttl=30", "preemption": "swap", "idle_chunk_size": 8192},
            engine={"host_kv_gb": 20.0},
        ),
        "num_preemptions_swap",
    ),
    "ttl_lpm_closed": (
        scenario(
            sim={"mode": "closed", "concurrency": 12},
            scheduler={"ordering": "longest_prefix_match", "eviction": "ttl:ttl=5"},
        ),
        None,
    ),
    "prefix_aware_3_replicas": (scenario(cluster={"num_replicas": 3, "router": "prefix_aware"}), None),
    # several replicas: csrc/sim/cluster_forward.h merges their steps (sim/cluster_fast.py)
    "round_robin_4_replicas_busy": (
        scenario(sessions=24, sim={"session_rate": 0.8}, cluster={"num_replicas": 4, "router": "round_robin"}),
        None,
    ),
    "least_loaded_2_replicas_closed": (
        scenario(sim={"mode": "closed", "concurrency": 10}, cluster={"num_replicas": 2, "router": "least_loaded"}),
        None,
    ),
    "session_affinity_3_replicas_chat": (
        scenario(
            "chat", sessions=150, sim={"session_rate": 4.0}, cluster={"num_replicas": 3, "router": "session_affinity"}
        ),
        None,
    ),
    "prefix_aware_2_replicas_swap_ttl": (
        scenario(
            "swe_smith",
            sessions=20,
            sim={"session_rate": 1.0},
            scheduler={"eviction": "ttl:ttl=30", "preemption": "swap"},
            engine={"host_kv_gb": 20.0},
            cluster={"num_replicas": 2, "router": "prefix_aware"},
        ),
        "num_preemptions_swap",
    ),
    "least_loaded_4_replicas_cut_by_max_sim_time": (
        scenario(
            sim={"session_rate": 0.5, "max_sim_time_s": 200.0, "kv_sample_interval_s": 0.25},
            cluster={"num_replicas": 4, "router": "least_loaded"},
        ),
        None,
    ),
    "short_run_cut_by_max_sim_time": (scenario(sim={"max_sim_time_s": 300.0, "kv_sample_interval_s": 0.25}), None),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fast_path_gives_the_step_by_step_event_log_exactly(name):
    cfg, must_happen = SCENARIOS[name]
    slow_log, slow_summary = run(cfg, fast_forward=False)
    fast_log, fast_summary = run(cfg, fast_forward=True)
    assert slow_summary["num_steps"] > 1000
    if must_happen:
        assert slow_summary[must_happen] > 0, f"the scenario was meant to exercise {must_happen}"
    for key in slow_log:
        assert same(slow_log[key], fast_log[key]), f"{name}: {key} differs"
    assert slow_summary.keys() == fast_summary.keys()
    for key in slow_summary:
        assert same(slow_summary[key], fast_summary[key]), f"{name}: summary {key} differs"


def test_fast_path_with_a_profile_cost_model_gives_the_step_by_step_event_log(tmp_path):
    path = tmp_path / "profile.json"
    random_profile_cost(np.random.default_rng(3), max_graph_batch=8).save(path)
    cfg = scenario(sim={"cost_model": "profile", "profile_path": str(path)})
    assert same(run(cfg, False), run(cfg, True))


# -- the cost formula: one C++ evaluator, bit-identical to the Python formulas it replaced ----------


def roofline_reference(cost: RooflineCost, plan) -> float:
    """RooflineCost.step_seconds as it was written in Python before it moved to csrc/step_cost.cpp."""
    from bisect import bisect_right

    tokens = plan.num_tokens
    copies = plan.num_swap_out_blocks + plan.num_swap_in_blocks
    seconds = cost._overhead_s
    if copies:
        seconds += copies * plan.block_size * cost._swap_token_s
    elif tokens <= 0:
        return 0.0
    if tokens > 0:
        intercept, slope = cost._linear_pieces[bisect_right(cost._linear_breaks, tokens)]
        seconds += intercept + slope * tokens
        sampled = plan.num_sampled
        if sampled > 0:
            flop = sampled * cost._head_flop_s
            mem = cost._head_weight_s + sampled * cost._head_act_s
            seconds += flop if flop > mem else mem
        flop = plan.attn_pairs * cost._attn_pair_s
        mem = plan.kv_read_tokens * cost._attn_kv_s
        seconds += flop if flop > mem else mem
    return seconds


def random_profile_cost(rng: np.random.Generator, max_graph_batch: int = 64) -> ProfileCost:
    """A ProfileCost of every basis on both paths, with random coefficients and limits."""

    def path(bases):
        terms = tuple(
            (b, float(rng.integers(1, 300)) if b in KNOTS else 0.0, float(rng.random() * 10.0 ** rng.integers(-12, -2)))
            for b in bases
        )
        limits = {b: float(rng.integers(1, 10**6)) for b in ("tokens", "reqs", "decode_kv", "prefill_pairs")}
        return ProfilePath(terms, limits)

    graph = path(
        ["one", "reqs", "reqs_over", "reqs_over", "decode_kv", "strict", "dropped", "dropped_kv", "swap_out", "swap_in"]
    )
    return ProfileCost({"graph": graph, "eager": path(sorted(PROFILE_BASIS))}, max_graph_batch)


def profile_reference(cost: ProfileCost, plan) -> float:
    """ProfileCost.step_seconds written out in Python: term by term, in the terms' order."""
    if plan.num_tokens <= 0 and not plan.num_swap_out_blocks and not plan.num_swap_in_blocks:
        return 0.0
    graph = 0 < cost.max_graph_batch and 0 < plan.num_tokens == plan.num_reqs <= cost.max_graph_batch
    strict = not plan.continues_decode
    dropped = bool(plan.follows_decode) and strict
    values = {
        "one": 1.0,
        "tokens": plan.num_tokens,
        "reqs": plan.num_reqs,
        "sampled": plan.num_sampled,
        "sampled_any": float(plan.num_sampled > 0),
        "decode_reqs": plan.num_decode_reqs,
        "prefill_reqs": plan.num_reqs - plan.num_decode_reqs,
        "decode_kv": plan.decode_kv_tokens,
        "prefill_pairs": plan.attn_pairs - plan.decode_kv_tokens,
        "prefill_kv": plan.kv_read_tokens - plan.decode_kv_tokens,
        "strict": float(strict),
        "dropped": float(dropped),
        "dropped_kv": plan.decode_kv_tokens if dropped else 0.0,
        "swap_out": plan.num_swap_out_blocks,
        "swap_in": plan.num_swap_in_blocks,
    }
    seconds = 0.0
    for basis, knot, coef in cost.paths["graph" if graph else "eager"].terms:
        if basis == "prefill_waves_kv":
            value = 0.0
            for q, c in zip(plan.query_lens, plan.cached_lens):
                if q > 1:
                    value += (c + q) * math.ceil(q / knot)
        elif basis == "tokens_over":
            value = max(plan.num_tokens - knot, 0.0)
        elif basis == "reqs_over":
            value = max(plan.num_reqs - knot, 0.0)
        else:
            value = float(values[basis])
        seconds += coef * value
    return max(seconds, 0.0)


def random_plans(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        reqs = rng.randint(0, 64)
        cached = [rng.choice([0, rng.randint(0, 131072)]) for _ in range(reqs)]
        query = [rng.choice([1, 1, 1, rng.randint(1, 8192)]) for _ in range(reqs)]
        base = PlanFeatures.of_requests(
            cached, query, num_sampled=rng.randint(0, reqs) if reqs else 0, block_size=rng.choice([1, 16, 32])
        )
        swaps = rng.choice([(0, 0), (0, 0), (rng.randint(0, 500), 0), (0, rng.randint(0, 500))])
        follows = rng.random() < 0.5
        yield PlanFeatures(
            **{
                **base.__dict__,
                "num_swap_out_blocks": swaps[0],
                "num_swap_in_blocks": swaps[1],
                "follows_decode": int(follows),
                "continues_decode": int(follows and rng.random() < 0.5),
            }
        )


@pytest.mark.parametrize("model,hardware", [("llama3_8b", "h100_sxm"), ("qwen3_8b", "h200"), ("smollm2_135m", "cpu")])
def test_roofline_native_cost_is_bit_identical_to_the_python_formula(model, hardware):
    cost = RooflineCost(load_model_spec(model), load_hardware_spec(hardware))
    for plan in random_plans(3000):
        assert cost.step_seconds(plan) == roofline_reference(cost, plan), plan


def test_profile_native_cost_is_bit_identical_to_the_python_formula():
    rng = np.random.default_rng(1)
    for _ in range(20):
        cost = random_profile_cost(rng, max_graph_batch=int(rng.choice([0, 8, 64])))
        for plan in random_plans(200, seed=int(rng.integers(1 << 30))):
            assert cost.step_seconds(plan) == profile_reference(cost, plan), plan


# -- ClusterForward on bare schedulers ------------------------------------------------------------


def reference_steps(sched, cost, pool):
    """The reference loop's steps on one scheduler, back to back from 0 (tokens from `pool` in turn,
    wrapping as Replica._tokens does): (start, seconds, tokens, requests, finished ids) per step."""
    log, now, token_at = [], 0.0, 0
    while sched.has_unfinished():
        plan = cp.plan_step(sched, now)
        assert not plan.is_empty
        seconds, n = cost.step_seconds(plan), plan.num_sampled
        at = 0 if token_at + n > pool.size else token_at
        token_at = at + n
        finished = sched.commit(plan, pool[at : at + n], now + seconds)
        log.append((now, seconds, plan.num_tokens, plan.num_reqs, sorted(f.request_id for f in finished)))
        now += seconds
    return log


@pytest.mark.parametrize("horizon", [0.05, 0.5, math.inf])
def test_cluster_forward_commits_the_reference_steps_before_each_horizon_and_stops_at_finishes(horizon):
    cost = RooflineCost(load_model_spec("llama3_8b"), load_hardware_spec("h100_sxm"))
    pool = np.random.default_rng(0).integers(0, 1000, size=37, dtype=np.int64)  # wraps around
    scheds = [cp.Scheduler(num_blocks=64, vocab_size=1000, max_num_batched_tokens=64) for _ in range(2)]
    for sched in scheds:
        for i in range(4):
            sched.add_request(i, np.arange(10 + 30 * i) % 1000, max_new_tokens=5 + 7 * i, ignore_eos=True)
    expected = reference_steps(scheds[1], cost, pool)
    cf = _native.ClusterForward(cost.native, [scheds[0]], [pool], [math.inf], 1.0)
    assert cf.start(0, 0.0, 0) and cf.next() == (expected[0][1], 0)
    got, h, eid = [], 0.0, 1
    while scheds[0].has_unfinished():
        h += horizon
        r = cf.advance(h, 1, -1, eid)  # a horizon entry that no step end at h comes before
        eid = r.next_eid
        assert all(start + sec < h for start, sec in zip(r.starts, r.seconds))
        ids = sorted(f.request_id for f in r.finished)
        for k, row in enumerate(zip(r.starts.tolist(), r.seconds.tolist(), r.num_tokens, r.num_reqs)):
            got.append((*row, ids if k == r.num_steps - 1 else []))
        if r.stopped == 0:  # a finish, or nothing left: the driver resumes the replica at that step's end
            assert ids or r.idle
            if not r.idle:
                h = r.stop_time
                cf.start(0, r.stop_time, eid)
                eid += 1
        scheds[0].check_invariants()
    assert got == expected and not r.samples


# -- turn memos change nothing but speed -------------------------------------------------------------


def agent_plans(session_ids: bool, num_blocks: int = 48):
    """Four agents taking turns on a small cache (evictions happen); every plan's arrays."""
    sched = cp.Scheduler(num_blocks=num_blocks, block_size=4, vocab_size=500, max_num_batched_tokens=32, chunk_size=16)
    rng = np.random.default_rng(7)
    contexts = {s: rng.integers(0, 500, size=int(rng.integers(5, 30))) for s in range(4)}
    log, now, next_id, turns = [], 0.0, 0, {s: 0 for s in range(4)}
    live = {}
    for s in range(4):
        sched.add_request(
            next_id, contexts[s], max_new_tokens=6, ignore_eos=True, session_id=f"s{s}" if session_ids else None
        )
        live[next_id], next_id = s, next_id + 1
    while sched.has_unfinished():
        plan = sched.step(now)
        log.append((list(plan.req_ids), list(plan.query_lens), list(plan.cached_lens), list(plan.slot_mapping)))
        tokens = (np.asarray(plan.input_ids)[np.asarray(plan.logits_indices)] * 7 + 3) % 500
        now += 0.01
        for f in sched.commit(plan, tokens, now):
            s = live.pop(f.request_id)
            turns[s] += 1
            if turns[s] < 5:
                new = rng.integers(0, 500, size=int(rng.integers(1, 9)))
                contexts[s] = np.concatenate([contexts[s], f.output_token_ids, new])
                sched.add_request(
                    next_id,
                    contexts[s],
                    max_new_tokens=6,
                    ignore_eos=True,
                    arrival_time=now,
                    session_id=f"s{s}" if session_ids else None,
                )
                live[next_id], next_id = s, next_id + 1
        sched.check_invariants()
    return log, sched.stats()


def test_turn_memos_leave_every_plan_unchanged():
    with_sessions, stats = agent_plans(session_ids=True)
    assert stats.num_evicted_blocks > 0 and stats.cached_tokens > 0
    without, _ = agent_plans(session_ids=False)
    assert with_sessions == without
