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
from omegaconf import DictConfig, OmegaConf

from sim.config import SimulationConfig
from sim.report import SUMMARY_FILE, format_table, plot_comparison, write_outputs
from sim.simulation import Simulation

log = logging.getLogger(__name__)

ConfigStore.instance().store(name="simulation_schema", node=SimulationConfig)


def run(cfg: DictConfig, out_dir: str | Path = ".") -> dict:
    """Validates, simulates, writes the outputs and logs to wandb; returns the summary."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    simulation = Simulation(container)  # bad configs fail here, before simulated time passes
    result = simulation.run()
    out = Path(out_dir) / cfg.output.dir
    paths = write_outputs(result, out, plots=cfg.output.plots, requests_table=cfg.output.requests_table)
    _log_wandb(cfg, container, result, paths)
    return result.summary


def _log_wandb(cfg: DictConfig, container: dict, result, paths: dict) -> None:
    if cfg.wandb.mode == "disabled":
        return
    import wandb

    run = wandb.init(project=cfg.wandb.project, group=cfg.wandb.group, mode=cfg.wandb.mode, config=container,
                     name=f"{cfg.policy.name}-{cfg.workload.name}-s{cfg.sim.seed}", dir=".", reinit="finish_previous")
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
        first = summaries[0]
        header = (f"{first['model']} on {first['hardware']} x{first['num_replicas']}, workload {first['workload']}, "
                  f"{first['num_requests']} requests per run"
                  + (" (roofline with zero overhead: physical lower bounds)" if first.get("physical_limit") else ""))
        print(f"\n{header}\n{table}\n")
        (sweep_dir / "comparison.md").write_text(f"{header}\n\n```\n{table}\n```\n")
        plot_comparison(summaries, sweep_dir)
        print(f"results: {sweep_dir}/*/summary.json, requests.csv, *.png; comparison: {sweep_dir}/comparison.png")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    summary = run(cfg)
    keys = ("num_requests", "prefix_hit_rate", "ttft_s_p50", "tpot_s_p50", "per_user_tok_s_p50",
            "per_gpu_output_tok_s", "wall_seconds")
    log.info("summary: %s", {k: summary.get(k) for k in keys})


if __name__ == "__main__":
    main()
