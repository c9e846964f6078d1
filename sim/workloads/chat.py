"""Human chat (`chat`): short prompts and replies, think time between turns."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sim.workloads.base import _Config
from sim.workloads.session import Session
from sim.workloads.synthetic import _SyntheticWorkload, _build, _calls_within_context, _tokens


@dataclass(frozen=True)
class ChatConfig(_Config):
    """Human chat: short prompts and replies, think time between turns, Poisson arrivals."""

    session_rate: float = 1.0
    single_turn_prob: float = 0.3
    turns_mean: float = 3.5  # over all conversations, single-turn ones included
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
            self._require(
                self.turns_mean >= 2 - self.single_turn_prob,
                "turns_mean",
                "must be >= 2 - single_turn_prob (multi-turn conversations have >= 2 turns)",
            )
        else:
            self._require(self.turns_mean == 1, "turns_mean", "must be 1 when single_turn_prob is 1")
        self._require(
            self.context_max >= self.prompt_max + self.output_max, "context_max", "must be >= prompt_max + output_max"
        )


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
