"""The entry points run: the demo walk-through and the benchmark's smoke size."""

from __future__ import annotations

from experiments import bench_controlplane, walkthrough


def test_walkthrough_runs_and_checks_its_outputs(capsys):
    walkthrough.main([])
    out = capsys.readouterr().out
    assert "PREEMPTED" in out and "kv copy device->host" in out and "kv copy host->device" in out
    assert "request 5:  4 tokens  ok" in out and "MISMATCH" not in out
    # the second turn of agent-a reuses its pinned first turn
    assert "req  5 FINISHED (length): 4 tokens, 24 prompt tokens from the prefix cache" in out


def test_walkthrough_with_other_policies(capsys):
    walkthrough.main(["--eviction", "lru", "--preemption", "recompute", "--ordering", "priority"])
    assert "MISMATCH" not in capsys.readouterr().out


def test_bench_smoke(capsys):
    bench_controlplane.main(["--requests", "1,8", "--contexts", "256", "--steps", "5"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.strip() and line.split()[0].isdigit()]
    assert [r.split()[:2] for r in rows] == [["1", "256"], ["8", "256"]]
