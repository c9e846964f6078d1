"""Generated workloads: renewal-process arrivals, per-session draws, and the samplers they share."""

from __future__ import annotations

import abc
import functools
import itertools
import math
from typing import Iterator

import numpy as np

from sim.workloads.base import Workload, _check_natural
from sim.workloads.session import Session, Turn


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
    def _session(self, rng: np.random.Generator, session_id: str, start: float, prefixes: np.ndarray) -> Session:
        """Draws one session's shape from its own generator."""


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


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


def _build(
    session_id: str,
    start: float,
    prefix_id: int,
    prefix_tokens: int,
    new: np.ndarray,
    out: np.ndarray,
    pause: np.ndarray,
) -> Session:
    """A Session from per-call arrays; the last pause is forced to 0."""
    pauses = [float(p) for p in pause]
    pauses[-1] = 0.0
    turns = tuple(Turn(n, o, p) for n, o, p in zip(new.tolist(), out.tolist(), pauses))
    return Session(session_id, start, prefix_id, prefix_tokens, turns)
