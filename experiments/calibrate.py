"""Calibration: the engine's own steps over a grid of agentic step shapes, fitted as the twin's `profile` cost.

    python -m experiments.calibrate                     # on a GPU: llama3_8b, random weights, hardware from the card
    python -m experiments.calibrate --quick             # a smaller grid (a minute)
    python -m experiments.calibrate --fit outputs/calibrate/h100_sxm/llama3_8b.csv   # refit a saved profile, no GPU

Writes the profile (docs/profile-format.md) to --out (outputs/calibrate/<hardware>/<model>.csv, not
committed) and its fit to conf/profiles/<hardware>/<model>.json, the file `cost=profile` reads.

Each step runs through the engine's own loop (`experiments.engine_replica`: plan, run with the
engine's overlap and CUDA graphs as configured, commit) and is timed as the loop's period. The
grid, per context length C (512 to 64K tokens, as many requests as the KV cache and the prefill
budget allow):

  ladder   B requests of C distinct tokens arrive together (multi-request prefill chunks, then mixed
           prefill + decode steps), then decode with staggered lengths so the batch halves every few
           steps: decode batches B, B/2, ..., 1 at context ~C (graph path, overlapped and strict steps)
  probes   one request at a time: the first P of those tokens (cached: 0, C/2, all) + L new ones
           (64 to 8192): prefill chunks on cached prefixes
  arrivals B' requests decode at context ~C while new requests (256 to 4096 new tokens on a cached
           prefix) arrive every few steps: the later turns of an agent, each dropping an overlap guess
  swaps    (once, on a small KV pool with a host tier and preemption=swap) requests outgrow the pool:
           swap-outs and swap-ins of different sizes

None of this is any fidelity workload (experiments.fidelity runs those).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import itertools
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import simpy

from controlplane.profile import write_profile
from experiments.engine_replica import StepLog
from sim.cost import shipped_profile_path
from sim.profile_cost import SHAPE_KEYS, STORAGE_DEFAULTS, ProfileCost, profile_storage
from sim.specs import ModelSpec, load_model_spec

# The engine's built-in shape (random weights) of each simulator model.
ENGINE_SHAPES = {
    "llama3_8b": "llama-3.1-8b",
    "llama3_70b": "llama-3.1-70b",
    "llama3_2_1b": "llama-3.2-1b",
    "qwen3_8b": "qwen3-8b",
    "smollm2_135m": "smollm2-135m",
}
# conf/hardware entries by the card's name.
CARDS = (("H200", "h200"), ("H100", "h100_sxm"))


@dataclass(frozen=True)
class GridSpec:
    """The calibration grid (module docstring); the defaults are sized for an 8B model on one H100/H200."""

    contexts: tuple[int, ...] = (512, 2048, 8192, 24576, 65536)
    prefill_budget: int = 262_144  # prompt tokens a ladder may send (B * C <= this)
    max_batch: int = 256
    steps_per_level: int = 6  # decode steps at each batch size of a ladder
    probe_fractions: tuple[float, ...] = (0.0, 0.5, 1.0)
    probe_lengths: tuple[int, ...] = (64, 256, 1024, 2048, 8192)
    arrival_lengths: tuple[int, ...] = (256, 800, 2048, 4096)
    arrival_batch: int = 4  # requests decoding while the arrivals come
    arrival_gap_steps: int = 6  # decode steps between two arrivals
    swap: bool = True
    swap_context: int = 4096  # the swap phase's pool holds four requests of this many tokens
    seed: int = 0

    @classmethod
    def quick(cls) -> "GridSpec":
        return cls(
            contexts=(512, 4096, 32768),
            prefill_budget=65536,
            max_batch=64,
            steps_per_level=4,
            probe_lengths=(64, 512, 2048, 8192),
            arrival_lengths=(256, 2048),
        )


# --------------------------------------------------------------------------- the grid, as SimPy processes


class GridDriver:
    """Submits the grid's requests to a replica (simulated or on the engine) and waits for them."""

    def __init__(self, env: simpy.Environment, replica, spec: GridSpec, vocab_size: int, log: StepLog) -> None:
        self.env, self.replica, self.spec, self.log = env, replica, spec, log
        config = replica.scheduler.config
        self.room = min(config.num_blocks * config.block_size // 2, config.max_model_len - 64)  # one request's most
        self.vocab = vocab_size
        self.rng = np.random.default_rng([spec.seed, 0xCA1])
        self.ids = itertools.count()
        self.block = replica.scheduler.config.block_size

    def tokens(self, n: int) -> np.ndarray:
        return self.rng.integers(0, self.vocab, size=n, dtype=np.int32)

    def submit(self, prompt: np.ndarray, max_new: int) -> simpy.Event:
        return self.replica.submit(next(self.ids), prompt, max_new, "")

    def last_step_seconds(self) -> float:
        return self.log.rows[-1]["seconds"] if self.log.rows else 1e-3

    def ladder(self, prompts: list[np.ndarray]):
        """All at once; request i decodes through every level whose batch is larger than i."""
        b, per = len(prompts), self.spec.steps_per_level
        levels = [-(-b // (1 << k)) for k in range(max(1, b.bit_length()))]
        levels = sorted(set(levels), reverse=True)
        yield self.env.all_of(
            [self.submit(p, per * sum(1 for size in levels if size > i) + 1) for i, p in enumerate(prompts)]
        )

    def probes(self, base: np.ndarray):
        for frac in self.spec.probe_fractions:
            cached = int(len(base) * frac) // self.block * self.block
            for length in self.spec.probe_lengths:
                if cached + length <= self.room:
                    yield self.submit(np.concatenate([base[:cached], self.tokens(length)]), 1)

    def arrivals(self, prompts: list[np.ndarray]):
        """prompts[:-1] decode (their prompts are cached); new turns on prompts[-1]'s prefix arrive meanwhile,
        one every `arrival_gap_steps` steps, each decoding a few tokens with them."""
        spec = self.spec
        base, decoders = prompts[-1], prompts[:-1]
        lengths = [n for n in spec.arrival_lengths if len(base) + n <= self.room]
        per_arrival = spec.arrival_gap_steps + 4 + max((-(-n // 2048) for n in lengths), default=0)
        steps = per_arrival * (len(lengths) + 1) + 8
        running = self.env.all_of([self.submit(np.concatenate([p, self.tokens(1)]), steps) for p in decoders])
        for length in lengths:
            target = len(self.log.rows) + spec.arrival_gap_steps
            while len(self.log.rows) < target and not running.triggered:
                yield self.env.timeout(self.last_step_seconds() / 2)
            yield self.submit(np.concatenate([base, self.tokens(length)]), 4)
        yield running

    def run(self, capacity_tokens: int, max_model_len: int):
        """The whole grid (the swap phase excepted: it needs another engine), context by context."""
        spec = self.spec
        for ctx in spec.contexts:
            if ctx + 64 > max_model_len or 2 * (ctx + 64) > capacity_tokens:
                continue
            room = int(0.8 * capacity_tokens) // (ctx + 8 * spec.steps_per_level + 64)
            batch = max(1, min(spec.max_batch, spec.prefill_budget // ctx, room))
            prompts = [self.tokens(ctx) for _ in range(batch)]
            yield from self.ladder(prompts)
            yield from self.probes(prompts[0])
            decoders = min(spec.arrival_batch, batch - 1)
            if decoders >= 1:
                yield from self.arrivals(prompts[:decoders] + [prompts[-1]])

    def swaps(self, num_blocks: int):
        """Four requests that all but fill the pool, then grow past it: one is swapped out while the
        others finish, then swapped back in; three rounds of different sizes."""
        room = (num_blocks - 8) * self.block
        for shares in ((0.3, 0.3, 0.2, 0.2), (0.25, 0.25, 0.25, 0.25), (0.4, 0.3, 0.2, 0.1)):
            lens = [max(self.block, int(room * share) // self.block * self.block - 1) for share in shares]
            yield self.env.all_of([self.submit(self.tokens(n), 3 * self.block) for n in lens])


def run_grid(
    env: simpy.Environment,
    replica,
    spec: GridSpec,
    vocab_size: int,
    log: StepLog,
    capacity_tokens: int,
    max_model_len: int,
    swap_phase: bool = False,
) -> None:
    """Runs the grid (or the swap phase) on `replica` to its end."""
    driver = GridDriver(env, replica, spec, vocab_size, log)
    gen = (
        driver.swaps(replica.scheduler.config.num_blocks) if swap_phase else driver.run(capacity_tokens, max_model_len)
    )
    env.run(until=env.process(gen))


# --------------------------------------------------------------------------- on a simulated engine (tests)


def calibrate_simulated(cost, spec: GridSpec, scheduler_config, swap_config=None) -> list[dict]:
    """The grid on simulated replicas whose step time is `cost` (e.g. a known function): the rows a
    profile of an engine with exactly that cost would hold."""
    from experiments.engine_replica import RecordingReplica
    from sim.metrics import Collector, Slo

    log = StepLog()
    for config, swap in ((scheduler_config, False), (swap_config, True)):
        if config is None:
            continue
        env = simpy.Environment()
        collector = Collector(1, config.num_blocks, 1e9, Slo(1.0, 1.0))
        replica = RecordingReplica(env, 0, config, cost, collector, 1e-3, spec.seed, log=log)
        run_grid(
            env,
            replica,
            spec,
            config.vocab_size,
            log,
            config.num_blocks * config.block_size,
            config.max_model_len,
            swap_phase=swap,
        )
    return log.rows


# --------------------------------------------------------------------------- on the engine


def engine_for_model(engine_model: str, device: str = "auto", loaded=None, **options: Any):
    """An EngineCore of an engine shape (or a config.json path) with random weights (vLLM's dummy format).

    Args:
        engine_model: a built-in shape (engine.models.shapes; ENGINE_SHAPES maps conf/model names to
            them) or a Hugging Face config.json path.
        device: "auto", "cuda" or "cpu".
        loaded: a LoadedModel to reuse (another KV pool on the same weights).
        **options: other EngineConfig fields (the scheduler's flat or in `scheduler`, as EngineConfig.from_dict).
    """
    from engine.config import EngineConfig
    from engine.core import EngineCore

    options = {"model": engine_model, "load_format": "dummy", "device": device, **options}
    return EngineCore(EngineConfig.from_dict(options), loaded=loaded)


def engine_loaded(core):
    """The LoadedModel of a core (to build another core on the same weights)."""
    from engine.loader import LoadedModel

    return LoadedModel(core.model, core.model_config, core.tokenizer, core.source, core.quantization)


def check_shape(core, spec: ModelSpec) -> None:
    """Raises ValueError if the engine's model is not the simulator model's shape."""
    mc = core.model_config
    engine = {
        "num_layers": mc.num_layers,
        "hidden_size": mc.hidden_size,
        "num_heads": mc.num_heads,
        "num_kv_heads": mc.num_kv_heads,
        "head_dim": mc.head_dim,
        "intermediate_size": mc.intermediate_size,
        "vocab_size": mc.vocab_size,
        "dtype_bytes": core.dtype.itemsize,
    }
    diff = {k: (engine[k], getattr(spec, k)) for k in SHAPE_KEYS if engine[k] != getattr(spec, k)}
    if diff:
        raise ValueError(
            f"the engine's model differs from {spec.name}: "
            + ", ".join(f"{k} {a} (engine) vs {b}" for k, (a, b) in diff.items())
        )


def hardware_name(core) -> str:
    """The conf/hardware entry of the card the engine runs on."""
    import torch

    if core.device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(core.device)
    for key, entry in CARDS:
        if key in name:
            return entry
    raise ValueError(f"no conf/hardware entry for the card {name!r}: pass --hardware NAME")


def engine_storage(core) -> dict[str, str]:
    """How the engine stores weights and KV: its ``kv_cache_dtype`` and ``quantization`` settings."""
    return {k: str(getattr(core.config, k, default)) for k, default in STORAGE_DEFAULTS.items()}


def engine_meta(core, spec: ModelSpec, hardware: str) -> dict:
    """The profile's header: where and how the steps ran."""
    import torch

    meta = {
        "model": spec.name,
        "engine_shape": core.source,
        "hardware": hardware,
        "model_shape": {k: getattr(spec, k) for k in SHAPE_KEYS},
        **engine_storage(core),
        "device": str(core.device),
        "dtype": str(core.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "kernels": dict(core.ops.chosen),
        "overlap": bool(core.overlap),
        "graph_batch_sizes": list(core.runner.graphs.sizes) if core.runner.graphs is not None else [],
        "block_size": core.scheduler_config.block_size,
        "chunk_size": core.scheduler_config.chunk_size,
        "idle_chunk_size": core.scheduler_config.idle_chunk_size,
        "max_num_batched_tokens": core.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": core.scheduler_config.max_num_seqs,
        "num_blocks": core.num_blocks,
        "timing": "loop period (experiments/engine_replica.py)",
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }
    meta["max_graph_batch"] = max(meta["graph_batch_sizes"], default=0)
    if core.device.type == "cuda":
        meta["card"] = torch.cuda.get_device_name(core.device)
        meta["cuda"] = torch.version.cuda
        meta["driver"] = _nvidia_smi("driver_version")
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        meta["card"] = platform.processor() or platform.machine()
    return meta


def git_commit() -> str:
    """HEAD's hash, with '+dirty' when the tree has uncommitted changes; $TANDEM_COMMIT outside a git
    checkout (a copy of the tree on a GPU machine); else 'unknown'."""
    if os.environ.get("TANDEM_COMMIT"):
        return os.environ["TANDEM_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _nvidia_smi(field_name: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_on_engine(core, spec: GridSpec, log: StepLog, swap_phase: bool = False) -> None:
    """The grid (or its swap phase) through an EngineReplica on `core`, in real time."""
    import simpy.rt

    from engine.sampling import SamplingParams
    from experiments.engine_replica import EngineReplica
    from sim.metrics import Collector, Slo

    core.reset()
    env = simpy.rt.RealtimeEnvironment(strict=False)
    collector = Collector(1, core.num_blocks, 1e9, Slo(1.0, 1.0))
    replica = EngineReplica(env, 0, core, collector, 1e-3, spec.seed, SamplingParams(temperature=0.0), log)
    run_grid(
        env,
        replica,
        spec,
        core.model_config.vocab_size,
        log,
        core.num_blocks * core.scheduler_config.block_size,
        core.max_model_len,
        swap_phase=swap_phase,
    )


def warm_up(core, spec: GridSpec) -> None:
    """Compiles and caches what the grid will use (kernels, graphs, GEMM choices) on a tiny grid; not recorded."""
    small = dataclasses.replace(
        spec,
        contexts=tuple(c for c in (256, 1024) if c <= core.max_model_len // 2),
        prefill_budget=4096,
        max_batch=8,
        steps_per_level=2,
        probe_lengths=(64, 300, 2048),
        arrival_lengths=(100, 777),
        swap=False,
    )
    run_on_engine(core, small, StepLog())


def calibrate_engine(
    spec: ModelSpec,
    engine_model: str,
    grid: GridSpec,
    *,
    hardware: str | None = None,
    device: str = "auto",
    engine_options: dict | None = None,
    progress: Callable[[str], None] = print,
) -> tuple[list, dict]:
    """Runs the grid on a new engine of `engine_model` (which must have `spec`'s shape); returns (rows, meta)."""
    options = dict(engine_options or {})
    core = engine_for_model(engine_model, device, **options)
    check_shape(core, spec)
    meta = engine_meta(core, spec, hardware or hardware_name(core))
    progress(
        f"engine: {meta['card']}, {core.num_blocks} KV blocks, overlap {core.overlap}, "
        f"graphs up to batch {meta['max_graph_batch']}; warming up"
    )
    warm_up(core, grid)
    log = StepLog()
    progress("grid ...")
    run_on_engine(core, grid, log)
    if grid.swap:
        progress("swap phase ...")
        swap_blocks = max(64, 4 * grid.swap_context // core.scheduler_config.block_size)
        loaded = engine_loaded(core)
        del core
        free_device()
        from engine.memory import block_bytes

        block = block_bytes(loaded.model, options.get("block_size", 16), weights_dtype(loaded))
        host_gib = 2 * swap_blocks * block / 2**30  # room for the pool twice over
        small = engine_for_model(
            engine_model,
            device,
            loaded=loaded,
            **{
                **options,
                "num_gpu_blocks": swap_blocks,
                "swap_space_gb": host_gib,
                "preemption": "swap",
                "max_num_seqs": 8,
            },
        )
        warm_up(small, dataclasses.replace(grid, arrival_lengths=(), probe_lengths=(64,)))
        run_on_engine(small, grid, log, swap_phase=True)
    meta["grid"] = dataclasses.asdict(grid)
    meta["rows"] = len(log.rows)
    return log.rows, meta


def weights_dtype(loaded):
    """The dtype of a loaded model's weights (its KV cache's)."""
    return next(loaded.model.parameters()).dtype


def free_device() -> None:
    """Returns freed device memory (a dropped engine's KV pool) to the driver."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- command line


def summary_table(cost: ProfileCost) -> str:
    lines = [f"{'path':8}{'steps':>8}{'trimmed':>9}{'|err| p50':>11}{'|err| p90':>11}"]
    for name, p in cost.paths.items():
        if p.observed:
            lines.append(f"{name:8}{p.rows:8d}{p.trimmed:9d}{p.median_rel_err:11.4f}{p.p90_rel_err:11.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> ProfileCost:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3_8b", help="a conf/model name or .yaml path (random weights of its shape)")
    p.add_argument("--engine-model", help="the engine's shape or config.json (default: the model's, ENGINE_SHAPES)")
    p.add_argument("--hardware", help="the conf/hardware entry (default: from the card's name)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="a smaller grid")
    p.add_argument("--no-swap", action="store_true", help="skip the swap phase")
    p.add_argument("--out", default="outputs/calibrate", help="where the profile CSV goes")
    p.add_argument("--save-to", help="the fit's JSON (default: conf/profiles/<hardware>/<model>.json)")
    p.add_argument("--fit", metavar="CSV", help="refit a saved profile (no engine run)")
    p.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an EngineConfig field (JSON value), e.g. enforce_eager=true",
    )
    a = p.parse_args(argv)
    if a.fit:
        cost = ProfileCost.fit(a.fit)
        model, hardware = cost.meta.get("model"), a.hardware or cost.meta.get("hardware")
        if not model or not hardware:
            raise SystemExit(f"{a.fit}: its header names no model or hardware; pass --hardware")
        if model in ENGINE_SHAPES:  # the shape; the storage is what the profile says it measured
            cost.check_model(dataclasses.replace(load_model_spec(model), **profile_storage(cost.meta)))
        out_json = Path(a.save_to) if a.save_to else shipped_profile_path(model, hardware)
        cost.save(out_json)
    else:
        grid = GridSpec.quick() if a.quick else GridSpec()
        if a.no_swap:
            grid = dataclasses.replace(grid, swap=False)
        options = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.engine_option)}
        spec = load_model_spec(a.model)
        engine_model = a.engine_model or ENGINE_SHAPES.get(spec.name)
        if engine_model is None:
            raise SystemExit(f"no engine shape for the model {spec.name!r}: pass --engine-model")
        rows, meta = calibrate_engine(
            spec, engine_model, grid, hardware=a.hardware, device=a.device, engine_options=options
        )
        csv_path = Path(a.out) / meta["hardware"] / f"{meta['model']}.csv"
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        write_profile(csv_path, rows, meta)
        print(f"profile: {csv_path} ({len(rows)} steps)")
        out_json = Path(a.save_to) if a.save_to else shipped_profile_path(meta["model"], meta["hardware"])
        cost = ProfileCost.fit(csv_path, model=dataclasses.replace(spec, **profile_storage(meta)))
        cost.save(out_json)
    print(cost.describe())
    print(summary_table(cost))
    print(f"fit: {out_json}")
    return cost


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
