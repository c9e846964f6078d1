"""Writing policies: Python subclasses of every kind, what they read, and what happens when they fail."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import Phase, settings

import controlplane as cp
from controlplane import conformance
from controlplane.policies import (
    PolicyError,
    ReplicaView,
    RequestView,
    RouteView,
    Router,
    TurnView,
    make_policy,
    register_policy,
)
from controlplane.testing import ToyModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _forget_test_policies():
    """Policies registered inside a test (many deliberately broken) leave the registry with it."""
    before = {kind: set(cp.policies.python_policy_names(kind)) for kind in cp.policies.KINDS}
    yield
    for kind in cp.policies.KINDS:
        for name in set(cp.policies.python_policy_names(kind)) - before[kind]:
            cp.policies.unregister_policy(kind, name)


def sched(**kw):
    base = dict(num_blocks=32, block_size=4, vocab_size=64, max_num_batched_tokens=64, max_model_len=64)
    base.update(kw)
    return cp.Scheduler(**base)


def run_all(s, model=None, now=0.0, dt=0.1, limit=500):
    model = model or ToyModel.for_scheduler(s.config)
    finished = []
    for _ in range(limit):
        if not s.has_unfinished():
            break
        plan = s.step(now)
        tokens, _ = model.run(plan)
        now += dt
        finished += s.commit(plan, tokens, now)
    return finished, now


# -- Python policies decide ------------------------------------------------------------


@register_policy("ordering", "test_longest_first")
class LongestFirst(cp.OrderingPolicy):
    def __init__(self, sign: float = 1.0):
        super().__init__()
        self.sign = sign

    def key(self, r):
        return -self.sign * r.num_prompt_tokens


def test_python_ordering_decides_admission_and_takes_spec_parameters():
    for spec, first in (("test_longest_first", 2), ("test_longest_first:sign=-1", 1)):
        s = sched(ordering=spec, max_num_seqs=1)
        s.add_request(1, [1, 2, 3], max_new_tokens=2)
        s.add_request(2, list(range(1, 12)), max_new_tokens=2)
        assert s.ordering == "test_longest_first"
        assert s.step(0.0).req_ids.tolist() == [first]
    with pytest.raises(ValueError, match="policy 'test_longest_first'.*unexpected keyword argument 'bogus'"):
        sched(ordering="test_longest_first:bogus=1")


@register_policy("eviction", "test_mru")
class Mru(cp.EvictionPolicy):
    def key(self, b):
        return -b.last_access


def test_python_eviction_decides_which_block_goes():
    # Two cached prompts; a third needs room: MRU evicts the newer one, LRU the older one.
    kept = {}
    for spec in ("lru", "test_mru"):
        s = sched(num_blocks=8, eviction=spec)
        model = ToyModel.for_scheduler(s.config)
        old, new = [1, 2, 3, 4, 5, 6, 7, 8, 9], [20, 21, 22, 23, 24, 25, 26, 27, 28]
        now = 0.0
        for rid, prompt in ((1, old), (2, new)):
            s.add_request(rid, prompt, max_new_tokens=1, arrival_time=now)
            _, now = run_all(s, model, now)
            now += 1.0
        s.add_request(3, list(range(30, 51)), max_new_tokens=1, arrival_time=now)
        run_all(s, model, now)
        kept[spec] = (s.cached_prefix_tokens(old + [0]), s.cached_prefix_tokens(new + [0]))
    assert kept["lru"][1] > kept["lru"][0]
    assert kept["test_mru"][0] > kept["test_mru"][1]


@register_policy("preemption", "test_always_swap")
class AlwaysSwap(cp.PreemptionPolicy):
    def mode(self, victim, host_free_blocks, blocks_needed):
        return "swap"


def test_python_preemption_decides_swap():
    s = sched(num_blocks=6, num_host_blocks=12, preemption="test_always_swap", max_num_batched_tokens=8, chunk_size=8)
    for rid in range(3):
        s.add_request(rid, [rid + 1] * 6, max_new_tokens=12)
    finished, _ = run_all(s)
    assert len(finished) == 3
    st = s.stats()
    assert st.num_preemptions_swap > 0 and st.num_preemptions_recompute == 0


@register_policy("router", "test_last_replica")
class LastReplica(cp.RouterPolicy):
    def __init__(self):
        super().__init__()
        self.ended = []

    def route(self, call, replicas):
        self.last_call = (call.num_prompt_tokens, call.session_id)
        return len(replicas) - 1

    def end_session(self, session_id):
        self.ended.append(session_id)


def test_router_policies_python_and_cpp():
    views = [
        ReplicaView(0, load=3, num_free_blocks=10),
        ReplicaView(1, load=1, num_free_blocks=2),
        ReplicaView(2, load=1, num_free_blocks=9, cached_prefix_tokens=64),
    ]
    assert Router("test_last_replica").route(0, "s", 5, 0.0, views) == 2
    mine = make_policy("router", "test_last_replica")
    assert mine.route(RouteView(num_prompt_tokens=5, session_id="s"), views) == 2
    assert mine.last_call == (5, "s")
    assert Router("least_loaded").route(0, "s", 5, 0.0, views) == 1
    assert Router("prefix_aware").route(0, "s", 5, 0.0, views) == 2
    rr = Router("round_robin")
    assert [rr.route(i, "s", 5, 0.0, views) for i in range(4)] == [0, 1, 2, 0]
    aff = Router("session_affinity")
    assert aff.route(0, "a", 5, 0.0, views) == 1
    assert aff.route(1, "a", 5, 0.0, [ReplicaView(0, 0), ReplicaView(1, 9), ReplicaView(2, 9)]) == 1
    aff.end_session("a")
    assert aff.route(2, "a", 5, 0.0, [ReplicaView(0, 0), ReplicaView(1, 9), ReplicaView(2, 9)]) == 0


# -- what policies read -------------------------------------------------------------------


def test_session_history_reaches_the_views():
    turns, requests = [], []

    @register_policy("eviction", "test_spy_turns")
    class SpyTurns(cp.EvictionPolicy):
        def key(self, b):
            return b.last_access

        def pin_seconds(self, turn):
            turns.append(
                (
                    turn.session_id,
                    turn.turn_index,
                    list(turn.pauses),
                    turn.session_service,
                    turn.cache_blocks,
                    turn.num_tokens,
                )
            )
            return 0.0

    @register_policy("ordering", "test_spy_requests")
    class SpyRequests(cp.OrderingPolicy):
        def key(self, r):
            requests.append((r.id, r.session_id, r.session_turns, r.session_service, r.session_last_end))
            return r.arrival_time

    s = sched(eviction="test_spy_turns", ordering="test_spy_requests")
    model = ToyModel.for_scheduler(s.config)
    context, now, ends = [1, 2, 3, 4, 5], 0.0, []
    for turn, pause in enumerate((2.0, 7.5, 0.0)):
        s.add_request(turn, context, max_new_tokens=3, arrival_time=now, session_id="agent")
        finished, now = run_all(s, model, now)
        ends.append(now)
        context = context + list(finished[0].output_token_ids) + [9]
        now += pause
    assert [t[:2] for t in turns] == [("agent", 0), ("agent", 1), ("agent", 2)]
    assert [t[2] for t in turns] == [[], [pytest.approx(2.0)], [pytest.approx(2.0), pytest.approx(7.5)]]
    assert all(t[4] == 32 for t in turns)
    services = [t[3] for t in turns]
    assert services[0] > 0 and services[1] > services[0] and services[2] > services[1]
    by_id = {rid: (turns_, service, last) for rid, _, turns_, service, last in requests}
    assert by_id[0] == (0, 0, None)
    assert by_id[1] == (1, services[0], ends[0])
    assert by_id[2] == (2, services[1], ends[1])
    # end_session forgets the history
    s.end_session("agent", now)
    s.add_request(9, [1, 2], max_new_tokens=1, arrival_time=now, session_id="agent")
    run_all(s, model, now)
    assert {rid: v for rid, _, *v in requests}[9][0] == 0


def test_pause_aware_holds_for_the_cheapest_expected_pause():
    # cost(T) = hold * share * E[min(pause, T)] + reload * tokens * P(pause > T); pauses {2, 10}:
    # cost(0) = R, cost(2) = 2*H*s + R/2, cost(10) = 6*H*s, with H*s = 1 here.
    p = make_policy("eviction", "pause_aware:reload_s_per_token=1,hold_cost=1,margin=1")
    turn = dict(num_blocks=4, cache_blocks=4, pauses=[2.0, 10.0])
    assert p.pin_seconds(TurnView(num_tokens=1, **turn)) == 0.0  # R=1: reloading is cheapest
    assert p.pin_seconds(TurnView(num_tokens=6, **turn)) == 2.0  # R=6: hold across the short pause
    assert p.pin_seconds(TurnView(num_tokens=10, **turn)) == 10.0  # R=10: hold across both
    # a smaller share of the cache makes holding cheaper
    assert p.pin_seconds(TurnView(num_tokens=6, num_blocks=1, cache_blocks=4, pauses=[2.0, 10.0])) == 10.0
    # no history: the prior pause stands in; margin stretches the hold; max_pin_s caps it
    q = make_policy("eviction", "pause_aware:reload_s_per_token=1,prior_pause_s=3,margin=1.5,max_pin_s=4")
    assert q.pin_seconds(TurnView(num_tokens=100, num_blocks=1, cache_blocks=8)) == 4.0
    assert make_policy("eviction", "pause_aware:reload_s_per_token=1,prior_pause_s=3").pin_seconds(
        TurnView(num_tokens=100, num_blocks=1, cache_blocks=8)
    ) == pytest.approx(3.3)
    for bad in (
        "pause_aware:margin=0.5",
        "pause_aware:min_history=1.5",
        "pause_aware:hold_cost=-1",
        "pause_aware:bogus=1",
    ):
        with pytest.raises(ValueError, match="pause_aware"):
            make_policy("eviction", bad)


def test_pause_aware_keeps_kv_across_a_pause_it_has_seen():
    # An agent pausing 4 s between turns while two other requests, each a third of the cache, come and go:
    # under LRU (TTL 1 s expired) the agent's KV is the oldest and goes; pause_aware learns the pause
    # from the session's history and holds it, so the other traffic evicts the other traffic instead.
    hits = {}
    for spec in ("ttl:ttl=1", "pause_aware:reload_s_per_token=1,min_history=1,prior_pause_s=0"):
        s = sched(num_blocks=34, eviction=spec, max_model_len=128)
        model = ToyModel.for_scheduler(s.config)
        context, now, cached = list(range(1, 21)), 0.0, []
        for turn in range(4):
            s.add_request(turn, context, max_new_tokens=2, arrival_time=now, session_id="agent")
            finished, end = run_all(s, model, now)
            cached.append(finished[0].num_cached_tokens / len(context))
            context = context + list(finished[0].output_token_ids) + [7, 8, 9]
            for j, at in enumerate((0.5, 1.5)):  # 16 blocks each
                s.add_request(100 + 2 * turn + j, [30 + 2 * turn + j] * 63, max_new_tokens=1, arrival_time=end + at)
                run_all(s, model, end + at)
            now = end + 4.0
        hits[spec.split(":")[0]] = cached
    assert max(hits["ttl"][1:]) < 0.5
    assert min(hits["pause_aware"][2:]) > 0.75  # from the second pause on, the history says 4 s


def test_session_las_serves_the_least_served_session_first():
    p = make_policy("ordering", "session_las:quantum=100")
    long_agent = RequestView(arrival_time=1.0, session_service=5000, num_computed_total=0)
    newcomer = RequestView(arrival_time=9.0, session_service=0, num_computed_total=0)
    assert p.key(newcomer) < p.key(long_agent)
    same_level = RequestView(arrival_time=0.5, session_service=90, num_computed_total=3000)
    assert p.key(same_level) < p.key(newcomer)  # within a quantum: first come, first served
    # the call's own progress does not move it (a moving key livelocked under KV pressure)
    assert p.key(same_level) == p.key(RequestView(arrival_time=0.5, session_service=90))
    with pytest.raises(ValueError, match="quantum"):
        make_policy("ordering", "session_las:quantum=0")


def test_cache_credit_orders_by_arrival_plus_uncached_work():
    p = make_policy("ordering", "cache_credit:tokens_per_s=1000")
    cold = RequestView(arrival_time=0.0, num_prompt_tokens=5000)  # deadline 5.0
    warm = RequestView(arrival_time=2.0, num_prompt_tokens=5200, num_cached_tokens=5000)  # deadline 2.2
    late = RequestView(arrival_time=6.0, num_prompt_tokens=300, num_cached_tokens=200)  # deadline 6.1
    assert p.key(warm) < p.key(cold) < p.key(late)
    assert p.needs_prefix_match()
    with pytest.raises(ValueError, match="tokens_per_s must be > 0"):
        make_policy("ordering", "cache_credit:tokens_per_s=0")


# -- failures are errors that name the policy ------------------------------------------------


def test_a_raising_python_policy_is_a_policy_error_and_stops_the_scheduler():
    @register_policy("ordering", "test_raises")
    class Raises(cp.OrderingPolicy):
        def key(self, r):
            raise KeyError("no such thing")

    s = sched(ordering="test_raises")
    s.add_request(1, [1, 2, 3], max_new_tokens=2)
    s.add_request(2, [1, 2, 3], max_new_tokens=2)
    with pytest.raises(PolicyError, match="ordering policy 'test_raises' raised in key\\(\\): KeyError") as info:
        s.step(0.0)
    assert isinstance(info.value.__cause__, KeyError)
    assert "test_raises" in s.failure
    with pytest.raises(PolicyError, match="stopped after a policy error: ordering policy 'test_raises'"):
        s.step(0.0)


@pytest.mark.parametrize(
    "kind,body,message",
    [
        ("ordering", "def key(self, r): return float('nan')", "returned a NaN key"),
        ("ordering", "def key(self, r): return 'soon'", "key\\(\\) returned a value of the wrong type"),
        ("ordering", "pass", "does not define key\\(\\)"),
        ("eviction", "def key(self, b): return (b.last_access, float('nan'))", "returned a NaN key"),
        (
            "eviction",
            "def key(self, b): return b.last_access\n    def pin_seconds(self, t): return -1.0",
            "invalid pin time -1",
        ),
        ("preemption", "def mode(self, v, free, needed): return 'later'", "neither 'recompute' nor 'swap'"),
    ],
)
def test_bad_python_policies_fail_clearly(kind, body, message):
    base = {"ordering": "OrderingPolicy", "eviction": "EvictionPolicy", "preemption": "PreemptionPolicy"}[kind]
    ns: dict = {"cp": cp}
    exec(f"class Bad(cp.{base}):\n    {body}\n", ns)  # noqa: S102 - test input
    name = f"test_bad_{kind}"
    register_policy(kind, name, ns["Bad"])
    s = sched(num_blocks=6, num_host_blocks=8, max_num_batched_tokens=8, chunk_size=8, **{kind: name})
    for rid in range(3):
        s.add_request(rid, [rid + 1] * 6, max_new_tokens=6, session_id=f"s{rid}")
    with pytest.raises(PolicyError, match=f"{kind} policy '{name}'.*{message}"):
        run_all(s)


def test_router_out_of_range_and_registry_rules():
    @register_policy("router", "test_far")
    class Far(cp.RouterPolicy):
        def route(self, call, replicas):
            return 7

    with pytest.raises(PolicyError, match="router policy 'test_far' chose replica 7 of 2"):
        Router("test_far").route(0, "", 1, 0.0, [ReplicaView(0, 0), ReplicaView(1, 0)])
    with pytest.raises(ValueError, match="'lru' is a built-in eviction policy"):
        register_policy("eviction", "lru", Mru)
    with pytest.raises(TypeError, match="must subclass controlplane.EvictionPolicy"):
        register_policy("eviction", "test_wrong_base", LongestFirst)
    with pytest.raises(ValueError, match="unknown policy kind"):
        register_policy("scheduling", "x", LongestFirst)
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        sched(eviction="nope")
    # a Python name may be registered again (a re-run notebook cell): the latest wins
    register_policy("router", "test_far", LastReplica)
    assert Router("test_far").route(0, "s", 5, 0.0, [ReplicaView(0, 0), ReplicaView(1, 0)]) == 1


def test_views_are_copies_that_outlive_the_call():
    kept = []

    @register_policy("ordering", "test_keeps_views")
    class Keeps(cp.OrderingPolicy):
        def key(self, r):
            kept.append(r)
            return r.arrival_time

    s = sched(ordering="test_keeps_views")
    s.add_request(1, [1, 2, 3], max_new_tokens=2, session_id="a-session-name-longer-than-sso")
    s.add_request(2, [1, 2, 3], max_new_tokens=2, session_id="b")
    run_all(s)
    del s
    assert {v.session_id for v in kept} == {"a-session-name-longer-than-sso", "b"}


# -- the conformance suite catches broken policies --------------------------------------------

# derandomize: a fixed search, so that these tests cannot pass or fail by luck
FAST = dict(max_examples=60, phases=[Phase.explicit, Phase.reuse, Phase.generate], database=None, derandomize=True)


def test_the_suite_catches_a_nondeterministic_policy():
    import random

    @register_policy("ordering", "test_coin_flip")
    class CoinFlip(cp.OrderingPolicy):
        def key(self, r):
            return random.random()

    with pytest.raises(conformance.ConformanceError, match="not deterministic"):
        conformance.run_machine("ordering", "test_coin_flip", lambda s: settings(s, **FAST))


def test_the_suite_catches_a_policy_that_starves_requests():
    @register_policy("eviction", "test_pin_forever")
    class PinForever(cp.EvictionPolicy):
        def key(self, b):
            return b.last_access

        def pin_seconds(self, turn):
            return 1e12

    with pytest.raises(conformance.ConformanceError, match="starvation"):
        conformance.run_machine("eviction", "test_pin_forever", lambda s: settings(s, **FAST))


def test_the_suite_catches_a_nondeterministic_router():
    import itertools

    counter = itertools.count()

    @register_policy("router", "test_global_counter")
    class GlobalCounter(cp.RouterPolicy):
        def route(self, call, replicas):
            return next(counter) % len(replicas)  # state shared across instances: not reproducible

    with pytest.raises(conformance.ConformanceError, match="not deterministic"):
        conformance.check_router("test_global_counter", 50)


def test_make_check_policy_prints_the_smallest_failing_sequence(tmp_path):
    module = tmp_path / "my_policies.py"
    module.write_text(
        "import controlplane as cp\n"
        "@cp.register_policy('eviction', 'pin_forever')\n"
        "class PinForever(cp.EvictionPolicy):\n"
        "    def key(self, b): return b.last_access\n"
        "    def pin_seconds(self, turn): return 1e12\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep))
    # SEED fixes the search (also where $CI makes Hypothesis derandomize, which found nothing in 80 examples)
    proc = subprocess.run(
        [
            "make",
            "-s",
            "check-policy",
            "POLICY=pin_forever",
            "MODULES=my_policies",
            "EXAMPLES=80",
            "SEED=0",
            f"PY={sys.executable}",
            "STAMP=",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "starvation" in out
    assert "state = PolicyMachine()" in out and "state.setup(" in out and "state.teardown()" in out
    ok = subprocess.run(
        ["make", "-s", "check-policy", "POLICY=no_such_policy", f"PY={sys.executable}", "STAMP="],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ok.returncode != 0 and "is not registered in any kind" in ok.stdout + ok.stderr
