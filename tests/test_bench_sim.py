"""experiments.bench_sim: its table, and the Vidur row it adds with --vidur."""

from __future__ import annotations

import json
import os
import stat

import pytest

from experiments import bench_sim


def test_quick_table_has_the_agentic_row(capsys):
    bench_sim.main(["--quick"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("agentic")]
    assert len(rows) == 1
    workload, rate, gpus, fast, requests, steps = rows[0][:6]
    assert (workload, rate, gpus, fast) == ("agentic_coding", "0.2", "1", "on")
    assert int(requests) > 20 and int(steps) > int(requests)  # 20 sessions of several calls, many steps each


def fake_vidur(tmp_path, payload: dict | None) -> str:
    """An executable standing in for Vidur's Python: records its arguments, prints `payload`."""
    script = tmp_path / "python"
    line = f"echo 'VIDUR_JSON {json.dumps(payload)}'" if payload else "echo 'no result'"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\necho 'INFO vidur log'\n{line}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_vidur_row_from_its_json_line(tmp_path, capsys):
    payload = {
        "vidur_version": "0.0.26",
        "num_requests": 37,
        "prefill_tokens": 50000,
        "decode_tokens": 500,
        "qps": 0.15,
        "simulated_s": 1234.0,
        "wall_s": 9.5,
        "event_loop_s": 8.0,
        "requests_per_wall_min": 233.7,
        "requests_per_wall_min_loop": 277.5,
        "batch_stages": 3700,
        "batch_stages_per_wall_s": 462.5,
    }
    bench_sim.main(["--quick", "--vidur", fake_vidur(tmp_path, payload)])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "vidur 0.0.26" in line).split()
    assert row[2:7] == ["0.15", "1", "-", "37", "3700"]
    assert row[7] == "5.0"  # outputs a batch stage: 37 * 500 / 3700
    assert row[9:12] == ["8.0", "278", "462"]  # event loop, its requests a minute, stages a second
    args = (tmp_path / "args").read_text().split()
    requests = int(args[args.index("--requests") + 1])
    agentic = next(line for line in out.splitlines() if line.lstrip().startswith("agentic")).split()
    assert requests == int(agentic[4])  # as many requests as the first agentic row
    assert args[args.index("--prefill") + 1] == "50000" and args[args.index("--decode") + 1] == "500"


def test_vidur_without_a_result_line_fails_clearly(tmp_path):
    with pytest.raises(RuntimeError, match="printed no VIDUR_JSON line"):
        bench_sim.main(["--quick", "--vidur", fake_vidur(tmp_path, None)])


def test_vidur_python_that_does_not_exist(tmp_path):
    with pytest.raises(SystemExit, match="no such Python"):
        bench_sim.main(["--quick", "--vidur", os.fspath(tmp_path / "missing" / "python")])
