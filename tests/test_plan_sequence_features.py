"""The plan features that depend on a plan's rows and on its place in the sequence (csrc/scheduler.h, Plan).

    num_decode_reqs / decode_kv_tokens   the rows with q == 1: their count and their sum of c + 1
    follows_decode     the last non-empty plan committed was a pure decode (T == R == S) with a row
                       that went on after it: an engine with overlapped decode launched a guess of this step
    continues_decode   that, and this plan is a pure decode of requests all in that plan (the guess is right)

An empty plan committed in between changes nothing. The simulator's fast path (csrc/fast_forward.h)
prices the same flags as the step-by-step loop.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import controlplane as cp
from experiments.engine_replica import RecordingReplica, StepLog
from sim.profile_cost import ProfileCost, ProfilePath
from sim.simulation import Simulation
from sim.specs import load_hardware_spec, load_model_spec

VOCAB = 1000
EOS = 7


def pure_decode(plan) -> bool:
    return plan.num_reqs > 0 and plan.num_tokens == plan.num_reqs == plan.num_sampled


class Reference:
    """The documented rule, written out over the committed plans."""

    def __init__(self) -> None:
        self.guess: set[int] | None = None  # the requests of the plan an engine guessed a successor of

    def expected(self, plan) -> tuple[bool, bool]:
        if plan.num_reqs == 0:
            return False, False
        follows = self.guess is not None
        return follows, follows and pure_decode(plan) and set(plan.req_ids.tolist()) <= self.guess

    def committed(self, plan, finished_ids: set[int]) -> None:
        if plan.num_reqs == 0 and len(plan.kv_ops) == 0:
            return  # an empty plan: nothing ran, nothing was guessed or dropped
        going_on = [r for r, s in zip(plan.req_ids.tolist(), plan.sample.tolist()) if s and r not in finished_ids]
        self.guess = set(plan.req_ids.tolist()) if pure_decode(plan) and going_on else None


def check_rows(plan) -> None:
    q, c = plan.query_lens.astype(np.int64), plan.cached_lens.astype(np.int64)
    assert plan.num_decode_reqs == int((q == 1).sum())
    assert plan.decode_kv_tokens == int((c[q == 1] + 1).sum())
    assert plan.kv_read_tokens == int((c + q).sum())


class Driver:
    """A scheduler stepped by hand: each plan's flags against the reference, each plan's rows checked."""

    def __init__(self, eos_rate: float = 0.0, **config) -> None:
        self.eos_rate = eos_rate
        self.sched = cp.Scheduler(
            **{
                "num_blocks": 64,
                "block_size": 4,
                "vocab_size": VOCAB,
                "max_num_batched_tokens": 64,
                "chunk_size": 32,
                **config,
            }
        )
        self.ref = Reference()
        self.now = 0.0
        self.seen: list[tuple[bool, bool, bool]] = []  # (follows, continues, pure decode) of each plan
        self.rng = np.random.default_rng(0)
        self.live: set[int] = set()

    def add(self, rid: int, prompt_len: int, max_new: int, prompt=None, **kw) -> None:
        prompt = self.rng.integers(10, VOCAB, prompt_len) if prompt is None else prompt
        self.sched.add_request(rid, prompt, max_new_tokens=max_new, eos_token_id=EOS, arrival_time=self.now, **kw)
        self.live.add(rid)

    def step(self, tokens=None) -> tuple[bool, bool, set[int]]:
        """One step and its commit; returns (follows, continues, finished ids)."""
        plan = self.sched.step(self.now)
        check_rows(plan)
        want = self.ref.expected(plan)
        got = (bool(plan.follows_decode), bool(plan.continues_decode))
        assert got == want, (plan.step_id, plan.req_ids.tolist(), plan.query_lens.tolist(), got, want)
        n = plan.num_sampled
        if tokens is None:
            out = np.where(self.rng.random(n) < self.eos_rate, EOS, self.rng.integers(10, VOCAB, n))
        else:
            out = np.asarray(tokens, dtype=np.int64)
        self.now += 0.01
        finished = {f.request_id for f in self.sched.commit(plan, out, self.now)}
        self.ref.committed(plan, finished)
        self.live -= finished
        if plan.num_reqs:
            self.seen.append((got[0], got[1], pure_decode(plan)))
        return got[0], got[1], finished


def test_num_decode_reqs_and_decode_kv_tokens_are_the_q1_rows():
    d = Driver(max_num_batched_tokens=40, chunk_size=16)
    d.add(1, 30, 5)
    d.add(2, 3, 5)
    d.add(3, 50, 3)
    plan = d.sched.step(0.0)
    # 1: chunk of 16 (0 cached), 2: 3 tokens, 3: the rest of the budget
    assert plan.query_lens.tolist() == [16, 3, 16] and plan.num_decode_reqs == 0 and plan.decode_kv_tokens == 0
    d.sched.commit(plan, np.zeros(plan.num_sampled, dtype=np.int64) + 11, 0.01)
    plan = d.sched.step(0.01)
    # 1: its last 14 tokens; 2 decodes after its 3 prompt tokens + 1 output; 3: its next chunk
    rows = dict(zip(plan.req_ids.tolist(), zip(plan.query_lens.tolist(), plan.cached_lens.tolist())))
    assert rows[2] == (1, 3)
    assert plan.num_decode_reqs == 1 and plan.decode_kv_tokens == 3 + 1
    check_rows(plan)


def test_follows_and_continues_decode_step_by_step():
    d = Driver()
    d.add(1, 10, 4)  # finishes with its 4th token
    d.add(2, 10, 6)
    assert d.step()[:2] == (False, False)  # both prefills: nothing before
    assert d.step()[:2] == (False, False)  # first pure decode: the plan before was a prefill
    assert d.step()[:2] == (True, True)  # the engine's guess: the same two requests
    f, c, done = d.step()  # request 1's 4th token: it finishes, 2 goes on
    assert (f, c, done) == (True, True, {1})
    assert d.step()[:2] == (True, True)  # 2 alone: all of it was in the plan before
    d.add(3, 1, 3)  # a 1-token prompt: its first row is a decode row
    f, c, _ = d.step()
    assert (f, c) == (True, False)  # a pure decode, but 3 was not in the guessed plan
    assert d.step()[:2] == (True, True)
    d.add(4, 9, 2)  # a prefill joins: a mixed plan drops the guess ...
    assert d.step()[:2] == (True, False)
    assert d.step()[:2] == (False, False)  # ... and launches none


def test_a_request_finishing_alone_leaves_no_guess():
    d = Driver()
    d.add(1, 10, 3)
    d.step()  # prefill, token 1
    d.step()  # decode, token 2 (follows nothing)
    f, c, done = d.step()  # decode, token 3: finishes, no row goes on
    assert (f, c, done) == (True, True, {1})
    d.add(2, 1, 3)
    assert d.step()[:2] == (False, False)  # a pure decode, but no guess was launched before it


def test_a_request_stopping_at_eos_in_a_pure_decode_with_no_row_going_on_leaves_no_guess():
    d = Driver()
    d.add(1, 10, 20)
    d.step()
    d.step()
    f, c, done = d.step(tokens=[EOS])
    assert (f, c, done) == (True, True, {1})
    d.add(2, 1, 3)
    assert d.step()[:2] == (False, False)


def test_an_empty_plan_in_between_changes_nothing():
    for with_empty_plan in (False, True):
        d = Driver()
        d.add(1, 10, 20)
        d.step()
        d.step()  # a pure decode, request 1 going on: a guess is launched
        d.sched.abort(1, d.now)  # the client goes away
        if with_empty_plan:
            plan = d.sched.step(d.now)
            assert plan.is_empty and not plan.follows_decode and not plan.continues_decode
            d.sched.commit(plan, np.zeros(0, dtype=np.int64), d.now)
        d.add(2, 1, 3)
        # the guess of request 1's next step was launched and is dropped: 2 follows it either way
        assert d.step()[:2] == (True, False), with_empty_plan
        assert d.step()[:2] == (True, True)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_flags_follow_the_rule_over_a_random_run(preemption):
    """Arrivals, shared prefixes, 1-token prompts, EOS, aborts and preemptions; every plan checked."""
    d = Driver(
        eos_rate=0.01, num_blocks=32, num_host_blocks=80, preemption=preemption, max_num_seqs=6, num_lookahead_tokens=1
    )
    rng = np.random.default_rng(1 if preemption == "swap" else 2)
    prefix = rng.integers(10, VOCAB, 24)
    rid = aborted = 0
    for _ in range(600):
        if rng.random() < 0.12:
            kind = rng.integers(0, 3)
            n = 1 if kind == 0 else int(rng.integers(2, 40))
            prompt = np.concatenate([prefix, rng.integers(10, VOCAB, n)]) if kind == 2 else rng.integers(10, VOCAB, n)
            d.add(rid, len(prompt), int(rng.integers(1, 60)), prompt=prompt)
            rid += 1
        if rng.random() < 0.01 and d.sched.has_unfinished():
            victim = int(rng.choice(sorted(d.live)))
            d.sched.abort(victim, d.now)
            d.live.discard(victim)
            aborted += 1
        if d.sched.has_unfinished():
            d.step()
        else:
            d.now += 0.05
        d.sched.check_invariants()
    kinds = set(d.seen)
    assert (True, True, True) in kinds  # overlapped decodes that continue
    assert (True, False, True) in kinds  # pure decodes with a newcomer: a dropped guess
    assert (True, False, False) in kinds  # mixed plans after a decode: a dropped guess
    assert (False, False, False) in kinds and (False, False, True) in kinds
    stats = d.sched.stats()
    assert aborted > 0 and stats.cached_tokens > 0
    assert stats.num_preemptions_swap + stats.num_preemptions_recompute > 0
    assert (stats.num_preemptions_swap > 0) == (preemption == "swap")


# --------------------------------------------------------------------------- the simulator's fast path


BASE, STRICT, DROPPED = 1e-3, 2.5e-4, 5e-4


def flag_cost() -> ProfileCost:
    """A cost that reads only the sequence flags: 1 ms, +0.25 ms if strict, +0.5 ms more if a guess was dropped."""
    eager = ProfilePath((("one", 0.0, BASE), ("strict", 0.0, STRICT), ("dropped", 0.0, DROPPED)))
    return ProfileCost({"graph": ProfilePath((), observed=False), "eager": eager}, 0)


def flags_of_seconds(seconds) -> list[tuple[int, int]]:
    out = []
    for s in seconds:
        extra = round((s - BASE) / STRICT)
        out.append({0: (1, 1), 1: (0, 0), 3: (1, 0)}[extra])
    return out


def sim_config(path, fast_forward: bool) -> dict:
    return {
        "model": dataclasses.asdict(load_model_spec("smollm2_135m")),
        "hardware": dataclasses.asdict(load_hardware_spec("h100_sxm")),
        "workload": {
            "name": "agentic_coding",
            "params": {
                "calls_mean": 4.0,
                "tool_pause_median": 0.05,
                "tool_pause_p90": 0.2,
                "human_pause_prob": 0.0,
                "output_max": 60,
                "output_mean": 20.0,
                "prefix_tokens_min": 200,
                "prefix_tokens_max": 400,
                "new_tokens_mean": 30.0,
                "new_tokens_max": 100,
            },
        },
        "engine": {"num_gpu_blocks": 400},
        "scheduler": {"num_lookahead_tokens": 1, "max_num_batched_tokens": 512, "chunk_size": 256},
        "sim": {
            "num_sessions": 10,
            "session_rate": 5.0,
            "progress": False,
            "cost_model": "profile",
            "profile_path": str(path),
            "fast_forward": fast_forward,
        },
        "wandb": {"mode": "disabled"},
    }


def test_fast_path_and_step_by_step_loop_price_the_same_flags(tmp_path):
    path = tmp_path / "flags.json"
    flag_cost().save(path)
    # step by step, the plans recorded: the seconds tell each plan's flags
    log = StepLog()
    sim = Simulation(sim_config(path, fast_forward=False))
    recorded = sim.run(
        replica_factory=lambda env, i, sc, col: RecordingReplica(
            env, i, sc, sim.cost_model, col, sim.cfg.sim.idle_wait_s, sim.cfg.sim.seed, log=log
        )
    )
    flags = [(r["follows_decode"], r["continues_decode"]) for r in log.rows]
    assert flags_of_seconds(recorded.collector.step_seconds) == flags
    assert {(1, 1), (0, 0), (1, 0)} <= set(flags)
    for fast_forward in (False, True):
        result = Simulation(sim_config(path, fast_forward)).run()
        assert flags_of_seconds(result.collector.step_seconds) == flags, fast_forward
        assert result.collector.step_start == recorded.collector.step_start
