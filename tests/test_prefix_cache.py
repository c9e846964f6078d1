"""The prefix index: shared prefixes computed once, namespaces isolated, eviction in policy order."""

from __future__ import annotations

import numpy as np
import pytest

from controlplane.testing import reference_generate

from helpers import drain, make, step

V = 97
SHARED = list(range(40, 56))  # 16 tokens: 4 full blocks of 4


def first_plan_row(sched, model, now, rid):
    """(cached_len, query_len) of `rid` in the next plan."""
    plan, done = step(sched, model, now)
    i = plan.req_ids.tolist().index(rid)
    return int(plan.cached_lens[i]), int(plan.query_lens[i])


def test_shared_prefix_is_computed_once():
    sched, model = make()
    prompts = {rid: SHARED + [rid, rid + 1, rid + 2] for rid in range(5)}
    sched.add_request(0, prompts[0], max_new_tokens=3)
    step(sched, model, 0.0)  # request 0 prefills 19 tokens; its 4 full blocks enter the index
    for rid in range(1, 5):
        sched.add_request(rid, prompts[rid], max_new_tokens=3)
    plan, _ = step(sched, model, 1.0)
    assert plan.req_ids.tolist() == [0, 1, 2, 3, 4]
    assert plan.cached_lens.tolist() == [19, 16, 16, 16, 16]
    assert plan.query_lens.tolist() == [1, 3, 3, 3, 3]
    done, _ = drain(sched, model, now=2.0)
    for rid in range(5):
        assert list(done[rid].output_token_ids) == reference_generate(prompts[rid], 3, V)
        assert done[rid].num_cached_tokens == (0 if rid == 0 else 16)
    stats = sched.stats()
    # prompt tokens: 19 + 4 * 3 new; decode: 2 per request (the third token is sampled, never computed)
    assert stats.computed_tokens == model.tokens_computed == 19 + 4 * 3 + 5 * 2
    assert stats.cached_tokens == 4 * 16
    assert stats.prompt_tokens == 5 * 19


def test_shared_blocks_are_the_same_physical_blocks():
    sched, model = make()
    sched.add_request(0, SHARED + [1], max_new_tokens=8)
    sched.add_request(1, SHARED + [2], max_new_tokens=8)
    step(sched, model, 0.0)
    sched.add_request(2, SHARED + [3], max_new_tokens=8)
    step(sched, model, 1.0)
    b0, b2 = sched.request_info(0)["blocks"], sched.request_info(2)["blocks"]
    b1 = sched.request_info(1)["blocks"]
    assert b0[:4] == b2[:4] and b0[4] != b2[4]
    # Requests 0 and 1 prefilled in the same step: 1 computed its own copy of the prefix.
    assert not set(b1) & set(b0)


def test_a_full_hit_still_computes_the_last_token():
    sched, model = make()
    sched.add_request(0, SHARED, max_new_tokens=2)
    drain(sched, model)
    sched.add_request(1, SHARED, max_new_tokens=2)
    # 16 tokens all cached, but the last token must run to produce logits: the hit stops at 3 blocks.
    assert first_plan_row(sched, model, 100.0, 1) == (12, 4)


def test_partial_block_is_never_shared():
    sched, model = make()
    sched.add_request(0, SHARED[:10], max_new_tokens=1)  # blocks: 2 full + 2 tokens of a third
    drain(sched, model)
    sched.add_request(1, SHARED[:11], max_new_tokens=1)
    assert first_plan_row(sched, model, 100.0, 1) == (8, 3)


def test_namespaces_never_share():
    sched, model = make()
    sched.add_request(0, SHARED + [1], max_new_tokens=1, cache_namespace="tenant-a")
    drain(sched, model)
    sched.add_request(1, SHARED + [1], max_new_tokens=1, cache_namespace="tenant-b")
    assert first_plan_row(sched, model, 100.0, 1) == (0, 17)
    sched.add_request(2, SHARED + [1], max_new_tokens=1)  # the default namespace
    assert first_plan_row(sched, model, 101.0, 2) == (0, 17)
    sched.add_request(3, SHARED + [2], max_new_tokens=1, cache_namespace="tenant-a")
    assert first_plan_row(sched, model, 102.0, 3) == (16, 1)


def test_caching_off():
    sched, model = make(enable_prefix_caching=False)
    sched.add_request(0, SHARED + [1], max_new_tokens=1)
    drain(sched, model)
    assert sched.stats().num_cached_blocks == 0 and sched.stats().num_free_blocks == 32
    sched.add_request(1, SHARED + [1], max_new_tokens=1)
    assert first_plan_row(sched, model, 100.0, 1) == (0, 17)


def fill(sched, model, rid, prompt, now, **kwargs):
    sched.add_request(rid, prompt, max_new_tokens=1, arrival_time=now, **kwargs)
    done, _ = drain(sched, model, now=now)
    return done[rid]


def hit(sched, model, rid, prompt, now):
    """Cached tokens of a one-token request with `prompt` admitted at `now`."""
    return fill(sched, model, rid, prompt, now).num_cached_tokens


X, Y = list(range(1, 9)), list(range(11, 19))  # 2 full blocks each
Z = list(range(60, 84))  # 24 tokens: 6 blocks


def test_lru_evicts_the_least_recently_used_blocks():
    sched, model = make(num_blocks=8)
    fill(sched, model, 0, X + [0], 0.0)  # caches X's 2 blocks (the partial third is freed)
    fill(sched, model, 1, Y + [0], 1.0)
    assert hit(sched, model, 2, X + [0, 1], 2.0) == 8  # touches X
    stats = sched.stats()
    assert (stats.num_free_blocks, stats.num_evictable_blocks) == (4, 4)
    fill(sched, model, 3, Z, 3.0)  # needs 6 blocks: 4 free + 2 evicted
    assert sched.stats().num_evicted_blocks == 2
    # (Z's own 6 blocks are now cached too: look X up first, its one new block evicts Z's tail.)
    assert hit(sched, model, 4, X + [7], 4.0) == 8  # X was touched later: kept
    assert hit(sched, model, 5, Y + [7], 5.0) == 0  # Y was older: gone


def test_eviction_takes_a_sequence_tail_first():
    sched, model = make(num_blocks=8)
    fill(sched, model, 0, X + [0], 0.0)
    fill(sched, model, 1, list(range(20, 48)), 1.0)  # 7 blocks: 6 free + X's second block
    assert hit(sched, model, 2, X + [5], 2.0) == 4


def test_priority_eviction_drops_less_important_blocks_first():
    for eviction, kept in [("priority", X), ("lru", Y)]:
        sched, model = make(num_blocks=8, eviction=eviction)
        fill(sched, model, 0, X + [0], 0.0, priority=0)  # older, important
        fill(sched, model, 1, Y + [0], 1.0, priority=3)  # newer, less important
        fill(sched, model, 2, Z, 2.0)  # 6 blocks: 4 free + 2 evicted
        lost = Y if kept is X else X
        assert hit(sched, model, 3, kept + [9], 3.0) == 8, eviction
        assert hit(sched, model, 4, lost + [9], 4.0) == 0, eviction


def test_cached_prefix_tokens_predicts_the_hit_and_changes_nothing():
    sched, model = make()
    sched.add_request(0, SHARED + [1], max_new_tokens=1, cache_namespace="a")
    drain(sched, model)
    before = sched.stats().as_dict()
    prompt = SHARED[:10] + [77, 78, 79, 80, 81]
    assert sched.cached_prefix_tokens(prompt, "a") == 8
    assert sched.cached_prefix_tokens(SHARED, "a") == 12  # the last token is always computed
    assert sched.cached_prefix_tokens(np.asarray(SHARED + [5], dtype=np.int32), "a") == 16
    assert sched.cached_prefix_tokens(SHARED + [5]) == 0 and sched.cached_prefix_tokens(SHARED + [5], "b") == 0
    assert sched.stats().as_dict() == before
    sched.add_request(1, prompt, max_new_tokens=1, cache_namespace="a")
    assert first_plan_row(sched, model, 100.0, 1) == (8, 7)


def _plan_log(sched, model, now=0.0):
    """Every plan's arrays until nothing is left, and what finished."""
    log, done = [], {}
    while sched.has_unfinished():
        plan, fin = step(sched, model, now)
        log.append(
            [a.tolist() for a in (plan.req_ids, plan.cached_lens, plan.query_lens, plan.input_ids, plan.slot_mapping)]
        )
        done.update(
            {rid: (list(f.output_token_ids), f.num_cached_tokens, f.num_computed_tokens) for rid, f in fin.items()}
        )
        now += 1.0
    return log, done, now


def test_a_continuation_plans_exactly_as_the_whole_prompt_sent_again():
    """add_continuation(after=previous) is add_request of previous prompt + output + new tokens."""
    pair = [make(), make()]
    first = SHARED + [1, 2, 3, 4, 5]
    for sched, _model in pair:
        sched.add_request(0, first, max_new_tokens=6, session_id="s")
    ends = [_plan_log(sched, model) for sched, model in pair]
    out = ends[0][1][0][0]
    new = [7, 8, 9, 10, 11, 12, 13]
    (a, model_a), (b, model_b) = pair
    assert a.add_continuation(
        1, 0, np.asarray(new, dtype=np.int32), max_new_tokens=5, arrival_time=ends[0][2], session_id="s"
    )
    b.add_request(1, first + out + new, max_new_tokens=5, arrival_time=ends[1][2], session_id="s")
    assert a.request_info(1) == b.request_info(1)
    log_a, log_b = _plan_log(a, model_a, ends[0][2]), _plan_log(b, model_b, ends[1][2])
    assert log_a == log_b and log_a[1][1][1] == 24  # the memo's cached blocks were hit
    assert a.stats().as_dict() == b.stats().as_dict()


def test_a_continuation_without_its_memo_changes_nothing():
    sched, model = make()
    sched.add_request(0, SHARED + [1], max_new_tokens=2, session_id="s")
    sched.add_request(1, SHARED + [2], max_new_tokens=2, session_id="t")
    drain(sched, model)
    before = sched.stats().as_dict()
    assert not sched.add_continuation(2, 1, [5], session_id="s")  # s's memo is request 0's
    assert not sched.add_continuation(2, 0, [5], session_id="t")
    assert not sched.add_continuation(2, 0, [5], session_id="s", cache_namespace="other")
    assert not sched.has_unfinished() and sched.stats().as_dict() == before
    assert sched.add_continuation(2, 0, [5], session_id="s")
    assert not sched.add_continuation(3, 0, [6], session_id="s")  # the memo was taken
    off, off_model = make(enable_prefix_caching=False)
    off.add_request(0, SHARED + [1], max_new_tokens=2, session_id="s")
    drain(off, off_model)
    assert not off.add_continuation(1, 0, [5], session_id="s")


def test_a_continuation_is_checked_as_the_whole_prompt():
    """Same errors, in the same order, as add_request of the whole prompt; a failed call keeps the memo."""
    pair = [make(max_model_len=40, num_blocks=8), make(max_model_len=40, num_blocks=8)]
    for sched, model in pair:
        sched.add_request(0, SHARED + [1], max_new_tokens=2, session_id="s")
        done, _ = drain(sched, model)
    (a, _), (b, _) = pair
    context = SHARED + [1] + list(done[0].output_token_ids)
    for new, limits in (
        ([3, V, 4], {}),
        ([3, -1], {}),
        ([3] * 30, {}),
        ([V] * 30, {}),
        ([3], {"max_new_tokens": 0}),
        ([3], {"eos_token_id": V}),
        ([3], {"stop_token_ids": [V]}),
        ([3], {"max_new_tokens": 30}),
        ([3], {"arrival_time": float("nan")}),
    ):
        with pytest.raises(ValueError) as whole:
            b.add_request(1, context + new, session_id="s", **limits)
        with pytest.raises(ValueError) as continued:
            a.add_continuation(1, 0, new, session_id="s", **limits)
        assert str(continued.value) == str(whole.value)
    assert str(whole.value) == "request 1: arrival_time must be finite"
    assert a.add_continuation(1, 0, [3], max_new_tokens=2, session_id="s")  # the failed calls kept the memo
    assert a.request_info(1)["num_prompt_tokens"] == len(context) + 1
