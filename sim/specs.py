"""What the simulator knows about a model and a machine: shapes, rates, memory.

`ModelSpec` is a decoder-only transformer (Llama / Qwen style: GQA attention,
a gated MLP, RMSNorm) described by the handful of numbers in its public
``config.json``. `HardwareSpec` is one accelerator described by datasheet
rates. Both are frozen, validated on construction, and load from
``conf/model/<name>.yaml`` and ``conf/hardware/<name>.yaml`` with unknown keys
rejected. `kv_capacity_blocks` sizes the device KV pool the way a vLLM-like
engine does after loading its weights.

A model spec also says how its weights and KV cache are stored, as the engine's
``kv_cache_dtype`` and ``quantization`` settings (engine/config.py) do; the bytes
every cost and capacity reads follow from them (`ModelSpec.weight_bytes`,
`ModelSpec.kv_bytes_per_token`):

    kv_cache_dtype  auto      K and V at dtype_bytes per element
                    fp8_e4m3  1 byte per element, plus one float32 scale per
                              (token, KV head) for K and one for V
    quantization    none      every weight at dtype_bytes
                    fp8       the linear layers (qkv, o, gate_up, down) at 1 byte per
                              weight plus one float32 scale per output channel; the
                              embedding table, the norms and the LM head stay at
                              dtype_bytes (as vLLM keeps lm_head unquantized in FP8
                              per-channel checkpoints)

A model spec also says over how many GPUs one replica shards the model, as the engine's
``tensor_parallel_size`` does (engine/tensor_parallel.py): with N ranks each holds 1/N of the query
heads, of the FFN's channels and of the vocabulary (the embedding and the LM head are
vocabulary-parallel), the KV heads split N ways, or, with fewer KV heads than ranks, the one KV head it
serves (N / num_kv_heads ranks share each); norms are whole on every rank. The ``rank_*`` methods give
one rank's share, which is every figure with N = 1.

One transformer layer, as the step-cost models see it (T tokens this step)::

    x [T, hidden] -> RMSNorm -> qkv  [hidden -> (heads + 2*kv_heads) * head_dim]
                              -> attention over the KV cache (no weights)
                              -> o    [heads * head_dim -> hidden]
                  -> RMSNorm -> gate_up [hidden -> 2 * intermediate]
                              -> down [intermediate -> hidden]
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

# The repository's conf/; TANDEM_CONF_DIR points elsewhere (e.g. an installed package run from a checkout).
CONF_DIR = Path(os.environ.get("TANDEM_CONF_DIR") or Path(__file__).resolve().parent.parent / "conf")

# What `kv_capacity_blocks` keeps free for activations when not told otherwise.
# A vLLM-like engine measures its peak activation memory with a dummy forward
# pass at the full token budget; for 1B-8B models and an 8192-token budget that
# peak (MLP intermediates of the chunk, sampled logits, allocator slack) is of
# the order of a GiB. A flat 1 GiB is a heuristic, not a measurement: pass
# `activation_reserve_bytes` when the engine's own figure is known.
DEFAULT_ACTIVATION_RESERVE_BYTES = 1 << 30

_GB = 1e9

# The engine's names and values (engine/config.py KV_CACHE_DTYPES, QUANTIZATIONS); the simulator
# does not import the engine (torch), tests/test_sim_fp8.py checks the two agree.
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")  # "auto": the model's dtype (dtype_bytes)
QUANTIZATIONS = ("none", "fp8")  # "fp8": e4m3 linear weights, per-output-channel scales
FP8_BYTES = 1  # an e4m3 element
SCALE_BYTES = 4  # a float32 scale


def check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    """ValueError ``"<field> must be one of a, b, got 'x'"`` (the engine's wording) unless value is allowed."""
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(allowed)}, got {value!r}")


def check_tensor_parallel(
    field: str, size: Any, model: str, num_heads: int, num_kv_heads: int, intermediate_size: int, vocab_size: int
) -> None:
    """ValueError naming `field` unless `size` is a positive integer the engine can shard such a model
    over: it must divide the query heads, the FFN's channels and the vocabulary, and divide the KV heads
    or be a multiple of them (engine/tensor_parallel.py check_divisible refuses the same sizes)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{field} must be a positive integer, got {size!r}")
    problems = []
    if num_heads % size:
        problems.append(f"{num_heads} query heads")
    if num_kv_heads % size and size % num_kv_heads:
        problems.append(f"{num_kv_heads} KV heads (nor is it a multiple of them)")
    if intermediate_size % size:
        problems.append(f"{intermediate_size} FFN channels")
    if vocab_size % size:
        problems.append(f"vocabulary of {vocab_size}")
    if problems:
        raise ValueError(f"{field} {size} does not divide model {model}'s " + ", ".join(problems))


def _check_positive_int(owner: str, field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {field} must be a positive integer, got {value!r}")


def _checked_float(owner: str, field: str, value: Any, *, allow_zero: bool) -> float:
    """`value` as a finite float, > 0 (or >= 0 with `allow_zero`), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = ""
        if isinstance(value, str):
            # PyYAML reads 3.35e12 (no sign in the exponent) as a string.
            hint = "; in YAML write floats with a dot and a signed exponent, e.g. 3.35e+12"
        raise ValueError(f"{owner}: {field} must be a number, got {value!r}{hint}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}: {field} must be finite and {bound}, got {value!r}")
    return value


def _from_mapping(cls, kind: str, values: Mapping[str, Any], source: str):
    """Builds dataclass `cls` from `values`, naming unknown or missing keys."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{kind} spec {source}: expected a mapping of keys, got {type(values).__name__}")
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{kind} spec {source}: unknown keys {unknown}; known: {sorted(known)}")
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(values))
    if missing:
        raise ValueError(f"{kind} spec {source}: missing keys {missing}")
    return cls(**values)


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, as in its ``config.json``.

    Args:
        name: short identifier used in messages and file names (``llama3_8b``).
        num_layers, hidden_size, num_heads, num_kv_heads, head_dim,
        intermediate_size, vocab_size: the architecture (``num_hidden_layers``,
            ``num_attention_heads``, ``num_key_value_heads`` ... in config.json).
        dtype_bytes: bytes per weight / activation / KV element (2 = bf16) at the model's dtype.
        tie_word_embeddings: the LM head reuses the embedding matrix.
        kv_cache_dtype: "auto" (KV at dtype_bytes) or "fp8_e4m3" (1 byte an element plus
            float32 scales per token and KV head), as the engine's setting of that name.
        quantization: "none" or "fp8" (the linear layers' weights in e4m3 with a float32
            scale per output channel; embeddings, norms and LM head at dtype_bytes).
        tensor_parallel_size: GPUs one replica shards the model over (the engine's setting of that
            name); it must divide the query heads, the FFN and the vocabulary, and divide the KV heads
            or be a multiple of them. 1: one GPU a replica.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2
    tie_word_embeddings: bool = False
    kv_cache_dtype: str = "auto"
    quantization: str = "none"
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"model spec: name must be a non-empty string, got {self.name!r}")
        owner = f"model {self.name}"
        for field in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "dtype_bytes",
        ):
            _check_positive_int(owner, field, getattr(self, field))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{owner}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"{owner}: tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        check_choice(f"{owner}: kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        check_choice(f"{owner}: quantization", self.quantization, QUANTIZATIONS)
        check_tensor_parallel(
            f"{owner}: tensor_parallel_size",
            self.tensor_parallel_size,
            self.name,
            self.num_heads,
            self.num_kv_heads,
            self.intermediate_size,
            self.vocab_size,
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "<dict>") -> "ModelSpec":
        """Builds a spec from a mapping, rejecting unknown and missing keys by name.

        Args:
            values: the ModelSpec fields.
            source: where the mapping came from, for messages.
        Returns:
            The validated spec.
        """
        return _from_mapping(cls, "model", values, source)

    def layer_matmuls(self) -> tuple[tuple[str, int, int], ...]:
        """The weight matmuls of one layer as ``(name, in_features, out_features)``.

        q, k and v are one fused matmul, and so are gate and up, as engines run them.
        """
        attn = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return (
            ("qkv", self.hidden_size, attn + 2 * kv),
            ("o", attn, self.hidden_size),
            ("gate_up", self.hidden_size, 2 * self.intermediate_size),
            ("down", self.intermediate_size, self.hidden_size),
        )

    def num_params(self) -> int:
        """Parameter count: embeddings, per-layer projections, MLP and two RMSNorms,
        the final norm, and the LM head unless tied to the embeddings.

        Returns:
            The number of weights (q_norm/k_norm of Qwen3, a few thousand, are not counted).
        """
        embed = self.vocab_size * self.hidden_size
        per_layer = sum(i * o for _, i, o in self.layer_matmuls()) + 2 * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embed
        return embed + self.num_layers * per_layer + self.hidden_size + lm_head

    @property
    def label(self) -> str:
        """How summaries and messages name the model: its name, with the storage and sharding settings
        that are not the defaults, e.g. ``llama3_8b (kv_cache_dtype=fp8_e4m3, quantization=fp8)``,
        ``llama3_8b (tensor_parallel_size=4)``."""
        changed = [
            f"{field}={getattr(self, field)}"
            for field, default in (
                ("kv_cache_dtype", KV_CACHE_DTYPES[0]),
                ("quantization", QUANTIZATIONS[0]),
                ("tensor_parallel_size", 1),
            )
            if getattr(self, field) != default
        ]
        return f"{self.name} ({', '.join(changed)})" if changed else self.name

    @property
    def linear_weight_dtype_bytes(self) -> int:
        """Bytes per weight of the linear layers (`layer_matmuls`): 1 with quantization fp8."""
        return FP8_BYTES if self.quantization == "fp8" else self.dtype_bytes

    @property
    def linear_scale_bytes(self) -> int:
        """Bytes of scales per output channel of a linear layer: a float32 with fp8, else none."""
        return SCALE_BYTES if self.quantization == "fp8" else 0

    @property
    def kv_dtype_bytes(self) -> int:
        """Bytes per K or V element in the cache: 1 with fp8_e4m3, else dtype_bytes."""
        return FP8_BYTES if self.kv_cache_dtype == "fp8_e4m3" else self.dtype_bytes

    @property
    def kv_scale_bytes(self) -> int:
        """Bytes of scales per (token, KV head) of K (and as many of V): a float32 with fp8_e4m3."""
        return SCALE_BYTES if self.kv_cache_dtype == "fp8_e4m3" else 0

    def linear_bytes(self, in_features: int, out_features: int) -> int:
        """Bytes of one linear layer's weights and scales: ``in*out*wb + out*scale``."""
        return in_features * out_features * self.linear_weight_dtype_bytes + out_features * self.linear_scale_bytes

    def weight_bytes(self) -> int:
        """Bytes of all weights: the linear layers per `linear_bytes` (all layers), everything else
        (embeddings, norms, the LM head) at ``dtype_bytes`` each; ``num_params() * dtype_bytes``
        with quantization none."""
        linear_params = self.num_layers * sum(i * o for _, i, o in self.layer_matmuls())
        linear = self.num_layers * sum(self.linear_bytes(i, o) for _, i, o in self.layer_matmuls())
        return (self.num_params() - linear_params) * self.dtype_bytes + linear

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies over all layers, scales included::

        2 * num_layers * num_kv_heads * (head_dim * kv_dtype_bytes + kv_scale_bytes)
        """
        return 2 * self.num_layers * self.num_kv_heads * (self.head_dim * self.kv_dtype_bytes + self.kv_scale_bytes)

    # -- one rank of a tensor-parallel replica (all of the model with tensor_parallel_size 1) ------------

    @property
    def heads_per_rank(self) -> int:
        """Query heads one rank computes: num_heads / N."""
        return self.num_heads // self.tensor_parallel_size

    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads one rank holds: num_kv_heads / N, or 1 when there are fewer KV heads than ranks
        (the engine gives each rank the KV head its query heads read: N / num_kv_heads ranks hold each)."""
        return max(1, self.num_kv_heads // self.tensor_parallel_size)

    @property
    def intermediate_per_rank(self) -> int:
        """FFN channels of one rank: intermediate_size / N."""
        return self.intermediate_size // self.tensor_parallel_size

    @property
    def vocab_per_rank(self) -> int:
        """Rows of the vocabulary-parallel embedding and LM head on one rank: vocab_size / N."""
        return self.vocab_size // self.tensor_parallel_size

    def rank_layer_matmuls(self) -> tuple[tuple[str, int, int], ...]:
        """One rank's weight matmuls of one layer as ``(name, in_features, out_features)``: qkv and
        gate_up column-parallel (their outputs split: the rank's heads, its FFN channels), o and down
        row-parallel (their inputs split; their outputs are partial sums, all-reduced). `layer_matmuls`
        with tensor_parallel_size 1."""
        attn = self.heads_per_rank * self.head_dim
        kv = self.kv_heads_per_rank * self.head_dim
        ffn = self.intermediate_per_rank
        return (
            ("qkv", self.hidden_size, attn + 2 * kv),
            ("o", attn, self.hidden_size),
            ("gate_up", self.hidden_size, 2 * ffn),
            ("down", ffn, self.hidden_size),
        )

    def rank_weight_bytes(self) -> int:
        """Bytes of one rank's weights: its slices of the linear layers (`rank_layer_matmuls`, each per
        `linear_bytes`: a column-parallel layer's scales split with its rows, a row-parallel layer's whole
        on every rank), its 1/N of the embedding and of the LM head (one table if tied) and every norm;
        KV heads replicated over ranks count on each. `weight_bytes` with tensor_parallel_size 1."""
        linear = self.num_layers * sum(self.linear_bytes(i, o) for _, i, o in self.rank_layer_matmuls())
        tables = 1 if self.tie_word_embeddings else 2
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return (tables * self.vocab_per_rank * self.hidden_size + norms) * self.dtype_bytes + linear

    def rank_kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies on one rank (its KV heads), scales included::

        2 * num_layers * kv_heads_per_rank * (head_dim * kv_dtype_bytes + kv_scale_bytes)

        `kv_bytes_per_token` / N when N divides the KV heads, / num_kv_heads (one head) when N exceeds them.
        """
        return (
            2 * self.num_layers * self.kv_heads_per_rank * (self.head_dim * self.kv_dtype_bytes + self.kv_scale_bytes)
        )


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator (or a CPU), as rates and capacities.

    Args:
        name: short identifier (``h100_sxm``).
        peak_flops: dense matrix FLOP/s at the model dtype (no sparsity).
        peak_flops_fp8: dense FP8 matrix FLOP/s (no sparsity), or None (not known): the rate of the
            linear layers of a model with quantization fp8; None prices them at peak_flops.
        mem_bandwidth: device memory bytes/s.
        mem_bytes: device memory capacity in bytes.
        host_link_bandwidth: device <-> host bytes/s, paid by KV swaps.
        step_overhead_s: fixed seconds added to every non-empty step (CPU work,
            kernel launches); 0 makes the roofline a physical lower bound.
        source: where the numbers come from ("datasheet: ...", "estimate: ...").
        gpu_link_bandwidth: GPU <-> GPU bytes/s, one direction, per GPU (NVLink on SXM boards), or
            None (not known): what the collectives of a tensor-parallel replica move data at. A
            replica with tensor_parallel_size > 1 needs it.
        collective_latency_s: fixed seconds each collective (all-reduce, all-gather) of a
            tensor-parallel replica takes beyond its bytes (launch, synchronisation), or None (not
            known): priced as 0, bytes only.
    """

    name: str
    peak_flops: float
    mem_bandwidth: float
    mem_bytes: float
    host_link_bandwidth: float
    step_overhead_s: float = 0.0
    source: str = ""
    peak_flops_fp8: float | None = None
    gpu_link_bandwidth: float | None = None
    collective_latency_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"hardware spec: name must be a non-empty string, got {self.name!r}")
        owner = f"hardware {self.name}"
        for field in ("peak_flops", "mem_bandwidth", "mem_bytes", "host_link_bandwidth"):
            object.__setattr__(self, field, _checked_float(owner, field, getattr(self, field), allow_zero=False))
        for field in ("peak_flops_fp8", "gpu_link_bandwidth"):
            if getattr(self, field) is not None:
                object.__setattr__(self, field, _checked_float(owner, field, getattr(self, field), allow_zero=False))
        object.__setattr__(
            self, "step_overhead_s", _checked_float(owner, "step_overhead_s", self.step_overhead_s, allow_zero=True)
        )
        if self.collective_latency_s is not None:
            object.__setattr__(
                self,
                "collective_latency_s",
                _checked_float(owner, "collective_latency_s", self.collective_latency_s, allow_zero=True),
            )
        if not isinstance(self.source, str):
            raise ValueError(f"{owner}: source must be a string, got {self.source!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "<dict>") -> "HardwareSpec":
        """Builds a spec from a mapping, rejecting unknown and missing keys by name.

        Args:
            values: the HardwareSpec fields.
            source: where the mapping came from, for messages.
        Returns:
            The validated spec.
        """
        return _from_mapping(cls, "hardware", values, source)


def kv_capacity_blocks(
    model: ModelSpec,
    hw: HardwareSpec,
    block_size: int,
    gpu_memory_utilization: float = 0.9,
    activation_reserve_bytes: float | None = None,
) -> int:
    """Device KV blocks of one replica left once the weights and an activation reserve are placed.

    ::

        mem_bytes * gpu_memory_utilization                               (each GPU of the replica)
        |<- weights ->|<- activations ->|<-------- KV blocks -------->|.|
                                                                      ^ remainder < 1 block

    A replica of N = `model.tensor_parallel_size` GPUs has the same block count on every rank (the
    engine's): each GPU holds its shard of the weights (`ModelSpec.rank_weight_bytes`), its own
    activation reserve, and of each block its KV heads (`ModelSpec.rank_kv_bytes_per_token`), so the
    replica's blocks grow about N-fold plus what the weights' N - 1 other shards leave free. N = 1:
    ``(mem_bytes * utilization - weight_bytes - reserve) // (kv_bytes_per_token * block_size)``.

    Args:
        model, hw: what runs where.
        block_size: tokens per KV block.
        gpu_memory_utilization: share of device memory the engine may use, in (0, 1].
        activation_reserve_bytes: memory kept for activations; None means
            `DEFAULT_ACTIVATION_RESERVE_BYTES`.
    Returns:
        The number of whole blocks (>= 1).
    Raises:
        ValueError: bad arguments, or not even one block fits.
    """
    _check_positive_int("kv_capacity_blocks", "block_size", block_size)
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    if activation_reserve_bytes is None:
        activation_reserve_bytes = DEFAULT_ACTIVATION_RESERVE_BYTES
    if activation_reserve_bytes < 0:
        raise ValueError(f"activation_reserve_bytes must be >= 0, got {activation_reserve_bytes!r}")
    budget = hw.mem_bytes * gpu_memory_utilization
    weights = model.rank_weight_bytes()
    free = budget - weights - activation_reserve_bytes
    block_bytes = model.rank_kv_bytes_per_token() * block_size
    blocks = int(free // block_bytes) if free > 0 else 0
    if blocks < 1:
        per_gpu = " per GPU" if model.tensor_parallel_size > 1 else ""
        raise ValueError(
            f"model {model.label} needs {weights / _GB:.1f} GB of weights{per_gpu}; {hw.name} has "
            f"{budget / _GB:.1f} GB usable at gpu_memory_utilization={gpu_memory_utilization}: "
            f"after a {activation_reserve_bytes / _GB:.1f} GB activation reserve "
            f"{free / _GB:.2f} GB is left, less than one KV block of {block_bytes / _GB:.4f} GB "
            f"(block_size={block_size})"
        )
    return blocks


def _spec_path(group: str, name_or_path: str | Path) -> Path:
    """``conf/<group>/<name>.yaml`` for a bare name; the path itself otherwise."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        if not path.is_file():
            raise ValueError(f"{group} spec file not found: {path}")
        return path
    path = CONF_DIR / group / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ValueError(f"unknown {group} {str(name_or_path)!r}; known: {known} (in {CONF_DIR / group})")
    return path


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"cannot parse {path}: {err}") from err


HARDWARE_RATES = (
    "peak_flops",
    "mem_bandwidth",
    "mem_bytes",
    "host_link_bandwidth",
    "step_overhead_s",
    "peak_flops_fp8",
    "gpu_link_bandwidth",
    "collective_latency_s",
)


def hardware_label(hw: HardwareSpec) -> str:
    """How summaries and messages name `hw`: its name, or, when the name is a shipped entry
    (conf/hardware/<name>.yaml) but a rate differs from it, the name and what was changed,
    e.g. ``h100_sxm (modified: mem_bandwidth=2e+12)``: the datasheet's name alone would claim
    the datasheet's rates. A rate left out (None: not known; peak_flops_fp8, gpu_link_bandwidth,
    collective_latency_s) is not a change.
    """
    path = CONF_DIR / "hardware" / f"{hw.name}.yaml"
    if Path(hw.name).name != hw.name or not path.is_file():
        return hw.name
    shipped = HardwareSpec.from_dict(_read_yaml(path), source=str(path))
    changed = [
        f"{field}={getattr(hw, field):g}"
        for field in HARDWARE_RATES
        if getattr(hw, field) is not None and getattr(hw, field) != getattr(shipped, field)
    ]
    return f"{hw.name} (modified: {', '.join(changed)})" if changed else hw.name


def load_model_spec(name_or_path: str | Path) -> ModelSpec:
    """Loads a ModelSpec from ``conf/model/<name>.yaml`` or from a YAML file path.

    Args:
        name_or_path: a name such as ``"llama3_8b"``, or a path ending in .yaml.
    Returns:
        The validated spec.
    Raises:
        ValueError: unknown name, missing file, unknown/missing keys, bad values.
    """
    path = _spec_path("model", name_or_path)
    return ModelSpec.from_dict(_read_yaml(path), source=str(path))


def load_hardware_spec(name_or_path: str | Path) -> HardwareSpec:
    """Loads a HardwareSpec from ``conf/hardware/<name>.yaml`` or from a YAML file path.

    Args:
        name_or_path: a name such as ``"h100_sxm"``, or a path ending in .yaml.
    Returns:
        The validated spec.
    Raises:
        ValueError: unknown name, missing file, unknown/missing keys, bad values.
    """
    path = _spec_path("hardware", name_or_path)
    return HardwareSpec.from_dict(_read_yaml(path), source=str(path))
