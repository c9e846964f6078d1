"""The same inputs and times give the same plans, under every policy."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import controlplane as cp
from controlplane.testing import ToyModel

FIELDS = [
    "req_ids",
    "query_lens",
    "cached_lens",
    "query_start_loc",
    "slots",
    "sample",
    "logits_indices",
    "input_ids",
    "positions",
    "slot_mapping",
    "kv_ops",
    "preempted_ids",
]


def trace(seed: int, ordering: str, eviction: str, preemption: str) -> list[tuple]:
    """Runs a seeded random workload; returns every plan (and the finished outputs) as tuples."""
    rng = np.random.default_rng(seed)
    sched = cp.Scheduler(
        num_blocks=12,
        block_size=4,
        num_host_blocks=8,
        max_num_seqs=4,
        max_num_batched_tokens=24,
        chunk_size=8,
        max_model_len=48,
        vocab_size=50,
        ordering=ordering,
        eviction=eviction,
        preemption=preemption,
    )
    model = ToyModel.for_scheduler(sched.config)
    prefix = list(range(1, 13))
    out, now, rid = [], 0.0, 0
    for _ in range(120):
        if rng.random() < 0.4:
            prompt = (prefix if rng.random() < 0.5 else []) + rng.integers(0, 50, rng.integers(1, 10)).tolist()
            sched.add_request(
                rid,
                prompt,
                max_new_tokens=int(rng.integers(1, 30)),
                arrival_time=now,
                session_id=str(rng.integers(0, 3)),
                priority=int(rng.integers(0, 3)),
            )
            rid += 1
        if rng.random() < 0.05 and sched.has_unfinished():
            victim = int(rng.integers(0, rid))
            try:
                sched.abort(victim, now)
            except ValueError:
                pass  # already finished
        if rng.random() < 0.05:
            sched.end_session(str(rng.integers(0, 3)), now)
        plan = sched.step(now)
        tokens, _ = model.run(plan)
        block_rows = plan.block_table[plan.slots].tobytes()
        now += float(rng.choice([0.0, 0.5, 3.0]))
        finished = sched.commit(plan, tokens, now)
        out.append(
            (plan.step_id, plan.now, block_rows)
            + tuple(getattr(plan, f).tobytes() for f in FIELDS)
            + tuple((f.request_id, f.finish_reason, tuple(f.output_token_ids)) for f in finished)
        )
    out.append(tuple(sorted(sched.stats().as_dict().items())))
    return out


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**32 - 1),
    ordering=st.sampled_from(cp.policy_names("ordering")),
    eviction=st.sampled_from(["lru", "priority", "ttl:ttl=2"]),
    preemption=st.sampled_from(cp.policy_names("preemption")),
)
def test_same_inputs_same_plans(seed, ordering, eviction, preemption):
    first = trace(seed, ordering, eviction, preemption)
    assert first == trace(seed, ordering, eviction, preemption)


def test_the_trace_is_not_trivial():
    """Guards the test above: the workload does schedule, preempt and finish things."""
    t = trace(7, "fcfs", "lru", "swap")
    stats = dict(t[-1])
    assert stats["num_finished"] > 5 and stats["num_steps"] > 50
    assert stats["num_preemptions_swap"] + stats["num_preemptions_recompute"] > 0
    assert trace(8, "fcfs", "lru", "swap") != t
