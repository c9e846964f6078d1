"""The simulator: exact event logs on tiny scenarios, determinism, properties, bad configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.cost import PlanFeatures, RooflineCost
from sim.simulation import Simulation
from sim.specs import HardwareSpec, ModelSpec, load_model_spec
from sim.workloads import Session, Turn, write_trace

SMOL = load_model_spec("smollm2_135m")
GiB = 1 << 30


def tiny_hardware(kv_blocks: int, block_size: int = 16, overhead: float = 0.0) -> dict:
    """A made-up accelerator whose KV cache holds exactly `kv_blocks` blocks of SmolLM2."""
    block_bytes = SMOL.kv_bytes_per_token() * block_size
    mem = (SMOL.weight_bytes() + GiB + (kv_blocks + 0.5) * block_bytes) / 0.9
    return dict(
        name="tiny",
        peak_flops=1e14,
        mem_bandwidth=1e12,
        mem_bytes=mem,
        host_link_bandwidth=1e10,
        step_overhead_s=overhead,
        source="test",
    )


def config(tmp_path, sessions, kv_blocks=64, policy=("fcfs", "lru", "recompute"), **sim):
    trace = tmp_path / "trace.jsonl"
    write_trace(str(trace), sessions)
    return {
        "model": {k: getattr(SMOL, k) for k in ModelSpec.__dataclass_fields__},
        "hardware": tiny_hardware(kv_blocks),
        "workload": {"name": "trace", "params": {"path": str(trace)}},
        "policy": {"name": "-".join(policy)},
        "scheduler": {**dict(zip(("ordering", "eviction", "preemption"), policy)), "max_model_len": 4096},
        "sim": {"num_sessions": len(sessions), "progress": False, **sim},
        "wandb": {"mode": "disabled"},
    }


def roofline(cfg) -> RooflineCost:
    return RooflineCost(ModelSpec(**cfg["model"]), HardwareSpec(**cfg["hardware"]))


def one(sid, start, *turns, prefix=(-1, 0)):
    return Session(sid, start, prefix[0], prefix[1], tuple(Turn(*t) for t in turns))


# -- exact event logs ------------------------------------------------------------------------


def test_one_request_ttft_is_its_prefill_cost_and_each_token_a_decode(tmp_path):
    cfg = config(tmp_path, [one("a", 2.0, (300, 5, 0.0))])
    result = Simulation(cfg).run()
    cost = roofline(cfg)
    row = result.requests.iloc[0]
    assert row.arrival == 2.0 and row.first_scheduled == 2.0
    assert row.ttft == pytest.approx(cost.lower_bound_prefill_seconds(300), rel=1e-12)
    # Token k (k >= 1) commits one decode step later, at context 300 + k - 1.
    expected = 2.0 + cost.lower_bound_prefill_seconds(300)
    for k in range(1, 5):
        expected += cost.lower_bound_decode_seconds(300 + k - 1)
    assert row.finish == pytest.approx(expected, rel=1e-12)
    assert (row.prompt_tokens, row.cached_tokens, row.computed_tokens, row.output_tokens) == (300, 0, 304, 5)
    assert result.summary["num_steps"] == 5


def test_second_turn_prefills_only_its_new_tokens(tmp_path):
    # Turn 1 computes 100 + 29 - 1 = 128 tokens = 8 full blocks; turn 2 = those 129 tokens + 20 new.
    cfg = config(tmp_path, [one("a", 0.0, (100, 29, 1.5), (20, 3, 0.0))])
    result = Simulation(cfg).run()
    first, second = result.requests.iloc[0], result.requests.iloc[1]
    assert second.arrival == pytest.approx(first.finish + 1.5)
    assert (second.prompt_tokens, second.cached_tokens) == (149, 128)
    assert second.computed_tokens == 21 + 2  # 20 new + the last reply token, then 2 decodes
    cost = roofline(cfg)
    prefill = cost.step_seconds(PlanFeatures.of_requests([128], [21]))
    assert second.ttft == pytest.approx(prefill, rel=1e-12)
    assert result.summary["prefix_hit_rate"] == pytest.approx(128 / (100 + 149))
    # genuinely new: 100 + 20; prefilled: 100 + 21
    assert result.summary["prefill_amplification"] == pytest.approx(121 / 120)


def retention_scenario(tmp_path, eviction, pause=5.0):
    """Session a pauses `pause` s between turns; one-shot sessions fill the KV cache meanwhile."""
    sessions = [one("a", 0.0, (200, 10, pause), (30, 2, 0.0))]
    # 12 one-shot requests of 64 distinct tokens, each leaving 4 cached blocks, in the second half
    # of the pause: after a 2 s pin has run out, before the next turn.
    sessions += [one(f"p{k}", 2.6 + 0.15 * k, (64, 1, 0.0)) for k in range(12)]
    cfg = config(tmp_path, sessions, kv_blocks=40, policy=("fcfs", eviction, "recompute"))
    result = Simulation(cfg).run()
    table = result.requests.set_index(["session_id", "turn"])
    return table.loc[("a", 1)], result


@pytest.mark.parametrize("eviction, expected", [("ttl:ttl=10", 208), ("ttl:ttl=2", 0), ("lru", 0)])
def test_ttl_longer_than_the_pause_keeps_the_prefix_and_shorter_loses_it(tmp_path, eviction, expected):
    # Turn 1 computes 209 tokens: 13 full blocks (208 tokens). The pressure needs 48 blocks of 40.
    second, result = retention_scenario(tmp_path, eviction)
    assert second.prompt_tokens == 240
    assert second.cached_tokens == expected
    assert result.summary["num_evicted_blocks"] > 0


# -- determinism --------------------------------------------------------------------------------

WALL_CLOCK = {"wall_seconds", "steps_per_wall_s", "requests_per_wall_min"}


def agentic(seed, **sim):
    return {
        "workload": {
            "name": "agentic_coding",
            "params": {"prefix_tokens_min": 2000, "prefix_tokens_max": 6000, "calls_mean": 4, "output_max": 800},
        },
        "hardware": tiny_hardware(600),
        "model": {k: getattr(SMOL, k) for k in ModelSpec.__dataclass_fields__},
        "sim": {"num_sessions": 12, "session_rate": 2.0, "seed": seed, "progress": False, **sim},
        "wandb": {"mode": "disabled"},
    }


def test_same_seed_same_results_different_seed_differs():
    a, b, c = (Simulation(agentic(seed)).run() for seed in (3, 3, 4))
    strip = lambda s: {k: v for k, v in s.items() if k not in WALL_CLOCK}  # noqa: E731
    assert strip(a.summary) == strip(b.summary)
    assert a.requests.equals(b.requests)
    assert not a.requests.equals(c.requests)
    assert strip(a.summary) != strip(c.summary)


# -- properties ------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    kv_blocks=st.integers(400, 900),
    policy=st.sampled_from(
        [
            ("fcfs", "lru", "recompute"),
            ("longest_prefix_match", "ttl:ttl=3", "recompute"),
            ("priority", "priority", "swap"),
            ("fcfs", "ttl:ttl=30", "swap"),
        ]
    ),
    replicas=st.integers(1, 3),
    router=st.sampled_from(["round_robin", "least_loaded", "session_affinity", "prefix_aware"]),
    mode=st.sampled_from(["open", "closed"]),
    overhead=st.sampled_from([0.0, 0.002]),
    lookahead=st.sampled_from([0, 1]),
)
def test_every_request_finishes_no_latency_beats_the_roofline_and_tokens_balance(
    seed, kv_blocks, policy, replicas, router, mode, overhead, lookahead
):
    cfg = agentic(seed, mode=mode, concurrency=3)
    cfg["hardware"] = tiny_hardware(kv_blocks, overhead=overhead)
    cfg["policy"] = {"name": "p"}
    cfg["cluster"] = {"num_replicas": replicas, "router": router}
    cfg["engine"] = {"host_kv_gb": 0.05}
    cfg["scheduler"] = {
        **dict(zip(("ordering", "eviction", "preemption"), policy)),
        "max_num_batched_tokens": 2048,
        "chunk_size": 1024,
        "num_lookahead_tokens": lookahead,
    }
    sim = Simulation(cfg)
    result = sim.run()
    s = result.summary
    # liveness: every session ran to its end (or stopped where its context outgrew the KV cache)
    assert s["completed"] and s["num_sessions"] == 12
    planned = {x.session_id: len(x.turns) for x in sim.workload.sessions(12, seed)}
    made = {sid: calls for sid, _, _, calls, truncated in result.collector.sessions}
    for sid, _, _, calls, truncated in result.collector.sessions:
        assert calls == planned[sid] or (truncated and calls < planned[sid])
    assert s["num_requests"] == sum(made.values()) > 0
    cost = RooflineCost(sim.model, sim.hardware)
    t = result.requests
    for row in t.itertuples():
        uncached = row.prompt_tokens - row.cached_tokens
        if row.preemptions == 0:
            bound = cost.step_seconds(PlanFeatures.of_requests([row.cached_tokens], [uncached]))
        else:  # re-admitted later, it may have found more of itself cached: its last prompt token still ran
            bound = cost.lower_bound_decode_seconds(row.prompt_tokens - 1)
        assert row.ttft >= bound * (1 - 1e-9), row
        if row.output_tokens > 1:
            assert row.tpot >= cost.lower_bound_decode_seconds(row.prompt_tokens) * (1 - 1e-9), row
        prefilled = row.computed_tokens - (row.output_tokens - 1)
        if row.preemptions == 0:
            assert prefilled + row.cached_tokens == row.prompt_tokens, row
        else:  # a re-admission may hit blocks it computed itself before being preempted
            assert 1 <= prefilled, row
    assert (t.first_scheduled >= t.arrival).all() and (t.first_token > t.first_scheduled).all()


# -- bad configs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ({"sim": {"bogus": 1}}, "unknown keys in 'sim': \\['bogus'\\]"),
        ({"modle": {}}, "unknown config section 'modle'"),
        ({"sim": {"session_rate": -1.0}}, "sim.session_rate must be positive"),
        ({"sim": {"num_sessions": 0}}, "sim.num_sessions must be positive"),
        ({"sim": {"mode": "half-open"}}, "sim.mode must be 'open' or 'closed'"),
        ({"cluster": {"router": "random"}}, "cluster.router: unknown router"),
        ({"cluster": {"num_replicas": 0}}, "cluster.num_replicas must be positive"),
        ({"scheduler": {"eviction": "fifo"}}, "unknown policy 'fifo' \\(eviction\\)"),
        ({"scheduler": {"eviction": "ttl:ttl=-3"}}, "ttl must be >= 0"),
        ({"engine": {"gpu_memory_utilization": 1.5}}, "gpu_memory_utilization"),
        ({"scheduler": {"block_size": 0}}, "block_size"),
        ({"scheduler": {"num_lookahead_tokens": -1}}, "num_lookahead_tokens"),
        ({"workload": {"name": "agentic_coding", "params": {"session_rat": 1}}}, "session_rat"),
        ({"workload": {"name": "agentic_coding", "params": {"session_rate": -2}}}, "session_rate"),
        ({"workload": {"name": "nope"}}, "nope"),
        (
            {
                "hardware": {
                    "name": "small",
                    "peak_flops": 1e14,
                    "mem_bandwidth": 1e12,
                    "mem_bytes": 8e9,
                    "host_link_bandwidth": 1e10,
                }
            },
            "does not fit|needs .* of weights",
        ),
        (
            {
                "hardware": {
                    "name": "neg",
                    "peak_flops": -1.0,
                    "mem_bandwidth": 1e12,
                    "mem_bytes": 8e10,
                    "host_link_bandwidth": 1e10,
                }
            },
            "peak_flops",
        ),
        # cost=profile reads conf/profiles/<hardware>/<model>.json: none for this hardware entry
        (
            {
                "hardware": {
                    "name": "h100_pcie",
                    "peak_flops": 7.56e14,
                    "mem_bandwidth": 2.0e12,
                    "mem_bytes": 8e10,
                    "host_link_bandwidth": 6.4e10,
                },
                "sim": {"cost_model": "profile"},
            },
            r"no fit of llama3_8b on h100_pcie .*shipped: \[.*h100_sxm/llama3_8b.*profile_path",
        ),
        ({"sim": {"cost_model": "profile", "profile_path": "/no/such/profile.json"}}, "no such file"),
    ],
)
def test_bad_config_fails_before_the_run(override, message):
    with pytest.raises(ValueError, match=message):
        Simulation(override)


def test_summary_numbers_are_finite_and_consistent():
    result = Simulation(agentic(1)).run()
    s = result.summary
    for key in ("ttft_s_p50", "tpot_s_p50", "per_gpu_output_tok_s", "prefix_hit_rate", "itl_s_p50"):
        assert math.isfinite(s[key]) and s[key] > 0, key
    assert s["ttft_s_p50"] <= s["ttft_s_p90"] <= s["ttft_s_p99"]
    assert s["output_tokens"] == result.requests.output_tokens.sum()
    # ITL percentiles (from the histogram) agree with the exact per-request TPOTs' scale
    assert 0.5 * s["tpot_s_p50"] < s["itl_s_p50"] < 2 * s["tpot_s_p90"] + 1e-9
    assert s["physical_limit"] and not np.isnan(s["kv_used_max"])


def test_a_sessions_new_tokens_drawn_at_once_are_those_drawn_call_by_call():
    from sim.simulation import TokenFactory

    tokens = TokenFactory(seed=3, vocab_size=49152)
    turns = [Turn(new_tokens=n, output_tokens=4, pause_after=0.0) for n in (250, 1, 2, 977, 33)]
    turns.insert(2, Turn(new_tokens=3, output_tokens=4, pause_after=0.0, new_token_ids=(5, 6, 7)))  # a trace's own ids
    at_once = tokens.session_new_tokens(tokens.session_rng(7), turns)
    rng = tokens.session_rng(7)
    one_by_one = [tokens.new_tokens(rng, t) for t in turns]
    assert [a.tolist() for a in at_once] == [b.tolist() for b in one_by_one]
    assert at_once[2].tolist() == [5, 6, 7] and len(at_once[4]) == 977
    assert tokens.session_new_tokens(tokens.session_rng(8), turns)[0].tolist() != at_once[0].tolist()


def test_itl_bins_are_searchsorted_bins_at_and_around_every_edge():
    from sim.metrics import _ITL_EDGES, _itl_bins

    rng = np.random.default_rng(5)
    edges = _ITL_EDGES
    cases = [
        rng.lognormal(-3.5, 2.5, 200_000),
        edges,
        np.nextafter(edges, 0),
        np.nextafter(edges, np.inf),
        np.array([0.0, -1.0, 1e-12, 1e-5, 1e4, 1e6, np.inf, np.nan]),
    ]
    for gaps in cases:
        assert _itl_bins(gaps).tolist() == np.searchsorted(edges, gaps).tolist()


# -- what a summary says -----------------------------------------------------------------------


def test_summary_values_are_plain_python_numbers_not_numpy_scalars():
    s = Simulation(agentic(1)).run().summary
    assert not [k for k, v in s.items() if isinstance(v, np.generic)]
    assert "np." not in repr(s)  # e.g. np.float64(193.49) in a printed summary


def h100_with(**rates) -> dict:
    import dataclasses

    from sim.specs import load_hardware_spec

    return {**dataclasses.asdict(load_hardware_spec("h100_sxm")), **rates}


@pytest.mark.parametrize(
    "hardware, label",
    [
        (h100_with(), "h100_sxm"),
        (h100_with(mem_bandwidth=2.0e12), "h100_sxm (modified: mem_bandwidth=2e+12)"),
        (
            h100_with(peak_flops=5e14, step_overhead_s=0.002),
            "h100_sxm (modified: peak_flops=5e+14, step_overhead_s=0.002)",
        ),
        (h100_with(name="my_gpu", mem_bandwidth=2.0e12), "my_gpu"),  # a name of the user's own: no datasheet claimed
    ],
)
def test_hardware_with_changed_rates_is_not_named_as_the_datasheet(hardware, label):
    cfg = {**agentic(1), "hardware": hardware, "sim": {**agentic(1)["sim"], "num_sessions": 2}}
    simulation = Simulation(cfg)
    assert simulation.run().summary["hardware"] == label
    assert f"on {label}," in simulation.cost_model.describe()


def test_a_changed_memory_size_is_named_in_the_does_not_fit_message():
    with pytest.raises(ValueError, match=r"h100_sxm \(modified: mem_bytes=1e\+10\) has 9.0 GB usable"):
        Simulation({"hardware": h100_with(mem_bytes=1.0e10), "sim": {"num_sessions": 1}})


def test_a_heavily_overloaded_run_warns_and_a_light_one_does_not():
    light = Simulation(agentic(1)).run()
    assert light.summary["slo_ttft_attainment"] > 0.5 and light.warnings == []
    cfg = agentic(1, session_rate=50.0, num_sessions=40)
    cfg["hardware"] = tiny_hardware(600, overhead=0.05)  # 50 ms a step: a queue that only grows
    heavy = Simulation(cfg).run()
    assert heavy.summary["slo_ttft_attainment"] < 0.5
    assert len(heavy.warnings) == 1 and heavy.warnings[0].startswith("overloaded: only ")
    assert "sim.slo_ttft_s=5 s" in heavy.warnings[0]
