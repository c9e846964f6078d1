"""Replicas as SimPy processes on the shared control plane, and the router in front of them.

A replica runs the engine core's loop with a step-cost model in place of the GPU::

    plan = scheduler.step(env.now)
    yield env.timeout(cost_model.step_seconds(plan))     # the step "runs"
    finished = scheduler.commit(plan, tokens, env.now)

Every scheduling and KV decision is the C++ scheduler's; this file only moves
simulated time and hands finished requests back to the sessions waiting on them.

The fast path (`fast_forward=True`, csrc/sim/fast_forward.h) runs that same loop in
C++ for all the steps that end before the next event of the rest of the
simulation (`env.peek()`): nothing else can act in between, so the steps, their
times, the tokens and what the metrics see are exactly those of the loop above,
with one SimPy event for the whole run of steps instead of one per step.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np
import simpy
from simpy.core import NORMAL

import controlplane as cp
from sim import _native

_EMPTY = np.empty(0, dtype=np.int64)


class Replica:
    """One engine replica (one GPU) driving its own scheduler.

    Args:
        env: the SimPy environment (its clock is the only clock).
        index: replica number.
        config: the control-plane config.
        cost_model: `step_seconds(plan) -> float`; with a `native` evaluator it also drives the fast path.
        metrics: receives `on_step(replica, start, seconds, plan)` after each commit, or
            `on_steps(replica, forward_result)` after a run of them; `next_sample_time(index)` and
            `sample_interval()` say after which steps it samples the scheduler's stats.
        idle_wait_s: when the scheduler makes an empty plan although requests are
            waiting (blocked, e.g. on pinned KV), re-plan after this long or at the next arrival.
        seed: seeds the synthetic output token ids.
        fast_forward: run steps in C++ between other events (same results, fewer SimPy events).
        driven: start no process; a `sim.cluster_fast.ClusterDriver` runs this replica's loop.
        scheduler: the scheduler to drive (default: a new one of `config`).

    A subclass that runs plans elsewhere (on an engine, experiments/engine_replica.py) overrides
    `_execute`; the loop, its events and the metrics stay these.
    """

    def __init__(
        self,
        env: simpy.Environment,
        index: int,
        config: cp.SchedulerConfig,
        cost_model,
        metrics,
        idle_wait_s: float,
        seed: int,
        fast_forward: bool = True,
        driven: bool = False,
        scheduler: cp.Scheduler | None = None,
    ) -> None:
        self.env = env
        self.index = index
        self.scheduler = cp.Scheduler(config) if scheduler is None else scheduler
        self.cost_model = cost_model
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self.vocab_size = config.vocab_size
        self.pending: dict[int, simpy.Event] = {}
        self.sessions: set[str] = set()
        rng = np.random.default_rng([seed, index, 0x70C])
        self._token_pool = rng.integers(0, config.vocab_size, size=1 << 16, dtype=np.int64)
        self._token_at = 0
        self._wake: simpy.Event | None = None
        native = getattr(cost_model, "native", None)
        self._fast = _native.FastForward(native, self._token_pool) if fast_forward and native is not None else None
        if not driven:
            self.process = env.process(self._loop_fast() if self._fast is not None else self._loop())

    @property
    def load(self) -> int:
        """Requests submitted and not finished."""
        return len(self.pending)

    def submit(
        self,
        request_id: int,
        prompt: np.ndarray,
        max_new_tokens: int,
        session_id: str,
        after: int | None = None,
        new_tokens: np.ndarray | None = None,
    ) -> simpy.Event:
        """Adds a request now; the returned event fires with its `FinishedRequest`.

        `after`: the session's previous request, finished on this replica, when `prompt` is its
        prompt + output + `new_tokens`: then only the new tokens are sent (the scheduler keeps the
        rest), unless it no longer has them.
        """
        now = self.env.now
        if after is None or not self.scheduler.add_continuation(
            request_id,
            after,
            new_tokens,
            max_new_tokens=max_new_tokens,
            ignore_eos=True,
            arrival_time=now,
            session_id=session_id,
        ):
            self.scheduler.add_request(
                request_id,
                prompt,
                max_new_tokens=max_new_tokens,
                ignore_eos=True,
                arrival_time=now,
                session_id=session_id,
            )
        self.sessions.add(session_id)
        done = self.env.event()
        self.pending[request_id] = done
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        return done

    def end_session(self, session_id: str) -> None:
        if session_id in self.sessions:
            self.sessions.discard(session_id)
            self.scheduler.end_session(session_id, self.env.now)

    def _tokens(self, n: int) -> np.ndarray:
        """Synthetic sampled token ids (the simulator has no model); csrc/sim/fast_forward.cpp takes the same."""
        at = self._token_at
        if at + n > self._token_pool.size:
            at = 0
        self._token_at = at + n
        return self._token_pool[at : at + n]

    def _finish(self, finished) -> None:
        for f in finished:
            self.pending.pop(f.request_id).succeed(f)

    def _idle(self):
        """Waits for an arrival (or `idle_wait_s`, when requests are blocked)."""
        self._wake = self.env.event()
        if self.scheduler.has_unfinished():
            yield self._wake | self.env.timeout(self.idle_wait_s)
        else:
            yield self._wake
        self._wake = None

    def _execute(self, plan) -> tuple[float, np.ndarray | None]:
        """Runs one plan made now: its seconds, and its sampled tokens (None: synthetic ones)."""
        return self.cost_model.step_seconds(plan), None

    def _run_step(self, plan, seconds: float, start: float, tokens: np.ndarray | None = None):
        """Runs one uncommitted, non-empty plan made at `start` as one SimPy event, then commits it."""
        yield self.env.timeout(seconds) if start == self.env.now else self._timeout_at(start + seconds)
        if tokens is None:
            tokens = self._tokens(plan.num_sampled)
        finished = self.scheduler.commit(plan, tokens, self.env.now)
        self.metrics.on_step(self, start, seconds, plan)
        self._finish(finished)

    def _loop(self):
        """The step-by-step loop: one SimPy event per step."""
        env, sched = self.env, self.scheduler
        while True:
            if not sched.has_unfinished():
                yield from self._idle()
                continue
            start = env.now
            plan = sched.step(start)
            if plan.is_empty:
                sched.commit(plan, _EMPTY, start)
                yield from self._idle()
                continue
            seconds, tokens = self._execute(plan)
            yield from self._run_step(plan, seconds, start, tokens)

    def _loop_fast(self):
        """The same loop, its steps up to the next other event run in C++ (csrc/sim/fast_forward.h)."""
        env, sched = self.env, self.scheduler
        while True:
            if not sched.has_unfinished():
                yield from self._idle()
                continue
            r = self._fast.advance(
                sched,
                env.now,
                env.peek(),
                self.metrics.next_sample_time(self.index),
                self.metrics.sample_interval(),
                self._token_at,
            )
            self._token_at = r.token_at
            if r.num_steps:
                self.metrics.on_steps(self, r)
            plan = r.plan
            if plan is not None and not plan.is_empty:
                yield from self._run_step(plan, r.plan_seconds, r.now)
                continue
            if r.now != env.now:
                yield self._timeout_at(r.now)  # the end of the last step run in C++
            self._finish(r.finished)
            if plan is not None:  # empty: requests are blocked
                sched.commit(plan, _EMPTY, r.now)
                yield from self._idle()

    def _timeout_at(self, when: float) -> simpy.Event:
        """A timeout that fires exactly at `when` (>= now), as the step-by-step loop's does.

        SimPy schedules at `now + delay`, and no float delay need round to `when` (with round-half-even,
        sums of a fixed `now` and consecutive delays can skip it): the event is queued at `when`
        itself, taking one event id as a Timeout would (SimPy 4's Environment._queue and _eid, as
        sim/cluster_fast.py does)."""
        if when < self.env.now:
            raise ValueError(f"a timeout at {when} is in the past (now {self.env.now})")
        event = simpy.Event(self.env)
        event._ok, event._value = True, None
        heapq.heappush(self.env._queue, (when, NORMAL, next(self.env._eid), event))
        return event


class Router:
    """Chooses a replica for each model call with a router policy (csrc/policies.h, RouterPolicy).

    `policy` is a spec naming a registered router, C++ or Python (``policy_names("router")``):
        round_robin: in turn.
        least_loaded: fewest requests in flight (ties: lowest index).
        session_affinity: a session's calls stay on the replica of its first call,
            which is chosen least-loaded.
        prefix_aware: most prompt tokens already in the replica's prefix cache,
            ties broken by load.
    Every decision is checked (an index out of range is a PolicyError naming the router).
    """

    def __init__(self, policy: str, replicas: Sequence[Replica]) -> None:
        self.policy = policy
        self.replicas = list(replicas)
        self._router = cp.policies.Router(policy)
        self._prefix = self._router.needs_prefix_match
        self._calls = 0

    def route(self, prompt: np.ndarray, session_id: str, now: float = 0.0) -> Replica:
        if len(self.replicas) == 1:
            return self.replicas[0]
        views = [
            cp.policies.ReplicaView(
                r.index,
                r.load,
                r.scheduler.num_available_blocks,
                r.scheduler.config.num_blocks,
                r.scheduler.cached_prefix_tokens(prompt) if self._prefix else 0,
            )
            for r in self.replicas
        ]
        self._calls += 1
        chosen = self._router.route(self._calls, session_id or "", int(len(prompt)), float(now), views)
        return self.replicas[chosen]

    def forget(self, session_id: str) -> None:
        self._router.end_session(session_id)
