"""experiments.bench_agentic end to end on the CPU: a tiny random-weight Llama served by `python -m engine.serve`
at concurrency 1, 2 and 4, beside the roofline twin on the rates measured here.

CPU step times are noisy: nothing here asserts how close the engine comes to the bound, only what was run,
that the twin ran the very sessions the server was sent, and that the roofline bounds the engine (on this
model the engine's per-step overhead puts it ten times or more past the bound).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from experiments import bench_agentic
from experiments.bench_agentic import FIGURES, Figures, workload_params

from engine_helpers import write_tiny_config

MODEL_YAML = """\
name: tiny
num_layers: 2
hidden_size: 128
num_heads: 8
num_kv_heads: 2
head_dim: 32
intermediate_size: 256
vocab_size: 1024
dtype_bytes: 4
"""


def test_figures_split_first_turns_from_later_ones():
    requests = pd.DataFrame({"turn": [0, 1, 2, 0, 1, 2, 3], "ttft": [3.0, 0.1, 0.2, 5.0, 0.3, 0.4, 0.5]})
    f = Figures.of({"per_user_tok_s_mean": 80.0, "per_gpu_output_tok_min": 6000.0}, requests)
    assert f.first_turn_ttft_s == 4.0
    assert f.later_ttft_s_p50 == 0.3
    assert math.isclose(f.later_ttft_s_p90, float(np.percentile([0.1, 0.2, 0.3, 0.4, 0.5], 90)))
    assert (f.per_user_tok_s, f.per_gpu_output_tok_min) == (80.0, 6000.0)


def test_workload_params_overrides_come_last():
    assert workload_params("cuda", False, {}) == {"turns_min": 4, "turns_max": 4}
    assert workload_params("cuda", True, {"output_tokens": 7})["output_tokens"] == 7
    assert workload_params("cpu", True, {})["turns_max"] == 2


def test_the_twin_takes_the_servers_fp8_options(tmp_path):
    import torch

    (tmp_path / "tiny.yaml").write_text(MODEL_YAML)
    config = write_tiny_config(tmp_path, "LlamaForCausalLM", vocab_size=1024, max_position_embeddings=4096)
    model = str(tmp_path / "tiny.yaml")
    plain = bench_agentic.twin_model(model, config, torch.bfloat16, {"load_format": "dummy"})
    fp8 = bench_agentic.twin_model(model, config, torch.bfloat16, {"kv_cache_dtype": "fp8_e4m3", "quantization": "fp8"})
    assert (plain.dtype_bytes, plain.kv_cache_dtype, plain.quantization) == (2, "auto", "none")
    assert (fp8.dtype_bytes, fp8.kv_cache_dtype, fp8.quantization) == (2, "fp8_e4m3", "fp8")


def test_the_twin_runs_fp8_linears_at_the_measured_fp8_rate_or_the_bf16_one():
    """Never the datasheet's FP8 rate beside a measured bf16 one (2.5x apart on an H100)."""
    import dataclasses

    import torch

    rates = bench_agentic.CardRates("cuda", "card", 3e12, 8e14, 8192, "bfloat16")
    assert bench_agentic.twin_hardware(rates, "h100_sxm").peak_flops_fp8 is None
    measured = dataclasses.replace(rates, fp8_matmul_flops=1.1e15)
    hw = bench_agentic.twin_hardware(measured, "h100_sxm")
    assert (hw.peak_flops, hw.peak_flops_fp8, hw.mem_bandwidth) == (8e14, 1.1e15, 3e12)
    assert "FP8 linear 1100.00 TFLOP/s" in hw.source
    # the engine's FP8 linear itself is what is timed (its CPU path here)
    assert bench_agentic.fp8_matmul_rate("cpu", torch.float32, 64, 1) > 0


def _bench(tmp_path, concurrency: list[str], blocks: int, *more: str, output_tokens: int = 8) -> dict:
    """bench_agentic on the tiny model: 160-token first turns, 24-token later ones, 8 output tokens a call."""
    (tmp_path / "tiny.yaml").write_text(MODEL_YAML)
    config = write_tiny_config(tmp_path, "LlamaForCausalLM", vocab_size=1024, max_position_embeddings=4096)
    return bench_agentic.main(
        ["--model", str(tmp_path / "tiny.yaml"), "--engine-model", config, "--concurrency", *concurrency, *more]
        + ["--params", "first_turn_tokens=160", "later_turn_tokens=24", f"output_tokens={output_tokens}"]
        + ["--engine", f"num_gpu_blocks={blocks}", "max_num_seqs=16", "--out", str(tmp_path / "run")]
    )


def test_served_levels_beside_the_roofline(tmp_path, capsys):
    out = tmp_path / "results.json"
    results = _bench(tmp_path, ["1", "2", "4"], 512, "--json", str(out))
    printed = capsys.readouterr().out
    assert "engine/roofline" in printed and "later-turn TTFT s p90" in printed

    rows = results["rows"]
    assert [(r["concurrency"], r["figure"]) for r in rows] == [(c, key) for c in (1, 2, 4) for key, _, _ in FIGURES]
    for row in rows:
        if row["kind"] == "share":  # of tokens at the floor: the CPU engine may reach none
            assert 0 <= row["engine"] <= 1 and 0 < row["roofline"] <= 1, row
            continue
        assert row["engine"] > 0 and row["roofline"] > 0 and math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["ratio"] > 1 if row["kind"] == "time" else row["ratio"] < 1, row
    m = results["meta"]
    assert m["hardware"]["peak_flops"] == m["rates"]["matmul_flops"] > 0
    assert m["hardware"]["mem_bandwidth"] == m["rates"]["copy_bytes_s"] > 0
    assert m["twin_engine"]["num_gpu_blocks"] == 512 and m["twin_engine"]["max_model_len"] == 4096
    assert m["params"] == {
        "first_turn_tokens": 160,
        "later_turn_tokens": 24,
        "output_tokens": 8,
        "turns_min": 3,
        "turns_max": 3,
    }
    # each level: its own seed, 2 x concurrency sessions of 3 calls, all served, the same calls in the twin
    assert [lv["level"]["seed"] for lv in results["levels"]] == [0, 1, 2]
    for level in results["levels"]:
        engine, twin, c = level["engine"], level["roofline"], level["level"]["concurrency"]
        assert engine["completed"] and engine["num_errors"] == 0
        assert engine["num_requests"] == twin["num_requests"] == 3 * 2 * c
        assert engine["output_tokens"] == twin["output_tokens"] == 8 * 3 * 2 * c
        assert engine["prompt_tokens"] == twin["prompt_tokens"]
    # preemptions: the engine's from /metrics, the twin's from its run (512 blocks hold every session here)
    assert [lv["preemptions"] for lv in results["levels"]] == [{"engine": 0, "roofline": 0}] * 3
    assert "preemptions (engine / twin): concurrency 1 0 / 0, concurrency 2 0 / 0, concurrency 4 0 / 0" in printed
    # admission `all` (the default) cuts nothing on either side
    assert [lv["admission_cuts"] for lv in results["levels"]] == [{"engine": 0, "roofline": 0}] * 3
    assert results["meta"]["policies"] == {} and "step_cost" not in results["meta"]["engine_options"]
    assert all("evicted_blocks" in lv for lv in results["levels"])
    # the engine's side keeps the scheduler's counts from /metrics only (a client sees none of them)
    assert not any(
        "num_admission_cuts" in lv["engine"] or "num_preemptions_recompute" in lv["engine"] for lv in results["levels"]
    )
    # the twin gets the idle prefill chunk the server resolved (0 on the CPU)
    assert results["meta"]["twin_engine"]["idle_chunk_size"] == 0

    # the twin's side again from the saved run: deterministic, so the same figures; an override moves it
    again = bench_agentic.main(["--retwin", str(out)])
    assert again["rows"] == rows and again["meta"]["retwin"]["overrides"] == {}
    assert [lv["preemptions"] for lv in again["levels"]] == [lv["preemptions"] for lv in results["levels"]]
    small = bench_agentic.main(["--retwin", str(out), "--twin-engine", "max_num_seqs=1"])
    assert small["meta"]["twin_engine"]["max_num_seqs"] == 1
    assert [r["engine"] for r in small["rows"]] == [r["engine"] for r in rows]
    # one request at a time instead of the server's 16: the twin's figures move (the engine's are the saved ones)
    assert [r["roofline"] for r in small["rows"]] != [r["roofline"] for r in rows]
    assert json.loads(out.read_text())["rows"] == rows


def test_server_counters_sum_every_replicas_counter(monkeypatch):
    text = (
        "# TYPE tandem_preemptions counter\n"
        'tandem_preemptions_total{replica="0"} 3.0\n'
        'tandem_preemptions_total{replica="1"} 4.0\n'
        "tandem_preemptions_created 1.7e9\n"
    )
    monkeypatch.setattr(bench_agentic.httpx, "get", lambda url, timeout: type("R", (), {"text": text})())
    assert bench_agentic.server_counter("http://x/v1", "tandem_preemptions_total") == 7
    monkeypatch.setattr(
        bench_agentic.httpx, "get", lambda url, timeout: type("R", (), {"text": "tandem_preemptions_total 2.0\n"})()
    )
    assert bench_agentic.server_counter("http://x/v1", "tandem_preemptions_total") == 2
    try:
        bench_agentic.server_counter("http://x/v1", "tandem_admission_cuts_total")
    except RuntimeError as exc:
        assert "no tandem_admission_cuts_total" in str(exc)
    else:
        raise AssertionError("a missing counter must fail")


def test_a_floor_admission_runs_on_both_sides_with_one_cost_model(tmp_path, capsys):
    """tps_floor on the server and in the twin, the server predicting with the twin's roofline on the rates
    measured here (a YAML of them). At 1,000,000 tok/s (1 us a step) no two requests may decode together: the
    second session's first call, sent beside the first one's, is held on both sides."""
    results = _bench(tmp_path, ["2"], 512, "--admission", "tps_floor:tok_s=1000000")  # the floor counted: its own
    printed = capsys.readouterr().out
    m = results["meta"]
    assert m["policies"] == {"admission": "tps_floor:tok_s=1000000"} and m["floor_tok_s"] == 1e6
    step_cost = m["engine_options"]["step_cost"]
    assert step_cost["cost_model"] == "roofline" and step_cost["model"].endswith("tiny.yaml")
    from sim.specs import load_hardware_spec

    assert load_hardware_spec(step_cost["hardware"]).peak_flops == m["hardware"]["peak_flops"]
    (level,) = results["levels"]
    assert level["engine"]["completed"] and level["roofline"]["completed"]
    assert level["engine"]["output_tokens"] == level["roofline"]["output_tokens"]
    assert level["admission_cuts"]["roofline"] > 0 and level["admission_cuts"]["engine"] > 0, level["admission_cuts"]
    assert "admission cuts (engine / twin): concurrency 2" in printed
    assert "floor 1e+06 tok/s" in printed


def test_preemptions_are_counted_on_both_sides_when_the_kv_cache_is_short(tmp_path):
    """Four sessions on 36 blocks of 16 tokens: the engine and its twin both preempt.

    Not left to timing: a first turn grows to 14 blocks (160 + 64 tokens) and decodes for 64 steps, so three of the
    four sessions, sent together, run at once and need 42 blocks; a third turn alone needs 25, so any two overlap too.
    """
    results = _bench(tmp_path, ["4"], 36, "--sessions", "4", output_tokens=64)
    (level,) = results["levels"]
    assert level["engine"]["completed"] and level["engine"]["num_errors"] == 0
    assert level["preemptions"]["engine"] > 0 and level["preemptions"]["roofline"] > 0, level["preemptions"]


def test_a_profile_twin_without_a_shipped_fit_fails_before_serving(tmp_path):
    import pytest

    (tmp_path / "tiny.yaml").write_text(MODEL_YAML)
    config = write_tiny_config(tmp_path, "LlamaForCausalLM", vocab_size=1024, max_position_embeddings=4096)
    args = bench_agentic.parse_args(
        ["--model", str(tmp_path / "tiny.yaml"), "--engine-model", config, "--twin-cost", "profile"]
    )
    with pytest.raises(ValueError, match="no fit of tiny on cpu"):
        bench_agentic.Setup.of(args)


def test_the_floor_counted_is_the_one_the_admission_keeps(capsys):
    import pytest

    assert bench_agentic.admission_floor("tps_floor:tok_s=50,min_chunk=16") == 50.0
    assert bench_agentic.admission_floor("tps_floor") == 70.0  # the policy's default
    assert bench_agentic.admission_floor("all") is None and bench_agentic.admission_floor(None) is None
    assert bench_agentic.parse_args(["--admission", "tps_floor:tok_s=50"]).floor == 50.0
    assert bench_agentic.parse_args([]).floor == 70.0
    assert bench_agentic.parse_args(["--floor", "40"]).floor == 40.0
    with pytest.raises(SystemExit):
        bench_agentic.parse_args(["--admission", "tps_floor:tok_s=50", "--floor", "70"])
    assert "not the floor the admission keeps (50 tok/s)" in capsys.readouterr().err


def test_a_run_cut_short_leaves_the_levels_it_served(tmp_path, monkeypatch):
    """--json is written after every level (marked partial), so a run stopped by a time limit keeps them."""
    import pytest

    real = bench_agentic.run_twin

    def twin_until_two(level, *args, **kwargs):
        if level.concurrency == 2:
            raise KeyboardInterrupt("the device call's time limit")
        return real(level, *args, **kwargs)

    monkeypatch.setattr(bench_agentic, "run_twin", twin_until_two)
    out = tmp_path / "results.json"
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path, ["1", "2"], 512, "--json", str(out))
    saved = json.loads(out.read_text())
    assert saved["partial"] is True and [lv["level"]["concurrency"] for lv in saved["levels"]] == [1]
    assert {r["concurrency"] for r in saved["rows"]} == {1} and saved["meta"]["twin_engine"]["num_gpu_blocks"] == 512
    # and its twin's side can be run again from it
    monkeypatch.setattr(bench_agentic, "run_twin", real)
    assert bench_agentic.main(["--retwin", str(out)])["rows"] == saved["rows"]
