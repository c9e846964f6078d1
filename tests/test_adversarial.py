"""The workloads `python -m experiments.adversary` found breaking a policy (tests/data/adversarial/*.json), replayed.

Each file is a shrunk scenario (trace lines and the replica's sizes), the policy and check it broke, what was
measured, and the twin's decisions (steps and a digest of every plan). Here, for each:

* the twin makes exactly those decisions again, and the finding still holds (a policy fixed since is a
  failure here: rerun the search and update or remove the file);
* the engine on the CPU (the tiny model with random weights, each step lasting what the twin's cost model
  prices it at) makes the twin's decisions, plan for plan.

And the search itself, on a property it must find broken and one it must not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from experiments import adversary
from experiments.adversary import Limits, Scenario, check, decisions_digest, run_twin

DATA = Path(__file__).parent / "data" / "adversarial"
FILES = sorted(DATA.glob("*.json"))


def _load(path: Path):
    record = json.loads(path.read_text())
    policy = {k: v for k, v in record["scheduler"].items() if adversary.BASELINE.get(k) != v}
    return record, policy, Scenario.from_json(record["scenario"])


def test_there_are_findings_to_replay():
    assert FILES, "tests/data/adversarial holds the search's findings (python -m experiments.adversary --save ...)"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_the_twin_makes_the_recorded_decisions_and_the_finding_holds(path):
    record, policy, scenario = _load(path)
    run = run_twin(scenario, policy, record=True)
    assert (len(run.keys), decisions_digest(run.keys)) == (record["twin"]["steps"], record["twin"]["digest"])
    found = check(record["check"], scenario, policy, Limits())
    assert found is not None, f"{path.name}: {record['check']} no longer breaks under {record['policy']}"
    assert json.loads(json.dumps(found, default=float)) == record["found"]


def _engine(tmp_path, scenario: Scenario, policy: dict):
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.memory import block_bytes

    config, spec = adversary.write_tiny_model(tmp_path)
    sched = scenario.scheduler(policy)
    sched.pop("max_model_len")
    cfg = dict(
        model=config,
        load_format="dummy",
        device="cpu",
        dtype="float32",
        num_gpu_blocks=scenario.num_blocks,
        enforce_eager=True,
        overlap_decode=False,
        scheduler={**sched, "idle_chunk_size": 0, "max_model_len": adversary.MAX_MODEL_LEN},
    )
    if "tps_floor" in policy.get("admission", ""):
        cfg["step_cost"] = {"model": spec, "hardware": adversary.HARDWARE}
    core = EngineCore(EngineConfig.from_dict(cfg))
    per_block = block_bytes(core.model, adversary.BLOCK_SIZE, core.kv_dtype)
    if scenario.num_host_blocks:  # swap space of exactly that many blocks
        cfg["swap_space_gb"] = scenario.num_host_blocks * per_block / (1 << 30)
        core = EngineCore(EngineConfig.from_dict(cfg))
    assert (core.num_blocks, core.num_host_blocks) == (scenario.num_blocks, scenario.num_host_blocks)
    return core


def _engine_matches_twin(tmp_path, scenario: Scenario, policy: dict):
    """The scenario through the engine on the CPU (each step lasting the twin's price of it): its plan keys equal
    the twin's, one for one. Returns the twin's run."""
    from engine.sampling import SamplingParams
    from experiments.engine_replica import StepLog, cost_clock_engine_replicas
    from sim.simulation import Simulation

    twin = run_twin(scenario, policy, record=True)
    core = _engine(tmp_path, scenario, policy)
    sim = Simulation(adversary.sim_config(scenario, policy), sessions=list(scenario.sessions))
    log = StepLog()
    factory = cost_clock_engine_replicas(
        core, sim.cost_model, sim.cfg.sim.idle_wait_s, sim.cfg.sim.seed, SamplingParams(temperature=0.0), log
    )
    result = sim.run(replica_factory=factory)
    assert result.summary["completed"] == twin.summary["completed"]
    assert len(log.keys) == len(twin.keys)
    for k, (a, b) in enumerate(zip(log.keys, twin.keys)):
        assert a == b, f"step {k}: engine {a} != twin {b}"
    assert core.stats().num_admission_cuts == twin.summary["num_admission_cuts"]
    return twin


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_the_engine_makes_the_twins_decisions(path, tmp_path):
    record, policy, scenario = _load(path)
    _engine_matches_twin(tmp_path, scenario, policy)


def test_the_engine_makes_the_twins_admission_decisions(tmp_path):
    """tps_floor at a floor this tiny model meets only by cutting prefill chunks (a decode step is ~0.3 ms): the
    twin cuts a long prompt that arrives while two requests decode, and the engine, whose step cost is built from
    EngineConfig.step_cost rather than handed over, cuts it the same way, step for step."""
    policy = {"admission": "tps_floor:tok_s=1500,min_chunk=16"}
    scenario = Scenario.from_json(
        {
            "trace": [
                {"session_id": "a", "arrival_time": 0.0, "prompt_tokens": 20, "output_tokens": 120},
                {"session_id": "b", "arrival_time": 0.0, "prompt_tokens": 30, "output_tokens": 120},
                {"session_id": "c", "arrival_time": 0.01, "prompt_tokens": 1800, "output_tokens": 8},
            ],
            "num_blocks": 160,
            "max_num_seqs": 4,
            "chunk_size": 2048,
            "max_num_batched_tokens": 8192,
            "num_host_blocks": 0,
        }
    )
    twin = _engine_matches_twin(tmp_path, scenario, policy)
    assert twin.summary["num_admission_cuts"] > 0


def test_the_search_finds_a_broken_property_and_shrinks_it():
    """A starvation limit a few milliseconds long breaks on almost any scenario with contention: the search
    finds one, and Hypothesis shrinks it to a small one (few calls of few tokens)."""
    # no shrinking deadline: what the shrinker reaches must not depend on how busy this machine is
    found = adversary.search("starvation", {}, Limits(starve_s=0.004), examples=60, seed=1, shrink_s=1e9)
    assert found is not None
    scenario, measured = found
    assert measured["max_ttft_s"] >= 0.004
    # shrunk: few calls (up to 24 are drawn), and no session can go without the property holding again
    assert sum(len(s.turns) for s in scenario.sessions) <= 8, scenario
    for k in range(len(scenario.sessions) if len(scenario.sessions) > 1 else 0):
        fewer = dataclasses.replace(scenario, sessions=scenario.sessions[:k] + scenario.sessions[k + 1 :], removed=0)
        assert check("starvation", fewer, {}, Limits(starve_s=0.004)) is None, (k, scenario)


def test_the_search_reports_none_where_the_property_holds():
    """No request under fcfs waits a minute for its first token on these scenarios (a whole one is < 1 s)."""
    assert adversary.search("starvation", {}, Limits(starve_s=60.0), examples=40, seed=1) is None


def test_the_app_saves_findings_that_this_file_replays(tmp_path, capsys):
    rows = adversary.main(
        ["scheduler.ordering=fcfs", "--checks", "starvation", "--starve-s", "0.004", "--examples", "40"]
        + ["--seed", "1", "--save", str(tmp_path)]
    )
    (row,) = rows
    assert row["finding"] and "FOUND" in capsys.readouterr().out
    record = json.loads(Path(row["file"]).read_text())
    assert record["check"] == "starvation" and record["scheduler"]["ordering"] == "fcfs"
    scenario = Scenario.from_json(record["scenario"])
    assert Scenario.from_json(scenario.to_json()) == scenario
    run = run_twin(scenario, {}, record=True)
    assert decisions_digest(run.keys) == record["twin"]["digest"]


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="unknown policy 'nope'"):
        adversary.policy_of(["policy=nope"])
    with pytest.raises(SystemExit, match="unknown key"):
        adversary.policy_of(["scheduler.chunk_size=5"])
    with pytest.raises(ValueError, match="unknown policy"):
        adversary.policy_of(["scheduler.ordering=nope"])
    with pytest.raises(ValueError, match="unknown check"):
        check(
            "nope",
            Scenario.from_json(
                {
                    "trace": [{"session_id": "a", "arrival_time": 0.0, "prompt_tokens": 1, "output_tokens": 1}],
                    "num_blocks": 4,
                    "max_num_seqs": 1,
                    "chunk_size": 16,
                    "max_num_batched_tokens": 16,
                    "num_host_blocks": 0,
                }
            ),
            {},
            Limits(),
        )
