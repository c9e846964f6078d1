"""cache_credit is a C++ ordering (csrc/policies.cpp) that decides exactly as its Python definition.

It was a Python policy: a key() call into Python for every waiting and running request every
step made whole simulations 5-7x slower than the C++ orderings. The Python definition it
replaced is kept here as the reference; a run with either must give the same event log.
"""

from __future__ import annotations

import pytest

import controlplane as cp
from controlplane.policies import make_policy, register_policy, unregister_policy
from sim.simulation import Simulation

REFERENCE = "cache_credit_python_reference"


class CacheCreditReference(cp.OrderingPolicy):
    """The Python cache_credit as it shipped: deadline = arrival + uncached work / tokens_per_s."""

    def __init__(self, tokens_per_s: float = 20000.0) -> None:
        super().__init__()
        self.tokens_per_s = float(tokens_per_s)

    def needs_prefix_match(self) -> bool:
        return True

    def key(self, r):
        done = max(r.num_cached_tokens, r.num_computed_tokens)
        work = max(0, r.num_prompt_tokens + r.num_output_tokens - done)
        return (r.arrival_time + work / self.tokens_per_s, r.arrival_time)


@pytest.fixture
def reference():
    register_policy("ordering", REFERENCE, CacheCreditReference)
    yield REFERENCE
    unregister_policy("ordering", REFERENCE)


def event_log(ordering: str, workload: str, sessions: int, **sections) -> tuple[dict, dict]:
    cfg = {
        "workload": {"name": workload, "params": {}},
        "sim": {"num_sessions": sessions, "progress": False, **sections.pop("sim", {})},
        "policy": {"name": "cache_credit"},
        "scheduler": {"ordering": ordering, **sections.pop("scheduler", {})},
        "wandb": {"mode": "disabled"},
        **sections,
    }
    result = Simulation(cfg).run()
    c = result.collector
    log = {
        "step_start": c.step_start,
        "step_seconds": c.step_seconds,
        "step_tokens": c.step_tokens,
        "step_reqs": c.step_reqs,
        "requests": c.requests,
        "sessions": c.sessions,
    }
    return log, result.summary


def test_cache_credit_is_a_native_policy():
    # A Python policy would come back as an instance of its Python class.
    assert type(make_policy("ordering", "cache_credit")) is cp.OrderingPolicy
    assert make_policy("ordering", "cache_credit").needs_prefix_match()
    with pytest.raises(ValueError, match="tokens_per_s must be > 0"):
        make_policy("ordering", "cache_credit:tokens_per_s=0")
    with pytest.raises(ValueError, match="no parameter 'rate'"):
        make_policy("ordering", "cache_credit:rate=3")


@pytest.mark.parametrize(
    "workload, sessions, sections, must_happen",
    [
        # a small cache: hundreds of recompute preemptions, where the order of running requests decides
        (
            "swe_smith",
            8,
            {"sim": {"session_rate": 0.5}, "engine": {"num_gpu_blocks": 5000}},
            "num_preemptions_recompute",
        ),
        (
            "swe_smith",
            6,
            {
                "sim": {"session_rate": 0.5},
                "engine": {"num_gpu_blocks": 4000, "host_kv_gb": 20.0},
                "scheduler": {"eviction": "ttl:ttl=30", "preemption": "swap"},
            },
            "num_preemptions_swap",
        ),
        (
            "agentic_coding",
            40,
            {"sim": {"session_rate": 0.3}, "cluster": {"num_replicas": 2, "router": "prefix_aware"}},
            None,
        ),
    ],
)
def test_cache_credit_run_equals_the_python_reference_exactly(reference, workload, sessions, sections, must_happen):
    tokens_per_s = "tokens_per_s=500" if must_happen else "tokens_per_s=20000"
    native_log, native_summary = event_log(f"cache_credit:{tokens_per_s}", workload, sessions, **sections)
    python_log, _ = event_log(f"{reference}:{tokens_per_s}", workload, sessions, **sections)
    if must_happen:
        assert native_summary[must_happen] > 100, f"the scenario was meant to exercise {must_happen}"
    assert native_summary["num_steps"] > 1000
    for key in native_log:
        assert native_log[key] == python_log[key], f"{key} differs"
