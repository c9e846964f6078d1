"""Look-ahead policy choice: the scheduler's snapshot run forward in the twin under each candidate policy.

Every `every_s` seconds (of the plane's clock), between two steps, the controller copies the scheduler
(`Scheduler.snapshot()`: the whole state, deterministic), gives each copy one candidate's policies
(`set_policy`: ordering, preemption and admission; the eviction policy stays), runs each forward for
`horizon_s` on the step-cost model (`sim._native.run_lookahead`, in C++ with the GIL released: no new
request arrives, each sampled token is a filler) and applies the candidate whose run scores best on
the objective to the live scheduler. Ties keep the policy in effect.

Objectives (higher is better):
  floor_goodput   output tokens within 1 / floor_tok_s of the request's previous one, a second
  throughput      output tokens a second
  ttft            minus the mean wait for a first token: of the requests that got one in the run, and
                  of those still without one at its end (counted with their age then)

In the simulator (`sim.lookahead`) it runs inline: simulated time does not pass while it thinks. In
the engine (`EngineConfig.lookahead`) only the snapshot is taken on the loop's thread; the forward runs
go to a worker thread and their choice is applied at the first step after they finish, so the step
itself does not wait for them (`Lookahead.decisions` records what each decision cost on each side).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from sim import _native

logger = logging.getLogger(__name__)

OBJECTIVES = ("floor_goodput", "throughput", "ttft")
KINDS = ("ordering", "preemption", "admission")


@dataclass(frozen=True)
class LookaheadConfig:
    """What a look-ahead controller chooses between, how often, how far it looks and for what.

    candidates: each a mapping kind -> spec (kinds: ordering, preemption, admission), or a string
        "kind=spec;kind=spec" (e.g. "admission=tps_floor:tok_s=70"); at least two.
    """

    candidates: tuple[Mapping[str, str], ...]
    every_s: float = 1.0
    horizon_s: float = 2.0
    objective: str = "floor_goodput"
    floor_tok_s: float = 70.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LookaheadConfig":
        known = {"candidates", "every_s", "horizon_s", "objective", "floor_tok_s"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown lookahead keys {unknown}; known: {sorted(known)}")
        if "candidates" not in values:
            raise ValueError("lookahead needs `candidates` (at least two policy sets)")
        candidates = tuple(_candidate(c) for c in values["candidates"])
        cfg = cls(candidates, **{k: v for k, v in values.items() if k != "candidates"})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from controlplane.policies import check_spec

        if len(self.candidates) < 2:
            raise ValueError(f"lookahead needs at least two candidates, got {len(self.candidates)}")
        kinds = [sorted(c) for c in self.candidates]
        if any(k != kinds[0] for k in kinds):
            # else what runs would depend on the choices before (a kind one candidate sets, another leaves)
            raise ValueError(
                f"lookahead candidates must all set the same kinds, got {[dict(c) for c in self.candidates]}"
            )
        for c in self.candidates:
            for kind, spec in c.items():
                if kind not in KINDS:
                    raise ValueError(f"lookahead candidate {dict(c)}: kind {kind!r} is not one of {list(KINDS)}")
                check_spec(kind, spec)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"lookahead objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        for name in ("every_s", "horizon_s", "floor_tok_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"lookahead {name} must be a number > 0, got {value!r}")


def _candidate(c) -> dict[str, str]:
    if isinstance(c, str):
        out = {}
        for part in filter(None, (p.strip() for p in c.split(";"))):
            kind, sep, spec = part.partition("=")
            if not sep:
                raise ValueError(f"lookahead candidate {c!r}: write kind=spec;kind=spec")
            out[kind.strip()] = spec.strip()
        return out
    if isinstance(c, Mapping):
        return {str(k): str(v) for k, v in c.items()}
    raise ValueError(f"a lookahead candidate is a mapping kind -> spec or 'kind=spec;...', got {c!r}")


@dataclass
class Decision:
    now: float
    chosen: int
    scores: list[float]
    snapshot_s: float  # wall seconds on the plane's loop: the copy
    forward_s: float  # wall seconds of the candidates' runs (a worker thread's, in the engine)


def score(objective: str, r, horizon_s: float) -> float:
    """A run's score on `objective` (higher is better)."""
    if objective == "floor_goodput":
        return r.floor_tokens / horizon_s
    if objective == "throughput":
        return r.tokens / horizon_s
    waits = r.first_tokens + r.waiting
    return -(r.ttft_sum + r.waiting_age_sum) / waits if waits else 0.0


@dataclass
class Lookahead:
    """One scheduler's controller; `on_step(scheduler, now)` between steps (after a commit)."""

    cfg: LookaheadConfig
    cost: Any  # a sim._native.StepCost
    threaded: bool = False
    current: int = -1  # the candidate in effect (index); -1: none applied yet (the config's own policies)
    decisions: list[Decision] = field(default_factory=list)
    failures: int = 0  # decisions that raised (logged; nothing applied)
    _next_at: float | None = None
    _pool: concurrent.futures.ThreadPoolExecutor | None = None
    _pending: tuple | None = None

    def on_step(self, scheduler, now: float) -> None:
        if self._pending is not None:
            if not self._pending[0].done():
                return
            self.settle(scheduler)
        if self._next_at is None:
            self._next_at = now + self.cfg.every_s
            self.current = self._in_effect(scheduler)
        if now < self._next_at:
            return
        self._next_at = now + self.cfg.every_s
        t0 = time.perf_counter()
        snap = scheduler.snapshot()
        snap_s = time.perf_counter() - t0
        if self.threaded:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lookahead")
            self._pending = (self._pool.submit(self._evaluate, snap, now), now, snap_s)
        else:
            try:
                chosen, scores, forward_s = self._evaluate(snap, now)
            except Exception as exc:  # a decision that failed changes nothing: the plane's step goes on
                self._failed(exc)
                return
            self._apply(scheduler, now, chosen, scores, snap_s, forward_s)

    def settle(self, scheduler) -> None:
        """Waits for a decision in progress (threaded) and applies it; call between steps."""
        if self._pending is not None:
            future, started, snap_s = self._pending
            self._pending = None
            try:
                chosen, scores, forward_s = future.result()
            except Exception as exc:
                self._failed(exc)
                return
            self._apply(scheduler, started, chosen, scores, snap_s, forward_s)

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        logger.warning("look-ahead decision failed (the policies in effect stay): %r", exc)

    def _in_effect(self, scheduler) -> int:
        """The candidate the scheduler's own policies are (-1: none of them)."""
        policies = scheduler.policies
        for i, c in enumerate(self.cfg.candidates):
            if all(policies.get(kind) == spec for kind, spec in c.items()):
                return i
        return -1

    def _evaluate(self, snap, now: float) -> tuple[int, list[float], float]:
        t0 = time.perf_counter()
        scores = []
        for candidate in self.cfg.candidates:
            s = snap.snapshot()
            for kind, spec in candidate.items():
                s.set_policy(kind, spec)
            r = _native.run_lookahead(s, self.cost, now, self.cfg.horizon_s, 1.0 / self.cfg.floor_tok_s)
            scores.append(score(self.cfg.objective, r, self.cfg.horizon_s))
        best = max(range(len(scores)), key=lambda i: (scores[i], i == self.current, -i))
        return best, scores, time.perf_counter() - t0

    def _apply(self, scheduler, now: float, chosen: int, scores, snap_s: float, forward_s: float) -> None:
        if chosen != self.current:
            for kind, spec in self.cfg.candidates[chosen].items():
                scheduler.set_policy(kind, spec)
            self.current = chosen
        self.decisions.append(Decision(now, chosen, list(scores), snap_s, forward_s))

    def summary(self) -> dict:
        """Decisions, switches, each candidate's share of decisions, and the wall time a decision cost."""
        n = len(self.decisions)
        chosen = [d.chosen for d in self.decisions]
        switches = sum(1 for a, b in zip(chosen, chosen[1:]) if a != b)
        return {
            "lookahead_decisions": n,
            "lookahead_switches": switches,
            "lookahead_failures": self.failures,
            "lookahead_share": [chosen.count(i) / n if n else 0.0 for i in range(len(self.cfg.candidates))],
            "lookahead_snapshot_ms": 1e3 * sum(d.snapshot_s for d in self.decisions) / n if n else 0.0,
            "lookahead_forward_ms": 1e3 * sum(d.forward_s for d in self.decisions) / n if n else 0.0,
        }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def merge_lookahead(summaries: list[dict]) -> dict:
    """The replicas' controllers together: decisions and switches summed, shares and costs decision-weighted."""
    n = sum(s["lookahead_decisions"] for s in summaries)
    out = {
        "lookahead_decisions": n,
        "lookahead_switches": sum(s["lookahead_switches"] for s in summaries),
        "lookahead_failures": sum(s["lookahead_failures"] for s in summaries),
    }
    for key in ("lookahead_snapshot_ms", "lookahead_forward_ms"):
        out[key] = sum(s[key] * s["lookahead_decisions"] for s in summaries) / n if n else 0.0
    k = len(summaries[0]["lookahead_share"])
    out["lookahead_share"] = [
        sum(s["lookahead_share"][i] * s["lookahead_decisions"] for s in summaries) / n if n else 0.0 for i in range(k)
    ]
    return out
