"""How far the twin is from the engine: named workloads on the GPU in real time, and in the simulator.

    python -m experiments.fidelity                        # conf/fidelity.yaml on this machine's GPU -> docs/fidelity.md
    python -m experiments.fidelity 'only=[swe_smith_c1]' server=false report=null
    python -m experiments.fidelity render=outputs/fidelity/DATE/TIME/results.json   # the report of a past run
    python -m experiments.fidelity render=... retwin=true   # ... its twin's side again on today's fit

Each run of `runs` is one simulator configuration (workload, its parameters scaled to fit, the
arrival process, a policy from conf/policy). It runs three times:

  engine   the simulator's sessions and replica loop in real time, each plan run on the engine
           (experiments/engine_replica.py): the engine's wall clock, its tokens, its KV
  twin     the same configuration simulated with the calibrated `profile` cost
           (conf/profiles/<hardware>/<model>.json, from experiments.calibrate)
  replay   the simulator again, each step lasting exactly the engine's measured seconds: its plan
           sequence must be the engine's (the same scheduler, the same events)

and per step the twin's prediction of the engine's own plan is compared with the measured time.
Runs of one `group` differ only in their policy: the report says whether the twin orders the
policies as the engine does. Runs with `server: true` also go through `python -m engine.serve`
and `experiments.bench_serving` (the gateway's share included). The report (docs/fidelity.md),
its plots and results.json go where `report` and `out_dir` say.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
import numpy as np
import simpy
import simpy.rt
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from controlplane.cli import fix_sys_argv
from controlplane.profile import FEATURES, PREFILL_ROWS, decode_prefill_rows
from engine.config import SCHEDULER_KEYS
from experiments import fidelity_report as R
from experiments.calibrate import (
    ENGINE_SHAPES,
    GridSpec,
    check_shape,
    engine_for_model,
    engine_loaded,
    engine_meta,
    free_device,
    hardware_name,
    warm_up,
)
from experiments.engine_replica import StepLog, engine_replicas, replay_replicas
from sim.config import EngineConf
from sim.cost import shipped_profile_path
from sim.profile_cost import STORAGE_DEFAULTS, ProfileCost, profile_storage
from sim.simulation import Simulation
from sim.specs import CONF_DIR, load_hardware_spec, load_model_spec

log = logging.getLogger(__name__)


@dataclass
class RunConf:
    """One workload run (a simulator configuration)."""

    name: str = "run"
    workload: str = "swe_smith"
    params: Dict[str, Any] = field(default_factory=dict)
    mode: str = "closed"  # closed: `concurrency` sessions in flight; open: `session_rate`
    concurrency: int = 1
    sessions: int = 2
    session_rate: Optional[float] = None
    policy: str = "lru"  # a conf/policy name ...
    ordering: Optional[str] = None  # ... with these specs in place of its own
    eviction: Optional[str] = None
    preemption: Optional[str] = None
    kv_blocks: Optional[int] = None  # the engine's KV pool (None: sized from free memory)
    group: Optional[str] = None  # runs of one group are ranked by policy
    server: bool = False  # also through engine.serve + bench_serving


@dataclass
class FidelityConf:
    model: str = "llama3_8b"  # conf/model name or .yaml path
    engine_model: Optional[str] = None  # the engine's shape or config.json (default: ENGINE_SHAPES[model])
    hardware: Optional[str] = None  # conf/hardware name (None: from the card)
    profile_path: Optional[str] = None  # None: conf/profiles/<hardware>/<model>.json
    device: str = "auto"
    seed: int = 0
    engine: Dict[str, Any] = field(default_factory=dict)  # EngineConfig fields of every engine run
    runs: List[RunConf] = field(default_factory=list)
    only: List[str] = field(default_factory=list)  # run names to run (empty: all)
    server: bool = True  # the runs marked `server` also through the server
    server_port: int = 8391
    warmup: bool = True
    out_dir: str = "."  # results.json and plots
    report: Optional[str] = None  # the markdown report's path (None: out_dir/fidelity.md)
    plots_dir: Optional[str] = None  # None: out_dir
    command: str = "python -m experiments.fidelity"
    render: Optional[str] = None  # a results.json to write the report of (no run) ...
    retwin: bool = False  # ... after running its twin's side again on the profile at hand


ConfigStore.instance().store(name="fidelity_schema", node=FidelityConf)


class WallEnvironment(simpy.rt.RealtimeEnvironment):
    """Real time from the moment `run` starts (not from construction), never strict about lateness."""

    def __init__(self) -> None:
        super().__init__(strict=False)

    def run(self, until=None):
        self.sync()
        return super().run(until)


# --------------------------------------------------------------------------- configurations


def policy_section(run: RunConf) -> dict:
    """The scheduler's policies that conf/policy/<run.policy>.yaml sets, with the run's own specs in their place."""
    path = CONF_DIR / "policy" / f"{run.policy}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "policy").glob("*.yaml"))
        raise ValueError(f"unknown policy {run.policy!r}; conf/policy has {known}")
    section = yaml.safe_load(path.read_text())["scheduler"]
    for kind in ("ordering", "eviction", "preemption"):
        if getattr(run, kind):
            section[kind] = getattr(run, kind)
    return section


def policy_label(run: RunConf) -> str:
    p = policy_section(run)
    return f"{p['ordering']}+{p['eviction']}" + ("" if p["preemption"] == "recompute" else f"+{p['preemption']}")


def engine_section(core) -> dict:
    """An engine's exact scheduler settings and KV sizes, as the simulator's `engine` and `scheduler` keys."""
    c = core.scheduler_config  # resolved: idle_chunk_size, max_model_len, num_lookahead_tokens
    return {
        **{k: getattr(c, k) for k in ("block_size", "max_num_seqs", "max_num_batched_tokens", "chunk_size")},
        **{k: getattr(c, k) for k in ("idle_chunk_size", "max_model_len", "enable_prefix_caching")},
        "num_gpu_blocks": core.num_blocks,
        "num_host_blocks": core.num_host_blocks,
        "num_lookahead_tokens": c.num_lookahead_tokens,
    }


def sim_config(fc: FidelityConf, run: RunConf, engine: dict, cost_model: str, profile_path: str | None) -> dict:
    """The simulator configuration of `run` on an engine of these settings (`engine_section`)."""
    sizing = {f.name for f in dataclasses.fields(EngineConf)}
    return {
        "model": {
            **dataclasses.asdict(load_model_spec(fc.model)),  # stored as the engine runs it
            **{k: fc.engine[k] for k in STORAGE_DEFAULTS if k in fc.engine},
        },
        "hardware": dataclasses.asdict(load_hardware_spec(fc.hardware)),
        "workload": {"name": run.workload, "params": dict(run.params)},
        "policy": {"name": run.policy},
        "scheduler": {**{k: v for k, v in engine.items() if k not in sizing}, **policy_section(run)},
        "cluster": {"num_replicas": 1, "router": "round_robin"},
        "engine": {k: v for k, v in engine.items() if k in sizing},
        "sim": {
            "seed": fc.seed,
            "mode": run.mode,
            "num_sessions": run.sessions,
            "session_rate": run.session_rate,
            "concurrency": run.concurrency,
            "cost_model": cost_model,
            "profile_path": profile_path,
            "progress": False,
            "kv_sample_interval_s": 0.25,
        },
        "wandb": {"mode": "disabled"},
    }


# --------------------------------------------------------------------------- the three runs


def run_engine(core, cfg: dict, seed: int):
    """`cfg` in real time with its plans on the engine: (SimResult, StepLog)."""
    from engine.sampling import SamplingParams

    steps = StepLog()
    sim = Simulation(cfg)
    result = sim.run(
        env=WallEnvironment(),
        replica_factory=engine_replicas(core, sim.cfg.sim.idle_wait_s, seed, SamplingParams(temperature=0.0), steps),
    )
    return result, steps


def run_replay(cfg: dict, steps: StepLog, seed: int) -> tuple[bool, str]:
    """The simulator with each step lasting the engine's measured seconds: does it plan as the engine did?"""
    replayed = StepLog()
    sim = Simulation(cfg)
    try:
        sim.run(replica_factory=replay_replicas(steps.rows, sim.cfg.sim.idle_wait_s, seed, replayed))
    except RuntimeError as exc:
        return False, str(exc)
    for k, (a, b) in enumerate(zip(steps.keys, replayed.keys)):
        if a != b:
            return False, f"step {k}: engine {a[:4]} vs replay {b[:4]}"
    if len(steps.keys) != len(replayed.keys):
        return False, f"{len(steps.keys)} engine steps, {len(replayed.keys)} replayed"
    return True, f"{len(steps.keys)} plans and start times equal"


def step_predictions(cost: ProfileCost, steps: StepLog) -> tuple[np.ndarray, np.ndarray]:
    """(the twin's seconds for each plan the engine ran, the measured seconds)."""
    features = np.array([[row[f] for f in FEATURES] for row in steps.rows], dtype=np.float64)
    measured = np.array([row["seconds"] for row in steps.rows])
    if not len(measured):
        return np.zeros(0), measured
    prefill = [
        np.asarray(decode_prefill_rows(row[PREFILL_ROWS]), dtype=np.float64).reshape(-1, 2) for row in steps.rows
    ]
    return cost.predict(features, prefill), measured


def run_server(fc: FidelityConf, run: RunConf, engine_model: str, num_blocks: int, out: Path) -> dict:
    """The run through `python -m engine.serve` (a subprocess on loopback) and bench_serving; its summary."""
    import httpx

    from experiments.bench_serving import BenchOptions, run_benchmark

    options = {"load_format": "dummy", "device": fc.device, **fc.engine, "num_gpu_blocks": num_blocks}
    cmd = [
        sys.executable,
        "-m",
        "engine.serve",
        f"model={engine_model}",
        f"port={fc.server_port}",
        "log_level=warning",
        "hydra.run.dir=" + str(out / "server"),
        "hydra.output_subdir=null",
    ]
    cmd += [f"{'scheduler' if k in SCHEDULER_KEYS else 'engine'}.{k}={json.dumps(v)}" for k, v in options.items()]
    base = f"http://127.0.0.1:{fc.server_port}/v1"
    with open(out / f"server-{run.name}.log", "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 900
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode} (log: {logf.name})")
                try:
                    if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start within 900 s")
                time.sleep(1.0)
            common = dict(
                base_url=base,
                workload=run.workload,
                seed=fc.seed,
                end_sessions=True,
                extra_body={"temperature": 0.0},
                label="server",
            )
            # a short warm-up (kernels compile on first use), another seed, so no prefix is shared
            warm = (
                {**run.params, "first_turn_tokens": 3000, "turns_min": 2, "turns_max": 2, "output_tokens": 32}
                if run.workload == "swe_smith"
                else dict(run.params)
            )
            asyncio.run(
                run_benchmark(
                    BenchOptions(**{**common, "seed": fc.seed + 1000, "params": warm}, sessions=2, concurrency=2)
                )
            )
            result = asyncio.run(
                run_benchmark(
                    BenchOptions(
                        **common,
                        params=dict(run.params),
                        sessions=run.sessions,
                        concurrency=run.concurrency if run.mode == "closed" else None,
                        session_rate=run.session_rate if run.mode == "open" else None,
                    )
                )
            )
            return result.summary
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


# --------------------------------------------------------------------------- the whole evaluation


def _groups(runs: list[RunConf]) -> list[list[RunConf]]:
    """Runs by engine KV size (one engine each, built on the same weights), in the configured order."""
    out: dict[Any, list[RunConf]] = {}
    for run in runs:
        out.setdefault(run.kv_blocks, []).append(run)
    return list(out.values())


def evaluate(fc: FidelityConf, progress=print) -> dict:
    """Runs every selected run on the engine, in the twin and in replay; returns the results (JSON-ready)."""
    out = Path(fc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in fc.runs if not fc.only or r.name in fc.only]
    if not runs:
        raise ValueError(f"no run selected (only={fc.only}; runs: {[r.name for r in fc.runs]})")
    spec = load_model_spec(fc.model)
    engine_model = fc.engine_model or ENGINE_SHAPES.get(spec.name)
    if engine_model is None:
        raise ValueError(f"no engine shape for {spec.name!r}: set engine_model")
    loaded, results, cost, meta = None, [], None, None
    for group in _groups(runs):
        options = {**fc.engine, **({"num_gpu_blocks": group[0].kv_blocks} if group[0].kv_blocks else {})}
        core = engine_for_model(engine_model, fc.device, loaded=loaded, **options)
        check_shape(core, spec)
        loaded = engine_loaded(core)
        if cost is None:
            fc = dataclasses.replace(fc, hardware=fc.hardware or hardware_name(core))
            meta = engine_meta(core, spec, fc.hardware)
            source = fc.profile_path or str(shipped_profile_path(spec.name, fc.hardware))
            cost = ProfileCost.load(source) if source.endswith(".json") else ProfileCost.fit(source)
            cost.check_model(dataclasses.replace(spec, **profile_storage(meta)))  # the engine's storage
            _check_profile(cost, meta)
            profile_path = str(out / "profile.json")  # the twins read this copy: the run outlives edits of conf/
            cost.save(profile_path)
            cost.meta["source_file"] = source
        progress(f"engine: {meta['card']}, {core.num_blocks} KV blocks; warming up")
        if fc.warmup:
            warm_up(core, GridSpec.quick())
        engine = engine_section(core)
        for run in group:
            progress(f"{run.name}: engine ...")
            t0 = time.monotonic()
            engine_result, steps = run_engine(core, sim_config(fc, run, engine, "roofline", None), fc.seed)
            progress(f"{run.name}: engine took {time.monotonic() - t0:.1f} s, {len(steps.rows)} steps; twin, replay")
            twin = Simulation(sim_config(fc, run, engine, "profile", profile_path)).run()
            equal, detail = run_replay(sim_config(fc, run, engine, "roofline", None), steps, fc.seed)
            predicted, measured = step_predictions(cost, steps)
            results.append(
                {
                    "run": dataclasses.asdict(run),
                    "engine": _plain(engine_result.summary),
                    "twin": _plain(twin.summary),
                    "twin_notes": twin.notes,
                    "replay_equal": equal,
                    "replay_detail": detail,
                    "steps": {
                        "measured": measured.tolist(),
                        "predicted": predicted.tolist(),
                        "features": [[r[f] for f in FEATURES] for r in steps.rows],
                        "prefill_rows": [r[PREFILL_ROWS] for r in steps.rows],
                    },
                    "requests": {"engine": _per_request(engine_result), "twin": _per_request(twin)},
                    "num_blocks": core.num_blocks,
                    "engine_model": engine_model,
                    "engine_settings": engine,
                }
            )
            partial = {
                "meta": meta,
                "profile": {"path": source, "meta": cost.meta},
                "config": dataclasses.asdict(fc),
                "runs": results,
            }
            (out / "results.partial.json").write_text(json.dumps(partial, default=_json_default) + "\n")
        del core
        free_device()
    del loaded
    free_device()
    if fc.server:
        for result in results:
            run = RunConf(**result["run"])
            if run.server:
                progress(f"{run.name}: through the server ...")
                result["server"] = _plain(run_server(fc, run, engine_model, result["num_blocks"], out))
    return {
        "meta": meta,
        "profile": {"path": source, "meta": cost.meta, "describe": cost.describe()},
        "config": dataclasses.asdict(fc),
        "runs": results,
    }


def retwin(results: dict, fc: FidelityConf, out: Path) -> dict:
    """Past results with the twin's side run again on the profile at hand (after a refit): the engine's
    measurements stay, the twin's runs and per-step predictions are recomputed."""
    meta = results["meta"]
    fc = dataclasses.replace(fc, model=results["config"]["model"], hardware=meta["hardware"])
    source = fc.profile_path or str(shipped_profile_path(meta["model"], meta["hardware"]))
    cost = ProfileCost.load(source) if source.endswith(".json") else ProfileCost.fit(source)
    cost.check_model(dataclasses.replace(load_model_spec(fc.model), **profile_storage(meta)))
    _check_profile(cost, meta)
    out.mkdir(parents=True, exist_ok=True)
    profile_path = str(out / "profile.json")
    cost.save(profile_path)
    for r in results["runs"]:
        run = RunConf(**r["run"])
        engine = r.get("engine_settings") or {  # results written before engine_settings: the engine's defaults
            "block_size": meta["block_size"],
            "max_num_seqs": meta["max_num_seqs"],
            "max_num_batched_tokens": meta["max_num_batched_tokens"],
            "chunk_size": meta["chunk_size"],
            "max_model_len": 131072,
            "enable_prefix_caching": True,
            "num_gpu_blocks": r["num_blocks"],
            "num_host_blocks": 0,
            "num_lookahead_tokens": 1 if meta["overlap"] else 0,
        }
        twin = Simulation(sim_config(fc, run, engine, "profile", profile_path)).run()
        features = np.asarray(r["steps"]["features"], dtype=np.float64)
        prefill = [
            np.asarray(decode_prefill_rows(t), dtype=np.float64).reshape(-1, 2) for t in r["steps"]["prefill_rows"]
        ]
        r.update(twin=_plain(twin.summary), twin_notes=twin.notes, engine_settings=engine)
        r["requests"]["twin"] = _per_request(twin)
        r["steps"]["predicted"] = cost.predict(features, prefill).tolist() if len(features) else []
    results["profile"] = {"path": source, "meta": {**cost.meta, "source_file": source}, "describe": cost.describe()}
    return results


def _check_profile(cost: ProfileCost, meta: dict) -> None:
    """The fit must describe this engine: the same decode loop and KV block size."""
    for key in ("overlap", "block_size"):
        if key in cost.meta and cost.meta[key] != meta[key]:
            raise ValueError(f"the profile was measured with {key}={cost.meta[key]}, this engine runs {meta[key]}")
    if cost.max_graph_batch != meta["max_graph_batch"]:
        raise ValueError(
            f"the profile's decode graphs go up to batch {cost.max_graph_batch}, this engine's "
            f"to {meta['max_graph_batch']}"
        )


def _per_request(result) -> dict:
    t = result.requests
    return {"ttft": t["ttft"].tolist(), "tpot": t["tpot"].tolist()}


def _plain(summary: dict) -> dict:
    """A summary with numpy scalars as Python numbers (JSON)."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


# --------------------------------------------------------------------------- the report


def reports(results: dict) -> tuple[list[R.RunReport], dict, list[dict]]:
    """RunReports, the overall per-step errors and the rankings of the results."""
    runs = []
    for r in results["runs"]:
        step = R.step_errors(r["steps"]["predicted"], r["steps"]["measured"])
        run = RunConf(**r["run"])
        desc = (
            f"{run.workload} {r['run']['params'] or ''}, {run.mode} loop "
            + (f"concurrency {run.concurrency}" if run.mode == "closed" else f"rate {run.session_rate}/s")
            + f", {run.sessions} sessions, policy {policy_label(run)}, {r['num_blocks']} KV blocks"
        )
        runs.append(
            R.RunReport(
                run.name,
                desc,
                r["engine"],
                r["twin"],
                step,
                r["replay_equal"],
                r["replay_detail"],
                r.get("server"),
                r["twin"] if r.get("server") else None,
            )
        )
    measured = np.concatenate([np.asarray(r["steps"]["measured"]) for r in results["runs"]])
    predicted = np.concatenate([np.asarray(r["steps"]["predicted"]) for r in results["runs"]])
    overall = R.step_errors(predicted, measured)
    rankings = []
    groups: dict[str, dict] = {}
    for r in results["runs"]:
        if r["run"]["group"]:
            groups.setdefault(r["run"]["group"], {})[policy_label(RunConf(**r["run"]))] = (r["engine"], r["twin"])
    for pairs in groups.values():
        if len(pairs) > 1:
            rankings.append(R.ranking(pairs, "ttft_s_p90", higher_is_better=False))
            rankings.append(R.ranking(pairs, "per_gpu_output_tok_s", higher_is_better=True))
    return runs, overall, rankings


def write_report(results: dict, path: Path, plots_dir: Path) -> str:
    """docs/fidelity.md: where it ran, the targets, per-run tables, rankings, the server runs, plots."""
    runs, overall, rankings = reports(results)
    checks = R.verdict(runs, overall, rankings)
    plots_dir.mkdir(parents=True, exist_ok=True)
    labels = sum(([r["run"]["name"]] * len(r["steps"]["measured"]) for r in results["runs"]), [])
    measured = np.concatenate([np.asarray(r["steps"]["measured"]) for r in results["runs"]])
    predicted = np.concatenate([np.asarray(r["steps"]["predicted"]) for r in results["runs"]])
    R.plot_steps(plots_dir / "steps.png", measured, predicted, labels)
    for key, label, scale in (("ttft", "TTFT (s)", 1.0), ("tpot", "TPOT (ms)", 1e3)):
        R.plot_cdfs(
            plots_dir / f"{key}.png",
            {
                r["run"]["name"]: (np.asarray(r["requests"]["engine"][key]), np.asarray(r["requests"]["twin"][key]))
                for r in results["runs"]
            },
            label,
            scale,
        )
    m, p = results["meta"], results["profile"]["meta"]
    rel = os.path.relpath(plots_dir, path.parent)
    lines = [
        "# The twin against the engine (fidelity)",
        "",
        f"Measured {m['date'][:10]} on one {m['card']} (driver {m.get('driver')}, torch {m['torch']}, "
        f"CUDA {m.get('cuda')}), {m['model']} shape ({m['engine_shape']}, random weights, {m['dtype']}), "
        f"kernels {m['kernels']}, overlapped decode {'on' if m['overlap'] else 'off'}, commit `{m['commit']}`.",
        f"Command: `{results['config']['command']}`. The twin's cost: the `profile` fit "
        f"`{os.path.relpath(results['profile']['path'])}` (calibrated {str(p.get('date', '?'))[:10]} on "
        f"{p.get('card', '?')}, commit `{p.get('commit', '?')}`, {p.get('rows', '?')} grid steps; none of "
        f"these workloads is in the grid).",
        "",
        "Each run is one simulator configuration: on the engine its sessions run in real time (the",
        "simulator's workload generator and arrival process, the engine's wall clock; experiments/engine_replica.py),",
        "in the twin they are simulated with the calibrated cost. Per-step error: the twin's prediction",
        "for each plan the engine ran against the measured loop period of that step.",
        "",
        "## Targets",
        "",
        R.verdict_table(checks),
        "",
        "## Per run",
        "",
        R.summary_table(runs),
        "",
    ]
    for run in runs:
        lines += [
            f"### {run.name}",
            "",
            run.description + ".",
            "",
            R.run_table(run),
            "",
            f"Replay (the simulator stepping by the measured seconds): {run.replay_detail}.",
            "",
        ]
        notes = next(r["twin_notes"] for r in results["runs"] if r["run"]["name"] == run.name)
        if notes:
            lines += ["Twin notes: " + "; ".join(notes) + ".", ""]
    if rankings:
        lines += ["## Policy ranking", ""]
        for r in rankings:
            lines += [R.ranking_table(r), ""]
    served = [run for run in runs if run.server]
    if served:
        lines += [
            "## Through the server",
            "",
            "The same runs via `python -m experiments.bench_serving` against `python -m engine.serve` "
            "(gateway, tokenizer-free token-id prompts, streamed token ids; client-side times).",
            "",
        ]
        for run in served:
            server_run = R.RunReport(run.name + " (server)", "", run.server, run.twin, run.step)
            lines += [f"### {run.name} through the server", "", R.run_table(server_run), ""]
            lines += [
                f"output ids from the server: {run.server.get('output_ids_from_server')}, synthetic: "
                f"{run.server.get('output_ids_synthetic')}; prefix hit rate {run.server.get('prefix_hit_rate')}",
                "",
            ]
    lines += [
        "## Plots",
        "",
        f"![predicted vs measured step time]({rel}/steps.png)",
        "",
        f"![TTFT CDFs]({rel}/ttft.png)",
        "",
        f"![TPOT CDFs]({rel}/tpot.png)",
        "",
    ]
    text = "\n".join(lines)
    path.write_text(text)
    return R.verdict_table(checks) + "\n\n" + R.summary_table(runs)


@hydra.main(version_base="1.3", config_path="../conf", config_name="fidelity")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    runs = [RunConf(**r) for r in container.pop("runs")]
    fc = FidelityConf(**container, runs=runs)
    out = Path(fc.out_dir)
    if fc.render:
        results = json.loads(Path(fc.render).read_text())
        if fc.retwin:
            results = retwin(results, fc, out)
            (out / "results.json").write_text(json.dumps(results, default=_json_default) + "\n")
    else:
        results = evaluate(fc, progress=lambda s: print(s, flush=True))
        (out / "results.json").write_text(json.dumps(results, default=_json_default) + "\n")
    report = Path(fc.report) if fc.report else out / "fidelity.md"
    print(write_report(results, report, Path(fc.plots_dir) if fc.plots_dir else out))
    print(f"report: {report}; results: {out / 'results.json'}")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


if __name__ == "__main__":
    fix_sys_argv(mappings={"engine"})  # engine.KEY=VALUE adds an EngineConfig field to the runs
    main()
