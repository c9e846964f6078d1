"""Random sequences of add/step/commit/abort/end_session/advance-time over small pools.

The conformance suite's state machine (controlplane/conformance.py) with every policy drawn at
random: small pools make eviction and preemption frequent; after every rule the C++ invariants
are checked, every plan stays within its capacity, every finished request's tokens equal the toy
model's reference output (which holds only if every plan addressed the right KV), and at
teardown arrivals stop and every request must finish (liveness) and a replay on a fresh
scheduler must give the same plans (determinism). tests/test_policy_conformance.py fixes one
policy at a time.
"""

from __future__ import annotations

from controlplane.conformance import make_machine

TestControlPlaneMachine = make_machine().TestCase
