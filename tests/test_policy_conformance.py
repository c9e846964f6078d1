"""The conformance suite over every registered policy (controlplane/conformance.py).

Parametrised over the registries: a new policy, C++ or Python, is tested by registering it.
`make check-policy POLICY=spec [KIND=kind] [MODULES=pkg.mod,...]` runs it for one policy with
more examples; on failure Hypothesis prints the smallest failing operation sequence.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

import controlplane as cp
import controlplane.examples  # noqa: F401 - the documented Python examples, one per kind
from controlplane import conformance
from controlplane.policies import KINDS, policy_names

cp.import_policy_modules([m for m in os.environ.get("TANDEM_POLICY_MODULES", "").split(",") if m])
ONLY = os.environ.get("TANDEM_POLICY", "")
ONLY_KIND = os.environ.get("TANDEM_POLICY_KIND", "")
EXAMPLES = int(os.environ.get("TANDEM_CONFORMANCE_EXAMPLES", "40"))
# `make check-policy SEED=n` passes --hypothesis-seed=n; the seed must win over Hypothesis's CI
# profile (which derandomizes when $CI is set) and over stored examples, so the search is the same
# on every machine.
SEEDED = {"derandomize": False, "database": None} if os.environ.get("TANDEM_CONFORMANCE_SEED") else {}

# Parameters that reach code the defaults do not (tiny pools, second-scale pauses).
EXTRA = {
    "eviction": [
        "ttl:ttl=0.5",
        "ttl:ttl=3",
        "pause_aware:reload_s_per_token=1,prior_pause_s=2",
        "pause_aware:reload_s_per_token=1,min_history=0",
        "hit_weighted_lru:bonus_s=0",
    ],
    "ordering": ["session_las:quantum=4", "cache_credit:tokens_per_s=5"],
    "preemption": ["swap_long:min_blocks=1"],
    "admission": ["tps_floor:tok_s=100,min_chunk=1", "tps_floor:margin=0.5,max_wait_s=0.5"],
}


def _cases():
    if ONLY:
        name = ONLY.split(":", 1)[0]
        if ONLY_KIND and ONLY_KIND not in conformance.ALL_KINDS:
            return [pytest.param("bad-kind", ONLY, id=f"bad-kind-{ONLY_KIND}")]
        kinds = [ONLY_KIND] if ONLY_KIND else [k for k in conformance.ALL_KINDS if name in policy_names(k)]
        kinds = [k for k in kinds if name in policy_names(k)]
        if not kinds:
            return [pytest.param("unregistered", ONLY, id=f"unregistered-{name}")]
        return [pytest.param(k, ONLY, id=f"{k}-{ONLY}") for k in kinds]
    return [pytest.param(k, s, id=f"{k}-{s}") for k, s in conformance.suite_specs(EXTRA)]


@pytest.mark.parametrize("kind,spec", _cases())
def test_policy_conforms(kind, spec):
    if kind == "unregistered":
        pytest.fail(
            f"policy {spec!r} is not registered in any kind (import its module with MODULES=...); "
            + "; ".join(f"{k}: {policy_names(k)}" for k in KINDS)
        )
    if kind == "bad-kind":
        pytest.fail(f"KIND={ONLY_KIND!r} is not a policy kind ({', '.join(KINDS)})")
    if kind == "router":
        conformance.check_router(spec, EXAMPLES, **SEEDED)
    else:
        conformance.run_machine(kind, spec, lambda s: settings(s, max_examples=EXAMPLES, **SEEDED))
