"""Admission policies (csrc/policies.h AdmissionPolicy): "all", and "tps_floor", which keeps a per-user speed
floor by predicting each step's time with the plane's step-cost model (docs/policies.md, "Admission")."""

from __future__ import annotations

import pytest

import controlplane as cp
from sim import _native
from sim.cost import _native_seconds
from sim.simulation import Simulation

FLOOR = 1.0 / 70  # seconds a step may take at 70 tokens/s per user

# 5 ms a step plus 50 us a token (the linear layers), nothing else: 185 tokens fit in 1/70 s.
PER_TOKEN = _native.StepCost.roofline(0.0, 0.0, [], [(0.005, 5e-5)], 0.0, 0.0, 0.0, 0.0, 0.0)
# 5 ms a step plus 0.1 us per KV token a decode reads: a 100K-token context alone takes 15 ms.
PER_KV = _native.StepCost.roofline(0.0, 0.0, [], [(0.005, 0.0)], 0.0, 0.0, 0.0, 0.0, 1e-7)


def scheduler(admission: str, cost=PER_TOKEN, **config) -> cp.Scheduler:
    s = cp.Scheduler(num_blocks=16384, max_model_len=262144, admission=admission, **config)
    s.set_step_cost(cost)
    return s


def run_steps(s: cp.Scheduler, now: float, n: int, cost=PER_TOKEN) -> tuple[float, list]:
    """n steps of 10 ms; each plan's (query lengths, predicted seconds)."""
    out = []
    for _ in range(n):
        plan = s.step(now)
        out.append(([int(q) for q in plan.query_lens], _native_seconds(cost, plan)))
        s.commit(plan, [1] * plan.num_sampled, now)
        now += 0.01
    return now, out


def four_decoding(s: cp.Scheduler) -> float:
    for i in range(4):
        s.add_request(i, list(range(100)), max_new_tokens=100, ignore_eos=True)
    now, steps = run_steps(s, 0.0, 3)
    assert steps[-1][0] == [1, 1, 1, 1]
    return now


@pytest.mark.parametrize("admission", ["tps_floor", "tps_floor:tok_s=70"])
def test_a_prefill_chunk_beside_decodes_gets_the_slack_of_the_floor(admission):
    s = scheduler(admission)
    now = four_decoding(s)
    s.add_request(10, list(range(5000)), max_new_tokens=5, ignore_eos=True, arrival_time=now)
    _, steps = run_steps(s, now, 3)
    for lens, seconds in steps:
        # 4 decodes + 181 prefill tokens: 5 ms + 185 x 50 us = 14.25 ms; 182 would be 14.30 > 14.29
        assert lens == [1, 1, 1, 1, 181] and seconds <= FLOOR
    assert s.stats().num_admission_cuts == 3
    s.check_invariants()


def test_admitting_all_breaks_the_floor_in_the_same_scene():
    s = scheduler("all")
    now = four_decoding(s)
    s.add_request(10, list(range(5000)), max_new_tokens=5, ignore_eos=True, arrival_time=now)
    _, steps = run_steps(s, now, 1)
    lens, seconds = steps[0]
    assert lens == [1, 1, 1, 1, 2048] and seconds > 7 * FLOOR
    assert s.stats().num_admission_cuts == 0


def test_with_no_decode_waiting_a_prefill_takes_whole_chunks():
    s = scheduler("tps_floor")
    s.add_request(0, list(range(5000)), max_new_tokens=5, ignore_eos=True)
    _, steps = run_steps(s, 0.0, 2)
    assert [lens for lens, _ in steps] == [[2048], [2048]]


def test_a_smaller_chunk_than_min_chunk_waits():
    # slack for 181 tokens: min_chunk 200 holds the prefill (its request keeps its place and blocks)
    s = scheduler("tps_floor:min_chunk=200")
    now = four_decoding(s)
    s.add_request(10, list(range(5000)), max_new_tokens=5, ignore_eos=True, arrival_time=now)
    _, steps = run_steps(s, now, 2)
    assert [lens for lens, _ in steps] == [[1, 1, 1, 1]] * 2
    assert s.request_info(10)["state"] == "WAITING"


def test_a_request_whose_decode_would_break_the_floor_waits_until_room():
    """Four 20K-token contexts decode in 5 + 8 ms; a fifth of 30K would make it 16 ms: it waits, reported."""
    s = scheduler("tps_floor:max_wait_s=0.05", cost=PER_KV)
    for i in range(4):
        s.add_request(i, list(range(20000)), max_new_tokens=20, ignore_eos=True)
    now, _ = run_steps(s, 0.0, 12, PER_KV)  # 10 chunks of 2048 tokens a step prefill the four (no decode yet)
    s.add_request(10, list(range(30000)), max_new_tokens=5, ignore_eos=True, arrival_time=now)
    now, steps = run_steps(s, now, 8, PER_KV)
    assert all(lens == [1, 1, 1, 1] and seconds <= FLOOR for lens, seconds in steps)
    st = s.stats()
    assert st.num_held_waiting == 1 and st.num_held_too_long == 0 and st.num_admission_cuts >= 8
    while s.request_info(10)["state"] == "WAITING":  # the four finish, then it is admitted
        now, _ = run_steps(s, now, 1, PER_KV)
    st = s.stats()
    assert st.num_held_waiting == 0 and st.num_held_too_long == 1
    s.check_invariants()


def test_a_request_is_admitted_when_nothing_runs_even_past_the_floor():
    s = scheduler("tps_floor", cost=PER_KV)
    s.add_request(0, [i % 1000 for i in range(150000)], max_new_tokens=3, ignore_eos=True)
    now, steps = run_steps(s, 0.0, 80, PER_KV)
    assert sum(lens[0] for lens, _ in steps if lens) >= 150000
    assert not s.has_unfinished()


def test_bad_admission_specs_and_misuse_are_refused():
    for spec, words in [
        ("tps_floor:tok_s=0", "tok_s must be > 0"),
        ("tps_floor:margin=-1", "margin must be > 0"),
        ("tps_floor:min_chunk=0.5", "min_chunk must be a whole number"),
        ("tps_floor:max_wait_s=-2", "max_wait_s must be >= 0"),
        ("tps_floor:speed=70", "has no parameter 'speed'"),
        ("all:x=1", "has no parameter 'x'"),
        ("nope", "unknown policy 'nope'"),
    ]:
        with pytest.raises(ValueError, match=words):
            cp.Scheduler(admission=spec)
    with pytest.raises(ValueError, match="admission"):
        cp.SchedulerConfig(admission="nope").validate()
    with pytest.raises(ValueError, match="written in C\\+\\+"):
        cp.register_policy("admission", "mine", object)
    s = cp.Scheduler(admission="tps_floor")
    s.add_request(0, [1, 2, 3])
    with pytest.raises(ValueError, match="give the scheduler a step cost"):
        s.step(0.0)
    with pytest.raises(TypeError, match="sim._native.StepCost"):
        s.set_step_cost(0.005)
    s.set_step_cost(PER_TOKEN)  # then it steps
    assert list(s.step(0.0).query_lens) == [3] and s.admission == "tps_floor"


def test_the_schedulers_predictions_stay_out_of_the_cost_models_counts():
    cost = _native.StepCost.roofline(0.0, 0.0, [], [(0.005, 5e-5)], 0.0, 0.0, 0.0, 0.0, 0.0)
    s = scheduler("tps_floor", cost=cost)
    four_decoding(s)
    s.add_request(10, list(range(5000)), max_new_tokens=5, ignore_eos=True, arrival_time=1.0)
    s.step(1.0)
    assert cost.num_steps == 0


# ------------------------------------------------------------------------------------ in the simulator


def simulate(admission: str, concurrency: int, fast_forward: bool = True, sessions: int = 8) -> dict:
    cfg = {
        "workload": {"name": "swe_smith", "params": {"turns_min": 3, "turns_max": 3}},
        "scheduler": {"admission": admission},
        "sim": {
            "mode": "closed",
            "concurrency": concurrency,
            "num_sessions": sessions,
            "seed": 0,
            "progress": False,
            "fast_forward": fast_forward,
        },
        "wandb": {"mode": "disabled"},
    }
    result = Simulation(cfg).run()
    assert result.summary["completed"]
    return result.summary


def test_the_floor_holds_in_the_twin_where_admitting_all_breaks_it():
    """swe_smith at concurrency 8 on Llama-3-8B / H100 (roofline): fcfs's batches of 50K-token prefills and
    eight long contexts put most tokens under 70 tok/s; tps_floor delivers every one at or above it."""
    plain, floor = simulate("all", 8), simulate("tps_floor:tok_s=70", 8)
    assert plain["floor_token_share"] < 0.5
    assert floor["floor_token_share"] == 1.0
    assert floor["num_admission_cuts"] > 0 and plain["num_admission_cuts"] == 0
    assert floor["output_tokens"] == plain["output_tokens"]


def test_fast_path_and_step_by_step_agree_on_the_floor():
    fast = simulate("tps_floor", 4, sessions=4)
    slow = simulate("tps_floor", 4, fast_forward=False, sessions=4)
    keys = ("floor_token_share", "num_admission_cuts", "num_steps", "ttft_s_p50", "output_tokens", "simulated_seconds")
    assert {k: fast[k] for k in keys} == {k: slow[k] for k in keys}


# ------------------------------------------------------------------------------------ in the engine


def test_the_engine_needs_a_step_cost_for_a_predicting_policy(tmp_path):
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match="give the engine a step cost"):
        EngineConfig.from_dict({"admission": "tps_floor"})
    with pytest.raises(ValueError, match="unknown engine step_cost keys"):
        EngineConfig.from_dict({"admission": "tps_floor", "step_cost": {"model": "x", "hardware": "y", "z": 1}})
    with pytest.raises(ValueError, match="needs `model` and `hardware`"):
        EngineConfig.from_dict({"admission": "tps_floor", "step_cost": {"model": "llama3_8b"}})


def test_the_engine_keeps_the_floor_its_cost_model_predicts(tmp_path):
    """A tiny engine on the CPU with the twin's roofline of it: prefill chunks beside decodes are cut to what
    the prediction allows (every step with a decode within 1 / tok_s by the same cost model, from the
    engine's own step profile), and every request still gets all its tokens."""
    from controlplane.profile import FEATURES, decode_prefill_rows
    from engine import LLM, SamplingParams
    from experiments.adversary import write_tiny_model
    from sim.cost import PlanFeatures

    config, spec = write_tiny_model(tmp_path)
    tok_s = 1000.0  # on conf/hardware/cpu a decode step of the four is ~0.26 ms, two 256-token chunks 4-8 ms
    llm = LLM(
        config,
        load_format="dummy",
        device="cpu",
        num_gpu_blocks=512,
        seed=1,
        chunk_size=256,
        admission=f"tps_floor:tok_s={tok_s:g},min_chunk=16",
        step_cost={"model": spec, "hardware": "cpu"},
    )
    core = llm.engine
    prompts = [[3 + i % 500 for i in range(n)] for n in (40, 50, 1500, 1700)]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.0),
        use_tqdm=False,
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [24] * 4
    assert core.stats().num_admission_cuts > 0
    mixed = 0
    for row in core.profile:
        rows = decode_prefill_rows(row["prefill_rows"])
        features = PlanFeatures(
            **{k: row[k] for k in FEATURES}, query_lens=tuple(q for q, _ in rows), cached_lens=tuple(c for _, c in rows)
        )
        if row["num_decode_reqs"] and row["num_tokens"] > row["num_decode_reqs"]:
            mixed += 1
            assert core.step_cost.step_seconds(features) <= 1 / tok_s
    assert mixed > 0  # prefills did run beside decodes, cut to the slack


# ------------------------------------------------------------------------------------ the router


def test_the_floor_aware_router_prefers_replicas_within_the_floor_then_the_cached_one():
    router = cp.policies.Router("floor_aware:tok_s=70")
    assert router.needs_step_prediction and router.needs_prefix_match
    view = cp.policies.ReplicaView
    within, over = 0.010, 0.020
    pick = lambda *vs: router.route(1, "s", 100, 0.0, list(vs))  # noqa: E731
    # the cached replica is over the floor: the one within it wins, however little it holds
    assert pick(view(0, 1, cached_prefix_tokens=50000, decode_step_s=over), view(1, 3, decode_step_s=within)) == 1
    # both within: most cached, then least loaded
    assert pick(view(0, 1, cached_prefix_tokens=10, decode_step_s=within), view(1, 0, decode_step_s=within)) == 0
    assert pick(view(0, 2, decode_step_s=within), view(1, 1, decode_step_s=within)) == 1
    # none within: where its context is cached
    assert pick(view(0, 0, decode_step_s=over), view(1, 5, cached_prefix_tokens=900, decode_step_s=over)) == 1
    with pytest.raises(ValueError, match="tok_s must be > 0"):
        cp.policies.Router("floor_aware:tok_s=0")


def test_a_replicas_predicted_decode_step_counts_what_it_holds():
    s = scheduler("all", cost=PER_KV)
    assert s.predicted_decode_seconds(0) == pytest.approx(0.005 + 1e-7)  # the call alone: its one token
    s.add_request(0, [i % 1000 for i in range(20000)], max_new_tokens=4)
    # the waiting request at its 20,000 tokens (+1 read) and the call at 30,000 (+1)
    assert s.predicted_decode_seconds(30000) == pytest.approx(0.005 + 1e-7 * 50002)
    assert cp.Scheduler().predicted_decode_seconds(100) == 0.0  # no step cost: no prediction


def test_a_cluster_routes_by_prediction_and_keeps_the_floor():
    cfg = {
        "workload": {"name": "swe_smith", "params": {"turns_min": 3, "turns_max": 3}},
        "scheduler": {"admission": "tps_floor"},
        "cluster": {"num_replicas": 2, "router": "floor_aware"},
        "sim": {"mode": "closed", "concurrency": 10, "num_sessions": 12, "seed": 0, "progress": False},
        "wandb": {"mode": "disabled"},
    }
    summary = Simulation(cfg).run().summary
    assert summary["completed"] and summary["floor_token_share"] == 1.0


def test_the_server_takes_the_policy_and_its_cost_and_reports_what_it_held(tmp_path):
    """`python -m engine.serve scheduler.admission=tps_floor 'engine.step_cost={...}'`: a long prompt sent while
    two requests decode is cut to the floor's slack (the cuts are on /metrics), and every request completes."""
    import asyncio
    import os
    import re

    import httpx

    from experiments.adversary import write_tiny_model

    from serve_helpers import tiny_server

    _, spec = write_tiny_model(tmp_path / "spec")
    server = tiny_server(str(tmp_path))
    name = os.path.basename(server.model_dir)
    server.args += [
        "scheduler.admission=tps_floor:tok_s=500,min_chunk=16",
        f'engine.step_cost={{model:"{spec}",hardware:cpu}}',
    ]

    async def calls(url: str) -> list[dict]:
        async with httpx.AsyncClient(timeout=120) as client:

            async def call(prompt, max_tokens, delay):
                await asyncio.sleep(delay)
                body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
                return (await client.post(url + "/v1/completions", json=body)).json()

            return await asyncio.gather(
                call([5, 6, 7], 300, 0.0), call([8, 9, 10], 300, 0.0), call([11 + i % 200 for i in range(1500)], 4, 0.3)
            )

    with server.running() as s:
        done = asyncio.run(calls(s.url))
        metrics = httpx.get(s.url + "/metrics", timeout=30).text
    assert [d["usage"]["completion_tokens"] if "usage" in d else d for d in done] == [300, 300, 4]
    cuts = re.search(r"^tandem_admission_cuts_total (\S+)$", metrics, re.M)
    assert cuts and float(cuts.group(1)) > 0, metrics[:3000]
    assert re.search(r"^tandem_admission_held_waiting 0\.0$", metrics, re.M)
