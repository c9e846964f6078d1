"""The Hydra app `python -m experiments.simulate`: a run, a sweep, typed configs, wandb offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

SMALL = ["model=smollm2_135m", "sim.num_sessions=3", "sim.progress=false", "+workload.params.calls_mean=2",
         "+workload.params.prefix_tokens_min=2000", "+workload.params.prefix_tokens_max=4000"]


def simulate(tmp_path, *args, check=True):
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "experiments.simulate", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
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
    proc = simulate(tmp_path, "-m", *SMALL, "wandb.mode=disabled", "policy=lru,ttl", f"hydra.sweep.dir={tmp_path}/sweep")
    assert "hit rate" in proc.stdout and " lru " in proc.stdout and " ttl " in proc.stdout
    assert (tmp_path / "sweep" / "comparison.md").exists() and (tmp_path / "sweep" / "comparison.png").exists()
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 2


@pytest.mark.parametrize("override, message", [
    ("sim.bogus=1", "bogus"),
    ("+model.layers=3", "layers"),
    ("sim.session_rate=-1", "sim.session_rate must be positive"),
    ("hardware.mem_bytes=1.0e+9", "does not fit|weights"),
])
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
        "    def key(self, r): return -r.arrival_time\n")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.simulate", *SMALL, "wandb.mode=disabled", "policy=python_examples",
         "policy.ordering=newest_first", "policy.modules=[controlplane.examples,my_policies]", "cluster=round_robin_4",
         "cluster.router=always_last", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, env={**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["ordering"], summary["eviction"], summary["router"]) == ("newest_first", "hit_weighted_lru",
                                                                             "always_last")
    table = pd.read_csv(tmp_path / "run" / "requests.csv")
    assert set(table["replica"]) == {3}  # every call went where the Python router said
    bad = simulate(tmp_path, *SMALL, "wandb.mode=disabled", "policy.modules=[no_such_module]",
                   f"hydra.run.dir={tmp_path}/bad", check=False)
    assert bad.returncode != 0 and "policy module 'no_such_module' could not be imported" in bad.stdout + bad.stderr
