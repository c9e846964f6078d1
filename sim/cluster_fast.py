"""The simulator's fast path: every replica's steps, merged in C++ (csrc/sim/cluster_forward.h).

Between two events of the rest of the simulation (an arrival, a tool pause ending, a session
reacting to a finish) nothing but the replicas' own steps happens, so one `ClusterDriver` runs
every replica's loop (one replica or several: a cluster of one is a cluster): the C++ side
commits the busy replicas' steps in the order SimPy would have processed their step-end
timeouts in the reference loop (`Replica._loop`), up to the next entry of SimPy's queue; Python
acts only where the reference loop would have done something another process can see (a
finish, a replica going idle), at that step's own queue position.

A queue position is SimPy's `(time, priority, eid)`. Each plan takes the eid its timeout would
have taken from `env._eid` in the reference loop (same order of creation relative to every
other event), and the driver's own events are put in `env._queue` at exactly such positions. So
ties with other events at the same simulated time resolve as in the reference loop, and every
plan, commit time, token and metric is the same (tests/test_sim_fast_forward.py). This class is
the one user of two SimPy 4 internals, `Environment._queue` and `Environment._eid`.

    queue:  ... (t1, N, e1: driver) ... (t2, N, e2: arrival) ...
    driver at t1:  commit all replica steps before (t2, N, e2), in (end, eid) order
                   -> stops early at a finish / an idle replica: resumed at that step's position
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Sequence

import simpy
from simpy.events import NORMAL

from sim import _native


class ClusterDriver:
    """Runs the loops of `Replica`s (made with `driven=True`) on one `sim._native.ClusterForward`.

    Args:
        env: the SimPy environment.
        replicas: the replicas, indexed 0..n-1; their cost model must have a `native` evaluator.
        metrics: the Collector; takes each run of committed steps, `on_steps(result)`, and says the KV
            sampling interval (`sample_interval_s`), as for the reference loop.
    """

    def __init__(self, env: simpy.Environment, replicas: Sequence, metrics) -> None:
        self.env = env
        self.replicas = list(replicas)
        self.metrics = metrics
        native = self.replicas[0].cost_model.native
        self._cf = _native.ClusterForward(
            native,
            [r.scheduler for r in self.replicas],
            [r._token_pool for r in self.replicas],
            [0.0] * len(self.replicas),  # first KV samples: after each replica's first step
            metrics.sample_interval_s,
        )
        self._queued: list[tuple[float, int]] = []  # positions (time, eid) of the driver's events in env._queue
        self._stop = None  # (position, ClusterResult): a replica's commit whose follow-up is due there
        for replica in self.replicas:
            self._idle(replica)

    def _schedule(self, when: float, eid: int) -> None:
        """Puts a driver event into SimPy's queue at position (when, NORMAL, eid)."""
        event = simpy.Event(self.env)
        event._ok, event._value = True, None
        event.callbacks.append(self._on_event)
        heapq.heappush(self.env._queue, (when, NORMAL, eid, event))
        heapq.heappush(self._queued, (when, eid))

    def _on_event(self, _event) -> None:
        position = heapq.heappop(self._queued)  # SimPy pops positions in order: this is the smallest
        if self._stop is not None and self._stop[0] == position:
            _, result = self._stop
            self._stop = None
            self._resolve(result)
        self._run()

    def _run(self) -> None:
        """Commits steps up to the next other event of SimPy's queue; Python follow-ups in between."""
        env, queue, queued = self.env, self.env._queue, self._queued
        while True:
            while queue and queued and queue[0][0] == queued[0][0] and queue[0][2] == queued[0][1]:
                heapq.heappop(queue)  # a driver event next: this run covers it
                heapq.heappop(queued)
            h = queue[0] if queue else (math.inf, NORMAL, 0)
            r = self._cf.advance(h[0], h[1], h[2], next(env._eid))
            env._eid = itertools.count(r.next_eid)
            if r.num_steps:
                self.metrics.on_steps(r)
            if r.stopped < 0:
                break
            if r.stop_time != env.now:  # resume at that step's own queue position
                self._stop = ((r.stop_time, r.stop_eid), r)
                self._schedule(r.stop_time, r.stop_eid)
                return
            self._resolve(r)
        self._ensure_event()

    def _resolve(self, r) -> None:
        """What the replica's reference loop does after that commit (its `_finish`, then its next plan)."""
        replica = self.replicas[r.stopped]
        if r.finished:
            replica._finish(r.finished)
        if r.idle:
            self._idle(replica)
        else:
            self._continue(replica)

    def _continue(self, replica) -> None:
        """The top of `Replica._loop` at env.now: plan a step, or wait."""
        if not replica.scheduler.has_unfinished() or not self._cf.start(
            replica.index, self.env.now, next(self.env._eid)
        ):
            self._idle(replica)

    def _idle(self, replica) -> None:
        """`Replica._idle`: wait for an arrival (or `idle_wait_s`, when requests are blocked)."""
        replica._wake = wake = self.env.event()
        cond = wake | self.env.timeout(replica.idle_wait_s) if replica.scheduler.has_unfinished() else wake
        cond.callbacks.append(lambda _event, r=replica: self._woken(r))

    def _woken(self, replica) -> None:
        replica._wake = None
        self._continue(replica)
        self._ensure_event()

    def _ensure_event(self) -> None:
        """A driver event at the earliest busy replica's step end, unless one comes at or before it."""
        end, eid = self._cf.next()
        if eid >= 0 and not (self._queued and self._queued[0] <= (end, eid)):
            self._schedule(end, eid)
