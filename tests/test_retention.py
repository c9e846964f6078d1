"""Session retention: a finished turn's KV stays pinned for the TTL under memory pressure, then not."""

from __future__ import annotations

import pytest

from controlplane.testing import reference_generate

from helpers import drain, make, step

V = 97
TURN1 = list(range(1, 13))  # 12 tokens; with 4 outputs the turn leaves 3 full blocks (15 KV tokens)


def first_turn(sched, model):
    """Runs turn 1 of session "s" from t=0; returns (its tokens, the time it ended)."""
    sched.add_request(1, TURN1, max_new_tokens=4, session_id="s")
    done, now = {}, 0.0
    while sched.has_unfinished():
        _, fin = step(sched, model, now)
        done.update(fin)
        now += 1.0
    end = now - 1.0
    assert list(done[1].output_token_ids) == reference_generate(TURN1, 4, V)
    return TURN1 + list(done[1].output_token_ids), end


def pressure(sched, model, start, count=10):
    """`count` unrelated one-shot requests, one after another from `start`: each leaves a cached block."""
    now = start
    for k in range(count):
        sched.add_request(100 + k, [60 + k, 1, 1, 1, 1, 1, 1], max_new_tokens=1, arrival_time=now)
        while sched.has_unfinished():
            step(sched, model, now)
            now += 0.1
    return now


def second_turn_hit(sched, model, history, now):
    prompt = history + [90, 91, 92]
    sched.add_request(2, prompt, max_new_tokens=3, session_id="s", arrival_time=now)
    done, _ = drain(sched, model, now=now)
    assert list(done[2].output_token_ids) == reference_generate(prompt, 3, V)
    return done[2].num_cached_tokens


@pytest.mark.parametrize(
    "eviction, pause, expected_hit",
    [
        ("ttl:ttl=10", 5.0, 12),  # pause shorter than the TTL: the whole previous turn is reused
        ("ttl:ttl=10", 20.0, 0),  # longer: the pin expired, pressure evicted it
        ("lru", 5.0, 0),  # no retention: pressure evicts the oldest blocks, the session's
    ],
)
def test_ttl_keeps_a_session_across_a_short_pause_only(eviction, pause, expected_hit):
    sched, model = make(num_blocks=8, eviction=eviction)
    history, end = first_turn(sched, model)
    pinned = 3 if eviction.startswith("ttl") else 0
    assert sched.stats().num_pinned_blocks == pinned
    assert sched.stats().num_evictable_blocks == 3 - pinned
    # Pressure during the second half of the pause (after the pin expired for the long pause).
    pressure(sched, model, end + pause / 2 + 0.5)
    assert sched.stats().num_evicted_blocks > 0
    assert second_turn_hit(sched, model, history, end + pause) == expected_hit
    sched.check_invariants()


def test_end_session_releases_the_pins():
    sched, model = make(num_blocks=8, eviction="ttl:ttl=1000")
    history, end = first_turn(sched, model)
    assert sched.stats().num_pinned_blocks == 3
    assert sched.end_session("s", end + 1) == 3
    assert sched.end_session("s", end + 1) == 0
    stats = sched.stats()
    assert (stats.num_pinned_blocks, stats.num_evictable_blocks) == (0, 3)
    pressure(sched, model, end + 2)
    assert second_turn_hit(sched, model, history, end + 5) == 0


def test_ending_one_session_keeps_another():
    sched, model = make(num_blocks=12, eviction="ttl:ttl=1000")
    sched.add_request(1, TURN1, max_new_tokens=4, session_id="s")
    sched.add_request(2, list(range(20, 32)), max_new_tokens=4, session_id="t")
    _, now = drain(sched, model)
    assert sched.stats().num_pinned_blocks == 6
    assert sched.end_session("t", now) == 3
    assert sched.stats().num_pinned_blocks == 3


def test_pinned_blocks_are_not_taken_until_the_pin_expires():
    sched, model = make(num_blocks=8, eviction="ttl:ttl=10")
    _, end = first_turn(sched, model)  # 3 blocks pinned until end + 10
    big = list(range(30, 54))  # 24 tokens: 6 blocks, but only 5 are free
    sched.add_request(7, big, max_new_tokens=1, arrival_time=end + 1)
    plan, _ = step(sched, model, end + 1)
    assert plan.is_empty and sched.stats().num_waiting == 1
    plan, _ = step(sched, model, end + 9.9)
    assert plan.is_empty
    plan, done = step(sched, model, end + 10)  # expired: now evictable, as LRU
    assert plan.req_ids.tolist() == [7] and 7 in done
    assert sched.stats().num_evicted_blocks == 1


def test_next_turn_renews_the_pin():
    sched, model = make(num_blocks=10, eviction="ttl:ttl=10")
    history, end = first_turn(sched, model)
    prompt2 = history + [90, 91, 92]  # 19 tokens
    sched.add_request(2, prompt2, max_new_tokens=3, session_id="s", arrival_time=end + 8)
    done, now = drain(sched, model, now=end + 8)
    assert done[2].num_cached_tokens == 12
    # Turn 1's pin ran out at end + 10 while turn 2 held its blocks; turn 2 ended at end + 10
    # and pinned all 5 of its full blocks (21 KV tokens) until end + 20.
    assert sched.stats().num_pinned_blocks == 5
    pressure(sched, model, end + 14)
    prompt3 = prompt2 + list(done[2].output_token_ids) + [93]
    sched.add_request(3, prompt3, max_new_tokens=1, session_id="s", arrival_time=end + 18)
    done, _ = drain(sched, model, now=end + 18)
    assert done[3].num_cached_tokens == 20
