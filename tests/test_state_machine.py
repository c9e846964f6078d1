"""Random sequences of add/step/commit/abort/end_session/advance-time over small pools.

Small pools make eviction and preemption frequent. After every rule the C++
invariants are checked (blocks conserved, reference counts equal holders,
nothing both free and held, cached blocks hash to their tokens, no block
writable by two requests, evictable count equals what the index can evict).
Every finished request's tokens must equal the toy model's reference output,
which holds only if every plan addressed the right KV. At teardown arrivals
stop and every request must finish (liveness).
"""

from __future__ import annotations

import numpy as np
from hypothesis import event, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import controlplane as cp
from controlplane.testing import ToyModel, reference_generate

VOCAB = 61
PREFIXES = [list(range(1, 13)), list(range(20, 29)), [5, 5, 5, 5, 5, 5, 5]]


class ControlPlaneMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([2, 4]),
        num_blocks=st.integers(12, 28),
        num_host_blocks=st.sampled_from([0, 6, 24]),
        max_num_seqs=st.integers(1, 6),
        budget=st.integers(1, 24),
        chunk=st.integers(1, 16),
        ordering=st.sampled_from(cp.policy_names("ordering")),
        eviction=st.sampled_from(cp.policy_names("eviction")),
        preemption=st.sampled_from(cp.policy_names("preemption")),
        ttl=st.sampled_from([0.5, 3.0, 50.0]),
        caching=st.booleans(),
    )
    def setup(self, block_size, num_blocks, num_host_blocks, max_num_seqs, budget, chunk,
              ordering, eviction, preemption, ttl, caching):
        if eviction == "ttl":
            eviction = f"ttl:ttl={ttl}"
        self.max_model_len = 40
        self.sched = cp.Scheduler(
            num_blocks=num_blocks, block_size=block_size, num_host_blocks=num_host_blocks,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, chunk_size=chunk,
            max_model_len=self.max_model_len, vocab_size=VOCAB, enable_prefix_caching=caching,
            ordering=ordering, eviction=eviction, preemption=preemption)
        self.model = ToyModel.for_scheduler(self.sched.config)
        self.capacity_tokens = num_blocks * block_size
        self.now = 0.0
        self.next_id = 0
        self.live: dict[int, tuple[list[int], int, tuple[int, ...]]] = {}
        self.sessions: set[str] = set()
        self.pending = None

    # -- arrivals -------------------------------------------------------------
    @precondition(lambda self: self.pending is None)
    @rule(prefix=st.sampled_from(range(len(PREFIXES) + 1)),
          suffix=st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=10),
          max_new=st.integers(1, 12), session=st.sampled_from([None, "s1", "s2", "s3"]),
          priority=st.integers(0, 3), namespace=st.sampled_from([None, "tenant-b"]),
          stop=st.sampled_from([(), (3,), (7, 11)]))
    def add(self, prefix, suffix, max_new, session, priority, namespace, stop):
        self._add(prefix, suffix, max_new, session, priority, namespace, stop)

    @precondition(lambda self: self.pending is None)
    @rule(seeds=st.lists(st.integers(0, 2**16), min_size=2, max_size=6))
    def add_burst(self, seeds):
        for seed in seeds:
            rng = np.random.default_rng(seed)
            suffix = list(rng.integers(0, VOCAB, size=int(rng.integers(0, 8))))
            self._add(int(rng.integers(0, len(PREFIXES) + 1)), [int(t) for t in suffix],
                      int(rng.integers(1, 12)), [None, "s1", "s2"][seed % 3], seed % 4,
                      None if seed % 5 else "tenant-b", () if seed % 2 else (3,))

    def _add(self, prefix, suffix, max_new, session, priority, namespace, stop):
        prompt = (PREFIXES[prefix] if prefix < len(PREFIXES) else []) + suffix
        if not prompt:
            prompt = [1]
        longest = min(len(prompt) + max_new, self.max_model_len) - 1
        if len(prompt) >= self.max_model_len or longest > self.capacity_tokens:
            return
        rid = self.next_id
        self.next_id += 1
        self.sched.add_request(rid, prompt, max_new_tokens=max_new, stop_token_ids=stop,
                               arrival_time=self.now, session_id=session, priority=priority,
                               cache_namespace=namespace)
        self.live[rid] = (prompt, max_new, stop)
        if session:
            self.sessions.add(session)

    # -- the loop ---------------------------------------------------------------
    @precondition(lambda self: self.pending is None)
    @rule(dt=st.sampled_from([0.0, 0.1, 1.0]), steps=st.integers(1, 6))
    def step_and_commit(self, dt, steps):
        for _ in range(steps):
            plan = self.sched.step(self.now)
            tokens, _ = self.model.run(plan)
            self.now += dt
            self._commit(plan, tokens)
            self.sched.check_invariants()

    @precondition(lambda self: self.pending is None)
    @rule()
    def step_only(self):
        plan = self.sched.step(self.now)
        self.pending = (plan, self.model.run(plan)[0])

    @precondition(lambda self: self.pending is not None)
    @rule()
    def commit_pending(self):
        plan, tokens = self.pending
        self.pending = None
        self._commit(plan, tokens)

    def _commit(self, plan, tokens):
        for f in self.sched.commit(plan, tokens, self.now):
            self._check_finished(f)

    def _check_finished(self, f):
        prompt, max_new, stop = self.live.pop(f.request_id)
        out = list(f.output_token_ids)
        assert out == reference_generate(prompt, len(out), VOCAB)
        assert 1 <= len(out) <= max_new
        if f.finish_reason == "stop":
            assert out[-1] in stop
        elif f.finish_reason == "length":
            assert len(out) == max_new
        else:
            assert f.finish_reason == "model_length"
            assert len(prompt) + len(out) == self.max_model_len
        assert not any(t in stop for t in out[:-1])

    @rule(data=st.data())
    def abort(self, data):
        if not self.live:
            return
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.sched.abort(rid, self.now)
        # Aborted while in the plan in flight: it is released at that commit.
        self.live.pop(rid)

    @rule(session=st.sampled_from(["s1", "s2", "s3"]))
    def end_session(self, session):
        self.sched.end_session(session, self.now)

    @rule(dt=st.sampled_from([0.5, 2.0, 10.0, 100.0]))
    def advance_time(self, dt):
        self.now += dt

    @invariant()
    def invariants_hold(self):
        if hasattr(self, "sched"):
            self.sched.check_invariants()

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        if self.pending is not None:
            self.commit_pending()
        # Liveness: arrivals stop, time keeps moving; everything finishes.
        for _ in range(5000):
            if not self.sched.has_unfinished():
                break
            plan = self.sched.step(self.now)
            tokens, _ = self.model.run(plan)
            self.now += 0.5 if not plan.is_empty else 100.0
            self._commit(plan, tokens)
            self.sched.check_invariants()
        assert not self.sched.has_unfinished(), f"livelock: {self.sched.stats().as_dict()}"
        assert not self.live, f"requests never reported: {sorted(self.live)}"
        stats = self.sched.stats()
        for name in ("num_preemptions_recompute", "num_preemptions_swap", "num_evicted_blocks",
                     "cached_tokens", "num_aborted"):
            event(f"{name} > 0: {getattr(stats, name) > 0}")
        assert stats.num_used_blocks == 0 and stats.num_running == 0
        assert stats.num_free_host_blocks == stats.num_host_blocks


TestControlPlaneMachine = ControlPlaneMachine.TestCase
