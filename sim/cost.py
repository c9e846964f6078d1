"""Step-cost models: the seconds one engine step takes for a given plan.

The simulator executes the control plane's plans by asking a `CostModel` how
long each would have run. A model sees only a plan's integer features
(`FEATURES`, plus ``block_size``), which the C++ Plan computes:

    num_tokens           T: tokens computed this step (all query tokens)
    num_reqs             R: requests in the batch
    num_sampled          S: rows that produce a token (logits only for these)
    attn_pairs           sum over requests of q*c + q*(q+1)/2 causal (query, key) pairs
    kv_read_tokens       sum over requests of c + q: KV tokens attention reads
    num_swap_out_blocks  KV block copies device -> host
    num_swap_in_blocks   KV block copies host -> device
    num_decode_reqs      requests with q == 1, and decode_kv_tokens their sum of c + 1
    follows_decode       the previous plan was a pure decode an engine with overlap guessed a successor of
    continues_decode     ... and this plan is that successor (csrc/scheduler.h, Plan)

(c = a request's cached length, q = its query length this step.) Any object
with these attributes works: a `controlplane` Plan, a `PlanFeatures`, a
`types.SimpleNamespace`. Every model costs an empty plan (T == 0, no copies)
0 seconds.

`RooflineCost` derives the time from a `ModelSpec` and a `HardwareSpec`;
`ProfileCost` (sim/profile_cost.py) is fitted to steps measured on an engine by
`experiments.calibrate` (docs/profile-format.md).

Both compute their coefficients here and evaluate them with `native`, a
`sim._native.StepCost` (csrc/step_cost.h): the same formula, in the same
order of floating-point operations, serves `step_seconds` and the simulator's
C++ fast path, so the two give bit-identical step times.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from controlplane import Plan
from controlplane.profile import FEATURES, PROFILE_COLUMNS, write_profile
from sim import _native
from sim.specs import CONF_DIR, HardwareSpec, ModelSpec, hardware_label


@dataclass(frozen=True)
class PlanFeatures:
    """A plan reduced to what cost models read (a plain record, for tests and bounds)."""

    num_tokens: int = 0
    num_reqs: int = 0
    num_sampled: int = 0
    attn_pairs: int = 0
    kv_read_tokens: int = 0
    num_swap_out_blocks: int = 0
    num_swap_in_blocks: int = 0
    num_decode_reqs: int = 0
    decode_kv_tokens: int = 0
    follows_decode: int = 0
    continues_decode: int = 0
    block_size: int = 16
    query_lens: tuple = ()  # the rows themselves, when known (per-request cost terms read them)
    cached_lens: tuple = ()

    @classmethod
    def of_requests(
        cls, cached_lens: Sequence[int], query_lens: Sequence[int], num_sampled: int | None = None, block_size: int = 16
    ) -> "PlanFeatures":
        """The features of a batch with no KV copies.

        Args:
            cached_lens, query_lens: per request, tokens already in the KV cache and
                tokens computed this step.
            num_sampled: rows that produce a token; None means every request.
            block_size: tokens per KV block.
        Returns:
            The batch's features.
        """
        return cls(
            num_tokens=sum(query_lens),
            num_reqs=len(query_lens),
            num_sampled=len(query_lens) if num_sampled is None else num_sampled,
            attn_pairs=sum(q * c + q * (q + 1) // 2 for c, q in zip(cached_lens, query_lens)),
            kv_read_tokens=sum(c + q for c, q in zip(cached_lens, query_lens)),
            num_decode_reqs=sum(1 for q in query_lens if q == 1),
            decode_kv_tokens=sum(c + 1 for c, q in zip(cached_lens, query_lens) if q == 1),
            block_size=block_size,
            query_lens=tuple(query_lens),
            cached_lens=tuple(cached_lens),
        )


class CostModel(abc.ABC):
    """Seconds per engine step, from a plan's features. Stateless between calls."""

    name: str = "abstract"

    @abc.abstractmethod
    def step_seconds(self, plan: Any) -> float:
        """Args: plan: an object with the `FEATURES` and ``block_size`` attributes.
        Returns: the step's duration in seconds (0.0 for an empty plan)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A few human-readable lines: what the model is and where its numbers come from."""

    #: The C++ evaluator of `step_seconds` (a `sim._native.StepCost`), or None: a model
    #: without one runs the simulator step by step.
    native: Any = None


def _native_seconds(native: Any, plan: Any, block_size: int | None = None) -> float:
    """`native.seconds` of a plan (read in C++) or a plan-like object (ints or floats; block_size from the
    plan unless given). A plan-like object without the decode features or the rows counts as one with
    none (0, and no per-request terms)."""
    if isinstance(plan, Plan):
        return native.plan_seconds(plan)
    return native.seconds(
        plan.num_tokens,
        plan.num_reqs,
        plan.num_sampled,
        plan.attn_pairs,
        plan.kv_read_tokens,
        plan.num_swap_out_blocks,
        plan.num_swap_in_blocks,
        plan.block_size if block_size is None else block_size,
        getattr(plan, "num_decode_reqs", 0),
        getattr(plan, "decode_kv_tokens", 0),
        getattr(plan, "follows_decode", 0),
        getattr(plan, "continues_decode", 0),
        list(getattr(plan, "query_lens", ())),
        list(getattr(plan, "cached_lens", ())),
    )


def _sum_of_max_pieces(
    terms: Iterable[tuple[float, float, float]],
) -> tuple[tuple[float, ...], tuple[tuple[float, float], ...]]:
    """Rewrites f(x) = sum_i max(a_i*x, b_i + c_i*x) as one piecewise-linear function.

    A term is memory bound (b + c*x: weights once, activations per token) until
    x_i = b / (a - c), then compute bound (a*x); if a <= c it never is::

        seconds |          /  a*x
                |        /
                |------*-----  b + c*x
                |    / x_i
                +--------------- x (tokens)

    Returns:
        ``breaks`` (sorted x_i) and ``pieces``: ``pieces[bisect_right(breaks, x)]``
        is the ``(intercept, slope)`` of f at x; the first k terms in break order
        are compute bound there.
    """
    order = sorted(((b / (a - c) if a > c else math.inf), a, b, c) for a, b, c in terms)
    breaks = tuple(x for x, *_ in order if x != math.inf)
    pieces = []
    for k in range(len(breaks) + 1):
        intercept = sum(b for _, _, b, _ in order[k:])
        slope = sum(a for _, a, _, _ in order[:k]) + sum(c for _, _, _, c in order[k:])
        pieces.append((intercept, slope))
    return breaks, tuple(pieces)


def ring_all_reduce_seconds(num_bytes: float, ranks: int, link_bandwidth: float, latency_s: float) -> float:
    """A ring all-reduce of `num_bytes` over `ranks` GPUs: each sends and receives 2 (N-1)/N of the
    buffer over its link, plus the collective's fixed latency; 0 for one rank (no collective)."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * num_bytes / link_bandwidth + latency_s


def ring_all_gather_seconds(num_bytes: float, ranks: int, link_bandwidth: float, latency_s: float) -> float:
    """A ring all-gather whose gathered result is `num_bytes`: each GPU receives the (N-1)/N it lacks,
    plus the collective's fixed latency; 0 for one rank."""
    if ranks == 1:
        return 0.0
    return (ranks - 1) / ranks * num_bytes / link_bandwidth + latency_s


class RooflineCost(CostModel):
    """Each operation takes the longer of its FLOPs at peak and its bytes at full bandwidth.

    Per step (L layers, db bytes per element at the model's dtype, T tokens, S sampled rows), on one
    GPU of the replica (N = ``model.tensor_parallel_size`` GPUs run the step in lockstep, each on its
    shard: `ModelSpec.rank_layer_matmuls`; N = 1, the whole model):

    * each weight matmul (in -> out) of each layer:
      ``max(2*T*in*out / peak_linear, (in*out*wb + out*sb + T*(in+out)*db) / bw)``
      where wb, sb are the weights' bytes per element and scale bytes per output channel
      (db and 0; 1 and 4 with quantization fp8: `ModelSpec.linear_bytes`) and peak_linear is
      ``hw.peak_flops_fp8`` with quantization fp8 when the hardware entry gives one, else
      ``hw.peak_flops``; activations stay at db
    * LM head on S rows only: ``max(2*S*hidden*vocab / peak, (hidden*vocab + S*(hidden+vocab)) * db / bw)``
      (0 if S == 0): unquantized, at the model's dtype and rate, whatever the quantization; vocab is
      the rank's vocab / N (vocabulary-parallel)
    * attention: ``max(L*4*heads*head_dim*attn_pairs / peak, kv_read_tokens*kv_bytes_per_token / bw)``,
      at the model's rate (the engine computes attention in bf16) on the KV as stored
      (`ModelSpec.kv_bytes_per_token`: fp8_e4m3's scales included); heads / N and the rank's KV
      bytes (`ModelSpec.rank_kv_bytes_per_token`) with N ranks
    * KV copies: ``(swap_out + swap_in) * kv_bytes_per_token * block_size / host_link`` (each rank its
      KV bytes over its own host link)
    * with N > 1, the collectives the engine's tensor-parallel pass inserts (engine/tensor_parallel.py),
      over ``hw.gpu_link_bandwidth`` (bw_link) with ``hw.collective_latency_s`` (lat) each:
      2L + 1 ring all-reduces of the step's hidden states (after each layer's o and down, and after
      the vocabulary-parallel embedding), ``(2L+1) * (2 (N-1)/N * T*hidden*db / bw_link + lat)``, and
      one all-gather of the LM head's output, ``(N-1)/N * S*vocab*db / bw_link + lat`` (every step
      with T > 0: the engine gathers the logits of the sampled rows, even of none; they are gathered
      in the model's dtype and cast to float32 after)
    * plus ``hw.step_overhead_s``; operations run one after another (no overlap).

    Every coefficient is computed here once: `step_seconds` is a handful of float
    operations (the simulator calls it about a million times per run). The collectives fold into the
    same coefficients: their latencies and per-token bytes into every piece of the linear layers (a
    term that is never compute bound), the gather's per-row bytes into both sides of the LM head's max.

    Args:
        model, hw: what runs where.
    Raises:
        ValueError: tensor_parallel_size > 1 on a hardware entry without gpu_link_bandwidth.
    """

    name = "roofline"

    def __init__(self, model: ModelSpec, hw: HardwareSpec) -> None:
        self.model = model
        self.hw = hw
        layers, db = model.num_layers, model.dtype_bytes
        peak, bw = hw.peak_flops, hw.mem_bandwidth
        ranks = self.ranks = model.tensor_parallel_size
        if ranks > 1 and hw.gpu_link_bandwidth is None:
            raise ValueError(
                f"model {model.label}: hardware {hardware_label(hw)} gives no gpu_link_bandwidth, so the "
                f"collectives of a tensor-parallel replica cannot be priced; set hardware.gpu_link_bandwidth "
                f"(bytes/s, one direction per GPU) and hardware.collective_latency_s"
            )
        self.linear_peak_flops = (
            hw.peak_flops_fp8 if model.quantization == "fp8" and hw.peak_flops_fp8 is not None else peak
        )
        hidden, vocab = model.hidden_size, model.vocab_per_rank
        # Weights' bytes in integers (exact): with quantization none, layers*i*o*db as before.
        terms = [
            (
                layers * 2 * i * o / self.linear_peak_flops,
                layers * model.linear_bytes(i, o) / bw,
                layers * (i + o) * db / bw,
            )
            for _, i, o in model.rank_layer_matmuls()
        ]
        self._collective_step_s = self._collective_token_s = self._gather_row_s = 0.0
        if ranks > 1:
            link, latency = hw.gpu_link_bandwidth, hw.collective_latency_s or 0.0
            all_reduces = 2 * layers + 1
            self._collective_step_s = (all_reduces + 1) * latency  # + the logits' all-gather
            self._collective_token_s = all_reduces * 2 * (ranks - 1) / ranks * hidden * db / link
            self._gather_row_s = (ranks - 1) / ranks * model.vocab_size * db / link
            terms.append((0.0, self._collective_step_s, self._collective_token_s))  # never compute bound
        self._linear_breaks, self._linear_pieces = _sum_of_max_pieces(terms)
        self._head_flop_s = 2 * hidden * vocab / peak + self._gather_row_s  # per sampled row
        self._head_weight_s = hidden * vocab * db / bw  # once per step
        self._head_act_s = (hidden + vocab) * db / bw + self._gather_row_s  # per sampled row
        self._attn_pair_s = layers * 4 * model.heads_per_rank * model.head_dim / peak
        self._attn_kv_s = model.rank_kv_bytes_per_token() / bw  # per KV token read, all layers
        self._swap_token_s = model.rank_kv_bytes_per_token() / hw.host_link_bandwidth
        self._overhead_s = hw.step_overhead_s
        self.native = _native.StepCost.roofline(
            overhead_s=self._overhead_s,
            swap_token_s=self._swap_token_s,
            breaks=list(self._linear_breaks),
            pieces=list(self._linear_pieces),
            head_flop_s=self._head_flop_s,
            head_weight_s=self._head_weight_s,
            head_act_s=self._head_act_s,
            attn_pair_s=self._attn_pair_s,
            attn_kv_s=self._attn_kv_s,
        )

    def collective_seconds(self, num_tokens: int, num_sampled: int) -> float:
        """The collectives' share of a step of `num_tokens` tokens and `num_sampled` sampled rows
        (0 with one GPU, and for a step without tokens), straight from the ring formulas."""
        m, hw = self.model, self.hw
        if self.ranks == 1 or num_tokens <= 0:
            return 0.0
        hidden_bytes = num_tokens * m.hidden_size * m.dtype_bytes
        args = (self.ranks, hw.gpu_link_bandwidth, hw.collective_latency_s or 0.0)
        return (2 * m.num_layers + 1) * ring_all_reduce_seconds(hidden_bytes, *args) + ring_all_gather_seconds(
            num_sampled * m.vocab_size * m.dtype_bytes, *args
        )

    @property
    def is_physical_limit(self) -> bool:
        """True when no fixed overhead is added (no step overhead, and no assumed collective latency
        with several GPUs a replica): the costs are lower bounds for any engine."""
        return self._overhead_s == 0.0 and self._collective_step_s == 0.0

    def step_seconds(self, plan: Any) -> float:
        """Args: plan: an object with the `FEATURES` and ``block_size`` attributes.
        Returns: the roofline seconds of the step (0.0 for an empty plan)::

            seconds = overhead + [copies * block_size * swap_token_s]
                      + intercept_k + slope_k * T                  (linear layers, k = piece of T)
                      + max(S * head_flop, head_weight + S * head_act)   if S > 0
                      + max(attn_pairs * attn_pair, kv_read_tokens * attn_kv)
        """
        return _native_seconds(self.native, plan)

    def lower_bound_prefill_seconds(self, num_tokens: int) -> float:
        """One request alone prefilling `num_tokens` from scratch in one step (sampling one row).

        Args:
            num_tokens: prompt tokens computed (no cached prefix).
        Returns:
            `step_seconds` of that plan, overhead included.
        """
        return self.step_seconds(PlanFeatures.of_requests([0], [num_tokens]))

    def lower_bound_decode_seconds(self, context_len: int) -> float:
        """One request alone decoding one token after `context_len` cached tokens.

        Args:
            context_len: tokens already in the KV cache (attention reads context_len + 1).
        Returns:
            `step_seconds` of that plan, overhead included.
        """
        return self.step_seconds(PlanFeatures.of_requests([context_len], [1]))

    def describe(self) -> str:
        """Returns: the model, the machine, the rates' source and two sample step costs."""
        if self.is_physical_limit:
            limit = "physical limit (no per-step overhead)"
        elif self._overhead_s == 0.0:
            limit = "no per-step overhead but an assumed latency per collective"
        else:
            limit = f"plus {self._overhead_s * 1e3:.3f} ms overhead per step"
        label = hardware_label(self.hw)
        source = self.hw.source or "source not given"
        if label != self.hw.name:
            source += ", except the rates modified above"
        lines = [
            f"roofline: {self.model.label} ({self.model.num_params() / 1e9:.2f}B params) on {label}, {limit}",
            f"  rates: {source}",
        ]
        if self.model.label != self.model.name:
            m = self.model
            rate = (
                ""
                if m.quantization != "fp8"
                else f"; linear layers at {self.linear_peak_flops / 1e12:.1f} TFLOP/s"
                + (" (no hardware.peak_flops_fp8: the bf16 rate)" if self.hw.peak_flops_fp8 is None else " (fp8)")
            )
            if m.tensor_parallel_size == 1:
                lines.append(
                    f"  storage: weights {m.weight_bytes() / 1e9:.2f} GB, KV {m.kv_bytes_per_token()} bytes/token{rate}"
                )
            else:
                lines.append(
                    f"  per GPU of {m.tensor_parallel_size}: weights {m.rank_weight_bytes() / 1e9:.2f} GB, "
                    f"KV {m.rank_kv_bytes_per_token()} bytes/token{rate}"
                )
                lines.append(
                    f"  collectives: {2 * m.num_layers + 1} all-reduces of the hidden states and an all-gather "
                    f"of the logits a step over {self.hw.gpu_link_bandwidth / 1e9:g} GB/s links, "
                    + (
                        f"{self.hw.collective_latency_s * 1e6:g} us each"
                        if self.hw.collective_latency_s is not None
                        else "no latency (hardware.collective_latency_s not known)"
                    )
                )
        lines.append(
            f"  decode 1 token at 4096 context: {self.lower_bound_decode_seconds(4096) * 1e3:.3f} ms;"
            f" prefill 2048 tokens: {self.lower_bound_prefill_seconds(2048) * 1e3:.3f} ms"
        )
        return "\n".join(lines)


def shipped_profile_path(model: str, hardware: str) -> Path:
    """Where `experiments.calibrate` writes, and `cost=profile` reads, a model's fit on a machine."""
    return CONF_DIR / "profiles" / hardware / f"{model}.json"


def shipped_profiles() -> list[str]:
    """The fits shipped in conf/profiles, as ``hardware/model`` names."""
    root = CONF_DIR / "profiles"
    return sorted(f"{p.parent.name}/{p.stem}" for p in root.glob("*/*.json"))


def _profile_cost(model: ModelSpec, hw: HardwareSpec, profile_path: str | Path | None) -> CostModel:
    from sim.profile_cost import ProfileCost

    if profile_path is None:
        path = shipped_profile_path(model.name, hw.name)
        if not path.is_file():
            raise ValueError(
                f"cost model 'profile': no fit of {model.name} on {hw.name} in conf/profiles "
                f"(shipped: {shipped_profiles() or 'none'}); run `python -m experiments.calibrate` "
                f"on that GPU, or give sim.profile_path (a profile .csv or a fitted .json)"
            )
        profile_path = path
    cost = ProfileCost.load(profile_path) if Path(profile_path).suffix == ".json" else ProfileCost.fit(profile_path)
    cost.check_model(model)
    return cost


_COST_MODELS: dict[str, Callable[[ModelSpec, HardwareSpec, Any], CostModel]] = {
    "roofline": lambda model, hw, profile_path: RooflineCost(model, hw),
    "profile": _profile_cost,
}


def make_cost_model(kind: str, model: ModelSpec, hw: HardwareSpec, profile_path: str | Path | None = None) -> CostModel:
    """Builds a cost model by name.

    Args:
        kind: ``"roofline"`` or ``"profile"``.
        model, hw: the specs (the roofline's inputs; a profile is for one pair already).
        profile_path: for ``"profile"``: a profile CSV to fit, or a JSON written by `ProfileCost.save`;
            None: the fit shipped for (model, hw) in conf/profiles (`shipped_profile_path`).
    Returns:
        The cost model.
    Raises:
        ValueError: unknown kind, missing or malformed profile, a profile of another model shape.
    """
    if kind not in _COST_MODELS:
        raise ValueError(f"unknown cost model {kind!r}; known: {sorted(_COST_MODELS)}")
    return _COST_MODELS[kind](model, hw, profile_path)


def __getattr__(name: str):
    """ProfileCost and its helpers, from sim/profile_cost.py (which imports CostModel from here)."""
    if name in ("ProfileCost", "nonnegative_least_squares", "read_profile"):
        from sim import profile_cost

        return getattr(profile_cost, name)
    raise AttributeError(f"module 'sim.cost' has no attribute {name!r}")


__all__ = [
    "FEATURES",
    "PROFILE_COLUMNS",
    "PlanFeatures",
    "CostModel",
    "RooflineCost",
    "ring_all_reduce_seconds",
    "ring_all_gather_seconds",
    "ProfileCost",
    "nonnegative_least_squares",
    "read_profile",
    "write_profile",
    "make_cost_model",
    "shipped_profile_path",
    "shipped_profiles",
]
