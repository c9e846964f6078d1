"""The simulator's extension (`sim._native`, csrc/sim/) on the control plane's objects.

Its fast path drives Schedulers that `controlplane._core` made, and hand back that module's Plans
and FinishedRequests: the two extensions share pybind11's type registry. Errors raised on either
side of the boundary reach Python as the same exceptions as from the control plane alone.
"""

from __future__ import annotations

import ast
import math
import pathlib

import numpy as np
import pytest

import controlplane as cp
from controlplane import _core
from controlplane.policies import PolicyError, register_policy
from sim import _native
from sim.cost import RooflineCost
from sim.specs import load_hardware_spec, load_model_spec

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIM_CLASSES = ("StepCost", "ClusterForward", "ClusterResult")


def roofline() -> RooflineCost:
    return RooflineCost(load_model_spec("llama3_8b"), load_hardware_spec("h100_sxm"))


def busy_scheduler(make=cp.Scheduler, **kw) -> cp.Scheduler:
    s = make(num_blocks=64, vocab_size=1000, max_num_batched_tokens=64, **kw)
    for i in range(3):
        s.add_request(i, np.arange(8 + 20 * i) % 1000, max_new_tokens=4 + 3 * i, ignore_eos=True)
    return s


def drain(cost, sched, pool) -> tuple[list[int], float]:
    """Runs one scheduler to its end on a ClusterForward of one replica, as sim/cluster_fast.py's driver
    does with nothing else in SimPy's queue: the order requests finished in, and the last step's end."""
    cf = _native.ClusterForward(cost.native, [sched], [pool], [math.inf], 1.0)
    order, eid, end = [], 1, 0.0
    busy = cf.start(0, 0.0, 0)
    while busy:
        r = cf.advance(math.inf, 1, 1 << 62, eid)
        assert r.stopped == 0 and all(isinstance(f, cp.FinishedRequest) for f in r.finished)
        order += [f.request_id for f in r.finished]
        eid, end = r.next_eid, r.stop_time
        busy = sched.has_unfinished() and cf.start(0, end, eid)
        eid += busy
    return order, end


def test_the_simulators_classes_live_in_sim_native_and_not_in_the_control_plane():
    for name in SIM_CLASSES:
        assert hasattr(_native, name)
        assert not hasattr(_core, name) and not hasattr(cp, name)


def test_no_sim_module_imports_the_control_planes_private_core():
    for path in sorted((ROOT / "sim").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n == "controlplane._core" or n.startswith("controlplane._core.") for n in names), path


@pytest.mark.parametrize(
    "make",
    [cp.Scheduler, lambda **kw: _core.Scheduler(cp.SchedulerConfig(**kw).to_core())],
    ids=["controlplane.Scheduler", "_core.Scheduler"],
)
def test_the_fast_path_drives_a_scheduler_made_by_the_control_plane(make):
    cost = roofline()
    sched = busy_scheduler(make)
    order, _ = drain(cost, sched, np.arange(100, dtype=np.int64))
    sched.check_invariants()
    assert sorted(order) == [0, 1, 2] and sched.stats().num_finished == 3
    # a control-plane Plan priced by the simulator's cost, as the reference loop does
    other = busy_scheduler()
    plan = other.step(0.0)
    assert cost.native.plan_seconds(plan) == cost.step_seconds(plan) > 0


def test_cluster_forward_takes_the_control_planes_schedulers():
    cost = roofline()
    scheds = [busy_scheduler() for _ in range(2)]
    cf = _native.ClusterForward(cost.native, scheds, [np.arange(50, dtype=np.int64)] * 2, [0.0, 0.0], 1.0)
    assert cf.start(0, 0.0, 1) and cf.start(1, 0.0, 2)
    r = cf.advance(math.inf, 1, 1 << 40, 3)
    assert r.num_steps > 0 and r.stopped in (0, 1) and r.finished
    assert all(isinstance(f, cp.FinishedRequest) for f in r.finished)
    assert [s[1] for s in r.samples[:2]] == [0, 1]  # each replica's first KV sample, read from its scheduler


def test_wrong_arguments_across_the_boundary_are_python_errors():
    cost = roofline()
    with pytest.raises(ValueError, match="empty replica"):  # tandem::InvalidInput thrown in sim._native
        _native.ClusterForward(cost.native, [busy_scheduler()], [np.zeros(0, dtype=np.int64)], [0.0], 1.0)
    with pytest.raises(ValueError, match="must hold integers"):
        _native.ClusterForward(cost.native, [busy_scheduler()], [np.zeros(4)], [0.0], 1.0)
    not_a_scheduler = cp.SchedulerConfig().to_core()  # another of the control plane's types
    with pytest.raises(TypeError):
        _native.ClusterForward(cost.native, [not_a_scheduler], [np.arange(4)], [0.0], 1.0)
    with pytest.raises(TypeError):
        cost.native.plan_seconds(not_a_scheduler)
    with pytest.raises(ValueError, match="no such replica"):
        _native.ClusterForward(cost.native, [busy_scheduler()], [np.arange(4)], [0.0], 1.0).start(1, 0.0, 0)


def test_a_python_policy_raising_inside_the_fast_path_is_a_policy_error_and_stops_the_scheduler():
    """The policy's exception is thrown in controlplane._core (its trampoline) and passes through the
    scheduler code the fast path runs in sim._native: caught there, recorded, rethrown, translated."""

    @register_policy("ordering", "test_native_raises")
    class Raises(cp.OrderingPolicy):
        def key(self, r):
            raise KeyError("no such thing")

    try:
        sched = busy_scheduler(ordering="test_native_raises")
        cf = _native.ClusterForward(roofline().native, [sched], [np.arange(10, dtype=np.int64)], [0.0], 1.0)
        with pytest.raises(PolicyError, match="ordering policy 'test_native_raises' raised in key") as info:
            cf.start(0, 0.0, 0)
        assert isinstance(info.value.__cause__, KeyError)
        assert "test_native_raises" in sched.failure
        with pytest.raises(PolicyError, match="stopped after a policy error"):
            cf.start(0, 0.0, 1)
    finally:
        cp.policies.unregister_policy("ordering", "test_native_raises")


def test_a_python_policy_decides_inside_the_fast_path_as_in_the_reference_loop():
    @register_policy("ordering", "test_native_longest_first")
    class LongestFirst(cp.OrderingPolicy):
        def key(self, r):
            return -r.num_prompt_tokens

    try:
        cost = roofline()
        pool = np.arange(1000, dtype=np.int64)
        fast, slow = (busy_scheduler(ordering="test_native_longest_first", max_num_seqs=1) for _ in range(2))
        order, end = drain(cost, fast, pool)
        now, at, slow_order = 0.0, 0, []
        while slow.has_unfinished():
            plan = slow.step(now)
            now += cost.step_seconds(plan)
            n = plan.num_sampled
            slow_order += [f.request_id for f in slow.commit(plan, pool[at : at + n], now)]
            at += n
        assert order == slow_order == [2, 1, 0] and end == now
    finally:
        cp.policies.unregister_policy("ordering", "test_native_longest_first")
