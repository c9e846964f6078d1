"""Optuna search over a policy's parameters, each trial a run of the simulator's Hydra app.

    python -m experiments.sweep_optuna ttl_goodput                       # conf/hydra/optuna/ttl_goodput.yaml
    python -m experiments.sweep_optuna ttl_goodput --trials 40 hydra/launcher=ray sim.seed=1

Trials go through the app's configured Hydra launcher (basic, joblib, ray, submitit) in batches of
`batch_size`, into one sweep directory, which ends with the app's comparison table as a `-m` sweep
does. Why a driver and not hydra-optuna-sweeper, and the study file format: docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra import initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, RunMode
from omegaconf import OmegaConf

from experiments.simulate import run

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STUDIES = CONF_DIR / "hydra" / "optuna"


@dataclass(frozen=True)
class StudyConf:
    """A search: which summary.json number to optimise, over which parameters, on which runs."""

    objective: str  # a summary.json key: goodput_req_s_per_gpu, ttft_s_p90, ...
    direction: str  # maximize | minimize
    params: dict[str, str]  # name -> interval(a, b) | range(a, b[, step]) | choice(...), tag(log, ...)
    overrides: list[str]  # the app's overrides; "{name}" takes the trial's value
    n_trials: int = 20
    batch_size: int = 2  # trials launched together (in parallel through the launcher)
    seed: int = 0  # the TPE sampler's
    storage: str | None = None  # e.g. sqlite:///study.db to resume; None: in memory
    study_name: str | None = None  # None: the study file's name


def load_study(name: str, **replace: Any) -> StudyConf:
    """Reads conf/hydra/optuna/<name>.yaml (or a path) into a StudyConf; unknown keys are errors."""
    path = Path(name) if name.endswith(".yaml") else STUDIES / f"{name}.yaml"
    conf = OmegaConf.merge(
        OmegaConf.structured(StudyConf),
        {"study_name": path.stem},
        OmegaConf.load(path),
        {k: v for k, v in replace.items() if v is not None},
    )
    study: StudyConf = OmegaConf.to_object(conf)
    if study.direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be maximize or minimize, not {study.direction!r}")
    unused = [p for p in study.params if not any(f"{{{p}" in o for o in study.overrides)]
    if unused:
        raise ValueError(f"params {unused} appear in no override (write e.g. scheduler.eviction='ttl:ttl={{ttl}}')")
    return study


def distribution(expr: str) -> optuna.distributions.BaseDistribution:
    """A Hydra sweep expression as an Optuna distribution (the syntax of hydra-optuna-sweeper).

    interval(a, b): float in [a, b]; tag(int, interval(a, b)): int; range(a, b, step): a, a+step, .. < b;
    choice(x, y, ..): categorical. tag(log, ...) samples on a log scale.
    """
    value = OverridesParser.create().parse_override(f"param={expr}").value()
    log_scale = "log" in getattr(value, "tags", ())
    if isinstance(value, ChoiceSweep):
        return optuna.distributions.CategoricalDistribution(value.list)
    if isinstance(value, RangeSweep):
        values = list(_range(value.start, value.stop, value.step))
        if all(isinstance(v, int) for v in values):
            return optuna.distributions.IntDistribution(values[0], values[-1], step=value.step, log=log_scale)
        return optuna.distributions.FloatDistribution(values[0], values[-1], step=value.step, log=log_scale)
    if isinstance(value, IntervalSweep):
        if "int" in value.tags:
            return optuna.distributions.IntDistribution(int(value.start), int(value.end), log=log_scale)
        return optuna.distributions.FloatDistribution(value.start, value.end, log=log_scale)
    raise ValueError(f"{expr!r} is not interval(..), range(..) or choice(..)")


def _range(start, stop, step):
    while start < stop:
        yield start
        start += step


def trial_overrides(study: StudyConf, params: dict[str, Any]) -> list[str]:
    """The app's overrides for one trial: the study's, each "{name}" replaced by the trial's value."""
    return [o.format(**params) for o in study.overrides]


def objective_value(study: StudyConf, ret: JobReturn) -> float | None:
    """The trial's objective from its run's summary; None when the run failed or gave no number."""
    if ret.status != JobStatus.COMPLETED:
        log.warning("the run in %s failed: %r", ret.working_dir, ret._return_value)  # the exception
        return None
    summary = ret.return_value
    if study.objective not in summary:
        raise KeyError(f"objective {study.objective!r} is not a summary key; keys: {sorted(summary)}")
    value = summary[study.objective]
    return None if value is None or math.isnan(value) else float(value)


def optimize(study: StudyConf, app_overrides: Sequence[str] = ()) -> optuna.Study:
    """Runs the study's trials through the app's Hydra launcher; returns the Optuna study.

    Args:
        study: the search.
        app_overrides: the app's command-line overrides, applied after the study's to every trial
            (hydra/launcher=ray, hydra.sweep.dir=..., sim.seed=1, ...); later overrides win.
    """
    space = {name: distribution(expr) for name, expr in study.params.items()}
    sampler = optuna.samplers.TPESampler(seed=study.seed, constant_liar=study.batch_size > 1)
    optuna_study = optuna.create_study(
        direction=study.direction,
        sampler=sampler,
        storage=study.storage,
        study_name=study.study_name,
        load_if_exists=study.storage is not None,
    )
    static = [o for o in study.overrides if "{" not in o]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="simulate"):
        hydra = GlobalHydra.instance().hydra
        cfg = hydra.compose_config("config", [*static, *app_overrides], RunMode.MULTIRUN, with_log_configuration=True)
        task_overrides = [o for o in OmegaConf.to_container(cfg.hydra.overrides.task) if o not in static]
        callbacks = Callbacks(cfg)
        callbacks.on_multirun_start(config=cfg, config_name="config")
        launcher = Plugins.instance().instantiate_launcher(
            config=cfg,
            hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
            task_function=run,
        )
        sweep_dir = Path(str(cfg.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        done = 0
        while done < study.n_trials:
            trials = [optuna_study.ask(space) for _ in range(min(study.batch_size, study.n_trials - done))]
            batch = [[*trial_overrides(study, t.params), *task_overrides] for t in trials]
            # job numbers are trial numbers: trial 7 ran in 7_<policy>/
            for trial, ret in zip(trials, launcher.launch(batch, initial_job_idx=trials[0].number)):
                value = objective_value(study, ret)
                if value is None:
                    optuna_study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    optuna_study.tell(trial, value)
            done += len(trials)
        _write_results(study, optuna_study, sweep_dir)
        callbacks.on_multirun_end(config=cfg, config_name="config")
    return optuna_study


def _write_results(study: StudyConf, optuna_study: optuna.Study, sweep_dir: Path) -> None:
    optuna_study.trials_dataframe().to_csv(sweep_dir / "optuna_trials.csv", index=False)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in optuna_study.trials):
        log.error("no trial completed: see the runs' logs in %s", sweep_dir)
        return
    best = optuna_study.best_trial
    (sweep_dir / "optuna_best.json").write_text(
        json.dumps(
            {
                "objective": study.objective,
                "direction": study.direction,
                "value": best.value,
                "trial": best.number,
                "params": best.params,
                "overrides": trial_overrides(study, best.params),
            },
            indent=2,
        )
    )
    log.info(
        "best %s = %.6g at trial %d: %s",
        study.objective,
        best.value,
        best.number,
        " ".join(trial_overrides(study, best.params)),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a file in conf/hydra/optuna/ (without .yaml) or a path to one")
    parser.add_argument("--trials", type=int, dest="n_trials")
    parser.add_argument("--batch-size", type=int, dest="batch_size")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--storage")
    parser.add_argument("overrides", nargs="*", help="the app's Hydra overrides, for every trial")
    args = parser.parse_intermixed_args(argv)
    study = load_study(
        args.study, n_trials=args.n_trials, batch_size=args.batch_size, seed=args.seed, storage=args.storage
    )
    optimize(study, args.overrides)


if __name__ == "__main__":
    main()
