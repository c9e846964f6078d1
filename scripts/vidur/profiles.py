"""Write SYNTHETIC Vidur profiling data for Llama-3-8B on one H100 (SXM).

Nothing here was measured on a GPU. Vidur's real profiling CSVs live on the
HuggingFace hub, which is not reachable from our machines, so this module
produces a stand-in with the same column schema, filled with roofline-style
times:

    t_ms = max(flops / (PEAK_FLOPS * eff_c), bytes / (HBM_BW * eff_m)) * 1e3
           + LAUNCH_MS

H100 SXM peak numbers (``conf/hardware/h100_sxm.yaml``: 989.4e12 dense bf16 FLOP/s,
3.35e12 B/s HBM3; the shape is ``conf/model/llama3_8b.yaml``'s) are scaled
by per-kernel-class efficiency factors, a small per-kernel launch cost is
added, and every sample gets a little seeded multiplicative jitter so the
data look like measurements but are fully deterministic.

The sample grids are our own (log-spaced token and KV-length grids, a short
batch-size ladder); they are not Vidur's profiling grids. Only the column
names and file names follow Vidur 0.0.26's loader, because those are the
interface its sklearn execution-time predictors read.

Output is laid out as a HuggingFace *hub cache*, so that Vidur's
``snapshot_download(repo_id=..., cache_dir=...)`` resolves it when
``HF_HUB_OFFLINE=1`` is set::

    <cache>/profiling_data/compute/datasets--project-vajra--dev-staging-meta-llama-llama-3-8b-h100/
        refs/main
        snapshots/<rev>/{config.json, mlp.csv.xz, attention.csv.xz}
    <cache>/profiling_data/network/datasets--project-vajra--dev-staging-h100-dgx/
        refs/main
        snapshots/<rev>/{config.json, all_reduce.csv.xz, send_recv.csv.xz}

The network files are only trained on for tensor/pipeline parallelism > 1,
but Vidur resolves the dataset (and checks its ``config.json``) even at TP 1,
so both are always written.

Usage::

    python scripts/vidur/profiles.py --cache-dir /tmp/vidur-cache [--tp 1 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

# --- HuggingFace dataset ids Vidur 0.0.26 looks up by default -----------------
COMPUTE_REPO = "project-vajra/dev-staging-meta-llama-llama-3-8b-h100"
NETWORK_REPO = "project-vajra/dev-staging-h100-dgx"
MODEL_NAME = "meta-llama/Llama-3-8B"
DEVICE_SKU = "h100"
NETWORK_SKU = "h100_dgx"
REVISION = "5e" * 20  # any 40-hex string; refs/main points at it
STAMP_FILE = "SYNTHETIC_PROFILES.json"
GENERATOR_VERSION = 2  # 2: shape and rates read from conf/ (peak 989.4 TFLOP/s)

# --- H100 SXM roofline: the rates of the simulator's own entry ------------------
CONF = Path(__file__).resolve().parents[2] / "conf"


def read_conf(group: str, name: str) -> dict:
    """Read a built-in entry of the project, e.g. ``conf/hardware/h100_sxm.yaml``."""
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text())


_H100 = read_conf("hardware", "h100_sxm")
PEAK_FLOPS = float(_H100["peak_flops"])  # dense bf16, FLOP/s
HBM_BW = float(_H100["mem_bandwidth"])  # B/s
NVLINK_BUS_BW = 450e9  # B/s per direction (NVLink 4, DGX H100)
IB_BW = 50e9  # B/s, one 400 Gb/s NIC per GPU
LAUNCH_MS = 0.005  # per-kernel launch / tail cost
EFF_GEMM = (0.72, 0.85)  # (compute, memory) efficiency of dense GEMMs
EFF_ELEMWISE = (0.30, 0.80)  # norms, activations, rope, residual add
EFF_ATTN_PREFILL = (0.55, 0.80)  # flash-attention forward
EFF_ATTN_DECODE = (0.20, 0.75)  # paged decode attention
EFF_NET = 0.80  # achieved fraction of link bandwidth
NET_LAT_MS = 0.010  # collective launch + sync latency
JITTER = 0.015  # relative std of the seeded noise


@dataclass(frozen=True)
class ModelShape:
    """Shape of the model the profiles describe, in Vidur's column names."""

    n_q_head: int
    n_kv_head: int
    n_embd: int
    n_expanded_embd: int
    vocab_size: int
    head_dim: int
    block_size: int = 16

    @classmethod
    def from_conf(cls, c: dict) -> ModelShape:
        """Build the shape from one of the simulator's ``conf/model/*.yaml`` entries."""
        return cls(
            n_q_head=c["num_heads"],
            n_kv_head=c["num_kv_heads"],
            n_embd=c["hidden_size"],
            n_expanded_embd=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            head_dim=c["head_dim"],
        )


_LLAMA3_8B_CONF = read_conf("model", "llama3_8b")
LLAMA3_8B = ModelShape.from_conf(_LLAMA3_8B_CONF)
BYTES = int(_LLAMA3_8B_CONF["dtype_bytes"])  # bf16


# --- sample grids (our own) ----------------------------------------------------
def log_grid(lo: int, hi: int, per_octave: int, multiple: int = 1) -> list[int]:
    """Integers from ``lo`` to ``hi`` spaced ~geometrically, rounded to ``multiple``.

    ``per_octave`` points per doubling; duplicates after rounding are dropped,
    and both end points are always included.
    """
    n = max(2, math.ceil(math.log2(hi / lo) * per_octave) + 1)
    raw = np.geomspace(lo, hi, n)
    vals = {max(multiple, round(float(v) / multiple) * multiple) for v in raw}
    vals.update({lo, hi})
    return sorted(v for v in vals if lo <= v <= hi)


def token_grid(max_tokens: int) -> list[int]:
    """Batch token counts for the linear/elementwise ops: dense below 64, then log."""
    return sorted(set(range(1, 65)) | set(log_grid(64, max_tokens, per_octave=24)))


def prefill_chunk_grid(max_chunk: int) -> list[int]:
    """Prefill chunk sizes: multiples of 32, ~4 per octave."""
    return log_grid(32, max_chunk, per_octave=4, multiple=32)


def prefill_kv_grid(max_seq_len: int) -> list[int]:
    """KV lengths already cached before a prefill chunk (0 = first chunk)."""
    return [0, *log_grid(128, max_seq_len, per_octave=6)]


def decode_batch_grid(max_batch: int) -> list[int]:
    """Decode batch sizes: every size to 8, then ~5 per octave."""
    small = list(range(1, min(8, max_batch) + 1))
    return sorted(set(small) | set(log_grid(8, max_batch, per_octave=5)))


def decode_kv_grid(max_seq_len: int) -> list[int]:
    """Average KV length of the sequences in a decode batch."""
    return log_grid(16, max_seq_len, per_octave=6)


def collective_size_grid(n_embd: int, max_tokens: int) -> list[int]:
    """Message sizes in bytes, expressed as whole tokens of hidden state."""
    return [t * n_embd * BYTES for t in log_grid(1, max_tokens, per_octave=4)]


# --- timing model ----------------------------------------------------------------
class Timer:
    """Roofline timer with deterministic multiplicative jitter."""

    def __init__(self, seed: int) -> None:
        """Seed the jitter generator."""
        self._rng = np.random.default_rng(seed)

    def roof(self, flops: float, nbytes: float, eff: tuple[float, float]) -> float:
        """Milliseconds for a kernel doing ``flops`` and moving ``nbytes``."""
        t = max(flops / (PEAK_FLOPS * eff[0]), nbytes / (HBM_BW * eff[1]))
        return t * 1e3 + LAUNCH_MS

    def stats(self, op: str, t_ms: float) -> dict[str, float]:
        """``time_stats.<op>.*`` columns around a nominal time (median is read)."""
        med = t_ms * float(np.exp(self._rng.normal(0.0, JITTER)))
        return {
            f"time_stats.{op}.min": med * 0.98,
            f"time_stats.{op}.max": med * 1.04,
            f"time_stats.{op}.mean": med * 1.004,
            f"time_stats.{op}.median": med,
            f"time_stats.{op}.std": med * JITTER,
        }


def mlp_rows(m: ModelShape, tp: int, max_tokens: int, timer: Timer) -> list[dict]:
    """Per-layer linear and elementwise op times versus batch token count."""
    hd = m.head_dim
    q_cols = m.n_q_head * hd // tp
    kv_cols = max(1, m.n_kv_head // tp) * hd
    qkv = q_cols + 2 * kv_cols
    ff = m.n_expanded_embd // tp
    d = m.n_embd

    def gemm(n: int, k: int, out: int) -> float:
        return timer.roof(2 * n * k * out, BYTES * (k * out + n * k + n * out), EFF_GEMM)

    def elem(flops: float, nbytes: float) -> float:
        return timer.roof(flops, nbytes, EFF_ELEMWISE)

    rows = []
    for n in token_grid(max_tokens):
        ops = {
            "attn_pre_proj": gemm(n, d, qkv),
            "attn_post_proj": gemm(n, q_cols, d),
            "mlp_up_proj": gemm(n, d, 2 * ff),
            "mlp_down_proj": gemm(n, ff, d),
            "mlp_act": elem(4 * n * ff, BYTES * 3 * n * ff),
            "attn_rope": elem(3 * n * (q_cols + kv_cols), BYTES * 2 * n * (q_cols + kv_cols)),
            "input_layernorm": elem(4 * n * d, BYTES * (2 * n * d + d)),
            "post_attention_layernorm": elem(4 * n * d, BYTES * (2 * n * d + d)),
            "add": elem(n * d, BYTES * 3 * n * d),
        }
        row: dict = {
            "n_head": m.n_q_head,
            "n_kv_head": m.n_kv_head,
            "n_embd": m.n_embd,
            "n_expanded_embd": m.n_expanded_embd,
            "vocab_size": m.vocab_size,
            "use_gated_mlp": True,
            "num_tokens": n,
            "num_tensor_parallel_workers": tp,
        }
        for op, t in ops.items():
            row.update(timer.stats(op, t))
        rows.append(row)
    return rows


def attention_rows(
    m: ModelShape,
    tp: int,
    max_seq_len: int,
    max_chunk: int,
    max_batch: int,
    timer: Timer,
) -> list[dict]:
    """Attention kernel times: prefill chunks (batch 1) and batched decode."""
    hd = m.head_dim
    qh = m.n_q_head // tp
    kvh = max(1, m.n_kv_head // tp)
    base = {
        "n_embd": m.n_embd,
        "n_q_head": m.n_q_head,
        "n_kv_head": m.n_kv_head,
        "block_size": m.block_size,
        "num_tensor_parallel_workers": tp,
        "max_model_len": max_seq_len,
    }

    def kv_save(tokens: int) -> dict[str, float]:
        # write K and V of every new token into the paged cache
        return timer.stats(
            "attn_kv_cache_save",
            timer.roof(0, 2 * BYTES * 2 * tokens * kvh * hd, EFF_ELEMWISE),
        )

    rows = []
    for chunk in prefill_chunk_grid(max_chunk):
        for kv in prefill_kv_grid(max_seq_len):
            if chunk + kv > max_seq_len:
                continue
            # causal: each query of the chunk sees the cached kv plus half the chunk
            flops = 4 * qh * hd * chunk * (kv + (chunk + 1) / 2)
            nbytes = BYTES * (2 * chunk * qh * hd + 2 * (kv + chunk) * kvh * hd)
            row = {
                **base,
                "prefill_chunk_size": chunk,
                "kv_cache_size": kv,
                "batch_size": 1,
            }
            row.update(timer.stats("attn_prefill", timer.roof(flops, nbytes, EFF_ATTN_PREFILL)))
            row.update(kv_save(chunk))
            rows.append(row)
    for bs in decode_batch_grid(max_batch):
        for kv in decode_kv_grid(max_seq_len):
            flops = 4 * qh * hd * kv * bs
            nbytes = BYTES * bs * (2 * kv * kvh * hd + 2 * qh * hd)
            row = {
                **base,
                "prefill_chunk_size": 0,
                "kv_cache_size": kv,
                "batch_size": bs,
            }
            row.update(timer.stats("attn_decode", timer.roof(flops, nbytes, EFF_ATTN_DECODE)))
            row.update(kv_save(bs))
            rows.append(row)
    return rows


def all_reduce_rows(m: ModelShape, max_tokens: int, timer: Timer) -> list[dict]:
    """Ring all-reduce over NVLink within one node, plus one-GPU-per-node rings."""
    rows = []
    for workers in (1, 2, 4, 8):
        for per_node in sorted({workers, 1}):
            bw = NVLINK_BUS_BW if per_node == workers else IB_BW
            for size in collective_size_grid(m.n_embd, max_tokens):
                moved = 0.0 if workers == 1 else 2 * (workers - 1) / workers * size
                t = NET_LAT_MS + moved / (bw * EFF_NET) * 1e3
                row = {
                    "rank": 0,
                    "num_workers": workers,
                    "size": size,
                    "collective": "all_reduce",
                    "devices_per_node": per_node,
                    "max_devices_per_node": 8,
                }
                row.update(timer.stats("all_reduce", t))
                rows.append(row)
    return rows


def send_recv_rows(m: ModelShape, max_tokens: int, timer: Timer) -> list[dict]:
    """Point-to-point activation send, intra-node (2/node) and inter-node (1/node)."""
    rows = []
    for per_node, bw in ((2, NVLINK_BUS_BW), (1, IB_BW)):
        for size in collective_size_grid(m.n_embd, max_tokens):
            row = {
                "rank": 0,
                "num_workers": 2,
                "size": size,
                "collective": "send_recv",
                "devices_per_node": per_node,
                "max_devices_per_node": 8,
            }
            row.update(timer.stats("send_recv", NET_LAT_MS + size / (bw * EFF_NET) * 1e3))
            rows.append(row)
    return rows


# --- hub-cache layout ------------------------------------------------------------
def snapshot_dir(cache_dir: Path, kind: str, repo_id: str) -> Path:
    """Create ``datasets--org--name`` with ``refs/main`` and return the snapshot dir."""
    repo_dir = cache_dir / "profiling_data" / kind / ("datasets--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(REVISION)
    snap = repo_dir / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def write_csv_xz(rows: list[dict], path: Path) -> int:
    """Write rows as an xz-compressed CSV; return the row count."""
    pd.DataFrame(rows).to_csv(path, index=False, compression="xz")
    return len(rows)


def write_profiles(
    cache_dir: Path,
    tp_sizes: tuple[int, ...] = (1,),
    max_seq_len: int = 131072,
    max_chunk: int = 65536,
    max_batch: int = 128,
    seed: int = 20240601,
) -> dict:
    """Write the four synthetic profile files under ``cache_dir``; return a summary."""
    timer = Timer(seed)
    m = LLAMA3_8B
    mlp: list[dict] = []
    attn: list[dict] = []
    for tp in tp_sizes:
        mlp += mlp_rows(m, tp, max_seq_len, timer)
        attn += attention_rows(m, tp, max_seq_len, max_chunk, max_batch, timer)

    compute = snapshot_dir(cache_dir, "compute", COMPUTE_REPO)
    network = snapshot_dir(cache_dir, "network", NETWORK_REPO)
    note = "SYNTHETIC roofline data from scripts/vidur/profiles.py, not a measurement"
    (compute / "config.json").write_text(
        json.dumps({"model": MODEL_NAME, "device_sku": DEVICE_SKU, "note": note}, indent=2)
    )
    (network / "config.json").write_text(json.dumps({"sku": NETWORK_SKU, "note": note}, indent=2))
    summary = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "tp_sizes": list(tp_sizes),
        "max_seq_len": max_seq_len,
        "max_chunk": max_chunk,
        "max_batch": max_batch,
        "rows": {
            "mlp": write_csv_xz(mlp, compute / "mlp.csv.xz"),
            "attention": write_csv_xz(attn, compute / "attention.csv.xz"),
            "all_reduce": write_csv_xz(all_reduce_rows(m, max_seq_len, timer), network / "all_reduce.csv.xz"),
            "send_recv": write_csv_xz(send_recv_rows(m, max_seq_len, timer), network / "send_recv.csv.xz"),
        },
        "note": note,
    }
    (cache_dir / STAMP_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def ensure_profiles(cache_dir: Path, tp_sizes: tuple[int, ...] = (1,)) -> bool:
    """Write the profiles unless a matching stamp is present; return True if written."""
    stamp = cache_dir / STAMP_FILE
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("generator_version") == GENERATOR_VERSION and set(tp_sizes) <= set(info.get("tp_sizes", [])):
            return False
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_profiles(cache_dir, tp_sizes=tp_sizes)
    return True


def main() -> None:
    """CLI: write the synthetic profiles into ``--cache-dir``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, required=True)
    ap.add_argument("--tp", type=int, nargs="+", default=[1], help="tensor-parallel sizes")
    ap.add_argument("--max-seq-len", type=int, default=131072)
    ap.add_argument("--seed", type=int, default=20240601)
    args = ap.parse_args()
    summary = write_profiles(
        args.cache_dir,
        tp_sizes=tuple(args.tp),
        max_seq_len=args.max_seq_len,
        seed=args.seed,
    )
    print(json.dumps(summary["rows"]))


if __name__ == "__main__":
    main()
