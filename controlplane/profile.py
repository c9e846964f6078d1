"""The step-profile format shared by the planes: the engine writes it, the simulator's ProfileCost reads it.

One row per executed step: the plan's features (the Plan properties of these names) and the measured
seconds; docs/profile-format.md describes the file.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

FEATURES = ("num_tokens", "num_reqs", "num_sampled", "attn_pairs", "kv_read_tokens",
            "num_swap_out_blocks", "num_swap_in_blocks")
PROFILE_COLUMNS = FEATURES + ("seconds",)


def parse_row(row: Mapping[str, Any], where: str) -> list[float]:
    """The FEATURES then seconds of one profile row, as non-negative finite floats."""
    values = []
    for column in PROFILE_COLUMNS:
        if column not in row:
            raise ValueError(f"{where}: missing column {column!r}")
        raw = row[column]
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: column {column!r}: {raw!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: column {column!r}: {raw!r} must be finite and >= 0")
        values.append(value)
    return values


def write_profile(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> int:
    """Writes measured steps as a profile CSV (what the GPU engine records).

    Args:
        path: the CSV file to create (overwritten).
        rows: mappings with every `FEATURES` name and ``seconds``; extra keys
            (``step_id``, ``model``, ``hardware`` ...) become extra columns.
    Returns:
        The number of rows written.
    Raises:
        ValueError: a row lacks a column or has a bad value.
    """
    extra: dict[str, None] = {}
    for i, row in enumerate(rows):
        parse_row(row, f"<rows>[{i}]")
        extra.update((k, None) for k in row if k not in PROFILE_COLUMNS)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*PROFILE_COLUMNS, *extra], restval="")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def plan_features(plan) -> dict[str, int]:
    """A plan's FEATURES as a profile row's columns (add ``seconds``)."""
    return {f: int(getattr(plan, f)) for f in FEATURES}
