"""A simulation's files: summary JSON, per-request CSV and standard plots (PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from sim.simulation import SimResult

SUMMARY_FILE = "summary.json"
REQUESTS_FILE = "requests.csv"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


def write_outputs(result: SimResult, out_dir: str | Path, plots: bool = True, requests_table: bool = True) -> dict:
    """Writes the run's files into `out_dir`; returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    summary = {k: _jsonable(v) for k, v in result.summary.items()}
    summary["notes"] = result.notes
    if hasattr(result, "warnings"):  # experiments/bench_serving.py's results have none
        summary["warnings"] = result.warnings
    paths["summary"] = out / SUMMARY_FILE
    paths["summary"].write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if requests_table:
        paths["requests"] = out / REQUESTS_FILE
        result.requests.to_csv(paths["requests"], index=False)
    if plots:
        paths.update(plot_run(result, out))
    return paths


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(result: SimResult, out: Path) -> dict:
    """Latency CDFs, KV usage over time, and per-user vs per-GPU throughput over time windows."""
    plt = _figure()
    table = result.requests
    paths = {}
    title = f"{result.summary['model']} on {result.summary['hardware']}, {result.summary['policy']}"

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, column, label in zip(axes, ("ttft", "tpot", "e2e"), ("TTFT (s)", "TPOT (s)", "end-to-end (s)")):
        values = np.sort(table[column].dropna().to_numpy())
        if values.size:
            ax.plot(values, np.arange(1, values.size + 1) / values.size)
        ax.set_xlabel(label)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    fig.suptitle(f"Latency CDFs: {title}")
    fig.tight_layout()
    paths["latency_cdf"] = out / "latency_cdf.png"
    fig.savefig(paths["latency_cdf"], dpi=110)
    plt.close(fig)

    samples = np.array(result.collector.kv_samples, dtype=float)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    if samples.size:
        for replica in np.unique(samples[:, 1]):
            rows = samples[samples[:, 1] == replica]
            ax.plot(rows[:, 0], rows[:, 2] / result.kv_blocks_per_replica, label=f"replica {int(replica)} held")
            ax.plot(
                rows[:, 0],
                1 - rows[:, 4] / result.kv_blocks_per_replica,
                alpha=0.4,
                linestyle="--",
                label=f"replica {int(replica)} held + cached",
            )
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("fraction of KV blocks")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title(f"KV usage: {title}")
    fig.tight_layout()
    paths["kv_usage"] = out / "kv_usage.png"
    fig.savefig(paths["kv_usage"], dpi=110)
    plt.close(fig)

    per_user, per_gpu = throughput_windows(result)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(per_gpu, per_user, s=12, alpha=0.6)
    ax.set_xlabel("per-GPU output tokens/s (window)")
    ax.set_ylabel("median per-user tokens/s (window)")
    ax.set_title("per-user vs per-GPU throughput", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["throughput"] = out / "throughput.png"
    fig.savefig(paths["throughput"], dpi=110)
    plt.close(fig)
    return paths


def throughput_windows(result: SimResult, num_windows: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(median per-user tokens/s, per-GPU output tokens/s) over equal windows of simulated time."""
    table = result.requests
    if table.empty:
        return np.empty(0), np.empty(0)
    lo, hi = table["arrival"].min(), table["finish"].max()
    edges = np.linspace(lo, hi, num_windows + 1)
    which = np.clip(np.searchsorted(edges, table["finish"].to_numpy(), side="right") - 1, 0, num_windows - 1)
    per_user, per_gpu = [], []
    width = (hi - lo) / num_windows
    rate = 1.0 / table["tpot"].to_numpy()
    outputs = table["output_tokens"].to_numpy()
    for w in range(num_windows):
        mask = which == w
        if mask.sum() < 3 or width <= 0:
            continue
        per_user.append(float(np.nanmedian(rate[mask])))
        gpus = result.summary.get("num_gpus", result.summary["num_replicas"])  # replicas x tensor_parallel_size
        per_gpu.append(float(outputs[mask].sum() / width / gpus))
    return np.array(per_user), np.array(per_gpu)


def plot_comparison(summaries: list[dict], out: Path, label_key: str = "policy") -> Path:
    """One point per run: per-GPU output tokens/s against median per-user tokens/s."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in summaries:
        axes[0].scatter(s["per_gpu_output_tok_s"], s["per_user_tok_s_p50"], s=40)
        axes[0].annotate(str(s[label_key]), (s["per_gpu_output_tok_s"], s["per_user_tok_s_p50"]), fontsize=8)
    axes[0].set_xlabel("per-GPU output tokens/s")
    axes[0].set_ylabel("median per-user tokens/s")
    axes[0].grid(alpha=0.3)
    names = [str(s[label_key]) for s in summaries]
    axes[1].bar(names, [s["ttft_s_p90"] for s in summaries])
    axes[1].set_ylabel("TTFT p90 (s)")
    axes[1].tick_params(axis="x", rotation=20)
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TABLE_COLUMNS = (
    ("policy", "policy", "{}"),
    ("hit rate", "prefix_hit_rate", "{:.1%}"),
    ("prefill amp", "prefill_amplification", "{:.2f}"),
    ("TTFT p50 s", "ttft_s_p50", "{:.2f}"),
    ("TTFT p90 s", "ttft_s_p90", "{:.2f}"),
    ("TPOT p50 ms", "tpot_s_p50", "{:.1f}", 1e3),
    ("user tok/s p50", "per_user_tok_s_p50", "{:.0f}"),
    ("GPU tok/s", "per_gpu_output_tok_s", "{:.0f}"),
    ("SLO met", "slo_attainment", "{:.1%}"),
    ("preempt", "num_preemptions_recompute", "{}"),
    ("evicted", "num_evicted_blocks", "{}"),
)


# What else can tell a sweep's runs apart: a column each, shown only where the runs differ.
VARYING_COLUMNS = (
    ("model", "model", "{}"),
    ("hardware", "hardware", "{}"),
    ("workload", "workload", "{}"),
    ("router", "router", "{}"),
    ("replicas", "num_replicas", "{}"),
    ("GPUs", "num_gpus", "{}"),
    ("mode", "mode", "{}"),
    ("seed", "seed", "{}"),
)


def format_table(summaries: list[dict]) -> str:
    """A plain-text comparison table, one row per run."""
    varying = tuple(c for c in VARYING_COLUMNS if len({str(s.get(c[1])) for s in summaries}) > 1)
    columns = TABLE_COLUMNS[:1] + varying + TABLE_COLUMNS[1:]
    header = [c[0] for c in columns]
    rows = []
    for s in summaries:
        row = []
        for col in columns:
            value = s.get(col[1])
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                row.append("-")
                continue
            scale = col[3] if len(col) > 3 else 1
            row.append(col[2].format(value * scale if scale != 1 else value))
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
