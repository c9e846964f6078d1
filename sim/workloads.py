"""Workload generators: the shape of agent and chat sessions, for the simulator.

A workload yields `Session`s: token counts, output lengths and pauses, never
token ids (except from traces that carry them). The simulator turns a shape
into ids so that each call's prompt is exactly the previous prompt, plus the
previous output, plus the call's new tokens; prefix reuse is therefore real:

    call 1 prompt: [ prefix | n1 ]                         -> o1, then pause p1
    call 2 prompt: [ prefix | n1 | o1 | n2 ]               -> o2, then pause p2
    call 3 prompt: [ prefix | n1 | o1 | n2 | o2 | n3 ]     -> o3 (last: pause 0)

    start --call 1--> finish 1 --p1--> arrival 2 --call 2--> finish 2 --p2--> ...

Everything is a pure function of the seed: prefix lengths, the arrival process
and every session draw from their own `numpy.random.SeedSequence` children, so
session i is the same whatever the rate or however many sessions are asked for.
See docs/workloads.md for the defaults and where they come from.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import numpy as np

Z_90 = 1.2815515655446004  # standard normal 90th percentile: sigma = ln(p90 / median) / Z_90


@dataclass(frozen=True)
class Turn:
    """One model call of a session.

    new_tokens: tokens appended to the context before this call (> 0).
    output_tokens: tokens generated for this call, with ignore_eos (>= 1).
    pause_after: seconds from this call's finish to the next call's arrival; 0 for the last.
    new_token_ids: the new tokens themselves, only from traces that give them.
    """

    new_tokens: int
    output_tokens: int
    pause_after: float
    new_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.new_tokens < 1 or self.output_tokens < 1 or not 0 <= self.pause_after < math.inf:
            raise ValueError(f"invalid turn {self}")
        if self.new_token_ids is not None and len(self.new_token_ids) != self.new_tokens:
            raise ValueError(f"turn has {self.new_tokens} new tokens but {len(self.new_token_ids)} ids")


@dataclass(frozen=True)
class Session:
    """A conversation or agent run: one shared prefix, then its calls in order.

    start_time: arrival of the first call in seconds (open loop; closed-loop drivers ignore it).
    prefix_id: the shared system/tool prefix it starts with (-1: none); equal ids mean
        identical prefixes of `prefix_tokens` tokens (0 when prefix_id is -1).
    """

    session_id: str
    start_time: float
    prefix_id: int
    prefix_tokens: int
    turns: tuple[Turn, ...]

    def __post_init__(self) -> None:
        if not self.turns or self.turns[-1].pause_after != 0:
            raise ValueError(f"session {self.session_id!r} needs turns, the last with pause_after 0")
        if (self.prefix_id == -1) != (self.prefix_tokens == 0) or self.prefix_id < -1 or self.prefix_tokens < 0:
            raise ValueError(f"session {self.session_id!r}: prefix_id -1 exactly when prefix_tokens is 0")
        if not (math.isfinite(self.start_time) and self.start_time >= 0):
            raise ValueError(f"session {self.session_id!r}: start_time must be finite and >= 0")


# --------------------------------------------------------------------------- configs


class _Config:
    """Base of the frozen workload configs: field types are enforced, values checked."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "_Config":
        """Builds a config from a mapping, rejecting unknown keys by name."""
        known = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} parameters {unknown}; known: {known}")
        return cls(**dict(values))

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _typed(field.name, field.type, getattr(self, field.name)))
        self._check()

    def _check(self) -> None:
        """Raises ValueError naming the first bad parameter."""

    def _require(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{type(self).__name__}.{name} = {getattr(self, name)!r} {rule}")

    def _positive(self, *names: str) -> None:
        for name in names:
            self._require(getattr(self, name) > 0, name, "must be > 0")

    def _at_least(self, low: float, *names: str) -> None:
        for name in names:
            self._require(getattr(self, name) >= low, name, f"must be >= {low}")

    def _probability(self, *names: str) -> None:
        for name in names:
            self._require(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")

    def _below(self, low: str, high: str, strict: bool = False) -> None:
        a, b = getattr(self, low), getattr(self, high)
        ok = a < b if strict else a <= b
        self._require(ok, high, f"must be {'>' if strict else '>='} {low} = {a!r}")


def _typed(name: str, kind: str, value: Any) -> Any:
    """Checks `value` against the annotated type `kind`; ints become floats for float fields."""
    if kind == "int" and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if kind == "float" and isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    raise ValueError(f"parameter {name} must be a finite {kind}, got {value!r}")


@dataclass(frozen=True)
class AgenticCodingConfig(_Config):
    """A coding agent: a long shared tool prefix, many short calls, bursty arrivals."""

    session_rate: float = 0.2          # sessions per second (open loop)
    arrival_cv: float = 2.0            # coefficient of variation of inter-arrival gaps (1: Poisson)
    num_prefixes: int = 4              # distinct system/tool prefixes (0: sessions have none)
    prefix_tokens_min: int = 20_000
    prefix_tokens_max: int = 60_000
    new_tokens_mean: float = 250.0     # mean of the clipped lognormal
    new_tokens_sigma: float = 1.0
    new_tokens_max: int = 16_384
    output_mean: float = 520.0         # mean of the clipped lognormal
    output_sigma: float = 1.3
    output_max: int = 4096
    calls_mean: float = 20.0           # geometric number of calls per session
    calls_max: int = 400
    tool_pause_median: float = 0.3
    tool_pause_p90: float = 13.6
    tool_pause_max: float = 900.0
    human_pause_prob: float = 0.05     # per pause: a human pause replaces the tool pause
    human_pause_mean: float = 120.0    # exponential
    context_max: int = 131_072         # a session ends before a call whose context would exceed this

    def _check(self) -> None:
        self._positive("session_rate", "arrival_cv", "prefix_tokens_min", "tool_pause_median",
                       "human_pause_mean")
        self._at_least(0, "num_prefixes", "new_tokens_sigma", "output_sigma")
        self._at_least(1, "new_tokens_mean", "output_mean", "calls_mean")
        self._below("prefix_tokens_min", "prefix_tokens_max")
        self._below("new_tokens_mean", "new_tokens_max", strict=True)
        self._below("output_mean", "output_max", strict=True)
        self._below("calls_mean", "calls_max")
        self._below("tool_pause_median", "tool_pause_p90")
        self._below("tool_pause_p90", "tool_pause_max")
        self._probability("human_pause_prob")
        first_call = self.prefix_tokens_max + self.new_tokens_max + self.output_max
        self._require(self.context_max >= first_call, "context_max",
                      f"must fit a first call: >= prefix_tokens_max + new_tokens_max + output_max = {first_call}")


@dataclass(frozen=True)
class SweSmithConfig(_Config):
    """The fixed multi-turn shape of the TokenSpeed SWE-smith benchmark."""

    session_rate: float = 0.1          # Poisson arrivals, for open-loop use
    first_turn_tokens: int = 50_000
    later_turn_tokens: int = 800
    turns_min: int = 10
    turns_max: int = 15
    output_tokens: int = 500

    def _check(self) -> None:
        self._positive("session_rate", "first_turn_tokens", "later_turn_tokens", "turns_min", "output_tokens")
        self._below("turns_min", "turns_max")


@dataclass(frozen=True)
class ChatConfig(_Config):
    """Human chat: short prompts and replies, think time between turns, Poisson arrivals."""

    session_rate: float = 1.0
    single_turn_prob: float = 0.3
    turns_mean: float = 3.5            # over all conversations, single-turn ones included
    turns_max: int = 64
    first_prompt_median: float = 170.0
    later_prompt_median: float = 80.0
    prompt_sigma: float = 1.0
    prompt_max: int = 8192
    output_median: float = 115.0
    output_sigma: float = 1.0
    output_max: int = 2048
    think_time_median: float = 15.0
    think_time_sigma: float = 1.0
    context_max: int = 131_072

    def _check(self) -> None:
        self._positive("session_rate", "think_time_median")
        self._at_least(0, "prompt_sigma", "output_sigma", "think_time_sigma")
        self._at_least(1, "first_prompt_median", "later_prompt_median", "output_median", "turns_mean")
        self._probability("single_turn_prob")
        self._below("first_prompt_median", "prompt_max")
        self._below("later_prompt_median", "prompt_max")
        self._below("output_median", "output_max")
        self._below("turns_mean", "turns_max")
        if self.single_turn_prob < 1:
            self._require(self.turns_mean >= 2 - self.single_turn_prob, "turns_mean",
                          "must be >= 2 - single_turn_prob (multi-turn conversations have >= 2 turns)")
        else:
            self._require(self.turns_mean == 1, "turns_mean", "must be 1 when single_turn_prob is 1")
        self._require(self.context_max >= self.prompt_max + self.output_max, "context_max",
                      "must be >= prompt_max + output_max")


@dataclass(frozen=True)
class TraceConfig(_Config):
    """Replay of a JSONL trace (schema in docs/workloads.md)."""

    path: str = ""

    def _check(self) -> None:
        self._require(bool(self.path), "path", "must name a JSONL trace file")


# --------------------------------------------------------------------------- workloads


class Workload(abc.ABC):
    """A source of sessions; `name` is its registry name, `config` its frozen parameters."""

    name: ClassVar[str]
    config_class: ClassVar[type[_Config]]
    endless: ClassVar[bool] = True  # generated without end: a run must say how many sessions

    def __init__(self, config: _Config) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}")
        self.config = config

    def check(self) -> None:
        """Checks what the parameters alone cannot (e.g. that a trace file exists), before a run."""

    def sessions(self, num_sessions: int | None, seed: int, rate: float | None = None) -> list[Session]:
        """The first `num_sessions` sessions of `iter_sessions(seed, rate)`.

        Args:
            num_sessions: how many sessions (>= 0); None: all of them (only for a workload that
                is not `endless`).
            seed: non-negative integer; the same seed gives the same sessions.
            rate: session arrivals per second (None: the config's `session_rate`).
        Returns:
            Sessions sorted by start_time.
        """
        if num_sessions is None and self.endless:
            raise ValueError(f"workload {self.name!r} generates sessions without end: num_sessions must be a number")
        if num_sessions is not None:
            _check_natural("num_sessions", num_sessions)
        return list(itertools.islice(self.iter_sessions(seed, rate), num_sessions))

    @abc.abstractmethod
    def iter_sessions(self, seed: int, rate: float | None = None) -> Iterator[Session]:
        """Sessions in arrival order, generated lazily (endless for synthetic workloads)."""


class _SyntheticWorkload(Workload):
    """A generated workload: renewal-process arrivals and independent per-session draws.

    Streams of SeedSequence(seed): spawn_key (0,) prefix lengths, (1,) arrivals, (2, i) session i.
    """

    def iter_sessions(self, seed: int, rate: float | None = None) -> Iterator[Session]:
        _check_natural("seed", seed)
        rate = self.config.session_rate if rate is None else rate
        if isinstance(rate, bool) or not (isinstance(rate, (int, float, np.number)) and 0 < rate < math.inf):
            raise ValueError(f"rate must be a positive, finite number of sessions per second, got {rate!r}")
        prefixes = self._prefix_lengths(_rng(seed, 0))
        return self._generate(seed, float(rate), prefixes)

    def _generate(self, seed: int, rate: float, prefixes: np.ndarray) -> Iterator[Session]:
        """Session i starts at the sum of i Gamma gaps (the first at t = 0)."""
        arrivals, cv2 = _rng(seed, 1), self._arrival_cv() ** 2
        start = 0.0
        for index in itertools.count():
            yield self._session(_rng(seed, 2, index), f"{self.name}-{seed}-{index}", start, prefixes)
            start += float(arrivals.gamma(1.0 / cv2, cv2 / rate))

    def _arrival_cv(self) -> float:
        return 1.0

    def _prefix_lengths(self, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    @abc.abstractmethod
    def _session(self, rng: np.random.Generator, session_id: str, start: float,
                 prefixes: np.ndarray) -> Session:
        """Draws one session's shape from its own generator."""


class AgenticCodingWorkload(_SyntheticWorkload):
    """Coding-agent sessions: shared 20-60k tool prefixes, ~20 calls, tool and human pauses."""

    name = "agentic_coding"
    config_class = AgenticCodingConfig

    def _arrival_cv(self) -> float:
        return self.config.arrival_cv

    def _prefix_lengths(self, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        return rng.integers(c.prefix_tokens_min, c.prefix_tokens_max, endpoint=True, size=c.num_prefixes)

    def _session(self, rng, session_id, start, prefixes) -> Session:
        c = self.config
        prefix_id = int(rng.integers(len(prefixes))) if len(prefixes) else -1
        prefix_tokens = int(prefixes[prefix_id]) if prefix_id >= 0 else 0
        n = min(int(rng.geometric(1.0 / c.calls_mean)), c.calls_max)
        new = _tokens(rng, _mu_for_clipped_mean(c.new_tokens_mean, c.new_tokens_sigma, c.new_tokens_max),
                      c.new_tokens_sigma, c.new_tokens_max, n)
        out = _tokens(rng, _mu_for_clipped_mean(c.output_mean, c.output_sigma, c.output_max),
                      c.output_sigma, c.output_max, n)
        tool_sigma = math.log(c.tool_pause_p90 / c.tool_pause_median) / Z_90
        tool = np.minimum(rng.lognormal(math.log(c.tool_pause_median), tool_sigma, n), c.tool_pause_max)
        human = rng.random(n) < c.human_pause_prob
        pause = np.where(human, rng.exponential(c.human_pause_mean, n), tool)
        n = _calls_within_context(prefix_tokens, new, out, c.context_max)
        return _build(session_id, start, prefix_id, prefix_tokens, new[:n], out[:n], pause[:n])


class SweSmithWorkload(_SyntheticWorkload):
    """SWE-smith as TokenSpeed drives it: 50k-token first turn, 800-token later turns, no pauses."""

    name = "swe_smith"
    config_class = SweSmithConfig

    def _session(self, rng, session_id, start, prefixes) -> Session:
        c = self.config
        n = int(rng.integers(c.turns_min, c.turns_max, endpoint=True))
        new = np.full(n, c.later_turn_tokens, dtype=np.int64)
        new[0] = c.first_turn_tokens
        out = np.full(n, c.output_tokens, dtype=np.int64)
        return _build(session_id, start, -1, 0, new, out, np.zeros(n))


class ChatWorkload(_SyntheticWorkload):
    """ShareGPT-like chat: lognormal prompt/reply lengths, lognormal think times."""

    name = "chat"
    config_class = ChatConfig

    def _num_turns(self, rng: np.random.Generator) -> int:
        """1 with single_turn_prob, else 1 + Geometric, with the overall mean turns_mean."""
        c = self.config
        if rng.random() < c.single_turn_prob:
            return 1
        multi_mean = (c.turns_mean - c.single_turn_prob) / (1 - c.single_turn_prob)
        stop = min(1.0, 1.0 / (multi_mean - 1))  # min: rounding can put multi_mean a hair below 2
        return min(1 + int(rng.geometric(stop)), c.turns_max)

    def _session(self, rng, session_id, start, prefixes) -> Session:
        c = self.config
        n = self._num_turns(rng)
        new = _tokens(rng, math.log(c.later_prompt_median), c.prompt_sigma, c.prompt_max, n)
        new[0] = _tokens(rng, math.log(c.first_prompt_median), c.prompt_sigma, c.prompt_max, 1)[0]
        out = _tokens(rng, math.log(c.output_median), c.output_sigma, c.output_max, n)
        pause = rng.lognormal(math.log(c.think_time_median), c.think_time_sigma, n)
        n = _calls_within_context(0, new, out, c.context_max)
        return _build(session_id, start, -1, 0, new[:n], out[:n], pause[:n])


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
            raise ValueError(f"workload.params.path: the trace {os.path.abspath(self.config.path)!r} "
                             f"has no sessions")

    def sessions(self, num_sessions: int | None = None, seed: int = 0, rate: float | None = None) -> list[Session]:
        """The file's first `num_sessions` sessions by start time (fewer if it has fewer; None: all)."""
        if num_sessions is not None:
            _check_natural("num_sessions", num_sessions)
        return load_trace(self.config.path)[:num_sessions]

    def iter_sessions(self, seed: int = 0, rate: float | None = None) -> Iterator[Session]:
        """The file's sessions by start time, once each; then it stops."""
        return iter(load_trace(self.config.path))


WORKLOADS: Mapping[str, type[Workload]] = {
    cls.name: cls for cls in (AgenticCodingWorkload, SweSmithWorkload, ChatWorkload, TraceWorkload)
}


def make_workload(name: str, params: Mapping[str, Any] | None = None) -> Workload:
    """Builds a registered workload from its name and parameters.

    Raises:
        ValueError: unknown name, unknown parameter names (listing the known ones) or bad values.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    cls = WORKLOADS[name]
    return cls(cls.config_class.from_dict(params or {}))


# --------------------------------------------------------------------------- sampling


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


def _check_natural(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _tokens(rng: np.random.Generator, mu: float, sigma: float, high: int, size: int) -> np.ndarray:
    """Lognormal(mu, sigma) token counts, rounded and clipped to [1, high]."""
    return np.clip(np.rint(rng.lognormal(mu, sigma, size)), 1, high).astype(np.int64)


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _clipped_mean(mu: float, sigma: float, high: float) -> float:
    """E[min(X, high)] for X ~ Lognormal(mu, sigma), sigma > 0."""
    z = (math.log(high) - mu) / sigma
    return math.exp(mu + sigma * sigma / 2) * _normal_cdf(z - sigma) + high * _normal_cdf(-z)


@functools.lru_cache(maxsize=64)
def _mu_for_clipped_mean(mean: float, sigma: float, high: float) -> float:
    """The mu whose lognormal, clipped at `high`, has mean `mean` (< high); bisection, as it rises with mu."""
    if sigma == 0:
        return math.log(mean)
    low_mu, high_mu = math.log(mean) - sigma * sigma / 2, math.log(high) + 40 * sigma
    for _ in range(200):
        mid = (low_mu + high_mu) / 2
        low_mu, high_mu = (mid, high_mu) if _clipped_mean(mid, sigma, high) < mean else (low_mu, mid)
    return (low_mu + high_mu) / 2


def _calls_within_context(prefix_tokens: int, new: np.ndarray, out: np.ndarray, context_max: int) -> int:
    """How many leading calls keep prompt plus output within context_max (at least 1)."""
    context = prefix_tokens + np.cumsum(new + out)
    return max(1, int(np.searchsorted(context, context_max, side="right")))


def _build(session_id: str, start: float, prefix_id: int, prefix_tokens: int,
           new: np.ndarray, out: np.ndarray, pause: np.ndarray) -> Session:
    """A Session from per-call arrays; the last pause is forced to 0."""
    pauses = [float(p) for p in pause]
    pauses[-1] = 0.0
    turns = tuple(Turn(n, o, p) for n, o, p in zip(new.tolist(), out.tolist(), pauses))
    return Session(session_id, start, prefix_id, prefix_tokens, turns)


# --------------------------------------------------------------------------- traces

_TRACE_FIELDS = ("arrival_time", "session_id", "prompt_tokens", "prompt_token_ids", "output_tokens",
                 "pause_after", "prefix_id", "prefix_tokens")
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
                    raise ValueError(f"{where}: prefix_id {prefix_id} has prefix_tokens "
                                     f"{prefix_sizes[prefix_id]} elsewhere, {prefix_tokens} here")
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


# --------------------------------------------------------------------------- summaries


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
