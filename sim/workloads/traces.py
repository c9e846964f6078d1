"""Trace replay (`trace`): the JSONL trace schema (docs/workloads.md), read and written."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from sim.workloads.base import Workload, _Config, _check_natural
from sim.workloads.session import Session, Turn


@dataclass(frozen=True)
class TraceConfig(_Config):
    """Replay of a JSONL trace (schema in docs/workloads.md)."""

    path: str = ""

    def _check(self) -> None:
        self._require(bool(self.path), "path", "must name a JSONL trace file")


class TraceWorkload(Workload):
    """Replays a JSONL trace; seed and rate are ignored, the file is read on each call."""

    name = "trace"
    config_class = TraceConfig
    endless = False

    def check(self) -> None:
        """Reads the whole trace: a missing file, a bad line or no sessions at all fail here, by path."""
        if not os.path.isfile(self.config.path):
            raise ValueError(f"workload.params.path: no such trace file {os.path.abspath(self.config.path)!r}")
        if not load_trace(self.config.path):
            # An empty trace is almost always a failed export or the wrong file: a run of 0
            # requests would only hide that behind undefined percentiles and empty plots.
            raise ValueError(f"workload.params.path: the trace {os.path.abspath(self.config.path)!r} has no sessions")

    def sessions(self, num_sessions: int | None = None, seed: int = 0, rate: float | None = None) -> list[Session]:
        """The file's first `num_sessions` sessions by start time (fewer if it has fewer; None: all)."""
        if num_sessions is not None:
            _check_natural("num_sessions", num_sessions)
        return load_trace(self.config.path)[:num_sessions]

    def iter_sessions(self, seed: int = 0, rate: float | None = None) -> Iterator[Session]:
        """The file's sessions by start time, once each; then it stops."""
        return iter(load_trace(self.config.path))


_TRACE_FIELDS = (
    "arrival_time",
    "session_id",
    "prompt_tokens",
    "prompt_token_ids",
    "output_tokens",
    "pause_after",
    "prefix_id",
    "prefix_tokens",
)
_MISSING = object()


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_count(low: int):
    """A field check: an integer >= low (JSON true/false and 3.0 are not integers)."""
    return lambda value: None if _is_int(value, low) else f"must be an integer >= {low}"


def _is_seconds(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return None if ok else "must be a finite number >= 0"


def _is_name(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _is_ids(value: Any) -> str | None:
    ok = isinstance(value, list) and value and all(_is_int(v, 0) for v in value)
    return None if ok else "must be a non-empty list of integers >= 0"


def _field(record: dict, key: str, check, where: str, default: Any = _MISSING) -> Any:
    """record[key] after `check`, or `default` when absent; errors name `where`."""
    if key not in record:
        if default is _MISSING:
            raise ValueError(f"{where}: missing field {key!r}")
        return default
    problem = check(record[key])
    if problem:
        raise ValueError(f"{where}: field {key!r} {problem}, got {record[key]!r:.80}")
    return record[key]


def _parse_line(line: str, where: str) -> dict:
    """One trace line as a checked JSON object (per-field checks are left to the callers)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    unknown = sorted(set(record) - set(_TRACE_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}; known: {sorted(_TRACE_FIELDS)}")
    return record


def _parse_turn(record: dict, where: str) -> Turn:
    """The call a trace line describes (its pause may still be zeroed if it is a session's last)."""
    if ("prompt_tokens" in record) == ("prompt_token_ids" in record):
        raise ValueError(f"{where}: give exactly one of 'prompt_tokens' and 'prompt_token_ids'")
    ids = _field(record, "prompt_token_ids", _is_ids, where, None)
    new = len(ids) if ids is not None else _field(record, "prompt_tokens", _is_count(1), where)
    out = _field(record, "output_tokens", _is_count(1), where)
    pause = float(_field(record, "pause_after", _is_seconds, where, 0.0))
    _field(record, "arrival_time", _is_seconds, where, None)  # checked, then ignored after a first line
    return Turn(new, out, pause, tuple(ids) if ids is not None else None)


def _parse_prefix(record: dict, where: str, first: bool) -> tuple[int, int]:
    """(prefix_id, prefix_tokens) of a session's first line; later lines may not have them."""
    given = [key for key in ("prefix_id", "prefix_tokens") if key in record]
    if given and not first:
        raise ValueError(f"{where}: {given} allowed only on a session's first line")
    if len(given) == 1:
        raise ValueError(f"{where}: 'prefix_id' and 'prefix_tokens' go together")
    prefix_id = _field(record, "prefix_id", _is_count(-1), where, -1)
    prefix_tokens = _field(record, "prefix_tokens", _is_count(0), where, 0)
    if (prefix_id == -1) != (prefix_tokens == 0):
        raise ValueError(f"{where}: prefix_tokens must be 0 exactly when prefix_id is -1")
    return prefix_id, prefix_tokens


def load_trace(path: str) -> list[Session]:
    """Reads a JSONL trace: one object per call, grouped by session_id in order of appearance.

    A run reads its trace more than once (the config check, then the replay): the parse is kept while
    the file's path, size and modification time stay the same (sessions are frozen).

    Returns:
        Sessions sorted by start time (stable). Raises ValueError naming the file and line.
    """
    stat = os.stat(path)
    return list(_read_trace(os.path.abspath(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _read_trace(path: str, size: int, mtime_ns: int) -> tuple[Session, ...]:
    drafts: dict[str, dict] = {}
    prefix_sizes: dict[int, int] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            record = _parse_line(line, where)
            sid = _field(record, "session_id", _is_name, where)
            first = sid not in drafts
            prefix_id, prefix_tokens = _parse_prefix(record, where, first)
            if first:
                start = float(_field(record, "arrival_time", _is_seconds, where))
                if prefix_sizes.setdefault(prefix_id, prefix_tokens) != prefix_tokens:
                    raise ValueError(
                        f"{where}: prefix_id {prefix_id} has prefix_tokens "
                        f"{prefix_sizes[prefix_id]} elsewhere, {prefix_tokens} here"
                    )
                drafts[sid] = dict(start=start, prefix_id=prefix_id, prefix_tokens=prefix_tokens, turns=[])
            drafts[sid]["turns"].append(_parse_turn(record, where))
    sessions = [_draft_session(sid, d) for sid, d in drafts.items()]
    return tuple(sorted(sessions, key=lambda s: s.start_time))


def _draft_session(session_id: str, draft: dict) -> Session:
    turns = draft["turns"]
    turns[-1] = dataclasses.replace(turns[-1], pause_after=0.0)
    return Session(session_id, draft["start"], draft["prefix_id"], draft["prefix_tokens"], tuple(turns))


def write_trace(path: str, sessions: Iterable[Session]) -> None:
    """Writes sessions in the JSONL trace schema; `load_trace` reads them back equal (sorted by start)."""
    seen: set[str] = set()
    with open(path, "w", encoding="utf-8") as out:
        for session in sessions:
            if session.session_id in seen:
                raise ValueError(f"duplicate session_id {session.session_id!r}")
            seen.add(session.session_id)
            for index, turn in enumerate(session.turns):
                out.write(json.dumps(_trace_record(session, index, turn)) + "\n")


def _trace_record(session: Session, index: int, turn: Turn) -> dict:
    """The JSON object of one call; the first call also carries the start and the prefix."""
    record: dict[str, Any] = {}
    if index == 0:
        record["arrival_time"] = float(session.start_time)
    record["session_id"] = session.session_id
    if index == 0 and session.prefix_id != -1:
        record.update(prefix_id=session.prefix_id, prefix_tokens=session.prefix_tokens)
    if turn.new_token_ids is not None:
        record["prompt_token_ids"] = list(turn.new_token_ids)
    else:
        record["prompt_tokens"] = turn.new_tokens
    record.update(output_tokens=turn.output_tokens, pause_after=float(turn.pause_after))
    return record
