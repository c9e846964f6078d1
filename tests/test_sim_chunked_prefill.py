"""The twin's chunked prefill: scheduler.idle_chunk_size selects the scheduler's rule (csrc/scheduler.cpp)
exactly as the engine does, and the step-cost model prices the larger chunks it plans."""

from __future__ import annotations

import pytest

from sim.config import from_mapping, scheduler_config, validate
from sim.simulation import Simulation
from sim.workloads import Session, Turn, write_trace

CHUNK, IDLE = 2048, 16384


def run(tmp_path, sessions, idle: int, step_overhead_s: float = 0.0):
    trace = tmp_path / f"trace_{idle}.jsonl"
    write_trace(str(trace), sessions)
    cfg = {
        "workload": {"name": "trace", "params": {"path": str(trace)}},
        "hardware": {"step_overhead_s": step_overhead_s},
        "scheduler": {"chunk_size": CHUNK, "max_num_batched_tokens": 8192, "idle_chunk_size": idle},
        "sim": {"num_sessions": len(sessions), "progress": False},
        "wandb": {"mode": "disabled"},
    }
    return Simulation(cfg).run()


def lone(prompt: int, output: int) -> list[Session]:
    return [Session("a", 0.0, -1, 0, (Turn(prompt, output, 0.0),))]


@pytest.mark.parametrize("step_overhead_s", [0.0, 0.002])
def test_a_lone_50k_prompt_takes_fewer_larger_steps_and_less_ttft(tmp_path, step_overhead_s):
    base = run(tmp_path, lone(50_000, 4), 0, step_overhead_s)
    idle = run(tmp_path, lone(50_000, 4), IDLE, step_overhead_s)
    # 50,000 = 24 * 2048 + 848 = 3 * 16384 + 848; then 3 decodes
    assert base.collector.step_tokens == [CHUNK] * 24 + [848] + [1] * 3
    assert idle.collector.step_tokens == [IDLE] * 3 + [848] + [1] * 3
    assert (base.summary["num_steps"], idle.summary["num_steps"]) == (28, 7)
    assert idle.requests.iloc[0].computed_tokens == base.requests.iloc[0].computed_tokens == 50_003
    # The roofline (Llama-3-8B on an H100) prices a prefill's FLOPs whatever its chunks, compute-bound
    # from 2048 tokens on; what 21 fewer steps save is their per-step overhead.
    ttft_base, ttft_idle = base.requests.iloc[0].ttft, idle.requests.iloc[0].ttft
    assert ttft_base - ttft_idle == pytest.approx(21 * step_overhead_s, abs=1e-9)
    if step_overhead_s:
        assert ttft_idle < ttft_base


def test_with_a_decode_running_the_chunk_stays_at_chunk_size(tmp_path):
    # `a` decodes 400 tokens from t ~ 0; `b`'s 50K prompt arrives at 0.5 s, while `a` still decodes,
    # and then decodes itself: some decode waits in every step, so idle_chunk_size changes nothing.
    sessions = [Session("a", 0.0, -1, 0, (Turn(200, 400, 0.0),)), Session("b", 0.5, -1, 0, (Turn(50_000, 4, 0.0),))]
    base, idle = run(tmp_path, sessions, 0), run(tmp_path, sessions, IDLE)
    assert idle.collector.step_tokens == base.collector.step_tokens
    assert idle.collector.step_start == base.collector.step_start
    assert idle.collector.requests == base.collector.requests
    mixed = [t for t, r in zip(idle.collector.step_tokens, idle.collector.step_reqs) if r == 2]
    assert len(mixed) >= 25 and max(mixed) == CHUNK + 1  # b's chunks beside a's decode: the stall bound


def test_the_hydra_config_selects_it_and_bad_values_name_the_setting():
    cfg = from_mapping({"scheduler": {"idle_chunk_size": IDLE}})
    validate(cfg)
    assert scheduler_config(cfg, num_blocks=64, num_host_blocks=0).idle_chunk_size == IDLE
    assert scheduler_config(from_mapping({}), num_blocks=64, num_host_blocks=0).idle_chunk_size == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="scheduler.idle_chunk_size must be (an int|>= 0)"):
            validate(from_mapping({"scheduler": {"idle_chunk_size": bad}}))


def test_the_simulate_command_line_sets_it():
    from test_cli_overrides import composed

    cfg = composed("experiments.simulate", "scheduler.idle_chunk_size=16384")
    assert cfg["scheduler"]["idle_chunk_size"] == IDLE
    cfg.pop("hydra", None)
    sim_cfg = from_mapping({k: v for k, v in cfg.items() if k != "defaults"})
    assert scheduler_config(sim_cfg, num_blocks=64, num_host_blocks=0).idle_chunk_size == IDLE
