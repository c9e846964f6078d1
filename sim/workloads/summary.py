"""Counts and mean/median statistics of a list of sessions."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from sim.workloads.session import Session


def summarize(sessions: Iterable[Session]) -> dict[str, float]:
    """Counts and mean/median statistics of a list of sessions (NaN where there is nothing to average).

    Pauses are those between calls (each session's final 0 excluded); the final context is a
    session's prefix plus all its new and output tokens.
    """
    sessions = list(sessions)
    turns = [t for s in sessions for t in s.turns]
    pauses = [t.pause_after for s in sessions for t in s.turns[:-1]]
    contexts = [s.prefix_tokens + sum(t.new_tokens + t.output_tokens for t in s.turns) for s in sessions]
    starts = [s.start_time for s in sessions]
    summary: dict[str, float] = {
        "sessions": len(sessions),
        "calls": len(turns),
        "calls_per_session_mean": len(turns) / len(sessions) if sessions else math.nan,
        "distinct_prefixes": len({s.prefix_id for s in sessions if s.prefix_id != -1}),
        "context_tokens_max": max(contexts, default=0),
        "span_seconds": max(starts) - min(starts) if sessions else 0.0,
    }
    columns = {
        "new_tokens": [t.new_tokens for t in turns],
        "output_tokens": [t.output_tokens for t in turns],
        "pause": pauses,
        "prefix_tokens": [s.prefix_tokens for s in sessions],
        "context_tokens": contexts,
    }
    for name, values in columns.items():
        summary[f"{name}_mean"] = float(np.mean(values)) if values else math.nan
        summary[f"{name}_median"] = float(np.median(values)) if values else math.nan
    return summary
