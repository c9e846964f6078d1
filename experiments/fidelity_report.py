"""The fidelity report's arithmetic, tables and plots (experiments.fidelity computes the runs).

    errors = compare(engine_summary, twin_summary)          # per metric: engine, twin, (twin - engine) / engine
    step = step_errors(predicted, measured)                 # |predicted - measured| / measured: median, p90
    order = ranking({"lru": (engine, twin), ...}, "ttft_s_p90", higher_is_better=False)
    checks = verdict(report)                                # each target of docs/fidelity.md: value, bound, met

Pure functions of summaries and arrays: tests/test_fidelity_report.py checks them on hand-made runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

# (summary key, label, target: max |relative error| or None for "reported only")
METRICS: tuple[tuple[str, str, float | None], ...] = (
    ("ttft_s_p50", "TTFT p50 (s)", 0.05),
    ("ttft_s_p90", "TTFT p90 (s)", 0.05),
    ("tpot_s_p50", "TPOT p50 (ms)", 0.05),
    ("tpot_s_p90", "TPOT p90 (ms)", 0.05),
    ("itl_s_p50", "ITL p50 (ms)", None),
    ("itl_s_p90", "ITL p90 (ms)", None),
    ("per_gpu_output_tok_s", "output tok/s", 0.03),
    ("per_gpu_total_tok_s", "total tok/s", None),
    ("session_s_p50", "session p50 (s)", None),
    ("prefix_hit_rate", "prefix hit rate", None),
    ("preemptions", "preemptions", None),
    ("num_steps", "steps", None),
)
SCALE = {"tpot_s_p50": 1e3, "tpot_s_p90": 1e3, "itl_s_p50": 1e3, "itl_s_p90": 1e3}
STEP_MEDIAN_TARGET = 0.03
STEP_P90_TARGET = 0.08


def metric(summary: Mapping, key: str) -> float:
    """A summary figure; `preemptions` is the sum of both kinds."""
    if key == "preemptions":
        return float(summary.get("num_preemptions_recompute", 0) + summary.get("num_preemptions_swap", 0))
    value = summary.get(key)
    return math.nan if value is None else float(value)


def relative_error(twin: float, engine: float) -> float:
    """(twin - engine) / engine; NaN where the engine's figure is 0 or unknown."""
    if not (math.isfinite(twin) and math.isfinite(engine)) or engine == 0:
        return math.nan
    return (twin - engine) / engine


def compare(engine: Mapping, twin: Mapping) -> dict[str, dict[str, float]]:
    """Per METRICS key: the engine's and the twin's figure and the twin's relative error."""
    out = {}
    for key, _, _ in METRICS:
        e, t = metric(engine, key), metric(twin, key)
        out[key] = {"engine": e, "twin": t, "rel_err": relative_error(t, e)}
    return out


def step_errors(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """|predicted - measured| / measured over steps: median, p90, mean signed error, count."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if p.shape != m.shape:
        raise ValueError(f"{p.size} predictions for {m.size} measured steps")
    keep = m > 0
    if not keep.any():
        return {"median": math.nan, "p90": math.nan, "signed_mean": math.nan, "n": 0}
    rel = (p[keep] - m[keep]) / m[keep]
    return {
        "median": float(np.median(np.abs(rel))),
        "p90": float(np.percentile(np.abs(rel), 90)),
        "signed_mean": float(rel.mean()),
        "n": int(keep.sum()),
    }


def ranking(pairs: Mapping[str, tuple[Mapping, Mapping]], key: str, higher_is_better: bool) -> dict:
    """The policies ordered best first by `key`, on the engine and in the twin.

    Args:
        pairs: policy name -> (engine summary, twin summary).
        key: a METRICS key.
        higher_is_better: throughput-like (True) or latency-like (False).
    Returns:
        {"engine": [...], "twin": [...], "same": bool, "engine_values": {...}, "twin_values": {...},
         "min_gap": the smallest relative gap between neighbours in the engine's order}.
    """

    def order(side: int) -> list[str]:
        values = {name: metric(p[side], key) for name, p in pairs.items()}
        return sorted(values, key=lambda n: -values[n] if higher_is_better else values[n])

    engine_values = {n: metric(p[0], key) for n, p in pairs.items()}
    engine_order, twin_order = order(0), order(1)
    gaps = [
        abs(engine_values[b] - engine_values[a]) / abs(engine_values[a])
        for a, b in zip(engine_order, engine_order[1:])
        if engine_values[a]
    ]
    return {
        "key": key,
        "engine": engine_order,
        "twin": twin_order,
        "same": engine_order == twin_order,
        "engine_values": engine_values,
        "twin_values": {n: metric(p[1], key) for n, p in pairs.items()},
        "min_gap": min(gaps) if gaps else math.nan,
    }


@dataclass
class RunReport:
    """One workload run on the engine and in the twin."""

    name: str
    description: str
    engine: Mapping
    twin: Mapping
    step: Mapping[str, float]
    replay_equal: bool | None = None  # the simulator, fed the measured step times, planned as the engine did
    replay_detail: str = ""
    server: Mapping | None = None  # the same run through engine.serve + bench_serving
    twin_for_server: Mapping | None = None
    comparison: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.comparison:
            self.comparison = compare(self.engine, self.twin)


def verdict(runs: Sequence[RunReport], overall_step: Mapping[str, float], rankings: Sequence[Mapping]) -> list[dict]:
    """Each target with its worst value over the runs: {"target", "value", "bound", "met"}."""
    checks = [
        {"target": "per-step |error| median", "value": overall_step["median"], "bound": STEP_MEDIAN_TARGET},
        {"target": "per-step |error| p90", "value": overall_step["p90"], "bound": STEP_P90_TARGET},
    ]
    for key, label, bound in METRICS:
        if bound is None:
            continue
        errors = [abs(r.comparison[key]["rel_err"]) for r in runs if math.isfinite(r.comparison[key]["rel_err"])]
        if errors:
            worst = max(errors)
            where = runs[[abs(r.comparison[key]["rel_err"]) for r in runs].index(worst)].name
            checks.append({"target": f"{label}: worst |error| ({where})", "value": worst, "bound": bound})
        elif runs:  # no run could say: an unmet target, not a silent one
            checks.append({"target": f"{label}: no run measured it", "value": math.nan, "bound": bound})
    for c in checks:
        c["met"] = bool(math.isfinite(c["value"]) and c["value"] <= c["bound"])
    for r in rankings:
        checks.append(
            {
                "target": f"ranking by {r['key']}",
                "value": " > ".join(r["engine"]),
                "bound": " > ".join(r["twin"]),
                "met": bool(r["same"]),
            }
        )
    replays = [r for r in runs if r.replay_equal is not None]
    if replays:
        checks.append(
            {
                "target": "replayed plan sequence equals the engine's",
                "value": sum(r.replay_equal for r in replays),
                "bound": len(replays),
                "met": all(r.replay_equal for r in replays),
            }
        )
    return checks


# --------------------------------------------------------------------------- text


def _fmt(value: float, key: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    value = value * SCALE.get(key, 1.0)
    if key in ("preemptions", "num_steps"):
        return f"{value:.0f}"
    return f"{value:.4g}"


def _pct(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{100 * value:+.1f}%"


def run_table(run: RunReport) -> str:
    """A markdown table: each metric on the engine, in the twin, and the twin's error."""
    lines = ["| metric | engine | twin | twin error |", "|---|---:|---:|---:|"]
    for key, label, bound in METRICS:
        c = run.comparison[key]
        mark = (
            "" if bound is None or not math.isfinite(c["rel_err"]) else (" ✓" if abs(c["rel_err"]) <= bound else " ✗")
        )
        lines.append(f"| {label} | {_fmt(c['engine'], key)} | {_fmt(c['twin'], key)} | {_pct(c['rel_err'])}{mark} |")
    s = run.step
    lines.append(
        f"| per-step |error| median / p90 ({s['n']} steps) | | | {100 * s['median']:.1f}% / {100 * s['p90']:.1f}% |"
    )
    return "\n".join(lines)


def summary_table(runs: Sequence[RunReport]) -> str:
    """One row per run: the headline errors."""
    keys = ("ttft_s_p50", "ttft_s_p90", "tpot_s_p50", "tpot_s_p90", "per_gpu_output_tok_s")
    head = "| run | step err p50 / p90 | " + " | ".join(label for k, label, _ in METRICS if k in keys) + " | replay |"
    lines = [head, "|---" * (len(keys) + 3) + "|"]
    for r in runs:
        errs = " | ".join(_pct(r.comparison[k]["rel_err"]) for k in keys)
        replay = "-" if r.replay_equal is None else ("equal" if r.replay_equal else "differs")
        lines.append(f"| {r.name} | {100 * r.step['median']:.1f}% / {100 * r.step['p90']:.1f}% | {errs} | {replay} |")
    return "\n".join(lines)


def verdict_table(checks: Sequence[Mapping]) -> str:
    lines = ["| target | measured | bound | met |", "|---|---|---|---|"]
    for c in checks:
        value, bound = c["value"], c["bound"]
        if isinstance(value, float) and isinstance(bound, float):
            value = f"{100 * value:.1f}%" if math.isfinite(value) else "-"
            bound = f"{100 * bound:.0f}%"
        lines.append(f"| {c['target']} | {value} | {bound} | {'yes' if c['met'] else '**no**'} |")
    return "\n".join(lines)


def ranking_table(r: Mapping) -> str:
    lines = [f"| policy | engine {r['key']} | twin {r['key']} |", "|---|---:|---:|"]
    for name in r["engine"]:
        lines.append(
            f"| {name} | {_fmt(r['engine_values'][name], r['key'])} | {_fmt(r['twin_values'][name], r['key'])} |"
        )
    lines.append(
        f"\nengine order: {' > '.join(r['engine'])}; twin order: {' > '.join(r['twin'])} "
        f"({'the same' if r['same'] else 'different'}; smallest gap between neighbours on the engine "
        f"{_pct(r['min_gap'])})"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def plot_steps(path, measured: np.ndarray, predicted: np.ndarray, labels: Sequence[str]) -> None:
    """Predicted vs measured step seconds, log-log, with the y = x line and +-8% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    labels = np.asarray(labels)
    for name in sorted(set(labels.tolist())):
        k = labels == name
        ax.scatter(measured[k] * 1e3, predicted[k] * 1e3, s=6, alpha=0.5, label=name)
    lo, hi = (
        float(min(measured.min(), predicted.min())) * 1e3 * 0.8,
        float(max(measured.max(), predicted.max())) * 1e3 * 1.25,
    )
    xs = np.geomspace(lo, hi, 50)
    ax.plot(xs, xs, "k-", lw=1, label="y = x")
    ax.fill_between(xs, xs * 0.92, xs * 1.08, color="grey", alpha=0.2, label="±8%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured step (ms)")
    ax.set_ylabel("twin's predicted step (ms)")
    ax.set_title("per-step time: twin vs engine")
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cdfs(path, series: Mapping[str, tuple[np.ndarray, np.ndarray]], xlabel: str, scale: float = 1.0) -> None:
    """One panel per run: the CDF of a per-request figure on the engine and in the twin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(series))
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, (engine, twin)) in zip(axes.flat, series.items()):
        for values, label, style in ((engine, "engine", "-"), (twin, "twin", "--")):
            v = np.sort(np.asarray(values, dtype=float)[np.isfinite(values)]) * scale
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size, style, where="post", label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = [
    "METRICS",
    "RunReport",
    "compare",
    "metric",
    "plot_cdfs",
    "plot_steps",
    "ranking",
    "ranking_table",
    "relative_error",
    "run_table",
    "step_errors",
    "summary_table",
    "verdict",
    "verdict_table",
]
