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

(c = a request's cached length, q = its query length this step.) Any object
with these attributes works: a `controlplane` Plan, a `PlanFeatures`, a
`types.SimpleNamespace`. Every model costs an empty plan (T == 0, no copies)
0 seconds.

`RooflineCost` derives the time from a `ModelSpec` and a `HardwareSpec`;
`ProfileCost` is fitted to steps measured on an engine (docs/profile-format.md).

Both compute their coefficients here and evaluate them with `native`, a
`controlplane.StepCost` (csrc/step_cost.h): the same formula, in the same
order of floating-point operations, serves `step_seconds` and the simulator's
C++ fast path, so the two give bit-identical step times.
"""

from __future__ import annotations

import abc
import csv
import json
import math
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from controlplane import _core
from controlplane.profile import FEATURES, PROFILE_COLUMNS, write_profile
from controlplane.profile import parse_row as _parse_row
from sim.specs import HardwareSpec, ModelSpec



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
    block_size: int = 16

    @classmethod
    def of_requests(cls, cached_lens: Sequence[int], query_lens: Sequence[int],
                    num_sampled: int | None = None, block_size: int = 16) -> "PlanFeatures":
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
            block_size=block_size,
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

    #: The C++ evaluator of `step_seconds` (a `controlplane.StepCost`), or None: a model
    #: without one runs the simulator step by step.
    native: Any = None


def _native_seconds(native: Any, plan: Any, block_size: int | None = None) -> float:
    """`native.seconds` of a plan-like object (ints or floats; block_size from the plan unless given)."""
    return native.seconds(plan.num_tokens, plan.num_reqs, plan.num_sampled, plan.attn_pairs, plan.kv_read_tokens,
                          plan.num_swap_out_blocks, plan.num_swap_in_blocks,
                          plan.block_size if block_size is None else block_size)


def _sum_of_max_pieces(terms: Iterable[tuple[float, float, float]]
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


class RooflineCost(CostModel):
    """Each operation takes the longer of its FLOPs at peak and its bytes at full bandwidth.

    Per step (L layers, db bytes per element, T tokens, S sampled rows):

    * each weight matmul (in -> out) of each layer:
      ``max(2*T*in*out / peak, (in*out + T*(in+out)) * db / bw)``
    * LM head on S rows only: the same with in = hidden, out = vocab (0 if S == 0)
    * attention, per layer:
      ``max(4*heads*head_dim*attn_pairs / peak, kv_read_tokens*2*kv_heads*head_dim*db / bw)``
    * KV copies: ``(swap_out + swap_in) * kv_bytes_per_token * block_size / host_link``
    * plus ``hw.step_overhead_s``; operations run one after another (no overlap).

    Every coefficient is computed here once: `step_seconds` is a handful of float
    operations (the simulator calls it about a million times per run).

    Args:
        model, hw: what runs where.
    """

    name = "roofline"

    def __init__(self, model: ModelSpec, hw: HardwareSpec) -> None:
        self.model = model
        self.hw = hw
        layers, db = model.num_layers, model.dtype_bytes
        peak, bw = hw.peak_flops, hw.mem_bandwidth
        self._linear_breaks, self._linear_pieces = _sum_of_max_pieces(
            (layers * 2 * i * o / peak, layers * i * o * db / bw, layers * (i + o) * db / bw)
            for _, i, o in model.layer_matmuls())
        hidden, vocab = model.hidden_size, model.vocab_size
        self._head_flop_s = 2 * hidden * vocab / peak          # per sampled row
        self._head_weight_s = hidden * vocab * db / bw         # once per step
        self._head_act_s = (hidden + vocab) * db / bw          # per sampled row
        self._attn_pair_s = layers * 4 * model.num_heads * model.head_dim / peak
        self._attn_kv_s = model.kv_bytes_per_token() / bw      # per KV token read, all layers
        self._swap_token_s = model.kv_bytes_per_token() / hw.host_link_bandwidth
        self._overhead_s = hw.step_overhead_s
        self.native = _core.StepCost.roofline(
            overhead_s=self._overhead_s, swap_token_s=self._swap_token_s, breaks=list(self._linear_breaks),
            pieces=list(self._linear_pieces), head_flop_s=self._head_flop_s, head_weight_s=self._head_weight_s,
            head_act_s=self._head_act_s, attn_pair_s=self._attn_pair_s, attn_kv_s=self._attn_kv_s)

    @property
    def is_physical_limit(self) -> bool:
        """True when no fixed overhead is added: the costs are lower bounds for any engine."""
        return self._overhead_s == 0.0

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
        limit = ("physical limit (no per-step overhead)" if self.is_physical_limit
                 else f"plus {self._overhead_s * 1e3:.3f} ms overhead per step")
        return "\n".join([
            f"roofline: {self.model.name} ({self.model.num_params() / 1e9:.2f}B params) "
            f"on {self.hw.name}, {limit}",
            f"  rates: {self.hw.source or 'source not given'}",
            f"  decode 1 token at 4096 context: {self.lower_bound_decode_seconds(4096) * 1e3:.3f} ms;"
            f" prefill 2048 tokens: {self.lower_bound_prefill_seconds(2048) * 1e3:.3f} ms",
        ])


def nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solves min ||a @ x - b||_2 subject to x >= 0 (Lawson and Hanson's active-set method).

    Args:
        a: [m, n] matrix (scale its columns to similar magnitudes first).
        b: [m] vector.
    Returns:
        x, shape [n], every entry >= 0.
    Raises:
        RuntimeError: no convergence within 3n outer iterations (degenerate input).
    """
    m, n = a.shape
    tol = 10 * np.finfo(float).eps * max(m, n) * max(np.abs(a).sum(axis=0).max(), 1.0)
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)     # columns allowed to be > 0
    for _ in range(3 * n + 1):
        gradient = a.T @ (b - a @ x)
        candidates = np.flatnonzero(~passive & (gradient > tol))
        if candidates.size == 0:
            return x
        passive[candidates[np.argmax(gradient[candidates])]] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if np.all(z[passive] > 0):
                break
            # Walk from x toward z until the first passive entry hits 0; drop it.
            blocked = passive & (z <= 0)
            step = x[blocked] - z[blocked]
            alpha = np.min(np.where(step > 0, x[blocked] / np.where(step > 0, step, 1.0), 0.0))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = z
    raise RuntimeError(f"nonnegative_least_squares: no convergence on a {m}x{n} problem")


def _profile_rows(source: str | Path | Iterable[Mapping[str, Any]]) -> Iterator[tuple[str, Mapping]]:
    """Yields ``("file:line", row)`` from a CSV path, or ``("<rows>[i]", row)`` from mappings."""
    if not isinstance(source, (str, Path)):
        for i, row in enumerate(source):
            yield f"<rows>[{i}]", row
        return
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ValueError(f"{source}: empty profile (no header line)")
        missing = [c for c in PROFILE_COLUMNS if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"{source}:1: header lacks columns {missing}; "
                             f"required: {list(PROFILE_COLUMNS)}")
        for row in reader:
            yield f"{source}:{reader.line_num}", row


def read_profile(source: str | Path | Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Reads measured steps (format: docs/profile-format.md).

    Args:
        source: a CSV path, or an iterable of mappings with the same columns.
    Returns:
        ``features`` [n, len(FEATURES)] and ``seconds`` [n], as float64.
    Raises:
        ValueError: empty profile, missing column, non-numeric or negative value
            (the message names the file and line, or the row index).
    """
    parsed = [_parse_row(row, where) for where, row in _profile_rows(source)]
    if not parsed:
        name = source if isinstance(source, (str, Path)) else "<rows>"
        raise ValueError(f"{name}: empty profile (no data rows)")
    table = np.asarray(parsed, dtype=np.float64)
    return table[:, :-1], table[:, -1]


class ProfileCost(CostModel):
    """seconds = intercept + sum_i coefficients[i] * feature_i, all terms >= 0.

    Fitted to steps measured on one engine, model, machine and block size
    (`fit`); the fitted numbers round-trip through JSON (`save`, `load`).

    Args:
        intercept: seconds every non-empty step costs.
        coefficients: seconds per unit of each `FEATURES` name (all of them).
        source: where the fit came from; num_rows, rmse: the fit's size and residual.
        unobserved: features that were 0 in every profiled step (their cost is unknown, taken as 0).
    """

    name = "profile"

    def __init__(self, intercept: float, coefficients: Mapping[str, float], source: str = "",
                 num_rows: int = 0, rmse: float = 0.0, unobserved: Sequence[str] = ()) -> None:
        if sorted(coefficients) != sorted(FEATURES):
            raise ValueError(f"ProfileCost coefficients must name exactly {list(FEATURES)}, "
                             f"got {sorted(coefficients)}")
        for key, value in [("intercept", intercept), *coefficients.items()]:
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"ProfileCost {key} must be finite and >= 0, got {value!r}")
        self.intercept = float(intercept)
        self.coefficients = {f: float(coefficients[f]) for f in FEATURES}
        self.source, self.num_rows, self.rmse = source, num_rows, rmse
        self.unobserved = tuple(unobserved)
        self.native = _core.StepCost.linear(self.intercept, *(self.coefficients[f] for f in FEATURES))

    @classmethod
    def fit(cls, source: str | Path | Iterable[Mapping[str, Any]]) -> "ProfileCost":
        """Fits the coefficients by non-negative least squares.

        Args:
            source: a profile CSV path or an iterable of row mappings (see `read_profile`).
        Returns:
            The fitted model.
        Raises:
            ValueError: a malformed profile.
        """
        features, seconds = read_profile(source)
        design = np.hstack([np.ones((len(seconds), 1)), features])
        scale = np.abs(design).max(axis=0)
        observed = scale > 0
        scale[~observed] = 1.0
        b_scale = max(float(np.abs(seconds).max()), 1e-300)
        x = nonnegative_least_squares(design / scale, seconds / b_scale) * b_scale / scale
        rmse = float(np.sqrt(np.mean((design @ x - seconds) ** 2)))
        name = str(source) if isinstance(source, (str, Path)) else "<rows>"
        return cls(float(x[0]), dict(zip(FEATURES, x[1:].tolist())), source=name,
                   num_rows=len(seconds), rmse=rmse,
                   unobserved=[f for f, seen in zip(FEATURES, observed[1:]) if not seen])

    def step_seconds(self, plan: Any) -> float:
        """Args: plan: an object with the `FEATURES` attributes.
        Returns: the fitted seconds of the step (0.0 for an empty plan): intercept + the
        coefficients times the features, summed left to right in `FEATURES` order."""
        return _native_seconds(self.native, plan, block_size=0)

    def to_dict(self) -> dict[str, Any]:
        """Returns: the fitted numbers as a JSON-ready mapping (the `save` format)."""
        return {"format": "tandem.ProfileCost/1", "intercept": self.intercept,
                "coefficients": dict(self.coefficients), "source": self.source,
                "num_rows": self.num_rows, "rmse": self.rmse, "unobserved": list(self.unobserved)}

    def save(self, path: str | Path) -> None:
        """Writes `to_dict` as JSON to `path`."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ProfileCost":
        """Reads a model written by `save`.

        Args:
            path: the JSON file.
        Returns:
            The model.
        Raises:
            ValueError: not a saved ProfileCost, or unknown keys.
        """
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != "tandem.ProfileCost/1":
            raise ValueError(f"{path}: not a saved ProfileCost (format tandem.ProfileCost/1)")
        known = {"format", "intercept", "coefficients", "source", "num_rows", "rmse", "unobserved"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        data.pop("format")
        return cls(**data)

    def describe(self) -> str:
        """Returns: the fitted formula, its residual and the features it never saw."""
        terms = " + ".join(f"{c:.3g}*{f}" for f, c in self.coefficients.items() if c)
        lines = [f"profile: fitted to {self.num_rows} steps from {self.source or '?'}",
                 f"  seconds = {self.intercept:.3g}" + (f" + {terms}" if terms else ""),
                 f"  rmse {self.rmse:.3g} s"]
        if self.unobserved:
            lines.append(f"  never varied in the profile (cost taken as 0): {', '.join(self.unobserved)}")
        return "\n".join(lines)


def _profile_cost(model: ModelSpec, hw: HardwareSpec, profile_path: str | Path | None) -> CostModel:
    if profile_path is None:
        raise ValueError("cost model 'profile' needs profile_path (a profile .csv or a saved .json)")
    if Path(profile_path).suffix == ".json":
        return ProfileCost.load(profile_path)
    return ProfileCost.fit(profile_path)


_COST_MODELS: dict[str, Callable[[ModelSpec, HardwareSpec, Any], CostModel]] = {
    "roofline": lambda model, hw, profile_path: RooflineCost(model, hw),
    "profile": _profile_cost,
}


def make_cost_model(kind: str, model: ModelSpec, hw: HardwareSpec,
                    profile_path: str | Path | None = None) -> CostModel:
    """Builds a cost model by name.

    Args:
        kind: ``"roofline"`` or ``"profile"``.
        model, hw: the specs (the roofline's inputs; a profile is for one pair already).
        profile_path: for ``"profile"``: a profile CSV to fit, or a JSON written by `ProfileCost.save`.
    Returns:
        The cost model.
    Raises:
        ValueError: unknown kind, missing or malformed profile.
    """
    if kind not in _COST_MODELS:
        raise ValueError(f"unknown cost model {kind!r}; known: {sorted(_COST_MODELS)}")
    return _COST_MODELS[kind](model, hw, profile_path)


__all__ = ["FEATURES", "PROFILE_COLUMNS", "PlanFeatures", "CostModel", "RooflineCost", "ProfileCost",
           "nonnegative_least_squares", "read_profile", "write_profile", "make_cost_model"]
