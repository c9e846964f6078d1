"""The fidelity report's arithmetic and tables (experiments/fidelity_report.py) on hand-made runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments import fidelity_report as R


def summary(**values) -> dict:
    """A run summary: every METRICS key at 1.0 unless given."""
    base = {key: 1.0 for key, _, _ in R.METRICS if key != "preemptions"}
    base.update(num_preemptions_recompute=0, num_preemptions_swap=0)
    base.update(values)
    return base


# --------------------------------------------------------------------------- compare


def test_compare_gives_each_metric_and_the_twins_relative_error():
    engine = summary(
        ttft_s_p50=2.0,
        tpot_s_p90=0.020,
        per_gpu_output_tok_s=100.0,
        num_preemptions_recompute=3,
        num_preemptions_swap=1,
        num_steps=400,
    )
    twin = summary(
        ttft_s_p50=2.5,
        tpot_s_p90=0.015,
        per_gpu_output_tok_s=97.0,
        num_preemptions_recompute=2,
        num_preemptions_swap=0,
        num_steps=400,
    )
    c = R.compare(engine, twin)
    assert set(c) == {key for key, _, _ in R.METRICS}
    assert c["ttft_s_p50"] == {"engine": 2.0, "twin": 2.5, "rel_err": 0.25}
    assert c["tpot_s_p90"]["rel_err"] == pytest.approx(-0.25, rel=1e-12)
    assert c["per_gpu_output_tok_s"]["rel_err"] == pytest.approx(-0.03, rel=1e-12)
    assert c["preemptions"] == {"engine": 4.0, "twin": 2.0, "rel_err": -0.5}  # both kinds summed
    assert c["num_steps"]["rel_err"] == 0.0
    assert c["ttft_s_p90"]["rel_err"] == 0.0


@pytest.mark.parametrize(
    "engine_value, twin_value", [(0.0, 1.0), (math.nan, 1.0), (1.0, math.nan), (None, 1.0), (math.inf, 1.0)]
)
def test_an_engine_figure_of_zero_or_unknown_gives_a_nan_error(engine_value, twin_value):
    engine, twin = summary(ttft_s_p50=engine_value), summary(ttft_s_p50=twin_value)
    c = R.compare(engine, twin)
    assert math.isnan(c["ttft_s_p50"]["rel_err"])
    assert math.isnan(R.relative_error(R.metric(twin, "ttft_s_p50"), R.metric(engine, "ttft_s_p50")))
    # a missing key reads as NaN too
    del engine["itl_s_p90"]
    assert math.isnan(R.compare(engine, twin)["itl_s_p90"]["engine"])
    assert math.isnan(R.compare(engine, twin)["itl_s_p90"]["rel_err"])


# --------------------------------------------------------------------------- step errors


def test_step_errors_median_p90_and_signed_mean():
    predicted = [1.1, 0.9, 1.0, 2.0, 5.0]
    measured = [1.0, 1.0, 1.0, 1.0, 0.0]  # the last step measured 0 s: left out
    s = R.step_errors(predicted, measured)
    # relative errors +0.1, -0.1, 0, +1.0; |.| sorted 0, 0.1, 0.1, 1.0
    assert s["n"] == 4
    assert s["median"] == pytest.approx(0.1, rel=1e-12)
    assert s["p90"] == pytest.approx(0.1 + 0.7 * 0.9, rel=1e-12)  # numpy's linear interpolation at 2.7
    assert s["signed_mean"] == pytest.approx(0.25, rel=1e-12)
    under = R.step_errors([0.5, 0.5], [1.0, 1.0])
    assert under == {"median": 0.5, "p90": 0.5, "signed_mean": -0.5, "n": 2}


def test_step_errors_of_no_steps_and_of_mismatched_arrays():
    s = R.step_errors([], [])
    assert s["n"] == 0 and math.isnan(s["median"]) and math.isnan(s["p90"]) and math.isnan(s["signed_mean"])
    assert R.step_errors([1.0], [0.0])["n"] == 0
    with pytest.raises(ValueError, match=r"3 predictions for 2 measured steps"):
        R.step_errors([1.0, 2.0, 3.0], [1.0, 2.0])


# --------------------------------------------------------------------------- rankings


def pair(engine_ttft: float, engine_tok: float, twin_ttft: float, twin_tok: float) -> tuple[dict, dict]:
    return (
        summary(ttft_s_p90=engine_ttft, per_gpu_output_tok_s=engine_tok),
        summary(ttft_s_p90=twin_ttft, per_gpu_output_tok_s=twin_tok),
    )


PAIRS = {"lru": pair(1.0, 300.0, 1.1, 310.0), "ttl": pair(2.0, 200.0, 0.9, 190.0), "lpm": pair(3.0, 250.0, 3.3, 240.0)}


def test_ranking_lower_is_better():
    r = R.ranking(PAIRS, "ttft_s_p90", higher_is_better=False)
    assert r["key"] == "ttft_s_p90"
    assert r["engine"] == ["lru", "ttl", "lpm"] and r["twin"] == ["ttl", "lru", "lpm"] and r["same"] is False
    assert r["engine_values"] == {"lru": 1.0, "ttl": 2.0, "lpm": 3.0}
    assert r["twin_values"] == {"lru": 1.1, "ttl": 0.9, "lpm": 3.3}
    assert r["min_gap"] == pytest.approx(0.5)  # gaps 1/1 and 1/2 between neighbours on the engine


def test_ranking_higher_is_better():
    r = R.ranking(PAIRS, "per_gpu_output_tok_s", higher_is_better=True)
    assert r["engine"] == ["lru", "lpm", "ttl"] and r["twin"] == ["lru", "lpm", "ttl"] and r["same"] is True
    assert r["min_gap"] == pytest.approx(min(50 / 300, 50 / 250))


def test_ranking_of_one_policy_has_no_gap():
    r = R.ranking({"lru": PAIRS["lru"]}, "ttft_s_p90", higher_is_better=False)
    assert r["engine"] == r["twin"] == ["lru"] and r["same"] and math.isnan(r["min_gap"])


# --------------------------------------------------------------------------- the verdict


def run(name: str, *, ttft=(20.0, 20.0), tpot=(0.02, 0.02), tok=(100.0, 100.0), replay=True, **step) -> R.RunReport:
    engine = summary(
        ttft_s_p50=ttft[0], ttft_s_p90=ttft[0], tpot_s_p50=tpot[0], tpot_s_p90=tpot[0], per_gpu_output_tok_s=tok[0]
    )
    twin = summary(
        ttft_s_p50=ttft[1], ttft_s_p90=ttft[1], tpot_s_p50=tpot[1], tpot_s_p90=tpot[1], per_gpu_output_tok_s=tok[1]
    )
    s = {"median": 0.01, "p90": 0.02, "signed_mean": 0.0, "n": 10, **step}
    return R.RunReport(name, f"{name} run", engine, twin, s, replay, "detail")


def checks_by_target(checks) -> dict:
    return {c["target"]: c for c in checks}


def test_verdict_targets_are_met_exactly_at_their_bounds():
    # 21/20 - 1 and 97/100 - 1 are the bounds 5% and 3% exactly (in binary too)
    runs = [run("a", ttft=(20.0, 21.0), tpot=(20.0, 19.0), tok=(100.0, 97.0)), run("b")]
    overall = {"median": 0.03, "p90": 0.08, "signed_mean": 0.0, "n": 20}
    checks = R.verdict(runs, overall, [])
    by = checks_by_target(checks)
    assert by["per-step |error| median"] == {
        "target": "per-step |error| median",
        "value": 0.03,
        "bound": 0.03,
        "met": True,
    }
    assert by["per-step |error| p90"]["met"] and by["per-step |error| p90"]["bound"] == 0.08
    assert by["TTFT p50 (s): worst |error| (a)"]["met"] and by["TTFT p50 (s): worst |error| (a)"]["bound"] == 0.05
    assert by["TTFT p90 (s): worst |error| (a)"]["value"] == 0.05
    assert by["TPOT p50 (ms): worst |error| (a)"]["value"] == 0.05 and by["TPOT p50 (ms): worst |error| (a)"]["met"]
    assert by["output tok/s: worst |error| (a)"] == {
        "target": "output tok/s: worst |error| (a)",
        "value": 0.03,
        "bound": 0.03,
        "met": True,
    }
    assert by["replayed plan sequence equals the engine's"] == {
        "target": "replayed plan sequence equals the engine's",
        "value": 2,
        "bound": 2,
        "met": True,
    }
    assert len(checks) == 2 + 5 + 1
    assert all(c["met"] for c in checks)


def test_verdict_targets_are_unmet_just_past_their_bounds():
    runs = [run("a", ttft=(20.0, 21.001), tok=(100.0, 96.99)), run("b", tpot=(0.02, 0.0189), replay=False)]
    overall = {"median": 0.0301, "p90": 0.0801, "signed_mean": 0.0, "n": 20}
    by = checks_by_target(R.verdict(runs, overall, []))
    assert not by["per-step |error| median"]["met"] and not by["per-step |error| p90"]["met"]
    assert not by["TTFT p50 (s): worst |error| (a)"]["met"]
    assert not by["output tok/s: worst |error| (a)"]["met"]
    assert not by["TPOT p50 (ms): worst |error| (b)"]["met"]  # |-5.5%|: the sign does not matter
    assert by["TPOT p50 (ms): worst |error| (b)"]["value"] == pytest.approx(0.055)
    assert by["replayed plan sequence equals the engine's"]["value"] == 1
    assert not by["replayed plan sequence equals the engine's"]["met"]


def test_verdict_reports_the_worst_run_of_each_metric():
    runs = [run("small", ttft=(20.0, 20.2)), run("large", ttft=(20.0, 18.0)), run("mid", ttft=(20.0, 20.6))]
    by = checks_by_target(R.verdict(runs, {"median": 0.0, "p90": 0.0}, []))
    assert by["TTFT p50 (s): worst |error| (large)"]["value"] == pytest.approx(0.1)
    assert "TTFT p50 (s): worst |error| (mid)" not in by


def test_verdict_adds_the_rankings():
    rankings = [R.ranking(PAIRS, "ttft_s_p90", False), R.ranking(PAIRS, "per_gpu_output_tok_s", True)]
    by = checks_by_target(R.verdict([run("a")], {"median": 0.0, "p90": 0.0}, rankings))
    assert by["ranking by ttft_s_p90"] == {
        "target": "ranking by ttft_s_p90",
        "value": "lru > ttl > lpm",
        "bound": "ttl > lru > lpm",
        "met": False,
    }
    assert by["ranking by per_gpu_output_tok_s"]["met"] is True


def test_verdict_with_nan_figures_does_not_crash():
    nan_run = run("n", ttft=(0.0, 1.0), tok=(math.nan, 5.0))
    ok_run = run("ok", ttft=(20.0, 20.5))
    checks = R.verdict([nan_run, ok_run], {"median": math.nan, "p90": math.nan}, [])
    by = checks_by_target(checks)
    assert by["per-step |error| median"]["met"] is False  # unknown is not met
    assert by["TTFT p50 (s): worst |error| (ok)"]["value"] == pytest.approx(0.025)  # the NaN run is skipped
    assert by["output tok/s: worst |error| (ok)"]["value"] == 0.0
    # no run with a finite error for a metric: the target is reported, and unmet
    checks = R.verdict([nan_run], {"median": 0.0, "p90": 0.0}, [])
    unknown = [c for c in checks if c["target"].startswith(("TTFT", "output tok/s"))]
    assert unknown and all(c["target"].endswith("no run measured it") and not c["met"] for c in unknown)
    assert "| - | 5% | **no** |" in R.verdict_table(unknown)
    assert R.verdict_table(checks)


def test_a_run_without_a_replay_adds_no_replay_check():
    r = run("a", replay=None)
    assert not any("replay" in c["target"] for c in R.verdict([r], {"median": 0.0, "p90": 0.0}, []))


# --------------------------------------------------------------------------- tables


def test_run_table_rows():
    engine = summary(
        ttft_s_p50=20.0,
        tpot_s_p50=0.02,
        per_gpu_output_tok_s=100.0,
        num_preemptions_recompute=3,
        num_steps=400,
        prefix_hit_rate=0.0,
    )
    twin = summary(
        ttft_s_p50=21.0,
        tpot_s_p50=0.0231,
        per_gpu_output_tok_s=100.0,
        num_preemptions_swap=2,
        num_steps=410,
        prefix_hit_rate=0.5,
    )
    r = R.RunReport("a", "", engine, twin, {"median": 0.012, "p90": 0.0345, "signed_mean": 0.0, "n": 7})
    lines = R.run_table(r).splitlines()
    assert lines[:2] == ["| metric | engine | twin | twin error |", "|---|---:|---:|---:|"]
    assert len(lines) == 2 + len(R.METRICS) + 1
    assert "| TTFT p50 (s) | 20 | 21 | +5.0% ✓ |" in lines  # exactly at the bound: met
    assert "| TPOT p50 (ms) | 20 | 23.1 | +15.5% ✗ |" in lines  # seconds shown as ms
    assert "| output tok/s | 100 | 100 | +0.0% ✓ |" in lines
    assert "| ITL p50 (ms) | 1000 | 1000 | +0.0% |" in lines  # reported only: no mark
    assert "| preemptions | 3 | 2 | -33.3% |" in lines
    assert "| steps | 400 | 410 | +2.5% |" in lines
    assert "| prefix hit rate | 0 | 0.5 | - |" in lines  # the engine's 0: no error
    assert lines[-1] == "| per-step |error| median / p90 (7 steps) | | | 1.2% / 3.5% |"


def test_summary_table_rows():
    runs = [run("a", ttft=(20.0, 21.0), median=0.012, p90=0.05), run("b", replay=False), run("c", replay=None)]
    lines = R.summary_table(runs).splitlines()
    assert lines[0] == (
        "| run | step err p50 / p90 | TTFT p50 (s) | TTFT p90 (s) | TPOT p50 (ms) | TPOT p90 (ms) "
        "| output tok/s | replay |"
    )
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    assert lines[2] == "| a | 1.2% / 5.0% | +5.0% | +5.0% | +0.0% | +0.0% | +0.0% | equal |"
    assert lines[3].endswith("| differs |") and lines[4].endswith("| - |")
    assert len(lines) == 5


def test_verdict_table_rows():
    checks = [
        {"target": "per-step |error| median", "value": 0.0123, "bound": 0.03, "met": True},
        {"target": "ranking by ttft_s_p90", "value": "a > b", "bound": "b > a", "met": False},
        {"target": "replayed plan sequence equals the engine's", "value": 3, "bound": 3, "met": True},
        {"target": "per-step |error| p90", "value": math.nan, "bound": 0.08, "met": False},
    ]
    lines = R.verdict_table(checks).splitlines()
    assert lines == [
        "| target | measured | bound | met |",
        "|---|---|---|---|",
        "| per-step |error| median | 1.2% | 3% | yes |",
        "| ranking by ttft_s_p90 | a > b | b > a | **no** |",
        "| replayed plan sequence equals the engine's | 3 | 3 | yes |",
        lines[-1],
    ]
    assert lines[-1].startswith("| per-step |error| p90 |") and lines[-1].endswith("| 8% | **no** |")


def test_ranking_table_rows():
    text = R.ranking_table(R.ranking(PAIRS, "ttft_s_p90", False))
    lines = text.splitlines()
    assert lines[:2] == ["| policy | engine ttft_s_p90 | twin ttft_s_p90 |", "|---|---:|---:|"]
    assert lines[2:5] == ["| lru | 1 | 1.1 |", "| ttl | 2 | 0.9 |", "| lpm | 3 | 3.3 |"]
    assert (
        "engine order: lru > ttl > lpm; twin order: ttl > lru > lpm (different; smallest gap between "
        "neighbours on the engine +50.0%)" in text
    )


def test_plots_are_written(tmp_path):
    rng = np.random.default_rng(0)
    measured = rng.uniform(1e-3, 5e-2, 50)
    R.plot_steps(tmp_path / "steps.png", measured, measured * rng.uniform(0.9, 1.1, 50), ["a"] * 25 + ["b"] * 25)
    R.plot_cdfs(
        tmp_path / "ttft.png",
        {"a": (measured, measured * 1.1), "b": (np.array([np.nan, 1.0]), np.array([]))},
        "TTFT (s)",
    )
    for name in ("steps.png", "ttft.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
