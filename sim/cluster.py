"""Replicas as SimPy processes on the shared control plane, and the router in front of them.

A replica runs the engine core's loop (`controlplane.loop_step`'s) with a step-cost model in place
of the GPU::

    plan = controlplane.plan_step(scheduler, env.now)    # empty: nothing runnable, wait
    yield env.timeout(cost_model.step_seconds(plan))      # the step "runs"
    finished = scheduler.commit(plan, tokens, env.now)

Every scheduling and KV decision is the C++ scheduler's; this file only moves
simulated time and hands finished requests back to the sessions waiting on them.

That loop, one SimPy event per step, is the reference. The fast path (`sim.fast_forward`, on by
default) runs the same loop for every replica in C++ (sim/cluster_fast.py; a cluster of one
replica is a cluster): the same steps, times, tokens and metrics, with far fewer SimPy events.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import simpy

import controlplane as cp


class StepRun(NamedTuple):
    """Committed steps as the metrics take them (`on_steps`): one entry per step in commit order,
    and the KV samples taken after them, (step start, replica, used, cached, free blocks). The fast
    path's `sim._native.ClusterResult` has the same fields."""

    starts: Sequence[float]
    seconds: Sequence[float]
    num_tokens: Sequence[int]
    num_reqs: Sequence[int]
    samples: list


class Replica:
    """One engine replica driving its own scheduler: one GPU, or a tensor-parallel group of
    `model.tensor_parallel_size` GPUs running each step together (one scheduler; its cost model
    prices a step of the group, collectives included, and its KV blocks span the ranks).

    Args:
        env: the SimPy environment (its clock is the only clock).
        index: replica number.
        config: the control-plane config.
        cost_model: `step_seconds(plan) -> float` (its `native` evaluator drives the fast path).
        metrics: takes the committed steps, `on_steps(run)` with a `StepRun`, after each commit;
            the replica samples its KV usage after the first step starting at or after 0, then
            after the first one starting `metrics.sample_interval_s` later, and so on.
        idle_wait_s: when the scheduler makes an empty plan although requests are
            waiting (blocked, e.g. on pinned KV), re-plan after this long or at the next arrival.
        seed: seeds the synthetic output token ids.
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
        driven: bool = False,
        scheduler: cp.Scheduler | None = None,
        lookahead=None,
    ) -> None:
        self.env = env
        self.index = index
        self.scheduler = cp.Scheduler(config) if scheduler is None else scheduler
        native = getattr(cost_model, "native", None)
        if native is not None and not self.scheduler.has_step_cost:
            # what an admission policy predicts step times with (scheduler.admission; unused by "all")
            self.scheduler.set_step_cost(native)
        self.cost_model = cost_model
        self.lookahead = lookahead  # a sim.lookahead.Lookahead, asked between steps (the reference loop only)
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self.vocab_size = config.vocab_size
        self.pending: dict[int, simpy.Event] = {}
        self.sessions: set[str] = set()
        rng = np.random.default_rng([seed, index, 0x70C])
        self._token_pool = rng.integers(0, config.vocab_size, size=1 << 16, dtype=np.int64)
        self._token_at = 0
        self._sample_at = 0.0
        self._wake: simpy.Event | None = None
        if not driven:
            self.process = env.process(self._loop())

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
        """Synthetic sampled token ids (the simulator has no model); csrc/sim/cluster_forward.cpp takes the same."""
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

    def _loop(self):
        """The reference loop, one SimPy event per step (csrc/sim/cluster_forward.cpp runs the same in C++)."""
        env, sched = self.env, self.scheduler
        while True:
            if not sched.has_unfinished():
                yield from self._idle()
                continue
            start = env.now
            plan = cp.plan_step(sched, start)
            if plan.is_empty:
                yield from self._idle()
                continue
            seconds, tokens = self._execute(plan)
            yield env.timeout(seconds)
            if tokens is None:
                tokens = self._tokens(plan.num_sampled)
            finished = sched.commit(plan, tokens, env.now)
            samples = []
            if start >= self._sample_at:  # KV usage after this step, once per sample interval
                self._sample_at = start + self.metrics.sample_interval_s
                st = sched.stats()
                samples.append((start, self.index, st.num_used_blocks, st.num_cached_blocks, st.num_free_blocks))
            self.metrics.on_steps(StepRun((start,), (seconds,), (plan.num_tokens,), (plan.num_reqs,), samples))
            self._finish(finished)
            if self.lookahead is not None:
                self.lookahead.on_step(sched, env.now)


class Router:
    """Chooses a replica for each model call with a router policy (csrc/policies.h, RouterPolicy).

    `policy` is a spec naming a registered router, C++ or Python (``policy_names("router")``):
        round_robin: in turn.
        least_loaded: fewest requests in flight (ties: lowest index).
        session_affinity: a session's calls stay on the replica of its first call,
            which is chosen least-loaded.
        prefix_aware: most prompt tokens already in the replica's prefix cache,
            ties broken by load.
        floor_aware:tok_s=70: of the replicas whose decode step with this call stays within 1 / tok_s
            (each one's step-cost model), prefix_aware's choice; if none is, prefix_aware's among all.
    Every decision is checked (an index out of range is a PolicyError naming the router).
    """

    def __init__(self, policy: str, replicas: Sequence[Replica]) -> None:
        self.policy = policy
        self.replicas = list(replicas)
        self._router = cp.policies.Router(policy)
        self._prefix = self._router.needs_prefix_match
        self._predict = self._router.needs_step_prediction
        if self._predict and len(self.replicas) > 1:
            blind = [r.index for r in self.replicas if not r.scheduler.has_step_cost]
            if blind:
                raise ValueError(
                    f"router {policy!r} predicts each replica's decode step, but replicas {blind} have no step "
                    f"cost (a cost model with a C++ evaluator sets one)"
                )
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
                r.scheduler.predicted_decode_seconds(len(prompt)) if self._predict else 0.0,
            )
            for r in self.replicas
        ]
        self._calls += 1
        chosen = self._router.route(self._calls, session_id or "", int(len(prompt)), float(now), views)
        return self.replicas[chosen]

    def forget(self, session_id: str) -> None:
        self._router.end_session(session_id)
