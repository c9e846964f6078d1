"""The Python API: bad input gets a ValueError saying what was wrong, and changes nothing."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import controlplane as cp
from controlplane.testing import reference_generate

from helpers import drain, make, step

S = cp.RequestState


def snapshot(sched: cp.Scheduler) -> tuple:
    """Everything observable about the scheduler's state."""
    return (sched.stats().as_dict(), sched.has_unfinished(), sched.has_pending_plan())


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_blocks=0), "num_blocks"),
        (dict(block_size=0), "block_size"),
        (dict(num_host_blocks=-1), "num_host_blocks"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(idle_chunk_size=-1), "idle_chunk_size must be >= 0"),
        (dict(idle_chunk_size=2.5), "idle_chunk_size must be an int"),
        (dict(max_model_len=1), "max_model_len"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(ordering="fifo"), "unknown policy 'fifo'"),
        (dict(eviction="lru:ttl=3"), "has no parameter 'ttl'"),
        (dict(eviction="ttl:ttl=-1"), "ttl must be >= 0"),
        (dict(eviction="ttl:ttl"), "ttl"),
        (dict(eviction="ttl:ttl=abc"), "ttl"),
        (dict(eviction="ttl:ttl=nan"), "finite"),
        (dict(preemption=""), "empty policy name"),
        (dict(num_blocks="8"), "must be an int"),
        (dict(num_blocks=True), "must be an int"),
        (dict(enable_prefix_caching=1), "must be a bool"),
        (dict(bogus=1), "unknown scheduler config keys: ['bogus']"),
    ],
)
def test_bad_config_is_a_value_error(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make(**overrides)


def test_policy_registry_and_specs():
    # built-in (C++) names
    assert {"fcfs", "longest_prefix_match", "priority", "session_las", "cache_credit"} <= set(
        cp.policy_names("ordering")
    )
    assert {"lru", "priority", "ttl", "pause_aware"} <= set(cp.policy_names("eviction"))
    assert {"recompute", "swap"} <= set(cp.policy_names("preemption"))
    assert {"round_robin", "least_loaded", "session_affinity", "prefix_aware"} <= set(cp.policy_names("router"))
    assert cp.parse_policy_spec("ttl:ttl=2.5") == ("ttl", {"ttl": 2.5})
    assert cp.parse_policy_spec("lru") == ("lru", {})
    with pytest.raises(ValueError, match="unknown policy kind 'bogus'"):
        cp.policy_names("bogus")
    sched, _ = make(eviction="ttl:ttl=2.5", ordering="priority")
    assert sched.ordering == "priority"


def test_config_from_dict_round_trip():
    cfg = cp.SchedulerConfig.from_dict({"num_blocks": 12, "eviction": "ttl:ttl=9"})
    assert cfg.num_blocks == 12 and cfg.block_size == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_blocks = 3  # frozen


# -- requests ---------------------------------------------------------------------------

BAD_REQUESTS = [
    (dict(prompt_token_ids=[]), "empty prompt"),
    (dict(prompt_token_ids=[1, 97]), r"token id 97 at position 1 is outside the vocabulary \[0, 97\)"),
    (dict(prompt_token_ids=[-1, 2]), "token id -1 at position 0 is outside the vocabulary"),
    (dict(prompt_token_ids=[2**40]), "outside the vocabulary"),
    (dict(prompt_token_ids=[1.5, 2.0]), "must hold integers"),
    (dict(prompt_token_ids=[[1, 2]]), "one-dimensional"),
    (dict(prompt_token_ids=list(range(90)) + list(range(38))), "does not fit max_model_len 128"),
    (dict(prompt_token_ids=[1, 2], max_new_tokens=0), "max_new_tokens must be positive"),
    (dict(prompt_token_ids=[1, 2], stop_token_ids=[200]), "stop token id 200"),
    (dict(prompt_token_ids=[1, 2], eos_token_id=97), "eos_token_id 97 is out of range"),
    (dict(prompt_token_ids=[1, 2], arrival_time=float("nan")), "arrival_time must be finite"),
    (dict(prompt_token_ids=[0], request_id=7), "duplicate request id 7"),
]


@pytest.mark.parametrize("kwargs, message", BAD_REQUESTS)
def test_bad_request_is_rejected_and_changes_nothing(kwargs, message):
    sched, model = make()
    sched.add_request(7, [3, 4, 5], max_new_tokens=4)
    before = snapshot(sched)
    kwargs = {"request_id": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        sched.add_request(**kwargs)
    assert snapshot(sched) == before
    sched.check_invariants()
    done, _ = drain(sched, model)
    assert list(done[7].output_token_ids) == reference_generate([3, 4, 5], 4, 97)


def test_request_that_can_never_fit_the_cache():
    sched, _ = make(num_blocks=4, block_size=4)  # 16 token slots
    with pytest.raises(ValueError, match="can never fit in the KV cache: it needs up to 5 blocks"):
        sched.add_request(1, list(range(10)), max_new_tokens=10)  # 19 KV tokens
    # 16 KV tokens (17 tokens, the last one sampled and never computed) fits exactly.
    sched.add_request(2, list(range(10)), max_new_tokens=7)
    assert sched.stats().num_waiting == 1


# -- the loop ---------------------------------------------------------------------------


def test_commit_errors_leave_the_plan_committable():
    sched, model = make()
    sched.add_request(1, [1, 2, 3], max_new_tokens=3)
    sched.add_request(2, [4, 5], max_new_tokens=3)
    plan = sched.step(1.0)
    tokens, _ = model.run(plan)
    before = snapshot(sched)
    assert plan.num_sampled == 2
    for bad, message in [
        (tokens[:1], "samples 2 tokens, got 1"),
        (np.concatenate([tokens, tokens]), "samples 2 tokens, got 4"),
        (np.array([1, 97]), r"token id 97 is outside the vocabulary \[0, 97\)"),
        (np.array([1, -3]), "token id -3 is outside the vocabulary"),
        (np.array([1.0, 2.0]), "must hold integers"),
    ]:
        with pytest.raises(ValueError, match=message):
            sched.commit(plan, bad, 1.0)
        assert snapshot(sched) == before
    with pytest.raises(ValueError, match="time went backwards"):
        sched.commit(plan, tokens, 0.5)
    with pytest.raises(ValueError, match="must be finite"):
        sched.commit(plan, tokens, float("inf"))
    with pytest.raises(ValueError, match="has not been committed"):
        sched.step(1.0)
    assert snapshot(sched) == before
    sched.commit(plan, tokens, 1.0)
    # A plan is committed once: the same plan again is stale.
    with pytest.raises(ValueError, match=f"plan {plan.step_id} is stale"):
        sched.commit(plan, tokens, 1.0)
    sched.check_invariants()
    done, _ = drain(sched, model, now=2.0)
    assert list(done[1].output_token_ids) == reference_generate([1, 2, 3], 3, 97)


def test_stale_plan_from_an_earlier_step_is_refused():
    sched, model = make()
    sched.add_request(1, [1, 2, 3], max_new_tokens=5)
    old, _ = step(sched, model, 0.0)
    new = sched.step(1.0)
    before = snapshot(sched)
    with pytest.raises(ValueError, match=f"plan {old.step_id} is stale \\(expected plan {new.step_id}\\)"):
        sched.commit(old, model.run(old)[0], 1.0)
    assert snapshot(sched) == before


def test_time_must_not_go_backwards():
    sched, model = make()
    sched.add_request(1, [1, 2, 3], max_new_tokens=2)
    step(sched, model, 5.0)
    with pytest.raises(ValueError, match=r"step: time went backwards \(now=4 < last 5\)"):
        sched.step(4.0)
    with pytest.raises(ValueError, match="abort: time went backwards"):
        sched.abort(1, 1.0)
    with pytest.raises(ValueError, match="end_session: time went backwards"):
        sched.end_session("s", 1.0)
    assert sched.has_unfinished()


def test_abort_unknown_or_finished_request():
    sched, model = make()
    with pytest.raises(ValueError, match="unknown request id 3"):
        sched.abort(3, 0.0)
    sched.add_request(3, [1, 2], max_new_tokens=1)
    step(sched, model, 0.0)
    with pytest.raises(ValueError, match="unknown request id 3 .*already finished"):
        sched.abort(3, 1.0)


def test_abort_in_every_state_frees_everything():
    sched, model = make(chunk_size=4, num_host_blocks=8, preemption="swap")
    sched.add_request(1, list(range(10)), max_new_tokens=20)  # waiting
    sched.abort(1, 0.0)
    sched.add_request(2, list(range(10)), max_new_tokens=20)
    step(sched, model, 0.0)
    assert sched.request_info(2)["state"] == "PREFILLING"
    sched.abort(2, 1.0)
    sched.add_request(3, list(range(5)), max_new_tokens=20)
    step(sched, model, 1.0)
    assert sched.request_info(3)["state"] == "DECODING"
    sched.abort(3, 2.0)
    stats = sched.stats()
    assert stats.num_aborted == 3 and stats.num_used_blocks == 0 and not sched.has_unfinished()
    sched.check_invariants()


def test_abort_of_a_request_in_the_plan_in_flight_applies_at_commit():
    sched, model = make()
    sched.add_request(1, [1, 2, 3], max_new_tokens=5)
    plan = sched.step(0.0)
    sched.abort(1, 0.0)
    # Its blocks are still being written by `plan`: held until the commit.
    assert sched.stats().num_used_blocks == 1
    finished = sched.commit(plan, model.run(plan)[0], 0.1)
    assert finished == [] and not sched.has_unfinished()
    assert sched.stats().num_used_blocks == 0 and sched.stats().num_aborted == 1
    sched.check_invariants()


def test_unknown_session_end_is_a_no_op():
    sched, _ = make()
    assert sched.end_session("nobody", 0.0) == 0


# -- the state machine ---------------------------------------------------------------------

ALLOWED = {
    (S.WAITING, S.PREFILLING),
    (S.WAITING, S.ABORTED),
    (S.PREFILLING, S.DECODING),
    (S.PREFILLING, S.PREEMPTED),
    (S.PREFILLING, S.FINISHED),
    (S.PREFILLING, S.ABORTED),
    (S.DECODING, S.FINISHED),
    (S.DECODING, S.PREEMPTED),
    (S.DECODING, S.ABORTED),
    (S.PREEMPTED, S.PREFILLING),
    (S.PREEMPTED, S.DECODING),
    (S.PREEMPTED, S.ABORTED),
}


def test_transition_table():
    states = list(S.__members__.values())
    for src, dst in itertools.product(states, states):
        assert cp.transition_allowed(src, dst) == ((src, dst) in ALLOWED), (src, dst)


# -- the plan's arrays ----------------------------------------------------------------------


def test_plan_arrays_are_read_only_views_without_copies():
    sched, _ = make()
    sched.add_request(1, [1, 2, 3, 4, 5], max_new_tokens=2)
    plan = sched.step(0.0)
    names = [
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
        "block_table",
    ]
    for name in names:
        a, b = getattr(plan, name), getattr(plan, name)
        assert not a.flags.writeable, name
        if a.size:
            assert np.shares_memory(a, b), f"{name} is copied on every access"
    with pytest.raises(ValueError):
        plan.input_ids[0] = 3
    assert plan.req_ids.dtype == np.int64 and plan.input_ids.dtype == np.int32
    assert plan.slot_mapping.dtype == np.int64 and plan.sample.dtype == np.bool_
    assert plan.kv_ops.shape == (0, 3)
    assert plan.block_table.shape == (8, sched.max_blocks_per_seq) == (8, 32)
    # The plan keeps the scheduler (which owns the block table) alive.
    row = plan.slots[0]
    del sched
    assert (plan.block_table[row, :2] >= 0).all() and (plan.block_table[row, 2:] == -1).all()
