"""The policy conformance suite: properties every registered policy must keep.

For one policy spec of one kind (the other kinds drawn from the built-in ones), Hypothesis drives the
scheduler through random sequences of operations -- arrivals (with shared prefixes,
sessions, priorities, cache namespaces, stop tokens), steps and commits, a step left in
flight, aborts, session ends and time jumps -- over pools small enough that eviction,
retention and preemption happen all the time. After every operation:

* the control-plane invariants hold (``check_invariants``: blocks conserved, reference
  counts equal holders, nothing both free and held, cached blocks hash to their tokens,
  no block writable by two requests);
* each plan stays within the capacity the scheduler was given: at most
  ``max_num_batched_tokens`` tokens, ``max_num_seqs`` requests, ``chunk_size`` tokens of one
  request (with an ``idle_chunk_size`` above ``chunk_size``, a step no decode waits in -- no
  running or swapped-out request has output and all but its last token computed -- may take
  up to that many tokens of one request, and as many in all if more than
  ``max_num_batched_tokens``), swap-outs into host blocks that exist, each request at most once;
* every finished request's tokens equal the toy model's reference output (they do only if
  every plan addressed the right KV: see controlplane/testing.py).

At the end, arrivals stop and time moves on: every request must finish (no starvation), and
the whole operation sequence replayed on a fresh scheduler with a fresh instance of the
policy must give exactly the same plans (determinism). Routers get the same treatment over a
small cluster (:func:`check_router`). On failure Hypothesis prints the smallest operation
sequence it found that breaks the property, as runnable steps.

Run it for one policy with ``make check-policy POLICY=name`` (see docs/policies.md).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from controlplane.config import SchedulerConfig
from controlplane.policies import KINDS, policy_names, python_policy_names
from controlplane.testing import ToyModel, reference_generate

VOCAB = 61
PREFIXES = [list(range(1, 13)), list(range(20, 29)), [5, 5, 5, 5, 5, 5, 5]]
MAX_MODEL_LEN = 40
TOY = {"max_model_len": MAX_MODEL_LEN, "vocab_size": VOCAB}  # the toy model's, in every SchedulerConfig here
SCHEDULER_KINDS = ("ordering", "eviction", "preemption", "admission")
ALL_KINDS = KINDS + ("admission",)  # admission policies are C++ only (not in controlplane.policies.KINDS)


def toy_step_cost():
    """The step cost every scheduler here predicts with (an admission policy's): 5 ms a step and 1 ms a
    token, so that tps_floor's default 70 tokens/s leaves room for 9 tokens a step: it binds at these sizes."""
    from sim import _native  # the evaluator's binding lives in the simulator's module

    return _native.StepCost.roofline(0.0, 0.0, [], [(0.005, 0.001)], 0.0, 0.0, 0.0, 0.0, 0.0)


class ConformanceError(AssertionError):
    """A policy broke one of the suite's properties."""


def _default_spec(kind: str, name: str, ttl: float) -> str:
    return f"ttl:ttl={ttl}" if (kind, name) == ("eviction", "ttl") else name


def plan_digest(plan) -> tuple:
    """What a plan decided, for exact comparison."""
    return (
        tuple(plan.req_ids.tolist()),
        tuple(plan.query_lens.tolist()),
        tuple(plan.cached_lens.tolist()),
        tuple(plan.slot_mapping.tolist()),
        tuple(plan.kv_ops.tolist()),
        tuple(plan.preempted_ids.tolist()),
    )


class Driver:
    """Applies operations to one scheduler and its toy model, checking each plan and result."""

    def __init__(self, setup: SchedulerConfig) -> None:
        from controlplane.scheduler import Scheduler

        self.setup = setup
        self.sched = Scheduler(setup)
        self.sched.set_step_cost(toy_step_cost())
        self.model = ToyModel.for_scheduler(self.sched.config)
        self.now = 0.0
        self.live: dict[int, tuple[list[int], int, tuple[int, ...]]] = {}
        self.pending = None
        self.digests: list[tuple] = []
        self.outputs: dict[int, tuple] = {}

    # -- operations (each is replayable from its arguments) --------------------------
    def add(self, rid: int, prompt: list[int], max_new: int, session, priority: int, namespace, stop) -> None:
        self.sched.add_request(
            rid,
            prompt,
            max_new_tokens=max_new,
            stop_token_ids=stop,
            arrival_time=self.now,
            session_id=session,
            priority=priority,
            cache_namespace=namespace,
        )
        self.live[rid] = (prompt, max_new, stop)

    def step_commit(self, dt: float, steps: int) -> None:
        for _ in range(steps):
            plan = self._step()
            tokens, _ = self.model.run(plan)
            self.now += dt
            self._commit(plan, tokens)
            self.sched.check_invariants()

    def step_only(self) -> None:
        plan = self._step()
        self.pending = (plan, self.model.run(plan)[0])

    def commit_pending(self) -> None:
        plan, tokens = self.pending
        self.pending = None
        self._commit(plan, tokens)

    def abort(self, rid: int) -> None:
        self.sched.abort(rid, self.now)
        self.live.pop(rid)  # aborted while in the plan in flight: released at that commit

    def end_session(self, session: str) -> None:
        self.sched.end_session(session, self.now)

    def advance(self, dt: float) -> None:
        self.now += dt

    def drain(self, max_steps: int = 5000) -> None:
        """Arrivals have stopped; time keeps moving until everything finishes."""
        if self.pending is not None:
            self.commit_pending()
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                break
            plan = self._step()
            tokens, _ = self.model.run(plan)
            self.now += 0.5 if not plan.is_empty else 100.0
            self._commit(plan, tokens)
            self.sched.check_invariants()
        if self.sched.has_unfinished():
            raise ConformanceError(
                f"starvation: requests still unfinished after {max_steps} steps with no "
                f"arrivals: {self.sched.stats().as_dict()}"
            )
        if self.live:
            raise ConformanceError(f"requests never reported as finished: {sorted(self.live)}")
        stats = self.sched.stats()
        if stats.num_used_blocks or stats.num_running or stats.num_free_host_blocks != stats.num_host_blocks:
            raise ConformanceError(f"resources held after every request finished: {stats.as_dict()}")

    # -- checks -----------------------------------------------------------------------
    def decode_waits(self) -> bool:
        """A running or swapped-out request's next token is a decode (SchedulerConfig.idle_chunk_size)."""
        for rid in self.live:
            r = self.sched.request_info(rid)
            if (
                (r["state"] in ("PREFILLING", "DECODING") or r["swapped"])
                and r["num_tokens"] > r["num_prompt_tokens"]
                and r["num_computed_tokens"] + 1 == r["num_tokens"]
            ):
                return True
        return False

    def _step(self):
        s = self.setup
        idle = s.idle_chunk_size > s.chunk_size and not self.decode_waits()
        budget = max(s.max_num_batched_tokens, s.idle_chunk_size) if idle else s.max_num_batched_tokens
        chunk, chunk_name = (s.idle_chunk_size, "idle_chunk_size") if idle else (s.chunk_size, "chunk_size")
        plan = self.sched.step(self.now)
        q = plan.query_lens
        if plan.num_tokens > budget:
            raise ConformanceError(
                f"plan has {plan.num_tokens} tokens > its budget {budget} (max_num_batched_tokens "
                f"{s.max_num_batched_tokens}{', no decode waits' if idle else ''})"
            )
        if plan.num_reqs > s.max_num_seqs:
            raise ConformanceError(f"plan has {plan.num_reqs} requests > max_num_seqs {s.max_num_seqs}")
        if len(q) and (q.max() > chunk or q.min() < 1):
            raise ConformanceError(f"query lengths {q.tolist()} outside [1, {chunk_name}={chunk}]")
        if len(set(plan.req_ids.tolist())) != plan.num_reqs:
            raise ConformanceError(f"a request appears twice in one plan: {plan.req_ids.tolist()}")
        for op, _src, dst in plan.kv_ops.tolist():
            if op == 0 and not 0 <= dst < s.num_host_blocks:
                raise ConformanceError(f"swap-out into host block {dst} of {s.num_host_blocks}")
        self.digests.append(plan_digest(plan))
        return plan

    def _commit(self, plan, tokens) -> None:
        for f in self.sched.commit(plan, tokens, self.now):
            self._check_finished(f)

    def _check_finished(self, f) -> None:
        prompt, max_new, stop = self.live.pop(f.request_id)
        out = list(f.output_token_ids)
        self.outputs[f.request_id] = (f.finish_reason, tuple(out))
        if out != reference_generate(prompt, len(out), VOCAB):
            raise ConformanceError(
                f"request {f.request_id} produced tokens that its context does not give: "
                "some plan addressed the wrong KV"
            )
        if not 1 <= len(out) <= max_new:
            raise ConformanceError(f"request {f.request_id} finished with {len(out)} tokens (max {max_new})")
        if f.finish_reason == "stop":
            assert out[-1] in stop
        elif f.finish_reason == "length":
            assert len(out) == max_new
        else:
            assert f.finish_reason == "model_length" and len(prompt) + len(out) == MAX_MODEL_LEN
        assert not any(t in stop for t in out[:-1])


def _kind_strategy(kind: str, fixed: dict[str, str]):
    """The fixed spec, or any built-in (C++) policy: the policy under test is checked with the reference ones."""
    if kind in fixed:
        return st.just(fixed[kind])
    return st.sampled_from(sorted(set(policy_names(kind)) - set(python_policy_names(kind))))


def make_machine(fixed: dict[str, str] | None = None) -> type[RuleBasedStateMachine]:
    """A state machine with the given policy specs fixed (e.g. ``{"eviction": "ttl:ttl=3"}``)."""
    fixed = dict(fixed or {})
    for kind in fixed:
        if kind not in SCHEDULER_KINDS:
            raise ValueError(f"the scheduler suite fixes ordering, eviction, preemption or admission, not {kind!r}")

    class PolicyMachine(RuleBasedStateMachine):
        @initialize(
            block_size=st.sampled_from([2, 4]),
            num_blocks=st.integers(12, 28),
            num_host_blocks=st.sampled_from([0, 6, 24]),
            max_num_seqs=st.integers(1, 6),
            budget=st.integers(1, 24),
            chunk=st.integers(1, 16),
            ordering=_kind_strategy("ordering", fixed),
            eviction=_kind_strategy("eviction", fixed),
            preemption=_kind_strategy("preemption", fixed),
            admission=_kind_strategy("admission", fixed),
            ttl=st.sampled_from([0.5, 3.0, 50.0]),
            caching=st.booleans(),
            lookahead=st.sampled_from([0, 0, 1, 2]),
            idle_chunk=st.sampled_from([0, 0, 12, 32]),
        )
        def setup(
            self,
            block_size,
            num_blocks,
            num_host_blocks,
            max_num_seqs,
            budget,
            chunk,
            ordering,
            eviction,
            preemption,
            admission,
            ttl,
            caching,
            lookahead,
            idle_chunk,
        ):
            if "eviction" not in fixed:
                eviction = _default_spec("eviction", eviction, ttl)
            self.config = SchedulerConfig(
                num_blocks=num_blocks,
                block_size=block_size,
                num_host_blocks=num_host_blocks,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=budget,
                chunk_size=chunk,
                enable_prefix_caching=caching,
                ordering=ordering,
                eviction=eviction,
                preemption=preemption,
                admission=admission,
                num_lookahead_tokens=lookahead,
                idle_chunk_size=idle_chunk,
                **TOY,
            )
            self.driver = Driver(self.config)
            self.ops: list[tuple[str, tuple]] = []
            self.capacity_tokens = num_blocks * block_size
            self.next_id = 0

        def _do(self, name: str, *args) -> None:
            self.ops.append((name, args))
            getattr(self.driver, name)(*args)

        # -- arrivals ----------------------------------------------------------------
        @precondition(lambda self: self.driver.pending is None)
        @rule(
            prefix=st.sampled_from(range(len(PREFIXES) + 1)),
            suffix=st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=10),
            max_new=st.integers(1, 12),
            session=st.sampled_from([None, "s1", "s2", "s3"]),
            priority=st.integers(0, 3),
            namespace=st.sampled_from([None, "tenant-b"]),
            stop=st.sampled_from([(), (3,), (7, 11)]),
        )
        def add(self, prefix, suffix, max_new, session, priority, namespace, stop):
            self._add(prefix, suffix, max_new, session, priority, namespace, stop)

        @precondition(lambda self: self.driver.pending is None)
        @rule(seeds=st.lists(st.integers(0, 2**16), min_size=2, max_size=6))
        def add_burst(self, seeds):
            for seed in seeds:
                rng = np.random.default_rng(seed)
                suffix = [int(t) for t in rng.integers(0, VOCAB, size=int(rng.integers(0, 8)))]
                self._add(
                    int(rng.integers(0, len(PREFIXES) + 1)),
                    suffix,
                    int(rng.integers(1, 12)),
                    [None, "s1", "s2"][seed % 3],
                    seed % 4,
                    None if seed % 5 else "tenant-b",
                    () if seed % 2 else (3,),
                )

        def _add(self, prefix, suffix, max_new, session, priority, namespace, stop):
            prompt = (PREFIXES[prefix] if prefix < len(PREFIXES) else []) + list(suffix)
            if not prompt:
                prompt = [1]
            longest = min(len(prompt) + max_new, MAX_MODEL_LEN) - 1
            if len(prompt) >= MAX_MODEL_LEN or longest > self.capacity_tokens:
                return
            rid = self.next_id
            self.next_id += 1
            self._do("add", rid, prompt, max_new, session, priority, namespace, tuple(stop))

        # -- the loop ----------------------------------------------------------------
        @precondition(lambda self: self.driver.pending is None)
        @rule(dt=st.sampled_from([0.0, 0.1, 1.0]), steps=st.integers(1, 6))
        def step_and_commit(self, dt, steps):
            self._do("step_commit", dt, steps)

        @precondition(lambda self: self.driver.pending is None)
        @rule()
        def step_only(self):
            self._do("step_only")

        @precondition(lambda self: self.driver.pending is not None)
        @rule()
        def commit_pending(self):
            self._do("commit_pending")

        @rule(data=st.data())
        def abort(self, data):
            if not self.driver.live:
                return
            self._do("abort", data.draw(st.sampled_from(sorted(self.driver.live))))

        @rule(session=st.sampled_from(["s1", "s2", "s3"]))
        def end_session(self, session):
            self._do("end_session", session)

        @rule(dt=st.sampled_from([0.5, 2.0, 10.0, 100.0]))
        def advance_time(self, dt):
            self._do("advance", dt)

        @invariant()
        def invariants_hold(self):
            if hasattr(self, "driver"):
                self.driver.sched.check_invariants()

        def teardown(self):
            if not hasattr(self, "driver"):
                return
            self._do("drain")
            stats = self.driver.sched.stats()
            for name in (
                "num_preemptions_recompute",
                "num_preemptions_swap",
                "num_evicted_blocks",
                "cached_tokens",
                "num_aborted",
            ):
                event(f"{name} > 0: {getattr(stats, name) > 0}")
            # Determinism: the same operations on a fresh scheduler and policy give the same plans.
            replay = Driver(self.config)
            for i, (name, args) in enumerate(self.ops):
                try:
                    getattr(replay, name)(*args)
                except Exception as exc:  # noqa: BLE001 - the first run accepted this operation
                    raise ConformanceError(
                        f"not deterministic: replaying the same operations failed at operation "
                        f"{i} ({name}{args}): {exc!r} ({self.config})"
                    ) from exc
            if replay.digests != self.driver.digests or replay.outputs != self.driver.outputs:
                first = next(
                    (i for i, (a, b) in enumerate(zip(replay.digests, self.driver.digests)) if a != b),
                    min(len(replay.digests), len(self.driver.digests)),
                )
                raise ConformanceError(
                    f"not deterministic: replaying the same operations gave a different plan "
                    f"at step {first} ({self.config})"
                )

    return PolicyMachine


# -- routers -------------------------------------------------------------------------------

_ROUTER_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("call"), st.integers(0, 4), st.integers(0, len(PREFIXES)), st.integers(0, 6), st.integers(1, 6)
        ),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("end"), st.integers(0, 4)),
    ),
    max_size=40,
)


def _run_router(spec: str, num_replicas: int, ops: list[tuple]) -> list[int]:
    from controlplane.policies import ReplicaView, Router

    router = Router(spec)
    setup = SchedulerConfig(num_blocks=24, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, chunk_size=8, **TOY)
    drivers = [Driver(setup) for _ in range(num_replicas)]
    choices: list[int] = []
    rid = 0

    def step_all():
        for d in drivers:
            if d.sched.has_unfinished():
                d.step_commit(0.1, 1)
            else:
                d.advance(0.1)

    for op in ops:
        if op[0] == "call":
            _, session, prefix, suffix, max_new = op
            prompt = (PREFIXES[prefix] if prefix < len(PREFIXES) else []) + [
                (rid * 7 + k) % VOCAB for k in range(suffix)
            ]
            prompt = prompt or [1]
            views = [
                ReplicaView(
                    i,
                    len(d.live),
                    d.sched.num_available_blocks,
                    setup.num_blocks,
                    d.sched.cached_prefix_tokens(prompt) if router.needs_prefix_match else 0,
                )
                for i, d in enumerate(drivers)
            ]
            chosen = router.route(rid, f"s{session}", len(prompt), drivers[0].now, views)
            choices.append(chosen)
            drivers[chosen].add(rid, prompt, max_new, f"s{session}", 0, None, ())
            rid += 1
        elif op[0] == "step":
            for _ in range(op[1]):
                step_all()
        else:
            router.end_session(f"s{op[1]}")
            for d in drivers:
                d.end_session(f"s{op[1]}")
    for d in drivers:
        d.drain()
    return choices


def check_router(spec: str, max_examples: int | None = None, **overrides: Any) -> None:
    """Runs the router properties for `spec`: valid choices, determinism, every call finishes.

    `overrides` are further Hypothesis settings (e.g. ``derandomize=False, database=None``)."""

    extra = dict(overrides, **({"max_examples": max_examples} if max_examples else {}))

    @settings(**extra) if extra else (lambda f: f)
    @given(num_replicas=st.integers(2, 3), ops=_ROUTER_OPS)
    def router_properties(num_replicas, ops):
        first = _run_router(spec, num_replicas, ops)
        if first != _run_router(spec, num_replicas, ops):
            raise ConformanceError(f"router {spec!r} is not deterministic: the same calls went elsewhere")

    router_properties()


def suite_specs(extra: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
    """(kind, spec) for every registered policy of every kind, plus `extra` parametrisations."""
    out = [(kind, name) for kind in ALL_KINDS for name in sorted(policy_names(kind))]
    for kind, specs in (extra or {}).items():
        out += [(kind, spec) for spec in specs]
    return out


def run_machine(kind: str, spec: str, configure: Callable[[Any], Any] | None = None) -> None:
    """Runs the scheduler state machine with `spec` fixed for `kind` (pytest calls this)."""
    machine = make_machine({kind: spec})
    case = machine.TestCase
    if configure is not None:
        case.settings = configure(case.settings)
    case().runTest()
