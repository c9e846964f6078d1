"""Typed, frozen configuration of a model's architecture and of an engine instance."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from controlplane.config import SchedulerConfig, reject_unknown_keys

# Hugging Face `architectures` names this engine runs, and the family each maps to.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class ModelConfigError(ValueError):
    """A model's configuration is missing, malformed or describes an architecture we do not run."""


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only model, read from a Hugging Face config.json or GGUF metadata."""

    architecture: str  # a key of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def family(self) -> str:
        return ARCHITECTURES[self.architecture]

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + emb + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Reads a Hugging Face config.json mapping; raises ModelConfigError naming what is wrong."""
        archs = cfg.get("architectures") or []
        if isinstance(archs, str):
            archs = [archs]
        supported = [a for a in archs if a in ARCHITECTURES]
        if not supported:
            raise ModelConfigError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; this engine runs {sorted(ARCHITECTURES)}"
            )
        arch = supported[0]

        def need(key: str):
            if key not in cfg:
                raise ModelConfigError(f"config.json lacks {key!r} (needed for {arch})")
            return cfg[key]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
        family = ARCHITECTURES[arch]
        rope_scaling = cfg.get("rope_scaling")
        theta = cfg.get("rope_theta")
        params = cfg.get("rope_parameters")  # transformers >= 5 folds theta and scaling in here
        if isinstance(params, Mapping):
            theta = params.get("rope_theta", theta)
            if params.get("rope_type", "default") != "default" and rope_scaling is None:
                rope_scaling = dict(params)
        config = cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        config.validate()
        return config

    def validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"model config {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "llama3", "linear"):
                raise ModelConfigError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face config.json mapping of this shape (for transformers references and dummy dirs)."""
        cfg = {
            "architectures": [self.architecture],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": self.attention_bias,
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        if self.bos_token_id is not None:
            cfg["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            cfg["eos_token_id"] = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0]
        return cfg


# EngineConfig.scheduler.idle_chunk_size=None on CUDA with a tiled prefill attention kernel: a lone 50K-token
# prompt is prefilled in 4 steps of 16384 tokens instead of 25 of chunk_size (2048), while a step
# that a decode waits in keeps chunk_size and max_num_batched_tokens (docs/engine.md).
AUTO_IDLE_CHUNK_SIZE = 16384

KV_CACHE_DTYPES = ("auto", "fp8_e4m3")  # the KV cache's element type ("auto": the model's dtype)
QUANTIZATIONS = ("none", "fp8")  # the weights' ("fp8": e4m3, per-output-channel scales)
# The engine's defaults of the scheduler's plane-resolved settings (EngineConfig.scheduler): the device's, the model's.
ENGINE_SCHEDULER_DEFAULTS = {"idle_chunk_size": None, "max_model_len": None}
# the scheduler's keys a user sets (the engine sets the others: sizes from memory and model, lookahead from overlap)
SCHEDULER_KEYS = {f.name for f in dataclasses.fields(SchedulerConfig)} - {
    "num_blocks",
    "num_host_blocks",
    "vocab_size",
    "num_lookahead_tokens",
}


@dataclass(frozen=True)
class StepCostOptions:
    """EngineConfig.step_cost's keys (see there)."""

    model: str = ""
    hardware: str = ""
    cost_model: str = "roofline"
    profile_path: str | None = None


@dataclass(frozen=True)
class EngineConfig:
    """How one engine instance runs; unknown keys are rejected by `from_dict`.

    Attributes:
        model: a Hugging Face model directory, a .gguf file, a built-in shape name
            (see engine.models.shapes) with load_format="dummy", or "" for the embedded default.
        tokenizer: a directory with tokenizer files, instead of the model's own (e.g. for dummy shapes).
        load_format: "auto" (directory or GGUF by what `model` is) or "dummy" (random weights).
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16".
        kv_cache_dtype: "auto" (the model's dtype) or "fp8_e4m3" (K/V stored in FP8 with scales;
            docs/fp8.md): half the KV bytes of bf16, so twice the tokens in the same memory.
        quantization: "none" or "fp8" (e4m3 weights with per-output-channel scales, quantized at load
            from a bf16 checkpoint or read as they are from an FP8 one; docs/fp8.md).
        device: "auto" (cuda if available), "cuda" or "cpu".
        kernel_backend: "auto", "torch", "triton" or "jax"; kernel_overrides per op.
        gpu_memory_utilization: share of device memory the engine may use (weights + KV + activations).
        num_gpu_blocks: if set, the KV block count (skips sizing from memory).
        kv_cache_memory_gb: on CPU, the KV cache's size when num_gpu_blocks is unset.
        enforce_eager: no CUDA graphs.
        cuda_graph_batch_sizes: decode batch sizes to capture (others pad up to the next one).
        scheduler: the control plane's settings (controlplane.SchedulerConfig; conf/scheduler/), less
            what the engine sets: num_blocks, num_host_blocks, vocab_size and num_lookahead_tokens.
            Its idle_chunk_size of None is AUTO_IDLE_CHUNK_SIZE on CUDA where prefill attention is a
            tiled kernel (not the torch reference), else 0; its max_model_len of None the model's.
        overlap_decode: launch each decode step's guessed successor before its tokens are back
            (engine/overlap.py); None: on where decode runs as CUDA graphs of the Triton kernels.
            On, the scheduler holds one block ahead of each decoding request (num_lookahead_tokens = 1).
        step_cost: the simulator's step-cost model of this engine, which an admission policy other than
            "all" (scheduler.admission, e.g. "tps_floor:tok_s=70") predicts step times with: keys `model`
            (a conf/model name or .yaml of the engine's shape; its dtype, KV cache dtype and quantization
            are taken from this config), `hardware` (a conf/hardware name or .yaml), `cost_model`
            ("roofline", the default, or "profile") and `profile_path` (a fitted profile; None: the one
            shipped for the pair). None: no cost model (admission must then be "all").
        lookahead: look-ahead policy choice (sim/lookahead.py LookaheadConfig: candidates, every_s,
            horizon_s, objective, floor_tok_s), with step_cost's model; the candidates' runs go to a
            worker thread, only the scheduler's snapshot is taken between steps. None: off.
        tensor_parallel_size: ranks the model is sharded over (engine.tensor_parallel): this process is
            rank 0 and runs the scheduler; the others are spawned processes that run each step's forward
            on their shard (gloo on CPUs, NCCL on GPUs). Off (1) by default.
    """

    model: str = ""
    tokenizer: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    quantization: str = "none"
    device: str = "auto"
    seed: int = 0
    kernel_backend: str = "auto"
    kernel_overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    swap_space_gb: float = 0.0
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(**ENGINE_SCHEDULER_DEFAULTS))
    enforce_eager: bool = False
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    overlap_decode: bool | None = None
    tensor_parallel_size: int = 1
    # KV cache events over ZMQ in vLLM's format (engine/kv_events.py KVEventsConfig fields;
    # docs/kv-events.md); None: off
    kv_events: Mapping[str, Any] | None = None
    step_cost: Mapping[str, Any] | None = None
    lookahead: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EngineConfig":
        """Builds a config from a mapping whose `scheduler` is a mapping too, or whose scheduler keys the
        user may set are given flat as vLLM's are (``LLM(max_num_seqs=8)``); rejects unknown keys by name."""
        values = dict(values)
        flat = {k: values.pop(k) for k in SCHEDULER_KEYS & values.keys()}
        reject_unknown_keys(cls, values, "engine config")
        if "cuda_graph_batch_sizes" in values and not isinstance(values["cuda_graph_batch_sizes"], str):
            values["cuda_graph_batch_sizes"] = tuple(values["cuda_graph_batch_sizes"])
        nested = values.get("scheduler", {})
        if flat or isinstance(nested, Mapping):
            nested = dataclasses.asdict(nested) if isinstance(nested, SchedulerConfig) else nested
            values["scheduler"] = SchedulerConfig.from_dict({**ENGINE_SCHEDULER_DEFAULTS, **nested, **flat})
        return cls(**values)

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy", "hf", "gguf"):
            raise ValueError(f"load_format must be auto, hf, gguf or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {self.device!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks <= 0:
            raise ValueError(f"num_gpu_blocks must be positive, got {self.num_gpu_blocks}")
        if self.overlap_decode not in (None, True, False):
            raise ValueError(f"overlap_decode must be true, false or null (auto), got {self.overlap_decode!r}")
        if type(self.tensor_parallel_size) is not int or self.tensor_parallel_size < 1:  # not a bool either
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.scheduler.num_lookahead_tokens:
            raise ValueError("scheduler.num_lookahead_tokens is the engine's to set: it follows overlap_decode")
        self.scheduler.validate()
        if self.step_cost is not None:
            reject_unknown_keys(StepCostOptions, self.step_cost, "engine step_cost")
            if not self.step_cost.get("model") or not self.step_cost.get("hardware"):
                raise ValueError("step_cost needs `model` and `hardware` (conf/model and conf/hardware names or files)")
        if self.lookahead is not None and self.step_cost is None:
            raise ValueError("lookahead runs candidate policies on the twin's cost model: give step_cost too")
        if self.lookahead is not None:
            from sim.lookahead import LookaheadConfig

            LookaheadConfig.from_dict(self.lookahead)
        if self.step_cost is None and self.scheduler.admission != "all":
            raise ValueError(
                f"scheduler.admission={self.scheduler.admission!r} predicts step times: give the engine a step "
                f"cost (step_cost={{model: ..., hardware: ...}}, the simulator's cost model of this engine)"
            )
