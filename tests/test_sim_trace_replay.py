"""Replaying a trace: every session of the file unless told otherwise, in both loop modes, and
every way a trace file can be wrong reported before the run, with its path."""

from __future__ import annotations

import pytest
from test_sim import SMOL, tiny_hardware

from sim.simulation import Simulation
from sim.specs import ModelSpec
from sim.workloads import Session, Turn, write_trace


def short_sessions(n: int, gap: float = 0.5) -> list[Session]:
    """`n` two-call sessions of a few hundred tokens, one every `gap` seconds."""
    return [Session(f"s{i}", i * gap, -1, 0, (Turn(60 + i % 7, 4, 0.2), Turn(20, 3, 0.0))) for i in range(n)]


def trace_config(path, **sim) -> dict:
    return {
        "model": {k: getattr(SMOL, k) for k in ModelSpec.__dataclass_fields__},
        "hardware": tiny_hardware(4000),
        "workload": {"name": "trace", "params": {"path": str(path)}},
        "sim": {"progress": False, **sim},
        "wandb": {"mode": "disabled"},
    }


@pytest.fixture
def trace_250(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trace(str(path), short_sessions(250))
    return path


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_trace_with_fewer_sessions_than_asked_replays_them_all(trace_250, mode):
    # was: SimPy's "No scheduled events left" (the run waited for sessions the file does not have)
    result = Simulation(trace_config(trace_250, num_sessions=400, mode=mode, concurrency=8)).run()
    s = result.summary
    assert (s["num_sessions"], s["num_sessions_planned"], s["num_requests"], s["completed"]) == (250, 250, 500, True)


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_num_sessions_unset_replays_the_whole_trace_and_a_number_caps_it(trace_250, mode):
    whole = Simulation(trace_config(trace_250, mode=mode)).run()
    assert whole.summary["num_sessions"] == whole.summary["num_sessions_planned"] == 250
    assert whole.summary["num_requests"] == 500 and not any("replayed" in note for note in whole.notes)
    capped = Simulation(trace_config(trace_250, num_sessions=200, mode=mode)).run()
    assert capped.summary["num_sessions"] == 200 and capped.summary["num_requests"] == 400
    assert capped.notes[0] == (
        "replayed the first 200 of the trace's 250 sessions (sim.num_sessions=200; null replays them all)"
    )


def test_a_generated_workload_needs_a_number_of_sessions():
    cfg = {"workload": {"name": "chat", "params": {}}, "sim": {"progress": False}, "wandb": {"mode": "disabled"}}
    with pytest.raises(ValueError, match="sim.num_sessions: workload 'chat' generates sessions without end"):
        Simulation(cfg)


def test_a_missing_trace_file_fails_in_the_config_check_naming_its_path(tmp_path):
    from sim.config import from_mapping, validate

    missing = tmp_path / "no" / "such.jsonl"
    with pytest.raises(ValueError, match=f"workload.params.path: no such trace file '{missing}'"):
        validate(from_mapping(trace_config(missing)))


def test_an_empty_trace_fails_before_the_run_naming_its_path(tmp_path):
    # An empty file is almost always a failed export or the wrong path: an error, not a run of 0 requests.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"the trace '{empty}' has no sessions"):
        Simulation(trace_config(empty))


def test_a_bad_trace_line_fails_before_the_run(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_trace(str(path), short_sessions(3))
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl, line 7"):
        Simulation(trace_config(path))


def test_a_run_parses_its_trace_once_and_a_changed_file_again(tmp_path):
    """The config check and the replay share one parse; a rewritten file is read afresh."""
    from sim import workloads

    path = tmp_path / "t.jsonl"
    write_trace(str(path), short_sessions(5))
    workloads._read_trace.cache_clear()
    result = Simulation(trace_config(path)).run()
    assert result.summary["num_sessions"] == 5
    assert workloads._read_trace.cache_info().misses == 1
    write_trace(str(path), short_sessions(7))
    assert len(workloads.load_trace(str(path))) == 7
