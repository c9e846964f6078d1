"""What every workload is: a frozen, type-checked config (`_Config`) and a source of sessions (`Workload`)."""

from __future__ import annotations

import abc
import dataclasses
import itertools
import math
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np

from sim.workloads.session import Session


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


class Workload(abc.ABC):
    """A source of sessions; `name` is its registry name, `config` its frozen parameters."""

    name: ClassVar[str]
    config_class: ClassVar[type[_Config]]
    endless: ClassVar[bool] = True  # generated without end: a run must say how many sessions

    def __init__(self, config: _Config) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}")
        self.config = config

    def check(self) -> None:  # noqa: B027 (a hook: most workloads have nothing to check)
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


def _check_natural(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
