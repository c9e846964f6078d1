"""Workload generators: determinism, calibrated statistics, trace replay and validation."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.workloads import (
    AgenticCodingConfig,
    Session,
    Turn,
    make_workload,
    summarize,
    write_trace,
)

EXAMPLE_TRACE = os.path.join(os.path.dirname(__file__), "data", "example_trace.jsonl")
SYNTHETIC = ["agentic_coding", "swe_smith", "chat"]
few_examples = settings(max_examples=30)


@pytest.fixture(scope="module")
def agentic_sample() -> list[Session]:
    """3000 coding sessions without human pauses, so every pause is a tool pause."""
    return make_workload("agentic_coding", {"human_pause_prob": 0.0}).sessions(3000, seed=7)


def assert_well_formed(sessions: list[Session]) -> None:
    """Positive tokens, non-negative pauses, a final 0 pause, sorted starts, consistent prefixes."""
    starts = [s.start_time for s in sessions]
    assert starts == sorted(starts)
    prefix_sizes: dict[int, int] = {}
    for s in sessions:
        assert s.turns and s.turns[-1].pause_after == 0.0
        assert prefix_sizes.setdefault(s.prefix_id, s.prefix_tokens) == s.prefix_tokens
        for t in s.turns:
            assert t.new_tokens >= 1 and t.output_tokens >= 1 and t.pause_after >= 0


def gaps(sessions: list[Session]) -> np.ndarray:
    return np.diff([s.start_time for s in sessions])


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", SYNTHETIC)
def test_same_seed_gives_identical_sessions(name):
    workload = make_workload(name)
    assert workload.sessions(50, seed=3) == make_workload(name).sessions(50, seed=3)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_different_seeds_give_different_sessions(name):
    workload = make_workload(name)
    a, b = workload.sessions(20, seed=1), workload.sessions(20, seed=2)
    assert [s.turns for s in a] != [s.turns for s in b]
    assert [s.start_time for s in a] != [s.start_time for s in b]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_iter_sessions_yields_the_same_sequence_as_sessions(name):
    workload = make_workload(name)
    stream = workload.iter_sessions(seed=5, rate=0.7)
    assert [next(stream) for _ in range(30)] == workload.sessions(30, seed=5, rate=0.7)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_session_shapes_do_not_depend_on_rate_or_count(name):
    workload = make_workload(name)
    slow, fast = workload.sessions(10, seed=9, rate=0.01), workload.sessions(20, seed=9, rate=100.0)
    assert [s.turns for s in slow] == [s.turns for s in fast[:10]]
    assert slow[0].start_time == fast[0].start_time == 0.0
    assert slow[5].start_time == pytest.approx(fast[5].start_time * 1e4)


# --------------------------------------------------------------------------- agentic_coding


def test_agentic_tool_pauses_have_the_configured_median_and_p90(agentic_sample):
    pauses = [t.pause_after for s in agentic_sample for t in s.turns[:-1]]
    assert np.median(pauses) == pytest.approx(0.3, rel=0.10)
    assert np.percentile(pauses, 90) == pytest.approx(13.6, rel=0.15)
    assert max(pauses) <= AgenticCodingConfig().tool_pause_max


def test_agentic_token_means_match_the_config(agentic_sample):
    s = summarize(agentic_sample)
    assert s["output_tokens_mean"] == pytest.approx(520, rel=0.05)
    assert s["new_tokens_mean"] == pytest.approx(250, rel=0.05)
    assert s["calls_per_session_mean"] == pytest.approx(20, rel=0.10)
    assert all(1 <= t.output_tokens <= 4096 for x in agentic_sample for t in x.turns)


def test_agentic_prefixes_are_in_range_and_shared_exactly_by_id(agentic_sample):
    by_id: dict[int, set[int]] = {}
    for s in agentic_sample:
        by_id.setdefault(s.prefix_id, set()).add(s.prefix_tokens)
    assert sorted(by_id) == [0, 1, 2, 3]
    assert all(len(sizes) == 1 and 20_000 <= min(sizes) <= 60_000 for sizes in by_id.values())


def test_agentic_contexts_stay_within_context_max(agentic_sample):
    assert summarize(agentic_sample)["context_tokens_max"] <= AgenticCodingConfig().context_max


def test_agentic_arrivals_are_a_gamma_renewal_process_with_the_configured_rate_and_cv(agentic_sample):
    g = gaps(agentic_sample)
    assert g.mean() == pytest.approx(1 / 0.2, rel=0.10)
    assert g.std() / g.mean() == pytest.approx(2.0, rel=0.15)


def test_agentic_human_pauses_replace_tool_pauses_at_the_configured_rate():
    params = {"tool_pause_median": 0.001, "tool_pause_p90": 0.002, "tool_pause_max": 0.01}
    sessions = make_workload("agentic_coding", params).sessions(600, seed=1)
    pauses = np.array([t.pause_after for s in sessions for t in s.turns[:-1]])
    human = pauses[pauses > 0.01]
    assert len(human) / len(pauses) == pytest.approx(0.05, rel=0.15)
    assert human.mean() == pytest.approx(120, rel=0.15)


def test_agentic_without_prefixes_has_prefix_id_minus_one():
    sessions = make_workload("agentic_coding", {"num_prefixes": 0}).sessions(5, seed=0)
    assert {(s.prefix_id, s.prefix_tokens) for s in sessions} == {(-1, 0)}


# --------------------------------------------------------------------------- swe_smith and chat


def test_swe_smith_has_the_exact_tokenspeed_shape():
    sessions = make_workload("swe_smith").sessions(300, seed=0)
    assert {len(s.turns) for s in sessions} == set(range(10, 16))
    for s in sessions:
        assert (s.prefix_id, s.prefix_tokens) == (-1, 0)
        assert [t.new_tokens for t in s.turns] == [50_000] + [800] * (len(s.turns) - 1)
        assert {(t.output_tokens, t.pause_after) for t in s.turns} == {(500, 0.0)}
    assert gaps(sessions).mean() == pytest.approx(10.0, rel=0.15)


def test_chat_medians_and_turn_counts_are_near_the_defaults():
    sessions = make_workload("chat").sessions(2000, seed=0)
    first = [s.turns[0].new_tokens for s in sessions]
    later = [t.new_tokens for s in sessions for t in s.turns[1:]]
    outputs = [t.output_tokens for s in sessions for t in s.turns]
    thinks = [t.pause_after for s in sessions for t in s.turns[:-1]]
    assert np.median(first) == pytest.approx(170, rel=0.10)
    assert np.median(later) == pytest.approx(80, rel=0.10)
    assert np.median(outputs) == pytest.approx(115, rel=0.10)
    assert np.median(thinks) == pytest.approx(15, rel=0.10)
    assert np.mean([len(s.turns) for s in sessions]) == pytest.approx(3.5, rel=0.10)
    assert np.mean([len(s.turns) == 1 for s in sessions]) == pytest.approx(0.3, rel=0.10)
    g = gaps(sessions)
    assert g.mean() == pytest.approx(1.0, rel=0.10) and g.std() / g.mean() == pytest.approx(1.0, rel=0.10)


# --------------------------------------------------------------------------- properties


@st.composite
def agentic_params(draw):
    prefix_max = draw(st.integers(1, 5000))
    new_max, out_max = draw(st.integers(2, 2000)), draw(st.integers(2, 2000))
    median = draw(st.floats(0.01, 10))
    p90 = median * draw(st.floats(1, 50))
    return {
        "session_rate": draw(st.floats(0.01, 100)),
        "arrival_cv": draw(st.floats(0.1, 4)),
        "num_prefixes": draw(st.integers(0, 6)),
        "prefix_tokens_max": prefix_max,
        "prefix_tokens_min": draw(st.integers(1, prefix_max)),
        "new_tokens_max": new_max,
        "new_tokens_mean": draw(st.floats(1, new_max - 0.5)),
        "new_tokens_sigma": draw(st.floats(0, 2.5)),
        "output_max": out_max,
        "output_mean": draw(st.floats(1, out_max - 0.5)),
        "output_sigma": draw(st.floats(0, 2.5)),
        "calls_mean": draw(st.floats(1, 30)),
        "calls_max": draw(st.integers(30, 100)),
        "tool_pause_median": median,
        "tool_pause_p90": p90,
        "tool_pause_max": p90 * 2,
        "human_pause_prob": draw(st.floats(0, 1)),
        "human_pause_mean": draw(st.floats(0.1, 1000)),
        "context_max": prefix_max + new_max + out_max + draw(st.integers(0, 20_000)),
    }


@st.composite
def chat_params(draw):
    single = draw(st.floats(0, 0.99))
    return {
        "session_rate": draw(st.floats(0.01, 100)),
        "single_turn_prob": single,
        "turns_mean": draw(st.floats(2 - single, 20)),
        "turns_max": draw(st.integers(20, 80)),
        "first_prompt_median": draw(st.floats(1, 500)),
        "later_prompt_median": draw(st.floats(1, 500)),
        "prompt_sigma": draw(st.floats(0, 2)),
        "output_median": draw(st.floats(1, 500)),
        "output_sigma": draw(st.floats(0, 2)),
        "think_time_median": draw(st.floats(0.01, 100)),
        "think_time_sigma": draw(st.floats(0, 2)),
        "context_max": draw(st.integers(8192 + 2048, 20_000)),
    }


@few_examples
@given(params=agentic_params(), seed=st.integers(0, 2**32))
def test_any_valid_agentic_params_give_well_formed_sessions_within_context(params, seed):
    sessions = make_workload("agentic_coding", params).sessions(8, seed)
    assert_well_formed(sessions)
    assert summarize(sessions)["context_tokens_max"] <= params["context_max"]
    assert all(
        s.prefix_tokens == 0 or params["prefix_tokens_min"] <= s.prefix_tokens <= params["prefix_tokens_max"]
        for s in sessions
    )


@few_examples
@given(params=chat_params(), seed=st.integers(0, 2**32))
def test_any_valid_chat_params_give_well_formed_sessions(params, seed):
    assert_well_formed(make_workload("chat", params).sessions(8, seed))


@few_examples
@given(turns_min=st.integers(1, 20), extra=st.integers(0, 5), seed=st.integers(0, 2**32))
def test_any_valid_swe_smith_params_give_turn_counts_in_range(turns_min, extra, seed):
    params = {"turns_min": turns_min, "turns_max": turns_min + extra, "session_rate": 3.0}
    sessions = make_workload("swe_smith", params).sessions(8, seed)
    assert_well_formed(sessions)
    assert all(turns_min <= len(s.turns) <= turns_min + extra for s in sessions)


turns = st.builds(
    Turn, st.integers(1, 10**6), st.integers(1, 10**5), st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
)
id_turns = st.lists(st.integers(0, 2**31), min_size=1, max_size=6).map(lambda ids: Turn(len(ids), 3, 1.5, tuple(ids)))


@st.composite
def trace_sessions(draw):
    count = draw(st.integers(0, 5))
    sessions = []
    for index in range(count):
        body = draw(st.lists(turns | id_turns, min_size=1, max_size=4))
        body[-1] = Turn(body[-1].new_tokens, body[-1].output_tokens, 0.0, body[-1].new_token_ids)
        prefix_id = draw(st.integers(-1, 2))
        sessions.append(
            Session(
                f"s{index}",
                draw(st.floats(0, 1e9)),
                prefix_id,
                0 if prefix_id == -1 else 100 * (prefix_id + 1),
                tuple(body),
            )
        )
    return sorted(sessions, key=lambda s: s.start_time)


@few_examples
@given(sessions=trace_sessions())
def test_any_sessions_round_trip_through_write_trace(sessions, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("trace") / "t.jsonl")
    write_trace(path, sessions)
    assert make_workload("trace", {"path": path}).sessions(10, seed=0) == sessions


# --------------------------------------------------------------------------- traces


def test_example_trace_loads_sorted_by_start_with_contexts_replayed():
    sessions = make_workload("trace", {"path": EXAMPLE_TRACE}).sessions(10, seed=0)
    assert sessions == [
        Session(
            "agent-a", 0.0, 0, 2048, (Turn(1200, 300, 2.5), Turn(250, 180, 0.4), Turn(310, 95, 35.0), Turn(60, 8, 0.0))
        ),
        Session(
            "chat-b",
            0.5,
            -1,
            0,
            (Turn(5, 40, 12.0, (101, 2023, 2003, 1037, 3231)), Turn(3, 25, 0.0, (2129, 2055, 1037))),
        ),
        Session("agent-c", 1.5, 0, 2048, (Turn(900, 220, 0.3), Turn(120, 512, 0.0))),
    ]


def test_example_trace_summary():
    s = summarize(make_workload("trace", {"path": EXAMPLE_TRACE}).iter_sessions(seed=0))
    assert (s["sessions"], s["calls"], s["distinct_prefixes"]) == (3, 8, 1)
    assert s["new_tokens_mean"] == (1200 + 250 + 310 + 60 + 5 + 3 + 900 + 120) / 8
    assert s["pause_median"] == 2.5 and s["span_seconds"] == 1.5
    assert s["context_tokens_max"] == 2048 + 1200 + 300 + 250 + 180 + 310 + 95 + 60 + 8


def test_trace_sessions_takes_the_first_n_and_iter_sessions_stops(tmp_path):
    workload = make_workload("trace", {"path": EXAMPLE_TRACE})
    assert [s.session_id for s in workload.sessions(2, seed=1, rate=5.0)] == ["agent-a", "chat-b"]
    assert len(list(workload.iter_sessions(seed=0))) == 3


def test_generated_sessions_round_trip_through_write_trace(tmp_path):
    sessions = make_workload("agentic_coding").sessions(20, seed=4)
    path = str(tmp_path / "agentic.jsonl")
    write_trace(path, sessions)
    assert make_workload("trace", {"path": path}).sessions(20, seed=0) == sessions


GOOD = {"arrival_time": 0.0, "session_id": "a", "prompt_tokens": 10, "output_tokens": 5}
BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"session_id": "b", "prompt_tokens": 3, "output_tokens": 1}), "'arrival_time'"),
    (json.dumps({"arrival_time": 1, "prompt_tokens": 3, "output_tokens": 1}), "'session_id'"),
    (json.dumps({"session_id": "a", "output_tokens": 1}), "prompt_tokens"),
    (json.dumps({"session_id": "a", "prompt_tokens": 3}), "'output_tokens'"),
    (json.dumps({**GOOD, "prompt_token_ids": [1]}), "exactly one"),
    (json.dumps({**GOOD, "session_id": "b", "prompt_tokens": "3"}), "'prompt_tokens'"),
    (json.dumps({**GOOD, "session_id": "b", "prompt_tokens": 3.0}), "'prompt_tokens'"),
    (json.dumps({**GOOD, "session_id": 7}), "'session_id'"),
    (json.dumps({**GOOD, "output_tokens": 0}), "'output_tokens'"),
    (json.dumps({**GOOD, "output_tokens": True}), "'output_tokens'"),
    (json.dumps({**GOOD, "pause_after": -1.0}), "'pause_after'"),
    (json.dumps({**GOOD, "session_id": "b", "arrival_time": -2}), "'arrival_time'"),
    ('{"session_id": "b", "arrival_time": NaN, "prompt_tokens": 1, "output_tokens": 1}', "'arrival_time'"),
    (json.dumps({**GOOD, "prompt_tokens": None}), "'prompt_tokens'"),
    (
        json.dumps({k: v for k, v in GOOD.items() if k != "prompt_tokens"} | {"prompt_token_ids": []}),
        "'prompt_token_ids'",
    ),
    (json.dumps({**GOOD, "prompt_tokens": 0}), "'prompt_tokens'"),
    (json.dumps({**GOOD, "tokens": 3}), "unknown fields"),
    (json.dumps({**GOOD, "prefix_id": 1, "prefix_tokens": 9}), "first line"),
    (json.dumps({**GOOD, "session_id": "b", "prefix_id": 1}), "go together"),
    (json.dumps({**GOOD, "session_id": "b", "prefix_id": 1, "prefix_tokens": 0}), "prefix_tokens must be 0"),
    (json.dumps({**GOOD, "session_id": "b", "prefix_id": 0, "prefix_tokens": 9}), "prefix_id 0 has"),
    (json.dumps({**GOOD, "session_id": "b", "prefix_id": -2, "prefix_tokens": 0}), "'prefix_id'"),
]


@pytest.mark.parametrize("bad_line,fragment", BAD_LINES)
def test_every_trace_error_names_the_file_and_line(tmp_path, bad_line, fragment):
    path = tmp_path / "bad.jsonl"
    first = {**GOOD, "prefix_id": 0, "prefix_tokens": 4}
    path.write_text(json.dumps(first) + "\n\n" + bad_line + "\n")
    with pytest.raises(ValueError) as err:
        make_workload("trace", {"path": str(path)}).sessions(5, seed=0)
    assert f"{path}, line 3" in str(err.value) and fragment in str(err.value)


def test_write_trace_rejects_duplicate_session_ids(tmp_path):
    session = make_workload("swe_smith").sessions(1, seed=0)[0]
    with pytest.raises(ValueError, match="duplicate session_id"):
        write_trace(str(tmp_path / "t.jsonl"), [session, session])


# --------------------------------------------------------------------------- validation


def test_unknown_parameters_are_rejected_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown .*\['sesion_rate'\].*known: .*'session_rate'"):
        make_workload("agentic_coding", {"sesion_rate": 1.0})
    with pytest.raises(ValueError, match="unknown workload 'nope'.*agentic_coding"):
        make_workload("nope")


BAD_VALUES = [
    ("agentic_coding", {"session_rate": -1.0}, "session_rate"),
    ("agentic_coding", {"arrival_cv": 0}, "arrival_cv"),
    ("agentic_coding", {"prefix_tokens_min": 70_000}, "prefix_tokens_max"),
    ("agentic_coding", {"human_pause_prob": 1.5}, "human_pause_prob"),
    ("agentic_coding", {"output_mean": 0.0}, "output_mean"),
    ("agentic_coding", {"output_mean": 5000.0}, "output_max"),
    ("agentic_coding", {"tool_pause_p90": 0.1}, "tool_pause_p90"),
    ("agentic_coding", {"new_tokens_sigma": -0.1}, "new_tokens_sigma"),
    ("agentic_coding", {"context_max": 50_000}, "context_max"),
    ("agentic_coding", {"num_prefixes": 2.5}, "num_prefixes"),
    ("agentic_coding", {"calls_mean": True}, "calls_mean"),
    ("agentic_coding", {"session_rate": math.inf}, "session_rate"),
    ("swe_smith", {"turns_min": 16}, "turns_max"),
    ("swe_smith", {"output_tokens": 0}, "output_tokens"),
    ("chat", {"single_turn_prob": -0.1}, "single_turn_prob"),
    ("chat", {"turns_mean": 1.2}, "turns_mean"),
    ("chat", {"think_time_median": 0}, "think_time_median"),
    ("trace", {}, "path"),
]


@pytest.mark.parametrize("name,params,param", BAD_VALUES)
def test_bad_values_are_rejected_naming_the_parameter(name, params, param):
    with pytest.raises(ValueError, match=rf"\b{param}\b"):
        make_workload(name, params)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_sessions": -1, "seed": 0}, {"num_sessions": 3, "seed": -1}, {"num_sessions": 3, "seed": 0, "rate": 0.0}],
)
def test_bad_call_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        make_workload("chat").sessions(**kwargs)


def test_integer_parameters_are_accepted_for_float_fields():
    workload = make_workload("chat", {"session_rate": 2, "turns_mean": 4})
    assert workload.config.session_rate == 2.0 and isinstance(workload.config.session_rate, float)
