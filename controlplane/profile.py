"""The step-profile format shared by the planes: the engine writes it, the simulator's ProfileCost reads it.

One row per executed step: the plan's features (the Plan properties of these names) and the measured
seconds, under a header naming where and how the steps ran; docs/profile-format.md describes the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

FEATURES = (
    "num_tokens",
    "num_reqs",
    "num_sampled",
    "attn_pairs",
    "kv_read_tokens",
    "num_swap_out_blocks",
    "num_swap_in_blocks",
    "num_decode_reqs",
    "decode_kv_tokens",
    "follows_decode",
    "continues_decode",
)
PROFILE_COLUMNS = FEATURES + ("seconds",)
# Optional column: the step's prefill rows (q > 1) as "q:c q:c ...", for per-request cost terms.
PREFILL_ROWS = "prefill_rows"
FORMAT_LINE = "# tandem-profile/2"


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


def write_profile(path: str | Path, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any] | None = None) -> int:
    """Writes measured steps as a profile CSV (what the GPU engine records).

    Args:
        path: the CSV file to create (overwritten).
        rows: mappings with every `FEATURES` name and ``seconds``; extra keys
            (``step_id``, ``start`` ...) become extra columns.
        meta: the header (card, driver, torch, dtype, kernels, overlap, graph sizes, model shape,
            commit ...), written as one JSON comment line after the format line.
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
        f.write(FORMAT_LINE + "\n")
        f.write("# " + json.dumps(dict(meta or {}), sort_keys=True) + "\n")
        writer = csv.DictWriter(f, fieldnames=[*PROFILE_COLUMNS, *extra], restval="")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def read_header(path: str | Path) -> tuple[dict, int, str]:
    """A profile file's header: (meta, number of comment lines, the CSV text after them).

    Raises:
        ValueError: a comment line that is neither the format line nor a JSON object.
    """
    text = Path(path).read_text()
    lines = text.splitlines(keepends=True)
    meta: dict = {}
    skipped = 0
    for line in lines:
        if not line.startswith("#"):
            break
        skipped += 1
        body = line[1:].strip()
        if not body or body.startswith("tandem-profile/"):
            continue
        try:
            meta.update(json.loads(body))
        except (json.JSONDecodeError, TypeError, ValueError):
            raise ValueError(f"{path}:{skipped}: a header line must hold a JSON object, got {body[:80]!r}") from None
    return meta, skipped, "".join(lines[skipped:])


def csv_rows(path: str | Path) -> tuple[dict, list[str] | None, list[tuple[int, dict]]]:
    """(meta, the CSV's column names or None, [(line number, row)]) of a profile file."""
    meta, skipped, body = read_header(path)
    reader = csv.DictReader(io.StringIO(body, newline=""))
    rows = [(skipped + reader.line_num, row) for row in reader]
    return meta, reader.fieldnames, rows


def plan_features(plan) -> dict[str, Any]:
    """A plan's FEATURES and its prefill rows as a profile row's columns (add ``seconds``)."""
    row: dict[str, Any] = {f: int(getattr(plan, f)) for f in FEATURES}
    # a pure decode (most engine steps) has no prefill rows: no per-row work on the engine's step path
    row[PREFILL_ROWS] = (
        "" if row["num_decode_reqs"] == row["num_reqs"] else encode_prefill_rows(plan.query_lens, plan.cached_lens)
    )
    return row


def encode_prefill_rows(query_lens, cached_lens) -> str:
    """ "q:c q:c ..." of the rows with q > 1 ("" for a pure decode)."""
    return " ".join(f"{int(q)}:{int(c)}" for q, c in zip(query_lens, cached_lens) if q > 1)


def decode_prefill_rows(text: str, where: str = "") -> list[tuple[int, int]]:
    """The (q, c) pairs of an encoded prefill_rows value.

    Raises:
        ValueError: not of the form "q:c q:c ..." with non-negative integers.
    """
    out = []
    for item in (text or "").split():
        q, sep, c = item.partition(":")
        if not sep or not q.isdigit() or not c.isdigit():
            raise ValueError(f"{where}: column {PREFILL_ROWS!r}: {item!r} is not q:c")
        out.append((int(q), int(c)))
    return out
