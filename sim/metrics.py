"""What a simulation measures, per step, per request and per session, and its summary.

Definitions (all times are simulated seconds):

* TTFT: first token's commit time - arrival. TPOT: (finish - first token) / (outputs - 1).
  ITL: time between consecutive tokens of a request (a log-binned histogram, 0.5% wide bins).
* per-user tokens/s: (outputs - 1) / (finish - first token), one value per request.
* per-GPU tokens/s: output tokens / (simulated span x GPUs); `total` adds prompt tokens. The GPUs
  are replicas x GPUs per replica (`model.tensor_parallel_size`: a tensor-parallel replica is a group
  of that many GPUs running each step together), `num_gpus` in the summary.
* goodput: requests per second per GPU whose TTFT <= slo_ttft_s and TPOT <= slo_tpot_s.
* floor share: of the output tokens after each request's first, the share that came at most
  slo_tpot_s (+ 100 ns, for a rounded 1 / tok_s) after the request's previous token (at or above the
  per-user speed floor 1 / slo_tpot_s); floor goodput: those tokens per second per GPU.
* prefix-cache hit rate: cached prompt tokens / prompt tokens (token-weighted).
* prefill amplification: tokens prefilled / genuinely new tokens, where a call's
  genuinely new tokens are its new tokens plus, the first time a shared prefix is
  sent to the cluster, that prefix; prefilled = computed - decoded (outputs - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REQUEST_COLUMNS = (
    "request_id",
    "session_id",
    "turn",
    "replica",
    "arrival",
    "first_scheduled",
    "first_token",
    "finish",
    "ttft",
    "tpot",
    "e2e",
    "prompt_tokens",
    "cached_tokens",
    "computed_tokens",
    "new_tokens",
    "genuinely_new_tokens",
    "output_tokens",
    "preemptions",
)

_ITL_EDGES = np.geomspace(1e-5, 1e4, 4000)  # seconds; ~0.5% per bin
# Binning by table: a float's top bits (sign, exponent, the first _ITL_SLICE_BITS of mantissa)
# cut the line into slices 1/4096 of an octave wide, far narrower than a bin (~0.5%), so a slice
# holds at most one edge: a gap's bin is its slice's first edge index k, plus one if the gap is
# above edges[k]. Exactly np.searchsorted(_ITL_EDGES, gaps), without its ~12 compares a gap.
_ITL_SLICE_BITS = 12
_ITL_SHIFT = 52 - _ITL_SLICE_BITS
_ITL_LO = int(np.array(_ITL_EDGES[0] / 4).view(np.int64)) >> _ITL_SHIFT  # slices below: bin 0
_ITL_HI = int(np.array(_ITL_EDGES[-1] * 4).view(np.int64)) >> _ITL_SHIFT  # slices above: bin n
_ITL_FIRST = np.searchsorted(  # each slice's first edge at or above its start
    _ITL_EDGES, (np.arange(_ITL_LO, _ITL_HI + 1, dtype=np.int64) << _ITL_SHIFT).view(np.float64)
).astype(np.int16)
_ITL_EDGES_INF = np.append(_ITL_EDGES, np.inf)


def _itl_bins(gaps: np.ndarray) -> np.ndarray:
    """`np.searchsorted(_ITL_EDGES, gaps)`: bin k holds the gaps in (edge k-1, edge k]
    (tests/test_sim.py compares the two at and around every edge)."""
    gaps = np.asarray(gaps, dtype=np.float64)
    bits = gaps.view(np.int64) >> _ITL_SHIFT  # negative numbers: negative bits, slice 0 (bin 0)
    first = _ITL_FIRST[np.clip(bits - _ITL_LO, 0, _ITL_FIRST.size - 1)]
    bins = first + (gaps > _ITL_EDGES_INF[first])
    bins[np.isnan(gaps)] = _ITL_EDGES.size  # searchsorted puts NaN last, whatever its sign bit
    return bins


@dataclass
class Slo:
    ttft_s: float
    tpot_s: float


def overload_warnings(summary: dict, slo_ttft_s: float) -> list[str]:
    """A warning when a run is heavily overloaded: fewer than half of its requests got their
    first token within the TTFT SLO, so queueing, not the policy under study, sets the figures.
    (A low `slo_attainment` alone is not overload: a tight TPOT target can be out of reach at
    long contexts with an empty queue.)"""
    met = summary.get("slo_ttft_attainment")
    if met is None or met >= 0.5:
        return []
    return [
        (
            f"overloaded: only {met:.0%} of requests had their first token within sim.slo_ttft_s={slo_ttft_s:g} s "
            f"(TTFT p50 {summary['ttft_s_p50']:.1f} s): queueing sets these figures. If that is not the intent, "
            f"lower the load (sim.session_rate, sim.num_sessions, sim.concurrency) or add replicas"
        )
    ]


def _pcts(values: np.ndarray, prefix: str) -> dict[str, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {f"{prefix}_{k}": float("nan") for k in ("mean", "p50", "p90", "p99")}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        f"{prefix}_mean": float(values.mean()),
        f"{prefix}_p50": float(p50),
        f"{prefix}_p90": float(p90),
        f"{prefix}_p99": float(p99),
    }


class Collector:
    """Accumulates what replicas and sessions report; `summary()` turns it into the run's figures."""

    def __init__(
        self, num_replicas: int, num_blocks: int, sample_interval_s: float, slo: Slo, gpus_per_replica: int = 1
    ) -> None:
        if isinstance(gpus_per_replica, bool) or not isinstance(gpus_per_replica, int) or gpus_per_replica < 1:
            raise ValueError(f"gpus_per_replica must be a positive integer, got {gpus_per_replica!r}")
        self.num_replicas = num_replicas
        self.gpus_per_replica = gpus_per_replica  # a tensor-parallel replica's GPUs
        self.num_blocks = num_blocks
        self.sample_interval_s = sample_interval_s
        self.slo = slo
        # Per step (start, seconds, tokens, requests), in commit order: the runs `on_steps` took
        # (a fast-path run's four arrays, or a reference step's four 1-tuples).
        self._step_chunks: list[tuple] = []
        self.kv_samples: list[tuple] = []  # (time, replica, used, cached, free) in blocks
        self.requests: list[tuple] = []
        self.sessions: list[tuple] = []  # (session_id, start, end, calls, truncated)
        self._itl_counts = np.zeros(_ITL_EDGES.size + 1, dtype=np.int64)
        self._itl_pending: list[np.ndarray] = []  # gaps not yet binned (binned in bulk: same counts)
        self._itl_pending_n = 0
        self.itl_sum = 0.0
        self.floor_tokens = 0  # inter-token gaps within the floor (see the module's definitions)
        # 100 ns over: a floor configured as a rounded 1 / tok_s (0.0142857 for 70) still counts a step
        # at exactly 1 / tok_s (what tps_floor keeps) as at the floor
        self._floor_gap = slo.tpot_s + 1e-7
        self.itl_n = 0

    @property
    def num_gpus(self) -> int:
        """GPUs of the cluster, what per-GPU figures divide by: replicas x GPUs per replica."""
        return self.num_replicas * self.gpus_per_replica

    # -- reports ------------------------------------------------------------------
    def on_steps(self, run) -> None:
        """Committed steps, one entry per step in commit order, and the KV samples their loop took:
        a `sim.cluster.StepRun` (the reference loop, one step) or a `sim._native.ClusterResult` (the
        fast path, a run of steps of every replica)."""
        self._step_chunks.append((run.starts, run.seconds, run.num_tokens, run.num_reqs))
        self.kv_samples.extend(run.samples)

    def _step_column(self, k: int) -> list:
        out: list = []
        for chunk in self._step_chunks:
            column = chunk[k]
            out.extend(column.tolist() if isinstance(column, np.ndarray) else column)
        return out

    @property
    def step_start(self) -> list[float]:
        """Each step's start, in the order the steps were committed (a new list)."""
        return self._step_column(0)

    @property
    def step_seconds(self) -> list[float]:
        return self._step_column(1)

    @property
    def step_tokens(self) -> list[int]:
        return self._step_column(2)

    @property
    def step_reqs(self) -> list[int]:
        return self._step_column(3)

    @property
    def num_steps(self) -> int:
        return sum(len(chunk[0]) for chunk in self._step_chunks)

    def on_request(self, f, session_id: str, turn: int, replica: int, new_tokens: int, genuinely_new: int) -> None:
        times = f.token_times
        n = times.size
        first, finish = float(times[0]), float(times[-1])
        if n > 1:
            gaps = times[1:] - times[:-1]  # np.diff's values, without its per-call overhead
            self._itl_pending.append(gaps)
            self._itl_pending_n += gaps.size
            if self._itl_pending_n >= 1 << 18:
                self._bin_itl()
            self.itl_sum += float(gaps.sum())
            self.floor_tokens += int(np.count_nonzero(gaps <= self._floor_gap))
            self.itl_n += n - 1
        tpot = (finish - first) / (n - 1) if n > 1 else math.nan
        self.requests.append(
            (
                f.request_id,
                session_id,
                turn,
                replica,
                f.arrival_time,
                f.first_scheduled_time,
                first,
                finish,
                first - f.arrival_time,
                tpot,
                finish - f.arrival_time,
                f.num_prompt_tokens,
                f.num_cached_tokens,
                f.num_computed_tokens,
                new_tokens,
                genuinely_new,
                n,
                f.num_preemptions,
            )
        )

    def _bin_itl(self) -> None:
        if self._itl_pending:
            gaps = np.concatenate(self._itl_pending)
            self._itl_counts += np.bincount(_itl_bins(gaps), minlength=self._itl_counts.size)
            self._itl_pending, self._itl_pending_n = [], 0

    @property
    def itl_counts(self) -> np.ndarray:
        """Inter-token gaps per ITL histogram bin (bin k: gaps in [edge k-1, edge k))."""
        self._bin_itl()
        return self._itl_counts

    def on_session(self, session_id: str, start: float, end: float, calls: int, truncated: bool) -> None:
        self.sessions.append((session_id, start, end, calls, truncated))

    # -- results ------------------------------------------------------------------
    def request_table(self):
        """The per-request table as a pandas DataFrame (columns: REQUEST_COLUMNS)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.requests, columns=list(REQUEST_COLUMNS))

    def itl_percentiles(self, qs=(50, 90, 99)) -> list[float]:
        total = self.itl_counts.sum()
        if total == 0:
            return [math.nan for _ in qs]
        cum = np.cumsum(self.itl_counts)
        edges = np.concatenate([[0.0], _ITL_EDGES, [_ITL_EDGES[-1]]])
        out = []
        for q in qs:
            k = int(np.searchsorted(cum, q / 100 * total))
            out.append(float(math.sqrt(max(edges[k], 1e-12) * edges[k + 1])))  # bin's geometric centre
        return out

    def summary(self, stats: list, wall_seconds: float) -> dict:
        """The run's figures; `stats` are the replicas' final control-plane stats."""
        cols = {
            name: np.array([row[i] for row in self.requests], dtype=float)
            for i, name in enumerate(REQUEST_COLUMNS)
            if name != "session_id"
        }
        n = len(self.requests)
        out: dict = {
            "num_requests": n,
            "num_sessions": len(self.sessions),
            "num_replicas": self.num_replicas,
            "num_gpus": self.num_gpus,
            "truncated_sessions": int(sum(1 for s in self.sessions if s[4])),
        }
        if n == 0:
            return out
        span = float(cols["finish"].max() - cols["arrival"].min()) or math.nan
        gpus = self.num_gpus
        outputs, prompts = cols["output_tokens"].sum(), cols["prompt_tokens"].sum()
        out.update(_pcts(cols["ttft"], "ttft_s"))
        out.update(_pcts(cols["tpot"], "tpot_s"))
        out.update(_pcts(cols["e2e"], "e2e_s"))
        p50, p90, p99 = self.itl_percentiles()
        out.update(
            {
                "itl_s_mean": self.itl_sum / self.itl_n if self.itl_n else math.nan,
                "itl_s_p50": p50,
                "itl_s_p90": p90,
                "itl_s_p99": p99,
            }
        )
        per_user = np.where(cols["tpot"] > 0, 1.0 / cols["tpot"], np.nan)
        out.update(_pcts(per_user, "per_user_tok_s"))
        out["per_user_tok_s_p10"] = float(np.nanpercentile(per_user, 10)) if np.isfinite(per_user).any() else math.nan
        out["simulated_seconds"] = span
        out["per_gpu_output_tok_s"] = outputs / span / gpus
        out["per_gpu_total_tok_s"] = (outputs + prompts) / span / gpus
        out["per_gpu_output_tok_min"] = 60 * out["per_gpu_output_tok_s"]
        out["per_gpu_total_tok_min"] = 60 * out["per_gpu_total_tok_s"]
        ttft_met, tpot_met = cols["ttft"] <= self.slo.ttft_s, ~(cols["tpot"] > self.slo.tpot_s)
        good = ttft_met & tpot_met
        out["slo_attainment"] = float(good.mean())
        out["slo_ttft_attainment"] = float(ttft_met.mean())
        out["slo_tpot_attainment"] = float(tpot_met.mean())
        out["goodput_req_s_per_gpu"] = float(good.sum()) / span / gpus
        out["floor_token_share"] = self.floor_tokens / self.itl_n if self.itl_n else math.nan
        out["floor_goodput_tok_s_per_gpu"] = self.floor_tokens / span / gpus
        out["prefix_hit_rate"] = float(cols["cached_tokens"].sum() / prompts)
        prefilled = cols["computed_tokens"] - (cols["output_tokens"] - 1)
        out["prefill_amplification"] = float(prefilled.sum() / cols["genuinely_new_tokens"].sum())
        out["prefilled_tokens"] = int(prefilled.sum())
        out["output_tokens"] = int(outputs)
        out["prompt_tokens"] = int(prompts)
        if self.sessions:
            sess = np.array([end - start for _, start, end, _, _ in self.sessions])
            out.update(_pcts(sess, "session_s"))
        if self.kv_samples:
            used = np.array([s[2] for s in self.kv_samples]) / self.num_blocks
            out["kv_used_mean"] = float(used.mean())
            out["kv_used_max"] = float(used.max())
        for key in (
            "num_preemptions_recompute",
            "num_preemptions_swap",
            "num_evicted_blocks",
            "num_admission_cuts",
            "num_held_too_long",
            "num_held_waiting",
        ):
            out[key] = int(sum(getattr(s, key) for s in stats))
        num_steps = self.num_steps
        out["num_steps"] = num_steps
        out["wall_seconds"] = wall_seconds
        out["steps_per_wall_s"] = num_steps / wall_seconds if wall_seconds > 0 else math.nan
        out["requests_per_wall_min"] = 60 * n / wall_seconds if wall_seconds > 0 else math.nan
        # plain Python numbers: a numpy scalar prints as np.float64(...) and is not JSON
        return {k: v.item() if isinstance(v, np.generic) else v for k, v in out.items()}
