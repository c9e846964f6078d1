"""Agent workloads: coding-agent sessions (`agentic_coding`) and the fixed SWE-smith shape (`swe_smith`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sim.workloads.base import _Config
from sim.workloads.session import Session
from sim.workloads.synthetic import _SyntheticWorkload, _build, _calls_within_context, _mu_for_clipped_mean, _tokens

Z_90 = 1.2815515655446004  # standard normal 90th percentile: sigma = ln(p90 / median) / Z_90


@dataclass(frozen=True)
class AgenticCodingConfig(_Config):
    """A coding agent: a long shared tool prefix, many short calls, bursty arrivals."""

    session_rate: float = 0.2  # sessions per second (open loop)
    arrival_cv: float = 2.0  # coefficient of variation of inter-arrival gaps (1: Poisson)
    num_prefixes: int = 4  # distinct system/tool prefixes (0: sessions have none)
    prefix_tokens_min: int = 20_000
    prefix_tokens_max: int = 60_000
    new_tokens_mean: float = 250.0  # mean of the clipped lognormal
    new_tokens_sigma: float = 1.0
    new_tokens_max: int = 16_384
    output_mean: float = 520.0  # mean of the clipped lognormal
    output_sigma: float = 1.3
    output_max: int = 4096
    calls_mean: float = 20.0  # geometric number of calls per session
    calls_max: int = 400
    tool_pause_median: float = 0.3
    tool_pause_p90: float = 13.6
    tool_pause_max: float = 900.0
    human_pause_prob: float = 0.05  # per pause: a human pause replaces the tool pause
    human_pause_mean: float = 120.0  # exponential
    context_max: int = 131_072  # a session ends before a call whose context would exceed this

    def _check(self) -> None:
        self._positive("session_rate", "arrival_cv", "prefix_tokens_min", "tool_pause_median", "human_pause_mean")
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
        self._require(
            self.context_max >= first_call,
            "context_max",
            f"must fit a first call: >= prefix_tokens_max + new_tokens_max + output_max = {first_call}",
        )


@dataclass(frozen=True)
class SweSmithConfig(_Config):
    """The fixed multi-turn shape of the TokenSpeed SWE-smith benchmark."""

    session_rate: float = 0.1  # Poisson arrivals, for open-loop use
    first_turn_tokens: int = 50_000
    later_turn_tokens: int = 800
    turns_min: int = 10
    turns_max: int = 15
    output_tokens: int = 500

    def _check(self) -> None:
        self._positive("session_rate", "first_turn_tokens", "later_turn_tokens", "turns_min", "output_tokens")
        self._below("turns_min", "turns_max")


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
        new = _tokens(
            rng,
            _mu_for_clipped_mean(c.new_tokens_mean, c.new_tokens_sigma, c.new_tokens_max),
            c.new_tokens_sigma,
            c.new_tokens_max,
            n,
        )
        out = _tokens(
            rng, _mu_for_clipped_mean(c.output_mean, c.output_sigma, c.output_max), c.output_sigma, c.output_max, n
        )
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
