"""Calibration (experiments/calibrate.py) on a synthetic engine whose step time is a known function of the plan.

The grid runs on simulated replicas priced by a known ProfileCost (the family the fit assumes, overlap
terms included); fitting the rows must give that function back, on the grid and on the steps of
workloads that are not in the grid.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import simpy

import controlplane as cp
from controlplane.profile import FEATURES, PREFILL_ROWS, decode_prefill_rows, read_header, write_profile
from experiments import calibrate
from experiments.calibrate import GridSpec, calibrate_simulated, run_grid
from experiments.engine_replica import RecordingReplica, StepLog
from sim import cost as sim_cost
from sim.metrics import Collector, Slo
from sim.profile_cost import SHAPE_KEYS, ProfileCost, ProfilePath
from sim.simulation import Simulation
from sim.specs import load_hardware_spec, load_model_spec

MAX_GRAPH_BATCH = 32
TRUTH_GRAPH = (
    ("one", 0.0, 4.5e-3),
    ("reqs", 0.0, 5e-6),
    ("reqs_over", 8.0, 3e-5),
    ("decode_kv", 0.0, 4.3e-7),
    ("strict", 0.0, 3e-4),
    ("dropped", 0.0, 1e-3),
    ("dropped_kv", 0.0, 2e-7),
    ("swap_out", 0.0, 4e-5),
    ("swap_in", 0.0, 5e-5),
)
TRUTH_EAGER = (
    ("one", 0.0, 5e-3),
    ("tokens", 0.0, 2e-6),
    ("tokens_over", 256.0, 2.2e-5),
    ("sampled_any", 0.0, 3.5e-4),
    ("sampled", 0.0, 1e-6),
    ("decode_reqs", 0.0, 1e-5),
    ("decode_kv", 0.0, 4.5e-7),
    ("prefill_reqs", 0.0, 2e-5),
    ("prefill_pairs", 0.0, 1.5e-10),
    ("prefill_kv", 0.0, 1e-8),
    ("prefill_waves_kv", 128.0, 5e-9),
    ("dropped", 0.0, 4e-3),
    ("dropped_kv", 0.0, 4e-7),
    ("swap_out", 0.0, 4e-5),
    ("swap_in", 0.0, 5e-5),
)  # a copy costs the same on either path
GRID = GridSpec(
    contexts=(64, 256, 1024),
    prefill_budget=4096,
    max_batch=MAX_GRAPH_BATCH,
    steps_per_level=4,
    probe_lengths=(16, 64, 256, 600),
    arrival_lengths=(40, 200),
    swap_context=256,
)
ENGINE = {
    "block_size": 16,
    "chunk_size": 256,
    "max_num_batched_tokens": 512,
    "max_num_seqs": MAX_GRAPH_BATCH,
    "num_lookahead_tokens": 1,
}
MAIN = cp.SchedulerConfig(num_blocks=512, vocab_size=1000, **ENGINE)
SWAP = dataclasses.replace(MAIN, num_blocks=64, num_host_blocks=128, preemption="swap", max_num_seqs=8)
FIT_META = {"max_graph_batch": MAX_GRAPH_BATCH, "overlap": True}


def truth_cost() -> ProfileCost:
    return ProfileCost(
        {"graph": ProfilePath(TRUTH_GRAPH), "eager": ProfilePath(TRUTH_EAGER)}, MAX_GRAPH_BATCH, {"overlap": True}
    )


def relative_errors(cost: ProfileCost, rows: list[dict]) -> np.ndarray:
    features = np.array([[r[f] for f in FEATURES] for r in rows], dtype=np.float64)
    prefill = [np.asarray(decode_prefill_rows(r[PREFILL_ROWS]), dtype=np.float64).reshape(-1, 2) for r in rows]
    seconds = np.array([r["seconds"] for r in rows])
    return np.abs(cost.predict(features, prefill) / seconds - 1)


def is_graph(row: dict) -> bool:
    return 0 < row["num_tokens"] == row["num_reqs"] <= MAX_GRAPH_BATCH


def is_dropped(row: dict) -> bool:
    return bool(row["follows_decode"]) and not row["continues_decode"]


@pytest.fixture(scope="module")
def grid_rows():
    return calibrate_simulated(truth_cost(), GRID, MAIN, SWAP)


@pytest.fixture(scope="module")
def fitted(grid_rows):
    return ProfileCost.fit(grid_rows, meta=FIT_META)


def recorded_workload(profile_path, workload: str, params: dict, **sim) -> StepLog:
    """A small simulation priced by the profile at `profile_path`, its plans recorded step by step."""
    config = {
        "model": dataclasses.asdict(load_model_spec("smollm2_135m")),
        "hardware": dataclasses.asdict(load_hardware_spec("h100_sxm")),
        "workload": {"name": workload, "params": params},
        "scheduler": ENGINE,
        "engine": {"num_gpu_blocks": 512},
        "sim": {
            "num_sessions": 12,
            "progress": False,
            "cost_model": "profile",
            "profile_path": str(profile_path),
            **sim,
        },
        "wandb": {"mode": "disabled"},
    }
    log = StepLog()
    simulation = Simulation(config)

    def factory(env, index, scheduler_config, collector):
        return RecordingReplica(
            env,
            index,
            scheduler_config,
            simulation.cost_model,
            collector,
            simulation.cfg.sim.idle_wait_s,
            0,
            log=log,
        )

    result = simulation.run(replica_factory=factory)
    assert result.summary["completed"] and result.summary["num_steps"] == len(log.rows)
    return log


WORKLOADS = {
    "swe_smith": (
        {"first_turn_tokens": 800, "later_turn_tokens": 60, "output_tokens": 30, "turns_min": 2, "turns_max": 3},
        {"mode": "closed", "concurrency": 4},
    ),
    "agentic_coding": (
        {
            "calls_mean": 3.0,
            "tool_pause_median": 0.05,
            "tool_pause_p90": 0.2,
            "human_pause_prob": 0.0,
            "output_max": 48,
            "output_mean": 16.0,
            "prefix_tokens_min": 200,
            "prefix_tokens_max": 400,
            "new_tokens_mean": 30.0,
            "new_tokens_max": 100,
        },
        {"session_rate": 20.0},
    ),
}


def test_calibration_on_a_synthetic_engine_recovers_its_step_time_on_the_grid(grid_rows, fitted):
    assert len(grid_rows) > 300
    errors = relative_errors(fitted, grid_rows)
    assert errors.max() < 0.01, errors.max()
    for name in ("graph", "eager"):
        assert fitted.paths[name].observed and fitted.paths[name].trimmed == 0
        assert fitted.paths[name].median_rel_err < 0.01
    assert fitted.paths["graph"].rows == sum(map(is_graph, grid_rows))
    assert fitted.paths["eager"].rows == len(grid_rows) - fitted.paths["graph"].rows


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_calibration_recovers_the_step_time_on_a_workload_outside_the_grid(tmp_path, fitted, workload):
    truth = tmp_path / "truth.json"
    truth_cost().save(truth)
    params, sim = WORKLOADS[workload]
    log = recorded_workload(truth, workload, params, **sim)
    rows = log.rows
    assert len(rows) > 100
    # the steps are of every kind the model prices (else the check below would prove little)
    assert any(map(is_graph, rows)) and not all(map(is_graph, rows))
    assert any(is_dropped(r) for r in rows) and any(r[PREFILL_ROWS] for r in rows)
    errors = relative_errors(fitted, rows)
    assert errors.max() < 0.01, (errors.max(), rows[int(errors.argmax())])
    # the recorded seconds are the truth's own (RecordingReplica logs what the replica was priced)
    assert [r["seconds"] for r in rows[:20]] == [truth_cost().step_seconds(_Row(r)) for r in rows[:20]]


class _Row:
    """A profile row as a plan-like object (the per-request rows decoded)."""

    def __init__(self, row: dict) -> None:
        for f in FEATURES:
            setattr(self, f, row[f])
        pairs = decode_prefill_rows(row[PREFILL_ROWS])
        decodes = row["num_decode_reqs"]
        self.query_lens = [q for q, _ in pairs] + [1] * decodes
        self.cached_lens = [c for _, c in pairs] + [0] * decodes
        self.block_size = 16


def test_calibration_prices_kv_copies_on_mixed_steps(tmp_path, fitted):
    # the grid swaps on pure-decode steps only: the eager path takes the graph path's copy costs
    # (sim/profile_cost.py, _share_copies), which a workload's mixed steps with swaps then pay
    truth = tmp_path / "truth.json"
    truth_cost().save(truth)
    params = {"first_turn_tokens": 1500, "later_turn_tokens": 60, "output_tokens": 200, "turns_min": 2, "turns_max": 3}
    config = {"mode": "closed", "concurrency": 6}
    log = StepLog()
    simulation = Simulation(
        {
            "model": dataclasses.asdict(load_model_spec("smollm2_135m")),
            "hardware": dataclasses.asdict(load_hardware_spec("h100_sxm")),
            "workload": {"name": "swe_smith", "params": params},
            "scheduler": {**ENGINE, "preemption": "swap"},
            "engine": {"num_gpu_blocks": 300, "num_host_blocks": 600},
            "sim": {
                "num_sessions": 12,
                "progress": False,
                "cost_model": "profile",
                "profile_path": str(truth),
                **config,
            },
            "wandb": {"mode": "disabled"},
        }
    )
    simulation.run(
        replica_factory=lambda env, i, sc, col: RecordingReplica(
            env, i, sc, simulation.cost_model, col, simulation.cfg.sim.idle_wait_s, 0, log=log
        )
    )
    assert any(not is_graph(r) and (r["num_swap_out_blocks"] or r["num_swap_in_blocks"]) for r in log.rows)
    assert relative_errors(fitted, log.rows).max() < 0.01


def test_the_grid_exercises_every_term_the_model_needs(grid_rows):
    # the same grid, run here by hand so the plans' request ids are known
    log = StepLog()
    stats = []
    for config, swap in ((MAIN, False), (SWAP, True)):
        env = simpy.Environment()
        replica = RecordingReplica(
            env,
            0,
            config,
            truth_cost(),
            Collector(1, config.num_blocks, 1e9, Slo(1.0, 1.0)),
            1e-3,
            GRID.seed,
            log=log,
        )
        run_grid(
            env,
            replica,
            GRID,
            config.vocab_size,
            log,
            config.num_blocks * config.block_size,
            config.max_model_len,
            swap_phase=swap,
        )
        stats.append(replica.scheduler.stats())
    assert log.rows == grid_rows  # calibrate_simulated runs just this
    rows = log.rows
    graph = [r for r in rows if is_graph(r)]
    eager = [r for r in rows if not is_graph(r)]
    assert len(graph) >= 100 and len(eager) >= 60
    # decode batches at every halving of the ladder, overlapped and strict
    assert {1, 2, 4, 8, 16, 32} <= {r["num_reqs"] for r in graph}
    assert any(r["continues_decode"] for r in graph) and any(not r["follows_decode"] for r in graph)
    # dropped overlap guesses: new turns arriving while others decode
    assert sum(is_dropped(r) and r["num_tokens"] > r["num_reqs"] for r in rows) >= 3
    # swaps out and in, of different sizes
    outs = {r["num_swap_out_blocks"] for r in rows if r["num_swap_out_blocks"]}
    ins = {r["num_swap_in_blocks"] for r in rows if r["num_swap_in_blocks"]}
    assert len(outs) >= 2 and len(ins) >= 2
    assert stats[1].num_preemptions_swap >= 3 and stats[0].num_preemptions_swap == 0
    # prefill chunks on cached prefixes: a request whose first step starts past 0 (a prefix-cache hit)
    first_cached = {}
    for key in log.keys:
        for rid, q, c in zip(key[1], key[2], key[3]):
            first_cached.setdefault(rid, (q, c))
    hits = [(q, c) for q, c in first_cached.values() if c > 0 and q > 1]
    assert len(hits) >= 5 and len({c for _, c in hits}) >= 3
    assert stats[0].cached_tokens > 0
    # multi-request prefill chunks, chunks without sampling, and every context length of the grid
    assert any(len(decode_prefill_rows(r[PREFILL_ROWS])) > 1 for r in rows)
    assert any(r["num_sampled"] == 0 for r in rows)
    assert max(r["kv_read_tokens"] for r in graph) >= GRID.contexts[-1]


def test_a_profile_written_and_refitted_from_the_command_line(tmp_path, grid_rows, fitted, capsys):
    csv_path = tmp_path / "profile.csv"
    spec = load_model_spec("smollm2_135m")
    meta = {
        **FIT_META,
        "model": "smollm2_135m",
        "hardware": "h100_sxm",
        "model_shape": {k: getattr(spec, k) for k in SHAPE_KEYS},
    }
    assert write_profile(csv_path, grid_rows, meta) == len(grid_rows)
    assert read_header(csv_path)[0] == meta
    out_json = tmp_path / "fits" / "p.json"
    cost = calibrate.main(["--fit", str(csv_path), "--save-to", str(out_json)])
    printed = capsys.readouterr().out
    assert f"fit: {out_json}" in printed and "graph" in printed and "eager" in printed
    saved = json.loads(out_json.read_text())
    assert saved["paths"] == json.loads(json.dumps(fitted.to_dict()["paths"]))
    assert saved["meta"]["model"] == "smollm2_135m" and saved["meta"]["source_file"] == str(csv_path)
    loaded = ProfileCost.load(out_json)
    assert relative_errors(loaded, grid_rows).max() < 0.01
    assert cost.to_dict()["paths"] == loaded.to_dict()["paths"]


def test_refit_without_save_to_writes_the_shipped_path(tmp_path, grid_rows, monkeypatch):
    monkeypatch.setattr(sim_cost, "CONF_DIR", tmp_path / "conf")
    csv_path = tmp_path / "profile.csv"
    write_profile(csv_path, grid_rows, {**FIT_META, "model": "smollm2_135m"})
    calibrate.main(["--fit", str(csv_path), "--hardware", "cpu"])
    assert ProfileCost.load(tmp_path / "conf" / "profiles" / "cpu" / "smollm2_135m.json").max_graph_batch == 32


@pytest.mark.parametrize("meta", [{}, {"model": "smollm2_135m"}, {"hardware": "h100_sxm"}])
def test_refit_of_a_profile_naming_no_model_or_hardware_exits_with_a_message(tmp_path, grid_rows, meta):
    csv_path = tmp_path / "profile.csv"
    write_profile(csv_path, grid_rows, {**FIT_META, **meta})
    with pytest.raises(SystemExit, match=r"profile\.csv: its header names no model or hardware; pass --hardware"):
        calibrate.main(["--fit", str(csv_path), "--save-to", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()


def test_refit_checks_the_shape_of_a_known_model(tmp_path, grid_rows):
    csv_path = tmp_path / "profile.csv"
    small = load_model_spec("smollm2_135m")
    write_profile(
        csv_path,
        grid_rows,
        {
            **FIT_META,
            "model": "llama3_8b",
            "hardware": "h100_sxm",
            "model_shape": {k: getattr(small, k) for k in SHAPE_KEYS},
        },
    )
    with pytest.raises(ValueError, match=r"measured on another model shape than llama3_8b"):
        calibrate.main(["--fit", str(csv_path), "--save-to", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()
