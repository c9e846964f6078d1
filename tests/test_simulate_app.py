"""The Hydra app `python -m experiments.simulate`: a run, a sweep, typed configs, wandb offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from helpers import run_simulate_app

SMALL = [
    "model=smollm2_135m",
    "sim.num_sessions=3",
    "sim.progress=false",
    "+workload.params.calls_mean=2",
    "+workload.params.prefix_tokens_min=2000",
    "+workload.params.prefix_tokens_max=4000",
]


def simulate(tmp_path, *args, check=True):
    proc = run_simulate_app(tmp_path, *args)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_one_run_writes_summary_table_and_plots(tmp_path):
    simulate(tmp_path, *SMALL, "wandb.mode=disabled", f"hydra.run.dir={tmp_path}/run")
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "smollm2_135m" and summary["workload"] == "agentic_coding"
    assert summary["num_sessions"] == 3 and summary["completed"]
    table = pd.read_csv(out / "requests.csv")
    assert len(table) == summary["num_requests"] > 0
    for png in ("latency_cdf.png", "kv_usage.png", "throughput.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / ".hydra" / "config.yaml").exists()


def test_sweep_prints_a_comparison(tmp_path):
    proc = simulate(
        tmp_path, "-m", *SMALL, "wandb.mode=disabled", "policy=lru,ttl", f"hydra.sweep.dir={tmp_path}/sweep"
    )
    assert "hit rate" in proc.stdout and " lru " in proc.stdout and " ttl " in proc.stdout
    assert (tmp_path / "sweep" / "comparison.md").exists() and (tmp_path / "sweep" / "comparison.png").exists()
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("sim.bogus=1", "bogus"),
        ("+model.layers=3", "layers"),
        ("sim.session_rate=-1", "sim.session_rate must be positive"),
        ("scheduler.idle_chunk_size=-1", "scheduler.idle_chunk_size must be >= 0"),
        ("hardware.mem_bytes=1.0e+9", "does not fit|weights"),
    ],
)
def test_bad_configs_fail_with_a_message(tmp_path, override, message):
    proc = simulate(tmp_path, *SMALL, "wandb.mode=disabled", override, f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode != 0
    import re

    assert re.search(message, proc.stdout + proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_wandb_offline_logs_the_run(tmp_path):
    simulate(tmp_path, *SMALL, "wandb.mode=offline", f"hydra.run.dir={tmp_path}/run")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_python_policies_are_selected_from_the_command_line(tmp_path):
    # A user's policy module (not part of Tandem) registering a router and an ordering, picked by name.
    (tmp_path / "my_policies.py").write_text(
        "import controlplane as cp\n"
        "@cp.register_policy('router', 'always_last')\n"
        "class AlwaysLast(cp.RouterPolicy):\n"
        "    def route(self, call, replicas): return len(replicas) - 1\n"
        "@cp.register_policy('ordering', 'newest_first')\n"
        "class NewestFirst(cp.OrderingPolicy):\n"
        "    def key(self, r): return -r.arrival_time\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.simulate",
            *SMALL,
            "wandb.mode=disabled",
            "policy=python_examples",
            "scheduler.ordering=newest_first",
            "scheduler.policy_modules=[controlplane.examples,my_policies]",
            "cluster=round_robin_4",
            "cluster.router=always_last",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
        env={**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["ordering"], summary["eviction"], summary["router"]) == (
        "newest_first",
        "hit_weighted_lru",
        "always_last",
    )
    table = pd.read_csv(tmp_path / "run" / "requests.csv")
    assert set(table["replica"]) == {3}  # every call went where the Python router said
    bad = simulate(
        tmp_path,
        *SMALL,
        "wandb.mode=disabled",
        "scheduler.policy_modules=[no_such_module]",
        f"hydra.run.dir={tmp_path}/bad",
        check=False,
    )
    assert bad.returncode != 0 and "policy module 'no_such_module' could not be imported" in bad.stdout + bad.stderr


def test_the_plain_command_is_quiet_and_prints_plain_numbers(tmp_path):
    # No WANDB_SILENT here: the default wandb.mode=offline must not print wandb's banner and tables.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.simulate", *SMALL, f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "wandb:" not in out and "np.float64" not in out and "np.int64" not in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"3 of 3 sessions, {summary['num_requests']} requests" in out
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1  # still logged


def test_the_default_simulation_is_a_sensible_load(tmp_path):
    # conf/config.yaml as it ships: it gave TTFT p50 79 s and SLO met 8.6% (0.2 sessions/s, 200 sessions)
    proc = simulate(tmp_path, "output.plots=false", "wandb.mode=disabled", f"hydra.run.dir={tmp_path}/run")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s["workload"], s["num_sessions"], s["completed"]) == ("agentic_coding", 120, True)
    assert s["ttft_s_p50"] < 0.5 and s["slo_ttft_attainment"] > 0.9 and s["warnings"] == []
    assert "overloaded" not in proc.stdout + proc.stderr


def test_a_heavily_overloaded_run_prints_a_warning(tmp_path):
    # the old default: agentic_coding at the generator's own 0.2 sessions/s, 200 sessions, one H100
    proc = simulate(
        tmp_path,
        "sim.progress=false",
        "wandb.mode=disabled",
        "output.plots=false",
        "sim.num_sessions=200",
        "sim.session_rate=0.2",
        f"hydra.run.dir={tmp_path}/run",
    )
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "overloaded: only" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"]


def test_a_trace_replays_every_session_from_a_path_relative_to_the_launch_dir(tmp_path):
    from sim.workloads import Session, Turn, write_trace

    sessions = [Session(f"s{i}", i * 0.5, -1, 0, (Turn(50, 3, 0.1), Turn(20, 2, 0.0))) for i in range(250)]
    write_trace(str(tmp_path / "mine.jsonl"), sessions)
    trace = [
        "model=smollm2_135m",
        "workload=trace",
        "workload.params.path=mine.jsonl",
        "sim.progress=false",
        "wandb.mode=disabled",
        "output.plots=false",
    ]
    proc = simulate(tmp_path, *trace, f"hydra.run.dir={tmp_path}/all")
    assert "250 of 250 sessions, 500 requests" in proc.stdout + proc.stderr
    capped = simulate(tmp_path, *trace, "sim.num_sessions=100", f"hydra.run.dir={tmp_path}/capped")
    assert "100 of 100 sessions, 200 requests" in capped.stdout + capped.stderr
    assert "replayed the first 100 of the trace's 250 sessions" in capped.stdout + capped.stderr


def test_a_missing_trace_file_is_reported_before_the_run_with_its_path(tmp_path):
    proc = simulate(
        tmp_path,
        "workload=trace",
        "workload.params.path=nowhere/t.jsonl",
        "wandb.mode=disabled",
        f"hydra.run.dir={tmp_path}/run",
        check=False,
    )
    assert proc.returncode != 0
    assert f"no such trace file '{tmp_path}/nowhere/t.jsonl'" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_changed_hardware_rates_are_named_in_the_summary_and_the_sweep_table(tmp_path):
    proc = simulate(
        tmp_path,
        "-m",
        *SMALL,
        "wandb.mode=disabled",
        "output.plots=false",
        "hardware.mem_bandwidth=2.0e12,3.35e12",
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    out = proc.stdout
    assert "smollm2_135m on (varies) x1" in out
    assert "h100_sxm (modified: mem_bandwidth=2e+12)" in out  # its own column in the table
    rows = [line for line in out.splitlines() if line.strip().startswith("lru")]
    assert len(rows) == 2 and rows[1].split()[1] == "h100_sxm"
