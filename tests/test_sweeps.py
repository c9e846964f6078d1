"""Sweeps beyond one process (docs/sweeps.md): the Ray and submitit launchers give joblib's numbers,
the sweep's comparison table and wandb runs; the Optuna driver tells each trial its run's objective."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = [
    "model=smollm2_135m",
    "sim.num_sessions=3",
    "sim.progress=false",
    "+workload.params.calls_mean=2",
    "+workload.params.prefix_tokens_min=2000",
    "+workload.params.prefix_tokens_max=4000",
    "output.plots=false",
]
TWO_POINTS = [*SMALL, "policy=lru,ttl", "sim.seed=3"]
WALL_CLOCK = {"wall_seconds", "requests_per_wall_min", "steps_per_wall_s"}  # differ run to run


def app(cwd: Path, module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def summaries(sweep: Path) -> dict[str, dict]:
    """Each run's summary.json by its job dir (0_lru, 1_ttl), less the wall-clock figures."""
    return {
        p.parent.name: {k: v for k, v in json.loads(p.read_text()).items() if k not in WALL_CLOCK}
        for p in sorted(sweep.glob("*/summary.json"))
    }


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("joblib") / "sweep"
    app(
        sweep.parent,
        "experiments.simulate",
        "-m",
        *TWO_POINTS,
        "wandb.mode=disabled",
        "hydra/launcher=joblib",
        f"hydra.sweep.dir={sweep}",
    )
    assert sorted(summaries(sweep)) == ["0_lru", "1_ttl"]
    return sweep


def assert_same_sweep(sweep: Path, reference: Path) -> None:
    assert summaries(sweep) == summaries(reference)
    assert (sweep / "comparison.md").read_text() == (reference / "comparison.md").read_text()
    assert (sweep / "comparison.png").stat().st_size > 1000
    for job in ("0_lru", "1_ttl"):  # wandb logged each run, offline, into its own job dir
        assert len(list((sweep / job / "wandb").glob("offline-run-*/*.wandb"))) == 1


@pytest.mark.parametrize("launcher", ["ray", "submitit_local"])
def test_launcher_sweep_matches_joblib(tmp_path, joblib_sweep, launcher):
    # ray: a local Ray instance the launcher starts (address=local: its own, never one an earlier run's Ray
    # left running for a moment, which ray.init would otherwise join and then refuse the plugin's
    # object_store_memory); submitit_local: one process per job, as on SLURM
    sweep = tmp_path / "sweep"
    own = ["hydra.launcher.ray.init.address=local"] if launcher == "ray" else []
    proc = app(
        tmp_path,
        "experiments.simulate",
        "-m",
        *TWO_POINTS,
        "wandb.mode=offline",
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep}",
        *own,
    )
    assert " lru " in proc.stdout and " ttl " in proc.stdout  # the comparison table
    assert_same_sweep(sweep, joblib_sweep)


def test_ray_cluster_launcher_joins_an_existing_two_node_cluster(tmp_path, joblib_sweep):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        sweep = tmp_path / "sweep"
        app(
            tmp_path,
            "experiments.simulate",
            "-m",
            *TWO_POINTS,
            "wandb.mode=offline",
            "hydra/launcher=ray_cluster",
            f"hydra.sweep.dir={sweep}",
            env={"RAY_ADDRESS": cluster.address},
        )
        assert_same_sweep(sweep, joblib_sweep)
    finally:
        cluster.shutdown()


def test_optuna_trials_are_told_their_runs_objective(tmp_path):
    study = tmp_path / "study.yaml"
    overrides = ["policy=ttl", "scheduler.eviction='ttl:ttl={ttl}'", *SMALL]
    study.write_text(
        "\n".join(
            [
                "objective: ttft_s_p90",
                "direction: minimize",
                "params:",
                "  ttl: choice(0, 300)",
                "overrides:",
                *(f"  - {o}" for o in overrides),
                "n_trials: 3",
                "batch_size: 2",
            ]
        )
    )
    sweep = tmp_path / "sweep"
    proc = app(
        tmp_path,
        "experiments.sweep_optuna",
        str(study),
        "wandb.mode=disabled",
        "hydra/launcher=joblib",
        f"hydra.sweep.dir={sweep}",
    )
    runs = summaries(sweep)
    assert sorted(runs) == ["0_ttl", "1_ttl", "2_ttl"]
    assert " ttl " in proc.stdout  # the app's comparison table closes the study as it does a sweep
    trials = (sweep / "optuna_trials.csv").read_text().splitlines()[1:]
    told = {int(t.split(",")[0]): float(t.split(",")[1]) for t in trials}
    assert told == {int(job.split("_")[0]): s["ttft_s_p90"] for job, s in runs.items()}
    best = json.loads((sweep / "optuna_best.json").read_text())
    assert best["value"] == min(told.values())
    assert f"scheduler.eviction='ttl:ttl={best['params']['ttl']}'" in best["overrides"]
    assert runs[f"{best['trial']}_ttl"]["eviction"] == f"ttl:ttl={best['params']['ttl']}"


def test_study_files_load_and_their_params_map_to_optuna_distributions():
    import optuna

    from experiments.sweep_optuna import STUDIES, distribution, load_study, trial_overrides

    assert distribution("tag(log, interval(0.01, 300))") == optuna.distributions.FloatDistribution(0.01, 300, log=True)
    assert distribution("tag(int, interval(1, 8))") == optuna.distributions.IntDistribution(1, 8)
    assert distribution("range(2, 10, 2)") == optuna.distributions.IntDistribution(2, 8, step=2)
    assert distribution("choice(lru, ttl)") == optuna.distributions.CategoricalDistribution(["lru", "ttl"])
    for path in sorted(STUDIES.glob("*.yaml")):
        study = load_study(path.stem)
        params = {name: distribution(expr) for name, expr in study.params.items()}
        assert all("{" not in o for o in trial_overrides(study, {n: d.low for n, d in params.items()}))
    with pytest.raises(ValueError, match="appear in no override"):
        load_study(str(STUDIES / "ttl_ttft_p90.yaml"), params={"ttl": "interval(1, 2)", "unused": "interval(1, 2)"})
