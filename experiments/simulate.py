"""The simulator's Hydra app.

    python -m experiments.simulate                                   # conf/config.yaml defaults
    python -m experiments.simulate policy=ttl workload=swe_smith sim=closed sim.concurrency=4
    python -m experiments.simulate -m policy=lru,ttl,lpm_lru hydra/launcher=joblib   # a sweep

Each run writes summary.json, requests.csv and PNG plots into its Hydra run
directory and logs them to wandb (offline unless wandb.mode=online). A sweep
ends with a comparison table (printed and written as comparison.md) and
comparison.png in the sweep directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from controlplane.cli import fix_sys_argv
from sim.config import SimulationConfig
from sim.report import SUMMARY_FILE, format_table, plot_comparison, write_outputs
from sim.simulation import Simulation

log = logging.getLogger(__name__)

schema = OmegaConf.structured(SimulationConfig)
OmegaConf.set_readonly(schema.scheduler, False)  # a frozen dataclass: Hydra merges conf/scheduler/ onto it
ConfigStore.instance().store(name="simulation_schema", node=schema)


def run(cfg: DictConfig, out_dir: str | Path = ".") -> dict:
    """Validates, simulates, writes the outputs and logs to wandb; returns the summary (with its notes)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    _paths_from_launch_dir(container)
    simulation = Simulation(container)  # bad configs fail here, before simulated time passes
    result = simulation.run()
    out = Path(out_dir) / cfg.output.dir
    paths = write_outputs(result, out, plots=cfg.output.plots, requests_table=cfg.output.requests_table)
    _log_wandb(cfg, container, result, paths)
    return {**result.summary, "notes": list(result.notes), "warnings": list(result.warnings)}


def _paths_from_launch_dir(container: dict) -> None:
    """Relative file paths in the config are relative to where the command ran, not to the run
    directory Hydra changes into (hydra.job.chdir)."""
    params, sim = container["workload"].get("params") or {}, container["sim"]
    if params.get("path"):
        params["path"] = to_absolute_path(params["path"])
    if sim.get("profile_path"):
        sim["profile_path"] = to_absolute_path(sim["profile_path"])


def summary_lines(summary: dict) -> list[str]:
    """What a run prints: what ran, its headline figures in plain numbers, then its notes
    (`summary["warnings"]` are logged apart, as warnings)."""
    s = summary
    ran = (
        f"summary: {s['model']} on {s['hardware']} x{s['num_replicas']}, {s['workload']}, policy {s['policy']}: "
        f"{s['num_sessions']} of {s['num_sessions_planned']} sessions, {s['num_requests']} requests"
    )
    if "ttft_s_p50" not in s:
        return [ran, *s.get("notes", [])]
    figures = (
        f"prefix hit {s['prefix_hit_rate']:.1%}, TTFT p50 {s['ttft_s_p50']:.2f} s p90 {s['ttft_s_p90']:.2f} s, "
        f"TPOT p50 {s['tpot_s_p50'] * 1e3:.1f} ms, GPU {s['per_gpu_output_tok_s']:.0f} output tok/s, "
        f"SLO met {s['slo_attainment']:.1%} (TTFT {s['slo_ttft_attainment']:.1%}, "
        f"TPOT {s['slo_tpot_attainment']:.1%}), tokens at the floor {s['floor_token_share']:.1%}; "
        f"{s['simulated_seconds']:.0f} simulated s in {s['wall_seconds']:.1f} s"
    )
    lines = [ran, figures]
    if s.get("num_admission_cuts") or s.get("num_held_too_long") or s.get("num_held_waiting"):
        lines.append(
            f"admission: {s['num_admission_cuts']} chunks cut or held, {s['num_held_too_long']} requests admitted "
            f"past its max wait, {s['num_held_waiting']} still held past it"
        )
    if "lookahead_decisions" in s:
        lines.append(
            f"look-ahead: {s['lookahead_decisions']} decisions, {s['lookahead_switches']} switches, "
            f"{s['lookahead_snapshot_ms']:.2f} ms a snapshot, {s['lookahead_forward_ms']:.1f} ms of forward runs"
        )
    return [*lines, *s.get("notes", [])]


def _log_wandb(cfg: DictConfig, container: dict, result, paths: dict) -> None:
    if cfg.wandb.mode == "disabled":
        return
    import wandb

    # Offline (the default) is quiet: wandb's banner and run tables would bury the summary. Online
    # keeps wandb's own lines (the run's URL).
    settings = wandb.Settings(silent=True) if cfg.wandb.mode == "offline" else None
    run = wandb.init(
        project=cfg.wandb.project,
        group=cfg.wandb.group,
        mode=cfg.wandb.mode,
        config=container,
        name=f"{cfg.policy.name}-{cfg.workload.name}-s{cfg.sim.seed}",
        dir=".",
        reinit="finish_previous",
        settings=settings,
    )
    try:
        numbers = {k: v for k, v in result.summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run.summary.update(numbers)
        run.log(numbers)
        table = result.requests
        if len(table) > 20_000:
            table = table.sample(20_000, random_state=0).sort_values("request_id")
        run.log({"requests": wandb.Table(dataframe=table)})
        for kind, path in paths.items():
            if str(path).endswith(".png"):
                run.log({kind: wandb.Image(str(path))})
    finally:
        run.finish()


class CompareRuns(Callback):
    """At the end of a sweep: a comparison table (stdout and comparison.md) and comparison.png."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summaries = []
        for path in sorted(sweep_dir.glob(f"*/{SUMMARY_FILE}"), key=lambda p: int(p.parent.name.split("_")[0])):
            summaries.append(json.loads(path.read_text()))
        if not summaries:
            return
        table = format_table(summaries)
        header = _sweep_header(summaries)
        print(f"\n{header}\n{table}\n")
        (sweep_dir / "comparison.md").write_text(f"{header}\n\n```\n{table}\n```\n")
        plot_comparison(summaries, sweep_dir)
        print(f"results: {sweep_dir}/*/summary.json, requests.csv, *.png; comparison: {sweep_dir}/comparison.png")


def _sweep_header(summaries: list[dict]) -> str:
    """What the runs of a sweep share (what differs has a column in the table)."""

    def common(key: str) -> str:
        values = {str(s[key]) for s in summaries}
        return values.pop() if len(values) == 1 else "(varies)"

    requests = sorted({s["num_requests"] for s in summaries})
    per_run = f"{requests[0]}" if len(requests) == 1 else f"{requests[0]}-{requests[-1]}"
    return (
        f"{common('model')} on {common('hardware')} x{common('num_replicas')}, workload {common('workload')}, "
        f"{per_run} requests per run"
        + (" (roofline with zero overhead: physical lower bounds)" if summaries[0].get("physical_limit") else "")
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    summary = run(cfg)
    for line in summary_lines(summary):
        log.info("%s", line)
    for line in summary.get("warnings", []):
        log.warning("%s", line)


if __name__ == "__main__":
    fix_sys_argv()
    main()
