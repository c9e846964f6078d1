"""Typed configuration of a simulation: the schema Hydra validates `conf/` against.

Every section is a dataclass; Hydra merges the YAML files onto them in struct
mode, so an unknown key is an error that names it. `validate(cfg)` then checks
values (rates, sizes, policies, that the model fits the hardware) before any
simulated time passes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from controlplane import SchedulerConfig, policy_names
from sim.specs import KV_CACHE_DTYPES, QUANTIZATIONS, check_choice, check_tensor_parallel
from sim.workloads import make_workload


@dataclass
class ModelConf:
    """A model's shape and storage (see sim.specs.ModelSpec); conf/model/*.yaml."""

    name: str = "llama3_8b"
    num_layers: int = 32
    hidden_size: int = 4096
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 14336
    vocab_size: int = 128256
    dtype_bytes: int = 2
    tie_word_embeddings: bool = False
    kv_cache_dtype: str = "auto"  # auto (dtype_bytes) | fp8_e4m3: as the engine's setting (docs/simulator.md)
    quantization: str = "none"  # none | fp8: e4m3 linear weights, per-output-channel scales
    tensor_parallel_size: int = 1  # GPUs a replica shards the model over, as the engine's setting (docs/simulator.md)


@dataclass
class HardwareConf:
    """One accelerator (see sim.specs.HardwareSpec); conf/hardware/*.yaml."""

    name: str = "h100_sxm"
    peak_flops: float = 989.4e12
    mem_bandwidth: float = 3.35e12
    mem_bytes: float = 80e9
    host_link_bandwidth: float = 64e9
    step_overhead_s: float = 0.0
    source: str = ""
    peak_flops_fp8: Optional[float] = None  # dense FP8 FLOP/s; None: FP8 linear layers at peak_flops
    gpu_link_bandwidth: Optional[float] = None  # GPU<->GPU bytes/s one direction; None: not known (TP 1 only)
    collective_latency_s: Optional[float] = None  # seconds each collective adds; None: not known (0)


@dataclass
class WorkloadConf:
    """A workload generator and its parameters (see sim.workloads); conf/workload/*.yaml."""

    name: str = "agentic_coding"
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicyConf:
    """The name of the policies that conf/policy/*.yaml set in `scheduler` (in run directories' names)."""

    name: str = "lru"


@dataclass
class ClusterConf:
    """Replicas behind a router (each of model.tensor_parallel_size GPUs); conf/cluster/*.yaml."""

    num_replicas: int = 1
    router: str = "round_robin"  # a router policy spec: policy_names("router"), C++ or Python


@dataclass
class EngineConf:
    """How each replica's KV cache is sized from memory (as the GPU engine's is)."""

    gpu_memory_utilization: float = 0.9
    host_kv_gb: float = 0.0  # host tier for swap-out preemption, GB per replica
    num_gpu_blocks: Optional[int] = None  # device KV blocks; None: sized from hardware.mem_bytes
    num_host_blocks: Optional[int] = None  # host-tier blocks; None: from host_kv_gb


@dataclass
class SimConf:
    """How the simulation runs; conf/sim/*.yaml."""

    seed: int = 0
    mode: str = "open"  # open: sessions arrive at session_rate; closed: fixed concurrency
    num_sessions: Optional[int] = None  # None: every session of a trace (a generated workload needs a number)
    session_rate: Optional[float] = None  # sessions/s (open loop); None: the workload's default
    concurrency: int = 8  # sessions in flight (closed loop)
    cost_model: str = "roofline"  # roofline | profile (conf/cost/)
    profile_path: Optional[str] = None  # profile: None = conf/profiles/<hardware>/<model>.json
    end_sessions: bool = True  # the agent ends its session after its last call
    idle_wait_s: float = 0.05  # a replica with only blocked requests re-plans after this long
    kv_sample_interval_s: float = 1.0
    slo_ttft_s: float = 5.0  # goodput: a request meets the SLO if TTFT <= this ...
    slo_tpot_s: float = 1.0 / 70.0  # ... and its time per output token <= this (70 tokens/s per user)
    max_sim_time_s: Optional[float] = None
    progress: bool = True
    fast_forward: bool = True  # run a replica's steps in C++ between other events (same results)
    # look-ahead policy choice (sim/lookahead.py LookaheadConfig: candidates, every_s, horizon_s, objective,
    # floor_tok_s); None: off. On, replicas run step by step (the choice is made between steps).
    lookahead: Any = None  # (Any: OmegaConf cannot merge `sim.lookahead={...}` into a typed mapping that is None)


@dataclass
class WandbConf:
    mode: str = "offline"  # offline | online | disabled
    project: str = "tandem-sim"
    group: Optional[str] = None


@dataclass
class OutputConf:
    dir: str = "."  # relative to Hydra's run directory
    plots: bool = True
    requests_table: bool = True


@dataclass
class SimulationConfig:
    model: ModelConf = field(default_factory=ModelConf)
    hardware: HardwareConf = field(default_factory=HardwareConf)
    workload: WorkloadConf = field(default_factory=WorkloadConf)
    policy: PolicyConf = field(default_factory=PolicyConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    engine: EngineConf = field(default_factory=EngineConf)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # conf/scheduler/*.yaml
    sim: SimConf = field(default_factory=SimConf)
    wandb: WandbConf = field(default_factory=WandbConf)
    output: OutputConf = field(default_factory=OutputConf)


def from_mapping(values: Any) -> SimulationConfig:
    """Builds a SimulationConfig from nested mappings (e.g. an OmegaConf container), rejecting unknown keys."""
    if isinstance(values, SimulationConfig):
        return values
    out = {}
    known = {f.name: f for f in dataclasses.fields(SimulationConfig)}
    for key, section in dict(values).items():
        if key not in known:
            raise ValueError(f"unknown config section '{key}'; known: {sorted(known)}")
        cls = known[key].default_factory  # type: ignore[misc]
        names = {f.name for f in dataclasses.fields(cls)}
        section = dict(section or {})
        unknown = sorted(set(section) - names)
        if unknown:
            raise ValueError(f"unknown keys in '{key}': {unknown}; known: {sorted(names)}")
        out[key] = SchedulerConfig.from_dict(section) if cls is SchedulerConfig else cls(**section)
    return SimulationConfig(**out)


def _positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if value is None or not value > 0:
            raise ValueError(f"{section}.{name} must be positive, got {value!r}")


def validate(cfg: SimulationConfig) -> None:
    """Checks values that the schema's types cannot; raises ValueError naming the setting."""
    s, e, c = cfg.sim, cfg.engine, cfg.cluster
    check_choice("model.kv_cache_dtype", cfg.model.kv_cache_dtype, KV_CACHE_DTYPES)
    check_choice("model.quantization", cfg.model.quantization, QUANTIZATIONS)
    m = cfg.model
    check_tensor_parallel(
        "model.tensor_parallel_size",
        m.tensor_parallel_size,
        m.name,
        m.num_heads,
        m.num_kv_heads,
        m.intermediate_size,
        m.vocab_size,
    )
    if s.mode not in ("open", "closed"):
        raise ValueError(f"sim.mode must be 'open' or 'closed', got {s.mode!r}")
    if s.session_rate is not None:
        _positive("sim", session_rate=s.session_rate)
    if s.num_sessions is not None:
        _positive("sim", num_sessions=s.num_sessions)
    _positive(
        "sim",
        concurrency=s.concurrency,
        idle_wait_s=s.idle_wait_s,
        kv_sample_interval_s=s.kv_sample_interval_s,
        slo_ttft_s=s.slo_ttft_s,
        slo_tpot_s=s.slo_tpot_s,
    )
    if s.max_sim_time_s is not None:
        _positive("sim", max_sim_time_s=s.max_sim_time_s)
    if s.cost_model not in ("roofline", "profile"):
        raise ValueError(f"sim.cost_model must be 'roofline' or 'profile', got {s.cost_model!r}")
    if s.cost_model == "profile" and s.profile_path and not os.path.isfile(s.profile_path):
        raise ValueError(f"sim.profile_path: no such file {s.profile_path!r}")
    _positive("cluster", num_replicas=c.num_replicas)
    if not 0 < e.gpu_memory_utilization <= 1:
        raise ValueError(f"engine.gpu_memory_utilization must be in (0, 1], got {e.gpu_memory_utilization}")
    if e.host_kv_gb < 0:
        raise ValueError(f"engine.host_kv_gb must be >= 0, got {e.host_kv_gb}")
    if e.num_gpu_blocks is not None:
        _positive("engine", num_gpu_blocks=e.num_gpu_blocks)
    if e.num_host_blocks is not None and e.num_host_blocks < 0:
        raise ValueError(f"engine.num_host_blocks must be >= 0, got {e.num_host_blocks}")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise ValueError(f"wandb.mode must be offline, online or disabled, got {cfg.wandb.mode!r}")
    cfg.scheduler.validate()
    if c.router.split(":", 1)[0] not in policy_names("router"):
        raise ValueError(f"cluster.router: unknown router {c.router!r}; registered: {policy_names('router')}")
    make_workload(cfg.workload.name, dict(cfg.workload.params)).check()  # e.g. a trace file that is not there


def scheduler_config(cfg: SimulationConfig, num_blocks: int, num_host_blocks: int) -> SchedulerConfig:
    """The control-plane config one replica runs with: cfg.scheduler with the sizes the simulator sets."""
    s = cfg.scheduler
    defaults = {k: getattr(SchedulerConfig, k) for k in ("idle_chunk_size", "max_model_len") if getattr(s, k) is None}
    return dataclasses.replace(
        s, num_blocks=num_blocks, num_host_blocks=num_host_blocks, vocab_size=cfg.model.vocab_size, **defaults
    )
