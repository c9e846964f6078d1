"""The swe_smith shape served end to end beside the roofline twin of the same card.

    python -m experiments.bench_agentic              # GPU: llama-3.1-8b shape, bf16, concurrency 1 2 4 (~5 min, H100)
    python -m experiments.bench_agentic --quick      # a smoke run: short sessions, one wave each
    python -m experiments.bench_agentic --params turns_min=10 turns_max=15 --sessions 4 --json out.json

The engine: `python -m engine.serve` (random weights, load_format=dummy), driven closed-loop by
experiments.bench_serving at each concurrency, with a seed of its own per level so that no level
hits what an earlier one cached. The twin: the simulator on the same sessions (workload, seed,
concurrency), the server's scheduler settings and KV size, and the roofline cost on this card's
measured rates (not the datasheet's): device copy bandwidth (read + write bytes, as
experiments.bench_engine) and the FLOP/s of a large GEMM; or, with --twin-cost profile, the calibrated fit
conf/profiles ships for the card (the JSON keeps the twin's side under "roofline" either way). Every ratio
is engine / twin: above 1 for TTFT (slower than the twin), below 1 for throughputs (the share of the
twin's reached).
Each level also counts the requests preempted: the engine's from the server's /metrics
(tandem_preemptions_total), the twin's from its run of the same sessions.

The per-user speed floor (issue #21; docs/policies.md, "Admission"): both sides report the share of
output tokens that came within 1 / --floor s (70 tok/s) of the request's previous one. With
`--admission tps_floor:tok_s=70` both run that admission policy, the server predicting with the twin's
own cost model (the measured rates, or with `--twin-cost profile` the fit conf/profiles ships for the
card), so the twin's share is the prediction and the engine's the measurement:

    python -m experiments.bench_agentic --concurrency 1 2 4 8 --waves 1 --twin-cost profile
    python -m experiments.bench_agentic --concurrency 1 2 4 8 --waves 1 --twin-cost profile \
        --admission tps_floor:tok_s=70
Without CUDA it runs on the CPU: SmolLM2-135M's shape in float32 and a small swe_smith.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import torch

from engine.config import SCHEDULER_KEYS
from experiments.bench_engine import copy_bandwidth
from experiments.bench_serving import BenchOptions, _pairs, run_benchmark
from experiments.calibrate import ENGINE_SHAPES, check_shape, git_commit, hardware_name
from experiments.fidelity import FidelityConf, RunConf, sim_config
from sim.cost import make_cost_model
from sim.simulation import Simulation
from sim.specs import HardwareSpec, ModelSpec, hardware_label, load_hardware_spec, load_model_spec

WORKLOAD = "swe_smith"
# 50K-token first turn, 800 new + 500 output tokens a later turn (swe_smith's defaults), 4 turns
# a session instead of 10-15 so that three levels of two waves each take ~4 minutes on an H100.
GPU_PARAMS = {"turns_min": 4, "turns_max": 4}
QUICK_PARAMS = {
    "first_turn_tokens": 8000,
    "later_turn_tokens": 800,
    "output_tokens": 100,
    "turns_min": 2,
    "turns_max": 2,
}
CPU_PARAMS = {"first_turn_tokens": 200, "later_turn_tokens": 40, "output_tokens": 16, "turns_min": 3, "turns_max": 3}
WARMUP_SEED = 1000  # the warm-up's sessions: another seed, so no prefix is shared with a measured level
STATS_PERIOD_S = 0.75  # a little more than the engine core's stats period (0.5 s): /metrics then has them all

# (key, label, kind): the six figures compared, each as engine / twin
FIGURES = (
    ("per_user_tok_s", "per-user tok/s (mean)", "rate"),
    ("per_gpu_output_tok_min", "per-GPU output tok/min", "rate"),
    ("first_turn_ttft_s", "first-turn TTFT s (mean)", "time"),
    ("later_ttft_s_p50", "later-turn TTFT s p50", "time"),
    ("later_ttft_s_p90", "later-turn TTFT s p90", "time"),
    ("floor_token_share", "tokens at the floor", "share"),
)


@dataclass(frozen=True)
class CardRates:
    """The two rates measured on the device; the roofline twin's peak FLOP/s and memory bandwidth."""

    device: str
    card: str
    copy_bytes_s: float  # device-to-device copy, bytes read + written per second
    matmul_flops: float  # FLOP/s of an n x n x n GEMM in `dtype`
    matmul_n: int
    dtype: str
    fp8_matmul_flops: float | None = None  # FLOP/s of the engine's FP8 linear (engine.quant.fp8_linear), n^3


@dataclass(frozen=True)
class Figures:
    """One side's figures of one concurrency level (sim/metrics.py definitions)."""

    per_user_tok_s: float  # mean over requests of 1 / TPOT
    per_gpu_output_tok_min: float  # output tokens / (last finish - first arrival), per GPU
    first_turn_ttft_s: float  # mean TTFT of the sessions' first calls
    later_ttft_s_p50: float  # TTFT of every later call
    later_ttft_s_p90: float
    floor_token_share: float  # output tokens (after each request's first) within 1 / floor s of the previous

    @classmethod
    def of(cls, summary: dict, requests) -> Figures:
        """From a run's summary and request table (a SimResult's or a BenchResult's)."""
        turn, ttft = np.asarray(requests["turn"]), np.asarray(requests["ttft"], dtype=np.float64)
        first, later = ttft[turn == 0], ttft[turn > 0]
        p50, p90 = np.percentile(later, [50, 90]) if later.size else (math.nan, math.nan)
        return cls(
            summary.get("per_user_tok_s_mean", math.nan),
            summary.get("per_gpu_output_tok_min", math.nan),
            float(first.mean()) if first.size else math.nan,
            float(p50),
            float(p90),
            summary.get("floor_token_share", math.nan),
        )


# --------------------------------------------------------------------------- the card


def _seconds_per_call(fn, device: str, repeats: int) -> float:
    """Wall seconds of one call of `fn`, over `repeats` calls after two unrecorded ones."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn(), fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def matmul_rate(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s (2 n^3 a product) of n x n GEMMs into a preallocated output; the best of five trials."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    c = torch.empty_like(a)
    best = min(_seconds_per_call(lambda: torch.mm(a, b, out=c), device, repeats) for _ in range(5))
    return 2.0 * n**3 / best


def fp8_matmul_rate(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s (2 n^3 a product) of the engine's FP8 linear on n x n activations in `dtype` and an n x n e4m3
    weight with per-channel scales: quantizing the activations per token included, as every prefill linear
    of an FP8-weight engine does (torch._scaled_mm on CUDA); the best of five trials."""
    from engine.quant import fp8_linear, quantize_fp8_per_channel

    x = torch.randn(n, n, device=device).to(dtype)
    w, scale = quantize_fp8_per_channel(torch.randn(n, n, device=device))
    best = min(_seconds_per_call(lambda: fp8_linear(x, w, scale), device, repeats) for _ in range(5))
    return 2.0 * n**3 / best


def host_copy_bandwidth(num_bytes: int = 1 << 26) -> float:
    """Bytes per second of a host memory copy, counting bytes read and written (the best of five trials)."""
    a = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
    b = torch.empty_like(a)
    return 2 * num_bytes / min(_seconds_per_call(lambda: b.copy_(a), "cpu", 5) for _ in range(5))


def measure_card(device: str, dtype: torch.dtype, fp8: bool = False) -> CardRates:
    """Copy bandwidth and GEMM rate of `device` (CUDA: bench_engine's 1 GiB copies, 8192^3 GEMMs; the CPU:
    one thread, as the CPU server's engine runs); with `fp8` (a server with FP8 weights) on CUDA, also the
    rate of the engine's FP8 linear at the same size."""
    name = str(dtype).replace("torch.", "")
    if device == "cuda":
        rates = CardRates(
            device,
            torch.cuda.get_device_name(),
            copy_bandwidth("cuda"),
            matmul_rate(device, dtype, 8192, 20),
            8192,
            name,
            fp8_matmul_rate(device, dtype, 8192, 20) if fp8 else None,
        )
        torch.cuda.empty_cache()  # the server sizes its KV cache from what is free
        return rates
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CardRates(device, "CPU", host_copy_bandwidth(), matmul_rate(device, dtype, 1024, 3), 1024, name)
    finally:
        torch.set_num_threads(threads)


def twin_hardware(rates: CardRates, base: str) -> HardwareSpec:
    """The conf/hardware entry `base` with the measured rates as its peak FLOP/s and bandwidth, no step overhead.

    Its FP8 rate is the measured FP8 linear's when there is one, else none (the cost model then runs FP8
    linears at the measured rate): the entry's datasheet FP8 rate beside a measured bf16 one would make the
    FP8 roofline 2.5x the bf16 one on an H100 where the engine's FP8 GEMMs are not."""
    hw = load_hardware_spec(base)
    fp8 = rates.fp8_matmul_flops
    return dataclasses.replace(
        hw,
        peak_flops=rates.matmul_flops,
        peak_flops_fp8=fp8,
        mem_bandwidth=rates.copy_bytes_s,
        step_overhead_s=0.0,
        source=f"measured on {rates.card}: copy {rates.copy_bytes_s / 1e9:.1f} GB/s (read+write), "
        f"{rates.dtype} GEMM {rates.matmul_n}^3 {rates.matmul_flops / 1e12:.2f} TFLOP/s"
        + (f", FP8 linear {fp8 / 1e12:.2f} TFLOP/s" if fp8 else ""),
    )


def twin_model(model: str, engine_model: str, dtype: torch.dtype, options: dict | None = None) -> ModelSpec:
    """The simulator's model `model` at the engine's dtype, KV cache dtype and weight quantization (the
    server's `options`); raises ValueError unless the engine runs its shape."""
    from engine.loader.dummy import config_for

    options = options or {}
    spec = dataclasses.replace(
        load_model_spec(model),
        dtype_bytes=dtype.itemsize,
        kv_cache_dtype=options.get("kv_cache_dtype", "auto"),
        quantization=options.get("quantization", "none"),
    )
    # check_shape reads only these two attributes of a core: the server's core is in another process
    check_shape(SimpleNamespace(model_config=config_for(engine_model), dtype=dtype), spec)
    return spec


# --------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hydra_value(value) -> str:
    """`value` in Hydra's override grammar: JSON, but a mapping's keys unquoted (`{model:"x",n:1}`)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return json.dumps(value)


@contextlib.contextmanager
def serving(
    engine_model: str, options: dict, out: Path, env: dict | None = None, timeout_s: float = 900.0
) -> Iterator[str]:
    """`python -m engine.serve` of `engine_model` with EngineConfig `options` on a loopback port (`env` added
    to its environment); yields its /v1 URL once GET /v1/models answers, stops it on exit. Log: out/server.log."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "engine.serve",
        f"model={engine_model}",
        f"port={port}",
        "log_level=warning",
        f"hydra.run.dir={out / 'server'}",
        "hydra.output_subdir=null",
    ]
    cmd += [f"{'scheduler' if k in SCHEDULER_KEYS else 'engine'}.{k}={hydra_value(v)}" for k, v in options.items()]
    base = f"http://127.0.0.1:{port}/v1"
    with open(out / "server.log", "w") as logf:
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        )
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode} (log: {logf.name})")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start within {timeout_s:.0f} s (log: {logf.name})")
                time.sleep(0.5)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def server_kv_blocks(base: str, timeout_s: float = 10.0) -> int:
    """The engine's KV blocks, from the server's /metrics (the core reports its stats every 0.5 s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(base.removesuffix("/v1") + "/metrics", timeout=5).text
        found = re.search(r"^tandem_kv_cache_total_blocks (\S+)$", text, re.MULTILINE)
        if found and float(found.group(1)) > 0:
            return int(float(found.group(1)))
        time.sleep(0.25)
    raise RuntimeError("the server's /metrics reported no KV blocks")


def server_counter(base: str, name: str) -> int:
    """The server's /metrics counter `name`, summed over its labels (every replica's). The core reports its
    stats every 0.5 s: read after that long with nothing running."""
    text = httpx.get(base.removesuffix("/v1") + "/metrics", timeout=5).text
    found = re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    if not found:
        raise RuntimeError(f"the server's /metrics has no {name}")
    return int(sum(float(v) for v in found))


# (the twin's summary keys, the server's /metrics counter, the printed label): requests preempted (recompute +
# swap), prefill chunks the admission policy cut or refused, requests it held past its max_wait_s, KV blocks
# evicted from the prefix cache
COUNTERS = {
    "preemptions": (("num_preemptions_recompute", "num_preemptions_swap"), "tandem_preemptions_total", "preemptions"),
    "admission_cuts": (("num_admission_cuts",), "tandem_admission_cuts_total", "admission cuts"),
    "held_too_long": (("num_held_too_long",), "tandem_admission_held_too_long_total", "held > max_wait_s"),
    "evicted_blocks": (("num_evicted_blocks",), "tandem_evicted_blocks_total", "KV blocks evicted"),
}
# the scheduler's counts a client cannot see: the engine's side of a level has them from /metrics (COUNTERS)
# instead, so its summary drops the client's (always 0) copies
SCHEDULER_COUNTS = (*(k for keys, _, _ in COUNTERS.values() for k in keys), "num_held_waiting")


def server_counters(base: str) -> dict[str, int]:
    return {key: server_counter(base, metric) for key, (_, metric, _) in COUNTERS.items()}


def level_counts(engine: dict, twin_summary: dict) -> dict:
    """Each COUNTERS count of a level the engine has (`engine`, from /metrics), beside the twin's."""
    return {
        key: {"engine": engine[key], "roofline": sum(twin_summary[k] for k in keys)}
        for key, (keys, _, _) in COUNTERS.items()
        if key in engine
    }


def twin_engine_section(options: dict, base: str, device: str) -> dict:
    """The simulator's `engine` and `scheduler` keys of the server (experiments.fidelity.sim_config): its
    EngineConfig's scheduler settings, its context length, idle prefill chunk and KV blocks as it reports them
    (the core resolves the last three), and the lookahead block that overlapped decode holds (its default is on
    where decode runs as CUDA graphs: on CUDA unless enforce_eager). The policies are run_twin's."""
    from engine.config import EngineConfig

    c = EngineConfig.from_dict(options)
    card = httpx.get(f"{base}/models", timeout=5).json()["data"][0]
    overlap = (device == "cuda" and not c.enforce_eager) if c.overlap_decode is None else c.overlap_decode
    s = c.scheduler
    return {
        **{k: getattr(s, k) for k in ("block_size", "max_num_seqs", "max_num_batched_tokens", "chunk_size")},
        "max_model_len": card["max_model_len"],
        # a server without the field (before it reported it) ran the configured value, or chunk_size's if none
        "idle_chunk_size": card.get("idle_chunk_size", s.idle_chunk_size or 0),
        **({"policy_modules": list(s.policy_modules)} if s.policy_modules else {}),
        "enable_prefix_caching": s.enable_prefix_caching,
        "num_gpu_blocks": c.num_gpu_blocks or server_kv_blocks(base),
        "num_host_blocks": 0,
        "num_lookahead_tokens": 1 if overlap else 0,
    }


# --------------------------------------------------------------------------- one level


@dataclass(frozen=True)
class Level:
    """One concurrency level: `sessions` swe_smith sessions, `concurrency` in flight, from `seed`."""

    concurrency: int
    sessions: int
    seed: int
    params: dict


def run_engine(base: str, level: Level, floor_tok_s: float = 70.0):
    """The level through the server (bench_serving, closed loop, greedy, sessions ended, the per-user floor
    `floor_tok_s` as its TPOT target): its BenchResult."""
    return asyncio.run(
        run_benchmark(
            BenchOptions(
                base_url=base,
                workload=WORKLOAD,
                params=dict(level.params),
                sessions=level.sessions,
                concurrency=level.concurrency,
                seed=level.seed,
                end_sessions=True,
                extra_body={"temperature": 0.0},
                label="engine",
                timeout_s=None,
                slo_tpot_s=1.0 / floor_tok_s,
            )
        )
    )


# the scheduler's policy kinds: the server's settings of these are the twin's
POLICY_KINDS = ("ordering", "eviction", "preemption", "admission")


def run_twin(
    level: Level,
    model: str,
    spec: ModelSpec,
    hw: HardwareSpec,
    engine: dict,
    cost: str = "roofline",
    policies: dict | None = None,
    floor_tok_s: float = 70.0,
):
    """The level in the simulator with the `cost` model (roofline on `hw`, or the `profile` fit shipped for
    the model on `hw`), the server's `policies` (POLICY_KINDS; fcfs + lru + recompute + all by default) and
    the per-user floor `floor_tok_s` as its TPOT target: its SimResult."""
    run = RunConf(
        name=f"c{level.concurrency}",
        workload=WORKLOAD,
        params=dict(level.params),
        mode="closed",
        concurrency=level.concurrency,
        sessions=level.sessions,
        policy="lru",
    )
    cfg = sim_config(FidelityConf(model=model, hardware=hw.name, seed=level.seed), run, engine, cost, None)
    cfg.update(model=dataclasses.asdict(spec), hardware=dataclasses.asdict(hw))
    cfg["scheduler"].update(policies or {})
    cfg["sim"]["slo_tpot_s"] = 1.0 / floor_tok_s
    return Simulation(cfg).run()


def compare(level: Level, engine: Figures, twin: Figures) -> list[dict]:
    """One row per figure: both values and engine / twin (the "roofline" key, whatever the twin's cost)."""
    rows = []
    for key, label, kind in FIGURES:
        e, r = getattr(engine, key), getattr(twin, key)
        rows.append(
            {
                "concurrency": level.concurrency,
                "sessions": level.sessions,
                "seed": level.seed,
                "figure": key,
                "label": label,
                "kind": kind,
                "engine": e,
                "roofline": r,
                "ratio": e / r if r else math.nan,
            }
        )
    return rows


# --------------------------------------------------------------------------- the whole run


def _fmt(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def format_rows(rows: list[dict], twin: str = "roofline") -> str:
    """The comparison as text, one block per concurrency level; `twin` names the twin's column (its cost)."""
    lines = [f"{'conc':>4}  {'figure':<26}{'engine':>10}{twin:>10}{'engine/' + twin:>17}"]
    for row in rows:
        lines.append(
            f"{row['concurrency']:>4}  {row['label']:<26}{_fmt(row['engine']):>10}"
            f"{_fmt(row['roofline']):>10}{_fmt(row['ratio']):>17}"
        )
    return "\n".join(lines)


def workload_params(device: str, quick: bool, overrides: dict) -> dict:
    """swe_smith's parameters: the device's defaults (--quick: shorter), then `overrides`."""
    if device == "cuda":
        base = QUICK_PARAMS if quick else GPU_PARAMS
    else:
        base = {**CPU_PARAMS, "turns_min": 2, "turns_max": 2} if quick else CPU_PARAMS
    return {**base, **overrides}


@dataclass(frozen=True)
class Setup:
    """What one run serves and simulates, from the command line and the device."""

    device: str
    dtype: torch.dtype
    model: str  # the twin's conf/model name or .yaml
    engine_model: str  # the server's shape or config.json
    spec: ModelSpec  # `model` at the engine's dtype
    options: dict  # the server's EngineConfig fields
    levels: tuple[Level, ...]
    hardware: str  # the conf/hardware entry of the card (its measured rates replace the entry's)
    twin_cost: str = "roofline"  # the twin's cost model: roofline on the measured rates, or the shipped profile
    floor_tok_s: float = 70.0  # the per-user speed floor both sides count tokens against

    @property
    def policies(self) -> dict:
        """The server's policy settings (POLICY_KINDS), which the twin runs too."""
        return {k: self.options[k] for k in POLICY_KINDS if k in self.options}

    @classmethod
    def of(cls, args: argparse.Namespace) -> Setup:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.dtype == "auto":
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
        else:
            dtype = getattr(torch, args.dtype)
        model = args.model or ("llama3_8b" if device == "cuda" else "smollm2_135m")
        engine_model = args.engine_model or ENGINE_SHAPES.get(load_model_spec(model).name)
        if engine_model is None:
            raise SystemExit(f"no engine shape for the model {model!r}: pass --engine-model")
        params = workload_params(device, args.quick, _pairs(args.params))
        levels = tuple(
            Level(c, args.sessions or (args.waves or (1 if args.quick else 2)) * c, args.seed + k, params)
            for k, c in enumerate(args.concurrency)
        )
        options = {
            "load_format": "dummy",
            "device": device,
            "dtype": str(dtype).replace("torch.", ""),
            **_pairs(args.engine),
        }
        if args.admission:
            options["admission"] = args.admission
        spec = twin_model(model, engine_model, dtype, options)
        hardware = args.hardware or hardware_name(SimpleNamespace(device=torch.device(device)))
        if args.twin_cost == "profile":  # no fit shipped for this model on this card: say so before serving
            make_cost_model("profile", spec, load_hardware_spec(hardware))
        return cls(device, dtype, model, engine_model, spec, options, levels, hardware, args.twin_cost, args.floor)


def step_cost_option(setup: Setup, hw: HardwareSpec, out: Path) -> dict:
    """EngineConfig.step_cost of the twin's cost model: the model, `hw` (the measured rates) written as a
    conf/hardware YAML under `out`, and the twin's cost (a profile: the fit shipped for the model on the card)."""
    import yaml

    path = out / "twin-hardware.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in dataclasses.asdict(hw).items() if v is not None}))
    return {"model": setup.model, "hardware": str(path), "cost_model": setup.twin_cost}


def serve_levels(
    setup: Setup, base: str, hw: HardwareSpec, warm_seed: int, progress=print, on_level=None
) -> tuple[list, list, dict]:
    """Warms the server up, then each level through it and in the twin: (rows, per-level summaries, the
    twin's engine section); `on_level(rows, levels, engine)` after each level with what is done so far."""
    params = setup.levels[0].params
    warm = {
        **params,
        "first_turn_tokens": min(3000, params.get("first_turn_tokens", 50_000)),
        "output_tokens": 32,
        "turns_min": 2,
        "turns_max": 2,
    }
    run_engine(base, Level(2, 2, warm_seed, warm), setup.floor_tok_s)
    engine = twin_engine_section(setup.options, base, setup.device)
    rows, levels = [], []
    time.sleep(STATS_PERIOD_S)
    counted = server_counters(base)
    for level in setup.levels:
        t0 = time.monotonic()
        served = run_engine(base, level, setup.floor_tok_s)
        s = served.summary
        time.sleep(STATS_PERIOD_S)  # the level's last stats
        now = server_counters(base)
        served_counts, counted = {k: now[k] - counted[k] for k in now}, now
        s = {k: v for k, v in s.items() if k not in SCHEDULER_COUNTS}
        progress(f"concurrency {level.concurrency}: {level.sessions} sessions served in {time.monotonic() - t0:.1f} s")
        if s["num_errors"] or not s["completed"]:
            progress(f"  warning: {s['num_errors']} failed calls {s['errors']}, completed {s['completed']}")
        twin = run_twin(level, setup.model, setup.spec, hw, engine, setup.twin_cost, setup.policies, setup.floor_tok_s)
        rows += compare(level, Figures.of(s, served.requests), Figures.of(twin.summary, twin.requests))
        levels.append(
            {
                "level": dataclasses.asdict(level),
                "engine": s,
                "roofline": twin.summary,
                "roofline_notes": twin.notes,
                **level_counts(served_counts, twin.summary),
            }
        )
        if on_level is not None:
            on_level(rows, levels, engine)
    return rows, levels, engine


def format_counters(levels: list[dict], key: str = "preemptions") -> str:
    """A COUNTERS count at each level, the engine's (its /metrics) and the twin's (the same sessions)."""

    def side(lv: dict, which: str):  # a run saved before the counter was read has none
        return lv.get(key, {}).get(which, "-")

    return f"{COUNTERS[key][2]} (engine / twin): " + ", ".join(
        f"concurrency {lv['level']['concurrency']} {side(lv, 'engine')} / {side(lv, 'roofline')}" for lv in levels
    )


def retwin(path: str, overrides: dict, progress=print) -> dict:
    """The twin's side of a saved run (--json) again, on its saved settings with `overrides` over its engine
    section (e.g. a scheduler setting the run did not hand the twin), beside the engine's saved figures and
    counts: the results as run() returns them. The twin is deterministic, so only what changed moves."""
    from sim.specs import HardwareSpec, ModelSpec

    saved = json.loads(Path(path).read_text())
    m = saved["meta"]
    spec, hw = ModelSpec(**m["model"]), HardwareSpec(**m["hardware"])
    engine = {**m["twin_engine"], **overrides}
    cost, policies, floor = m.get("twin_cost", "roofline"), m.get("policies", {}), m.get("floor_tok_s", 70.0)
    rows, levels = [], []
    for lv in saved["levels"]:
        level = Level(**lv["level"])
        twin = run_twin(level, m.get("twin_model", spec.name), spec, hw, engine, cost, policies, floor)
        progress(f"concurrency {level.concurrency}: the twin re-run")
        measured = {r["figure"]: r["engine"] for r in saved["rows"] if r["concurrency"] == level.concurrency}
        engine_figures = Figures(**{key: measured.get(key, math.nan) for key, _, _ in FIGURES})
        rows += compare(level, engine_figures, Figures.of(twin.summary, twin.requests))
        counts = level_counts({key: lv[key]["engine"] for key in COUNTERS if key in lv}, twin.summary)
        levels.append({**lv, "roofline": twin.summary, "roofline_notes": twin.notes, **counts})
    meta = {**m, "twin_engine": engine, "retwin": {"from": path, "overrides": overrides, "commit": git_commit()}}
    return {"meta": meta, "rows": rows, "levels": levels}


def run(args: argparse.Namespace, progress=print) -> dict:
    """Measures the card, serves every level, runs the twin on each; returns the results (JSON-ready)."""
    start = time.monotonic()
    setup = Setup.of(args)
    rates = measure_card(setup.device, setup.dtype, setup.options.get("quantization", "none") == "fp8")
    hw = twin_hardware(rates, setup.hardware)
    progress(
        f"card: {rates.card}; copy {rates.copy_bytes_s / 1e9:.1f} GB/s (read+write), {rates.dtype} GEMM "
        f"{rates.matmul_n}^3 {rates.matmul_flops / 1e12:.2f} TFLOP/s"
        + (f", FP8 linear {rates.fp8_matmul_flops / 1e12:.2f} TFLOP/s" if rates.fp8_matmul_flops else "")
        + f"; twin hardware {hardware_label(hw)}"
    )
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_agentic-"))
    out.mkdir(parents=True, exist_ok=True)
    if setup.options.get("admission", "all") != "all" and "step_cost" not in setup.options:
        # the server's admission policy predicts with the twin's own cost model: the same model on the same rates
        setup.options["step_cost"] = step_cost_option(setup, hw, out)
        progress(f"the server's admission {setup.options['admission']} predicts with {setup.options['step_cost']}")
    # on the CPU one intra-op thread: the engine's spinning OpenMP workers would fight the client for the cores
    env = {"OMP_NUM_THREADS": "1"} if setup.device == "cpu" else None

    def results(rows: list, levels: list, engine: dict) -> dict:
        return {"meta": _run_meta(setup, rates, hw, out, start, engine), "rows": rows, "levels": levels}

    def save_partial(rows: list, levels: list, engine: dict) -> None:
        # what a run cut short (a device call's time limit) has measured so far: the levels served
        if args.json:
            Path(args.json).write_text(json.dumps({**results(rows, levels, engine), "partial": True}, default=float))

    with serving(setup.engine_model, setup.options, out, env) as base:
        progress(f"server up at {time.monotonic() - start:.0f} s ({setup.engine_model}, {rates.dtype}); warming up")
        rows, levels, engine = serve_levels(setup, base, hw, args.seed + WARMUP_SEED, progress, save_partial)
    return results(rows, levels, engine)


def _run_meta(setup: Setup, rates: CardRates, hw: HardwareSpec, out: Path, start: float, engine: dict) -> dict:
    """The results' meta: what ran (card, rates, model, options, policies, twin settings) and when."""
    return {
        "rates": dataclasses.asdict(rates),
        "hardware": dataclasses.asdict(hw),
        "hardware_label": hardware_label(hw),
        "model": dataclasses.asdict(setup.spec),
        "twin_model": setup.model,  # its conf/model name or .yaml, as given
        "engine_model": setup.engine_model,
        "engine_options": setup.options,
        "twin_cost": setup.twin_cost,
        "policies": setup.policies,
        "floor_tok_s": setup.floor_tok_s,
        "twin_engine": engine,
        "workload": WORKLOAD,
        "params": setup.levels[0].params,
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.monotonic() - start,
        "out": str(out),
    }


def admission_floor(spec: str | None) -> float | None:
    """The tok/s an admission spec keeps (`tps_floor:tok_s=50` -> 50.0; tps_floor's default 70), or None (no
    spec, or a policy that keeps no floor)."""
    from controlplane import parse_policy_spec

    if not spec:
        return None
    name, params = parse_policy_spec(spec)
    return params.get("tok_s", 70.0) if name == "tps_floor" else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4], help="closed-loop levels")
    p.add_argument("--sessions", type=int, help="sessions at each level (default: 2 x concurrency; --quick: 1 x)")
    p.add_argument("--waves", type=int, help="sessions at each level = this x concurrency (unless --sessions)")
    p.add_argument(
        "--params",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="swe_smith parameters over the defaults (GPU: 4 turns a session; CPU: a small shape)",
    )
    p.add_argument("--model", help="conf/model name or .yaml of the twin (default: llama3_8b; CPU: smollm2_135m)")
    p.add_argument("--engine-model", help="the engine's shape or config.json (default: the model's, ENGINE_SHAPES)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32", "float16"),
        help="auto: bfloat16 on CUDA, float32 on the CPU",
    )
    p.add_argument("--hardware", help="conf/hardware entry the measured rates replace (default: from the card)")
    p.add_argument("--engine", nargs="*", default=[], metavar="KEY=VALUE", help="EngineConfig fields of the server")
    p.add_argument(
        "--admission",
        help="the scheduler's admission policy on both sides (e.g. tps_floor:tok_s=70); a predicting one gets "
        "the twin's cost model as the server's step_cost unless --engine gives one",
    )
    p.add_argument(
        "--twin-cost",
        default="roofline",
        choices=("roofline", "profile"),
        help="the twin's cost: roofline on the measured rates, or the fit shipped for the model on the card "
        "(conf/profiles)",
    )
    p.add_argument(
        "--floor",
        type=float,
        help="per-user tok/s both sides count tokens at the floor against (default: the admission's tok_s, else 70)",
    )
    p.add_argument("--seed", type=int, default=0, help="level k runs sessions of seed + k")
    p.add_argument("--quick", action="store_true", help="short sessions, one wave a level")
    p.add_argument("--out", help="the server's log and Hydra directory (default: a temporary directory)")
    p.add_argument(
        "--json",
        help="write the rows, the summaries and the measured rates here (after each level too, marked partial)",
    )
    p.add_argument(
        "--retwin",
        metavar="JSON",
        help="serve nothing: run the twin's side of a saved run (its --json) again, beside its saved engine side",
    )
    p.add_argument(
        "--twin-engine",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="with --retwin: the twin's scheduler and KV settings over the saved ones (e.g. idle_chunk_size=16384)",
    )
    args = p.parse_args(argv)
    if min(args.concurrency) < 1 or any(v is not None and v < 1 for v in (args.sessions, args.waves)):
        p.error("--concurrency, --sessions and --waves must be >= 1")
    kept = admission_floor(args.admission)
    if args.floor is None:
        args.floor = kept or 70.0
    elif kept is not None and kept != args.floor:
        p.error(f"--floor {args.floor:g} is not the floor the admission keeps ({kept:g} tok/s)")
    if not args.floor > 0:
        p.error("--floor must be > 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark, prints the comparison and returns the results."""
    args = parse_args(argv)
    progress = lambda s: print(s, flush=True)  # noqa: E731
    if args.retwin:
        results = retwin(args.retwin, _pairs(args.twin_engine), progress)
    else:
        results = run(args, progress=progress)
    m = results["meta"]
    print(
        f"\n{WORKLOAD} {m['params']}, {m['engine_model']} (random weights, {m['rates']['dtype']}) on "
        f"{m['rates']['card']}, {m['twin_engine']['num_gpu_blocks']} KV blocks; twin: {m['twin_cost']} on "
        f"{m['hardware_label']}; policies {m['policies'] or 'fcfs+lru'}; floor {m['floor_tok_s']:g} tok/s"
    )
    print(
        f"ratio = engine / {m['twin_cost']}: > 1 for TTFT (slower than the twin), < 1 for throughputs and the "
        "share of tokens at the floor (short of the twin)"
    )
    print(format_rows(results["rows"], m["twin_cost"]))
    for key in COUNTERS:
        print(format_counters(results["levels"], key))
    if "retwin" in m:
        print(f"the twin re-run from {m['retwin']['from']} with {m['retwin']['overrides'] or 'its saved settings'}")
    else:
        print(f"wall {m['wall_seconds']:.0f} s; server log {m['out']}/server.log")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
