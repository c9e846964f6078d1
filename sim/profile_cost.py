"""The `profile` cost model: a step's seconds fitted to the engine's own measured steps.

`experiments.calibrate` runs the engine over a grid of step shapes and writes a profile
(docs/profile-format.md); `ProfileCost.fit` turns it into a sum of non-negative terms, one set
per path the engine takes (csrc/step_cost.h evaluates them)::

    graph (all-decode plan, a CUDA graph replay):
        one + reqs + sum_k reqs_over(k) + decode_kv + strict + dropped + dropped_kv + swaps
    eager (everything else):
        one + tokens + sum_k tokens_over(k)                    the weights' matmuls: flat, then compute bound
        + sampled_any + sampled                                the LM head and the sampler
        + decode_reqs + decode_kv                              decode rows' attention (KV bytes read)
        + prefill_reqs + prefill_pairs + prefill_kv            prefill attention (query x key pairs) ...
        + sum_k prefill_waves_kv(k)                            ... run in waves of query tiles, each reading the
                                                               whole context: (c + q) * ceil(q / k) per request
        + dropped + dropped_kv + swap_out + swap_in            a dropped overlap guess; KV copies

A profile prices the engine it measured, storage and sharding included: its header's
``kv_cache_dtype`` and ``quantization`` (absent in a header: "auto" and "none", what every engine ran
before FP8) and ``tensor_parallel_size`` (absent: 1, one GPU) must be the simulated model's, else
`check_model` refuses it. A bf16 fit is not rescaled to FP8: its
coefficients mix the bytes a step moves with what does not scale with them (kernel launches, the
host's share, the quantize and dequantize work FP8 adds, the attention kernel's own rate), so a
byte ratio applied to them would be a guess presented as a measurement. FP8 runs take the roofline
(whose bytes do follow the storage) or a profile calibrated on an FP8 engine
(``python -m experiments.calibrate --engine-option 'kv_cache_dtype="fp8_e4m3"' ...``). Nor is a
one-GPU fit divided by the ranks of a tensor-parallel replica: the launches and the host's work do
not shrink with them, and it measured no collective. Tensor-parallel runs take the roofline or a
profile calibrated at their size (``--engine-option 'tensor_parallel_size=4'``).

`strict` (a decode step the engine could not overlap with the host's work) and `dropped` (the
guess of an overlapped decode that the next plan did not match, whose GPU time that plan waits
for) come from the plan's place in the sequence, which the scheduler tracks (csrc/scheduler.h).
Each coefficient is >= 0 (non-negative least squares on relative errors), so adding work never
makes a step cheaper and the hinges make the linear layers' cost convex in the tokens: flat while
the weights' bytes dominate, then rising with the FLOPs. Beyond the profiled range every term
extends linearly (the fitted per-token and per-pair rates); such steps are counted
(`num_extrapolated`) and the simulation reports them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from controlplane.profile import FEATURES, PREFILL_ROWS, PROFILE_COLUMNS, csv_rows, decode_prefill_rows
from controlplane.profile import parse_row as _parse_row
from sim import _native
from sim.cost import CostModel, _native_seconds
from sim.specs import ModelSpec

FORMAT = "tandem.ProfileCost/2"
# The basis functions by name (csrc/step_cost.h has the same); f: feature columns, k: a knot.
PROFILE_BASIS = {
    "one": lambda f, k: np.ones_like(f["num_tokens"]),
    "tokens": lambda f, k: f["num_tokens"],
    "reqs": lambda f, k: f["num_reqs"],
    "sampled": lambda f, k: f["num_sampled"],
    "sampled_any": lambda f, k: (f["num_sampled"] > 0).astype(float),
    "decode_reqs": lambda f, k: f["num_decode_reqs"],
    "prefill_reqs": lambda f, k: f["num_reqs"] - f["num_decode_reqs"],
    "decode_kv": lambda f, k: f["decode_kv_tokens"],
    "prefill_pairs": lambda f, k: f["attn_pairs"] - f["decode_kv_tokens"],
    "prefill_kv": lambda f, k: f["kv_read_tokens"] - f["decode_kv_tokens"],
    "strict": lambda f, k: (f["continues_decode"] == 0).astype(float),
    "dropped": lambda f, k: ((f["follows_decode"] != 0) & (f["continues_decode"] == 0)).astype(float),
    "dropped_kv": lambda f, k: np.where(
        (f["follows_decode"] != 0) & (f["continues_decode"] == 0), f["decode_kv_tokens"], 0.0
    ),
    "swap_out": lambda f, k: f["num_swap_out_blocks"],
    "swap_in": lambda f, k: f["num_swap_in_blocks"],
    "tokens_over": lambda f, k: np.maximum(f["num_tokens"] - k, 0.0),
    "reqs_over": lambda f, k: np.maximum(f["num_reqs"] - k, 0.0),
    "prefill_waves_kv": lambda f, k: (
        np.array([float(((r[:, 0] + r[:, 1]) * np.ceil(r[:, 0] / k)).sum()) for r in f[PREFILL_ROWS]])
        if PREFILL_ROWS in f
        else np.zeros_like(f["num_tokens"])
    ),
}
PATH_TERMS = {
    "graph": ("one", "reqs", "reqs_over", "decode_kv", "strict", "dropped", "dropped_kv", "swap_out", "swap_in"),
    "eager": (
        "one",
        "tokens",
        "tokens_over",
        "sampled_any",
        "sampled",
        "decode_reqs",
        "decode_kv",
        "prefill_reqs",
        "prefill_pairs",
        "prefill_kv",
        "prefill_waves_kv",
        "dropped",
        "dropped_kv",
        "swap_out",
        "swap_in",
    ),
}
KNOTS = {
    "tokens_over": (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
    "reqs_over": (2, 4, 8, 16, 32, 64, 128),
    "prefill_waves_kv": (128, 256, 512, 1024),
}
OVERLAP_ONLY = ("strict", "dropped", "dropped_kv")  # fitted only for an engine with overlapped decode
LIMIT_BASES = ("tokens", "reqs", "decode_kv", "prefill_pairs", "prefill_kv", "swap_out", "swap_in")
MIN_ROWS_PER_TERM = 3
MIN_PATH_ROWS = 20
MIN_ROWS_BEYOND_KNOT = 5
MIN_SUPPORT = 3  # steps where a basis is not 0 before its coefficient is fitted
SHARED = ("swap_out", "swap_in")  # the same copies on either path: one path's fit serves the other
# A step over twice (or under half) its fitted time, and far off compared with the others, is a
# hiccup rather than a step's cost (a kernel compiled on first use, a garbage collection, a page
# fault): such rows are dropped and the fit redone, up to TRIM_ROUNDS times and TRIM_MAX_SHARE of
# a path's rows; how many were dropped is kept with the fit.
TRIM_LOG_RATIO = math.log(2.0)
TRIM_MEDIAN_FACTOR = 8.0
TRIM_ROUNDS = 3
TRIM_MAX_SHARE = 0.10
SHAPE_KEYS = (
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "dtype_bytes",
)
# How the profiled engine stored weights and KV and over how many GPUs it sharded the model (header
# keys; experiments.calibrate writes each from the engine's config) and what a header without them means.
STORAGE_DEFAULTS = {"kv_cache_dtype": "auto", "quantization": "none", "tensor_parallel_size": 1}
SHARDING_KEYS = ("tensor_parallel_size",)


def profile_storage(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The profiled engine's ``kv_cache_dtype`` and ``quantization`` (strings) and ``tensor_parallel_size``
    (an int) from a profile's header: ModelSpec fields, ``dataclasses.replace(spec, **profile_storage(meta))``."""
    out: dict[str, Any] = {}
    for key, default in STORAGE_DEFAULTS.items():
        value = meta.get(key, default)
        if key in SHARDING_KEYS:
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"profile header: {key} must be an integer, got {value!r}") from None
        out[key] = str(value) if key not in SHARDING_KEYS else value
    return out


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
    passive = np.zeros(n, dtype=bool)  # columns allowed to be > 0
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


# --------------------------------------------------------------------------- reading profiles


def _profile_rows(source: str | Path | Iterable[Mapping[str, Any]]) -> tuple[dict, Iterator[tuple[str, Mapping]]]:
    """(header meta, ``("file:line", row)`` ...) of a CSV path, or ({}, ``("<rows>[i]", row)`` ...)."""
    if not isinstance(source, (str, Path)):
        return {}, ((f"<rows>[{i}]", row) for i, row in enumerate(source))
    meta, columns, rows = csv_rows(source)
    if columns is None:
        raise ValueError(f"{source}: empty profile (no header line)")
    missing = [c for c in PROFILE_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{source}: the column header lacks {missing}; required: {list(PROFILE_COLUMNS)} "
            f"(a profile of an older format? re-run `python -m experiments.calibrate`)"
        )
    return meta, ((f"{source}:{line}", row) for line, row in rows)


def read_profile(
    source: str | Path | Iterable[Mapping[str, Any]],
) -> tuple[np.ndarray, np.ndarray, dict, list[np.ndarray] | None]:
    """Reads measured steps (format: docs/profile-format.md).

    Args:
        source: a CSV path, or an iterable of mappings with the same columns.
    Returns:
        ``features`` [n, len(FEATURES)], ``seconds`` [n] (float64), the header's meta ({} for mappings)
        and each row's prefill rows as a [k, 2] array of (q, c), or None without the optional column.
    Raises:
        ValueError: empty profile, missing column, non-numeric or negative value
            (the message names the file and line, or the row index).
    """
    meta, rows = _profile_rows(source)
    parsed, prefill = [], []
    for where, row in rows:
        parsed.append(_parse_row(row, where))
        if prefill is not None and PREFILL_ROWS in row:
            pairs = decode_prefill_rows(row[PREFILL_ROWS], where)
            prefill.append(np.asarray(pairs, dtype=np.float64).reshape(-1, 2))
        else:
            prefill = None
    if not parsed:
        name = source if isinstance(source, (str, Path)) else "<rows>"
        raise ValueError(f"{name}: empty profile (no data rows)")
    table = np.asarray(parsed, dtype=np.float64)
    return table[:, :-1], table[:, -1], meta, prefill


def feature_columns(features: np.ndarray, prefill: list[np.ndarray] | None = None) -> dict[str, Any]:
    """The [n, len(FEATURES)] matrix as one array per feature name (and the prefill rows, if known)."""
    cols: dict[str, Any] = {name: features[:, i] for i, name in enumerate(FEATURES)}
    if prefill is not None:
        cols[PREFILL_ROWS] = prefill
    return cols


def _subset(cols: Mapping[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """The columns of the rows selected by a boolean mask."""
    out = {k: v[rows] for k, v in cols.items() if k != PREFILL_ROWS}
    if PREFILL_ROWS in cols:
        out[PREFILL_ROWS] = [r for r, keep in zip(cols[PREFILL_ROWS], rows) if keep]
    return out


def graph_rows(cols: Mapping[str, np.ndarray], max_graph_batch: int) -> np.ndarray:
    """Which steps the engine ran as a decode graph: all rows q == 1, at most max_graph_batch of them."""
    t, r = cols["num_tokens"], cols["num_reqs"]
    return (max_graph_batch > 0) & (t > 0) & (t == r) & (r <= max_graph_batch)


# --------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class ProfilePath:
    """The fitted terms of one path: ``(basis, knot, coefficient)``, the range the fit saw, its quality."""

    terms: tuple[tuple[str, float, float], ...]
    limits: Mapping[str, float] = field(default_factory=dict)
    observed: bool = True
    rows: int = 0
    trimmed: int = 0
    median_rel_err: float = math.nan
    p90_rel_err: float = math.nan
    unvaried: tuple[str, ...] = ()  # bases that never varied (or on < MIN_SUPPORT steps): cost not fitted

    def design(self, cols: Mapping[str, np.ndarray]) -> np.ndarray:
        """[n, len(terms)]: each term's basis values (numpy's evaluation of csrc/step_cost.cpp)."""
        return (
            np.stack([PROFILE_BASIS[b](cols, k) for b, k, _ in self.terms], axis=1)
            if self.terms
            else np.zeros((len(cols["num_tokens"]), 0))
        )

    def to_dict(self) -> dict:
        return {
            "terms": [list(t) for t in self.terms],
            "limits": dict(self.limits),
            "observed": self.observed,
            "rows": self.rows,
            "trimmed": self.trimmed,
            "median_rel_err": self.median_rel_err,
            "p90_rel_err": self.p90_rel_err,
            "unvaried": list(self.unvaried),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "ProfilePath":
        known = {"terms", "limits", "observed", "rows", "trimmed", "median_rel_err", "p90_rel_err", "unvaried"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}")
        terms = []
        for term in data.get("terms", []):
            if len(term) != 3 or term[0] not in PROFILE_BASIS:
                raise ValueError(
                    f"{where}: a term is [basis, knot, coefficient] with a basis of "
                    f"{sorted(PROFILE_BASIS)}, got {term!r}"
                )
            basis, knot, coef = term[0], float(term[1]), float(term[2])
            if not (math.isfinite(coef) and coef >= 0 and math.isfinite(knot)):
                raise ValueError(f"{where}: term {basis} coefficient must be finite and >= 0, got {coef!r}")
            terms.append((basis, knot, coef))
        return cls(
            tuple(terms),
            dict(data.get("limits", {})),
            bool(data.get("observed", True)),
            int(data.get("rows", 0)),
            int(data.get("trimmed", 0)),
            float(data.get("median_rel_err", math.nan)),
            float(data.get("p90_rel_err", math.nan)),
            tuple(data.get("unvaried", ())),
        )


def _candidate_terms(path: str, cols: Mapping[str, np.ndarray], overlap: bool) -> tuple[list, list[str]]:
    """The (basis, knot) columns worth fitting on these steps, and the bases that never varied."""
    chosen, unvaried = [], []
    for basis in PATH_TERMS[path]:
        if basis in OVERLAP_ONLY and not overlap:
            continue
        if basis == "prefill_waves_kv":
            if PREFILL_ROWS in cols and any(len(r) for r in cols[PREFILL_ROWS]):
                chosen += [(basis, float(k)) for k in KNOTS[basis]]
            continue
        if basis in KNOTS:
            axis = PROFILE_BASIS[basis.split("_")[0]](cols, 0.0)
            chosen += [(basis, float(k)) for k in KNOTS[basis] if (axis > k).sum() >= MIN_ROWS_BEYOND_KNOT]
            continue
        values = PROFILE_BASIS[basis](cols, 0.0)
        if basis != "one" and (np.ptp(values) == 0 or np.count_nonzero(values) < MIN_SUPPORT):
            unvaried.append(basis)  # constant (or all but constant) here: its cost cannot be told apart
            continue
        chosen.append((basis, 0.0))
    return chosen, unvaried


def _weighted_nnls(design: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the squared relative errors."""
    a = design / seconds[:, None]
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    return nonnegative_least_squares(a / scale, np.ones(len(seconds))) / scale


def _fit_path(path: str, cols: Mapping[str, np.ndarray], seconds: np.ndarray, overlap: bool, where: str) -> ProfilePath:
    terms, unvaried = _candidate_terms(path, cols, overlap)
    need = max(MIN_PATH_ROWS, MIN_ROWS_PER_TERM * len(terms))
    if len(seconds) < need:
        raise ValueError(
            f"{where}: the {path} path has {len(seconds)} measured steps; a fit of its "
            f"{len(terms)} terms needs at least {need} (too few rows: profile a larger grid)"
        )
    if (seconds <= 0).any():
        raise ValueError(f"{where}: the {path} path has steps of 0 seconds; a measured step takes time")
    probe = ProfilePath(tuple((b, k, 0.0) for b, k in terms))
    design = probe.design(cols)
    keep = np.ones(len(seconds), dtype=bool)
    coef = _weighted_nnls(design, seconds)
    for _ in range(TRIM_ROUNDS):
        predicted = np.maximum(design @ coef, 1e-12)
        off = np.abs(np.log(seconds / predicted))
        hiccup = (off > TRIM_LOG_RATIO) & (off > TRIM_MEDIAN_FACTOR * float(np.median(off[keep])))
        if not (hiccup & keep).any() or (keep & ~hiccup).sum() < (1 - TRIM_MAX_SHARE) * len(seconds):
            break
        keep &= ~hiccup
        coef = _weighted_nnls(design[keep], seconds[keep])
    trimmed = int((~keep).sum())
    kept = np.abs(design[keep] @ coef / seconds[keep] - 1)
    limits = {b: float(PROFILE_BASIS[b](cols, 0.0).max()) for b in LIMIT_BASES if b in PATH_TERMS[path]}
    return ProfilePath(
        tuple((b, k, float(c)) for (b, k), c in zip(terms, coef)),
        limits,
        True,
        len(seconds),
        trimmed,
        float(np.median(kept)),
        float(np.percentile(kept, 90)),
        tuple(unvaried),
    )


def _share_copies(paths: dict[str, ProfilePath]) -> dict[str, ProfilePath]:
    """A KV copy costs the same before either path's forward pass: a path whose steps never copied
    takes the other path's copy terms and range (else such steps would cost their copies nothing)."""
    out = dict(paths)
    for name, other in (("graph", "eager"), ("eager", "graph")):
        mine, theirs = out[name], paths[other]
        have = {b for b, _, _ in mine.terms}
        borrowed = [t for t in theirs.terms if t[0] in SHARED and t[0] not in have]
        if borrowed:
            limits = {**mine.limits, **{b: theirs.limits.get(b, 0.0) for b, _, _ in borrowed}}
            out[name] = dataclasses.replace(
                mine,
                terms=mine.terms + tuple(borrowed),
                limits=limits,
                unvaried=tuple(u for u in mine.unvaried if u not in SHARED),
            )
    return out


# --------------------------------------------------------------------------- the model


class ProfileCost(CostModel):
    """A fitted step cost: per path (graph or eager), the sum of its terms (module docstring).

    Args:
        paths: ``{"graph": ProfilePath, "eager": ProfilePath}``.
        max_graph_batch: the largest decode batch the profiled engine ran as a CUDA graph (0: none).
        meta: where the profile came from (card, driver, torch, dtype, kernels, overlap, model shape,
            commit, ...), as written by `experiments.calibrate`.
    """

    name = "profile"

    def __init__(
        self, paths: Mapping[str, ProfilePath], max_graph_batch: int = 0, meta: Mapping[str, Any] | None = None
    ) -> None:
        if sorted(paths) != ["eager", "graph"]:
            raise ValueError(f"ProfileCost needs the paths 'graph' and 'eager', got {sorted(paths)}")
        if isinstance(max_graph_batch, bool) or not isinstance(max_graph_batch, int) or max_graph_batch < 0:
            raise ValueError(f"ProfileCost max_graph_batch must be an integer >= 0, got {max_graph_batch!r}")
        if max_graph_batch > 0 and not paths["graph"].observed:
            raise ValueError("ProfileCost: the engine ran decode graphs but no graph step was profiled")
        self.paths = dict(paths)
        self.max_graph_batch = max_graph_batch
        self.meta = dict(meta or {})

        def native_path(p: ProfilePath):
            return ([(b, k, c) for b, k, c in p.terms], sorted(p.limits.items()))

        (gt, gl), (et, el) = native_path(self.paths["graph"]), native_path(self.paths["eager"])
        self.native = _native.StepCost.profile(
            gt, et, gl, el, self.paths["graph"].observed, self.paths["eager"].observed, max_graph_batch
        )

    @classmethod
    def fit(
        cls,
        source: str | Path | Iterable[Mapping[str, Any]],
        meta: Mapping[str, Any] | None = None,
        model: ModelSpec | None = None,
    ) -> "ProfileCost":
        """Fits both paths by non-negative least squares on relative errors.

        Args:
            source: a profile CSV path or an iterable of row mappings (see `read_profile`).
            meta: overrides the file's header (``max_graph_batch``, ``overlap`` are read from it).
            model: if given, the profile's ``model_shape`` must be this model's (else ValueError).
        Returns:
            The fitted model.
        Raises:
            ValueError: a malformed profile, too few steps on a path, another model's profile.
        """
        features, seconds, file_meta, prefill = read_profile(source)
        meta = {**file_meta, **(meta or {})}
        where = str(source) if isinstance(source, (str, Path)) else "<rows>"
        max_graph_batch = int(meta.get("max_graph_batch", 0))
        overlap = bool(meta.get("overlap", False))
        cols = feature_columns(features, prefill)
        work = (cols["num_tokens"] > 0) | (cols["num_swap_out_blocks"] + cols["num_swap_in_blocks"] > 0)
        graph = graph_rows(cols, max_graph_batch)
        paths = {}
        for name, rows in (("graph", graph & work), ("eager", ~graph & work)):
            if name == "graph" and max_graph_batch == 0:
                paths[name] = ProfilePath((), observed=False)
                continue
            paths[name] = _fit_path(name, _subset(cols, rows), seconds[rows], overlap, where)
        if max_graph_batch:
            paths = _share_copies(paths)
        meta.update(source_file=where, rows=int(work.sum()))
        cost = cls(paths, max_graph_batch, meta)
        if model is not None:
            cost.check_model(model)
        return cost

    def check_model(self, model: ModelSpec) -> None:
        """Raises ValueError if the profile names a model shape other than `model`'s, or was measured
        with another ``kv_cache_dtype`` or ``quantization`` (a header without them: auto and none), or
        on another ``tensor_parallel_size`` (without it: 1). A profile is not rescaled to other ranks:
        its terms mix the bytes a step moves with launches and the host's share, and it measured its
        own collectives."""
        recorded = profile_storage(self.meta)
        ranks = recorded["tensor_parallel_size"]
        if ranks != model.tensor_parallel_size:
            raise ValueError(
                f"profile {self.meta.get('source_file', '')!s}: measured on an engine with tensor_parallel_size="
                f"{ranks}, but model {model.name} is simulated with tensor_parallel_size={model.tensor_parallel_size}; "
                f"a fitted profile prices only the sharding it measured (no rescaling: sim/profile_cost.py). Use "
                f"cost=roofline, or calibrate an engine at that size (python -m experiments.calibrate "
                f"--engine-option 'tensor_parallel_size={model.tensor_parallel_size}') and pass sim.profile_path"
            )
        measured = {k: v for k, v in recorded.items() if k not in SHARDING_KEYS}
        wanted = {k: getattr(model, k) for k in measured}
        if measured != wanted:
            says = ", ".join(f"{k}={v}" for k, v in measured.items())
            asks = ", ".join(f"{k}={v}" for k, v in wanted.items())
            options = " ".join(f"--engine-option '{k}=\"{v}\"'" for k, v in wanted.items() if v != measured[k])
            raise ValueError(
                f"profile {self.meta.get('source_file', '')!s}: measured on an engine with {says}, but model "
                f"{model.name} is simulated with {asks}; a fitted profile prices only the storage it measured "
                f"(no rescaling by byte ratios: sim/profile_cost.py). Use cost=roofline, or calibrate an engine "
                f"with those settings (python -m experiments.calibrate {options}) and pass sim.profile_path"
            )
        shape = self.meta.get("model_shape")
        if not shape:
            return
        ours = {k: getattr(model, k) for k in SHAPE_KEYS}
        diff = {k: (shape.get(k), ours[k]) for k in SHAPE_KEYS if k in shape and shape[k] != ours[k]}
        if diff:
            raise ValueError(
                f"profile {self.meta.get('source_file', '')!s}: measured on another model shape than "
                f"{model.name}: " + ", ".join(f"{k} {a} (profile) vs {b}" for k, (a, b) in diff.items())
            )

    def step_seconds(self, plan: Any) -> float:
        """Args: plan: an object with the `FEATURES` attributes.
        Returns: the fitted seconds of the step (0.0 for an empty plan)."""
        return _native_seconds(self.native, plan, block_size=0)

    def predict(self, features: np.ndarray, prefill: list[np.ndarray] | None = None) -> np.ndarray:
        """Seconds of many steps at once ([n, len(FEATURES)] rows, and each row's (q, c) prefill rows),
        by numpy; equal to `step_seconds` up to rounding (the sums run in another order)."""
        cols = feature_columns(np.asarray(features, dtype=np.float64), prefill)
        graph = graph_rows(cols, self.max_graph_batch)
        out = np.zeros(len(cols["num_tokens"]))
        for name, rows in (("graph", graph), ("eager", ~graph)):
            p = self.paths[name]
            if rows.any() and p.terms:
                out[rows] = p.design(_subset(cols, rows)) @ np.array([c for _, _, c in p.terms])
        empty = (cols["num_tokens"] <= 0) & (cols["num_swap_out_blocks"] + cols["num_swap_in_blocks"] <= 0)
        out[empty] = 0.0
        return out

    @property
    def num_extrapolated(self) -> int:
        """Steps priced so far beyond the profiled range (all copies of this model, fast paths too)."""
        return int(self.native.num_extrapolated)

    def to_dict(self) -> dict[str, Any]:
        """Returns: the fitted numbers as a JSON-ready mapping (the `save` format)."""
        return {
            "format": FORMAT,
            "max_graph_batch": self.max_graph_batch,
            "paths": {k: v.to_dict() for k, v in self.paths.items()},
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> None:
        """Writes `to_dict` as JSON to `path` (its folder is created)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ProfileCost":
        """Reads a model written by `save`.

        Raises:
            ValueError: not a saved ProfileCost of this format, or unknown keys.
        """
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON: {err}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ValueError(
                f"{path}: not a saved ProfileCost of format {FORMAT} (found {found!r}); "
                f"refit it with `python -m experiments.calibrate --fit PROFILE.csv`"
            )
        unknown = sorted(set(data) - {"format", "max_graph_batch", "paths", "meta"})
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        paths = data.get("paths") or {}
        meta = {**data.get("meta", {}), "source_file": str(path)}
        return cls(
            {k: ProfilePath.from_dict(v, f"{path}: paths.{k}") for k, v in paths.items()},
            int(data.get("max_graph_batch", 0)),
            meta,
        )

    def describe(self) -> str:
        """Returns: where the profile came from, each path's terms, fit quality and range."""
        m = self.meta
        lines = [
            f"profile: {m.get('model', '?')} on {m.get('card', m.get('hardware', '?'))}, fitted to "
            f"{m.get('rows', '?')} steps ({m.get('source_file', '?')}); overlap {m.get('overlap', '?')}, "
            f"decode graphs up to batch {self.max_graph_batch}"
        ]
        for name, p in self.paths.items():
            if not p.observed:
                lines.append(f"  {name}: not profiled")
                continue
            terms = " + ".join(f"{c:.3g}*{b}" + (f"({k:g})" if b.endswith("_over") else "") for b, k, c in p.terms if c)
            lines.append(
                f"  {name} ({p.rows} steps, {p.trimmed} trimmed; |rel err| median {p.median_rel_err:.3f},"
                f" p90 {p.p90_rel_err:.3f}): seconds = {terms or 0}"
            )
        return "\n".join(lines)


__all__ = [
    "FORMAT",
    "PROFILE_BASIS",
    "STORAGE_DEFAULTS",
    "SHARDING_KEYS",
    "profile_storage",
    "ProfileCost",
    "ProfilePath",
    "nonnegative_least_squares",
    "read_profile",
    "feature_columns",
    "graph_rows",
]
