"""The fidelity pipeline end to end on the CPU: calibrate a tiny random-weight Llama, then run the Hydra app
`python -m experiments.fidelity` on it (engine in real time, twin, replay) and render its report again.

CPU step times are noisy: nothing here asserts accuracy, only what was run and written, and that the
simulator fed the measured step times planned exactly as the engine did (the replay).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from controlplane.profile import FEATURES, PREFILL_ROWS, read_header, write_profile
from experiments.calibrate import GridSpec, calibrate_engine
from sim.profile_cost import SHAPE_KEYS, ProfileCost
from sim.specs import load_model_spec

from engine_helpers import tiny_config

ENGINE = {"num_gpu_blocks": 512, "max_num_seqs": 16, "chunk_size": 256, "max_num_batched_tokens": 512}
GRID = GridSpec(
    contexts=(64, 256),
    prefill_budget=2048,
    max_batch=8,
    steps_per_level=3,
    probe_lengths=(16, 128),
    arrival_lengths=(40, 200),
    swap_context=256,
)
MODEL_YAML = """\
name: tiny
num_layers: 2
hidden_size: 128
num_heads: 8
num_kv_heads: 2
head_dim: 32
intermediate_size: 256
vocab_size: 1024
dtype_bytes: 4
"""
AGENTIC = (
    "{calls_mean: 2.0, tool_pause_median: 0.05, tool_pause_p90: 0.2, human_pause_prob: 0.0, output_max: 48, "
    "output_mean: 16.0, prefix_tokens_min: 200, prefix_tokens_max: 400, new_tokens_mean: 30.0, "
    "new_tokens_max: 100}"
)
APP_CONFIG = """\
defaults:
  - fidelity_schema
  - _self_
model: {d}/tiny.yaml
engine_model: {d}/config.json
hardware: cpu
profile_path: {d}/profile.json
device: cpu
warmup: false
engine: {engine}
server: false
report: {d}/out/fidelity.md
plots_dir: {d}/out/plots
out_dir: {d}/out
command: python -m experiments.fidelity --config-name tiny
runs:
  - {{name: swe, workload: swe_smith, params: {{first_turn_tokens: 300, later_turn_tokens: 40, output_tokens: 12,
     turns_min: 2, turns_max: 2}}, mode: closed, concurrency: 2, sessions: 2, policy: lru}}
  - {{name: ag_lru, workload: agentic_coding, params: {agentic}, mode: open, session_rate: 20.0, sessions: 4,
     policy: lru, kv_blocks: 60, group: ag}}
  - {{name: ag_ttl, workload: agentic_coding, params: {agentic}, mode: open, session_rate: 20.0, sessions: 4,
     policy: ttl, eviction: "ttl:ttl=1", kv_blocks: 60, group: ag}}
hydra:
  run:
    dir: {d}/hydra
  job:
    chdir: false
"""
RUNS = ["swe", "ag_lru", "ag_ttl"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny model's files, its calibration on the CPU (rows, meta), the profile CSV and its fit."""
    d = tmp_path_factory.mktemp("fidelity")
    config = tiny_config("LlamaForCausalLM", vocab_size=1024, max_position_embeddings=4096)
    (d / "config.json").write_text(json.dumps(config.to_hf()))
    (d / "tiny.yaml").write_text(MODEL_YAML)
    spec = load_model_spec(str(d / "tiny.yaml"))
    rows, meta = calibrate_engine(
        spec,
        str(d / "config.json"),
        GRID,
        hardware="cpu",
        device="cpu",
        engine_options=dict(ENGINE),
        progress=lambda line: None,
    )
    write_profile(d / "profile.csv", rows, meta)
    cost = ProfileCost.fit(d / "profile.csv", model=spec)
    cost.save(d / "profile.json")
    return d, spec, rows, meta, cost


@pytest.fixture(scope="module")
def app_run(calibrated):
    d = calibrated[0]
    (d / "hcfg").mkdir()
    (d / "hcfg" / "tiny.yaml").write_text(APP_CONFIG.format(d=d, engine=json.dumps(ENGINE), agentic=AGENTIC))
    proc = fidelity_app(d, "--config-path", str(d / "hcfg"), "--config-name", "tiny")
    return d, proc


def fidelity_app(cwd, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.fidelity", *args],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_calibration_on_the_cpu_writes_a_profile_that_fits(calibrated):
    d, spec, rows, meta, cost = calibrated
    assert meta["model"] == "tiny" and meta["hardware"] == "cpu" and meta["device"] == "cpu"
    assert meta["model_shape"] == {k: getattr(spec, k) for k in SHAPE_KEYS}
    assert meta["grid"] == dataclasses.asdict(GRID) and meta["rows"] == len(rows)
    assert meta["max_graph_batch"] == 0 and meta["graph_batch_sizes"] == [] and meta["num_blocks"] == 512
    assert read_header(d / "profile.csv")[0] == json.loads(json.dumps(meta))
    for row in rows:
        assert set(FEATURES) | {"seconds", "run_seconds", "start", PREFILL_ROWS} <= set(row)
        assert row["seconds"] > 0 and row["seconds"] >= row["run_seconds"] > 0
    # the ladder's decode batches, prefill chunks, and the swap phase on its own small engine
    assert {1, 2, 4, 8} <= {r["num_reqs"] for r in rows if r["num_tokens"] == r["num_reqs"]}
    assert any(r["num_swap_out_blocks"] for r in rows) and any(r["num_swap_in_blocks"] for r in rows)
    # no graphs on the CPU: every step is eager
    assert not cost.paths["graph"].observed and cost.max_graph_batch == 0
    assert cost.paths["eager"].rows == len(rows) and cost.meta["overlap"] == meta["overlap"]
    assert all(c >= 0 for _, _, c in cost.paths["eager"].terms)
    assert ProfileCost.load(d / "profile.json").to_dict()["paths"] == json.loads(json.dumps(cost.to_dict()["paths"]))


def test_the_fidelity_app_runs_engine_twin_and_replay_and_writes_the_report(app_run):
    d, proc = app_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = d / "out"
    results = json.loads((out / "results.json").read_text())
    assert [r["run"]["name"] for r in results["runs"]] == RUNS
    assert results["meta"]["hardware"] == "cpu" and results["meta"]["model"] == "tiny"
    assert results["profile"]["path"] == str(d / "profile.json")
    for r in results["runs"]:
        name = r["run"]["name"]
        # the simulator fed the engine's measured step times planned exactly as the engine did
        assert r["replay_equal"] is True, (name, r["replay_detail"])
        steps = r["steps"]
        n = len(steps["measured"])
        assert n > 5 and r["replay_detail"] == f"{n} plans and start times equal"
        assert len(steps["predicted"]) == len(steps["features"]) == len(steps["prefill_rows"]) == n
        assert all(m > 0 for m in steps["measured"]) and all(p > 0 for p in steps["predicted"])
        assert r["engine"]["num_steps"] == n
        assert r["engine"]["completed"] and r["twin"]["completed"]
        assert r["num_blocks"] == (512 if name == "swe" else 60)
        assert r["twin"]["cost_model"] == "profile"
        assert len(r["requests"]["engine"]["ttft"]) == r["engine"]["num_requests"]
    assert (out / "profile.json").is_file()
    report = (out / "fidelity.md").read_text()
    assert report.startswith("# The twin against the engine (fidelity)")
    assert "## Targets\n\n| target | measured | bound | met |" in report
    assert "| replayed plan sequence equals the engine's | 3 | 3 | yes |" in report
    assert "## Per run" in report and "## Policy ranking" in report and "## Through the server" not in report
    for name in RUNS:
        assert report.count(f"\n### {name}\n") == 1
    assert report.index("### swe") < report.index("### ag_lru") < report.index("### ag_ttl")
    assert "engine order:" in report
    for png in ("steps.png", "ttft.png", "tpot.png"):
        assert (out / "plots" / png).stat().st_size > 1000
        assert f"(plots/{png})" in report
    assert "report: " in proc.stdout


def test_render_rewrites_the_report_of_a_past_run_without_running(app_run):
    d, proc = app_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = (d / "out" / "fidelity.md").read_text()
    rendered = d / "rendered"
    again = fidelity_app(
        d,
        "--config-path",
        str(d / "hcfg"),
        "--config-name",
        "tiny",
        f"render={d / 'out' / 'results.json'}",
        f"report={rendered / 'fidelity.md'}",
        f"plots_dir={rendered / 'plots'}",
        f"out_dir={rendered}",
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "engine ..." not in again.stdout  # nothing ran
    assert not (rendered / "results.json").exists() and not (rendered / "profile.json").exists()
    assert (rendered / "fidelity.md").read_text() == first  # the same report from the same results
    for png in ("steps.png", "ttft.png", "tpot.png"):
        assert (rendered / "plots" / png).stat().st_size > 1000
