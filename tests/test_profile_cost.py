"""The `profile` cost model (sim/profile_cost.py): its fit, its refusals, its file format, its evaluators.

Synthetic profiles are generated from a known ProfileCost of the fitted family (both paths, hinge
knots from KNOTS, per-request prefill terms), so a noiseless fit must give back the truth.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import controlplane as cp
from controlplane.profile import FEATURES, PREFILL_ROWS, encode_prefill_rows, write_profile
from sim import _native
from sim import cost as sim_cost
from sim.cost import PlanFeatures, make_cost_model
from sim.profile_cost import FORMAT, KNOTS, SHAPE_KEYS, ProfileCost, ProfilePath, nonnegative_least_squares
from sim.simulation import Simulation
from sim.specs import load_hardware_spec, load_model_spec

MAX_GRAPH_BATCH = 32

# A cost of the family with every kind of term, of realistic sizes (an 8B model on a GPU, roughly).
TRUTH_GRAPH = (
    ("one", 0.0, 4.5e-3),
    ("reqs", 0.0, 5e-6),
    ("reqs_over", 8.0, 3e-5),
    ("reqs_over", 16.0, 1e-5),
    ("decode_kv", 0.0, 4e-8),
    ("strict", 0.0, 3e-4),
    ("dropped", 0.0, 1e-3),
    ("dropped_kv", 0.0, 2e-8),
    ("swap_out", 0.0, 5e-5),
    ("swap_in", 0.0, 6e-5),
)
TRUTH_EAGER = (
    ("one", 0.0, 6e-3),
    ("tokens", 0.0, 2e-6),
    ("tokens_over", 256.0, 2e-5),
    ("tokens_over", 2048.0, 5e-6),
    ("sampled_any", 0.0, 3.5e-4),
    ("sampled", 0.0, 1e-6),
    ("decode_reqs", 0.0, 1e-5),
    ("decode_kv", 0.0, 4.5e-8),
    ("prefill_reqs", 0.0, 2e-4),
    ("prefill_pairs", 0.0, 1.5e-11),
    ("prefill_kv", 0.0, 1e-8),
    ("prefill_waves_kv", 256.0, 3e-9),
    ("prefill_waves_kv", 1024.0, 2e-9),
    ("dropped", 0.0, 4e-3),
    ("dropped_kv", 0.0, 4e-8),
    ("swap_out", 0.0, 5e-5),
    ("swap_in", 0.0, 6e-5),
)


def truth_cost(meta=None) -> ProfileCost:
    return ProfileCost({"graph": ProfilePath(TRUTH_GRAPH), "eager": ProfilePath(TRUTH_EAGER)}, MAX_GRAPH_BATCH, meta)


def with_flags(plan: PlanFeatures, rng: np.random.Generator, swap_out: int = 0, swap_in: int = 0) -> PlanFeatures:
    """The plan in a random place of the sequence (continues_decode only for a pure decode)."""
    follows = int(rng.random() < 0.5)
    pure_decode = plan.num_tokens == plan.num_reqs == plan.num_sampled > 0
    continues = int(follows and pure_decode and rng.random() < 0.6)
    return dataclasses.replace(
        plan,
        follows_decode=follows,
        continues_decode=continues,
        num_swap_out_blocks=swap_out,
        num_swap_in_blocks=swap_in,
    )


def random_swaps(rng: np.random.Generator) -> tuple[int, int]:
    kind = rng.integers(0, 6)
    return (int(rng.integers(1, 64)), 0) if kind == 0 else (0, int(rng.integers(1, 64))) if kind == 1 else (0, 0)


def graph_plan(rng: np.random.Generator, max_context: int = 40_000) -> PlanFeatures:
    reqs = int(rng.integers(1, MAX_GRAPH_BATCH + 1))
    cached = rng.integers(0, max_context, reqs).tolist()
    return with_flags(PlanFeatures.of_requests(cached, [1] * reqs), rng, *random_swaps(rng))


def eager_plan(rng: np.random.Generator, max_context: int = 30_000, max_query: int = 4096) -> PlanFeatures:
    kind = rng.integers(0, 5)
    if kind == 0:  # a decode batch too large for a graph
        reqs = int(rng.integers(MAX_GRAPH_BATCH + 1, 129))
        return with_flags(
            PlanFeatures.of_requests(rng.integers(0, max_context, reqs).tolist(), [1] * reqs), rng, *random_swaps(rng)
        )
    if kind == 4 and rng.random() < 0.3:  # KV copies only
        return with_flags(
            PlanFeatures(),
            rng,
            *((int(rng.integers(1, 64)), 0) if rng.random() < 0.5 else (0, int(rng.integers(1, 64)))),
        )
    decodes = int(rng.integers(0, 40)) if kind != 3 else 0
    prefills = int(rng.integers(1, 4))
    cached = rng.integers(0, max_context, decodes).tolist() + [
        int(rng.choice([0, rng.integers(0, max_context)])) for _ in range(prefills)
    ]
    query = [1] * decodes + rng.integers(2, max_query, prefills).tolist()
    # kind 3: a prefill chunk short of its prompt's end samples nothing
    sampled = 0 if kind == 3 else decodes + int(rng.integers(0, prefills + 1))
    return with_flags(PlanFeatures.of_requests(cached, query, num_sampled=sampled), rng)


def profile_row(plan: PlanFeatures, seconds: float) -> dict:
    row = {f: getattr(plan, f) for f in FEATURES}
    row[PREFILL_ROWS] = encode_prefill_rows(plan.query_lens, plan.cached_lens)
    row["seconds"] = seconds
    return row


def synthetic_plans(seed: int, graph: int = 250, eager: int = 350) -> list[PlanFeatures]:
    rng = np.random.default_rng(seed)
    return [graph_plan(rng) for _ in range(graph)] + [eager_plan(rng) for _ in range(eager)]


def features_of(plans) -> tuple[np.ndarray, list[np.ndarray]]:
    features = np.array([[getattr(p, f) for f in FEATURES] for p in plans], dtype=np.float64)
    prefill = [
        np.array([(q, c) for q, c in zip(p.query_lens, p.cached_lens) if q > 1], dtype=np.float64).reshape(-1, 2)
        for p in plans
    ]
    return features, prefill


def write_synthetic(path, plans, cost: ProfileCost, meta: dict, scale=None) -> list[float]:
    seconds = [cost.step_seconds(p) for p in plans]
    if scale is not None:
        seconds = [s * k for s, k in zip(seconds, scale)]
    write_profile(path, [profile_row(p, s) for p, s in zip(plans, seconds)], meta)
    return seconds


def shape_of(name: str) -> dict:
    spec = load_model_spec(name)
    return {k: getattr(spec, k) for k in SHAPE_KEYS}


META = {"max_graph_batch": MAX_GRAPH_BATCH, "overlap": True, "model": "llama3_8b", "hardware": "h100_sxm"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(truth, fit of the truth's noiseless profile, the profiled plans)."""
    path = tmp_path_factory.mktemp("profile") / "profile.csv"
    truth = truth_cost()
    plans = synthetic_plans(seed=0)
    write_synthetic(path, plans, truth, {**META, "model_shape": shape_of("llama3_8b")})
    return truth, ProfileCost.fit(path), plans


# --------------------------------------------------------------------------- the fit


def test_noiseless_fit_recovers_the_generating_cost_on_its_rows_and_on_fresh_plans(fitted):
    truth, fit, plans = fitted
    assert fit.max_graph_batch == MAX_GRAPH_BATCH and fit.meta["overlap"] is True
    graph_rows = sum(1 for p in plans if 0 < p.num_tokens == p.num_reqs <= MAX_GRAPH_BATCH)
    assert fit.paths["graph"].rows == graph_rows and fit.paths["eager"].rows == len(plans) - graph_rows
    assert fit.paths["graph"].trimmed == fit.paths["eager"].trimmed == 0
    # every term of the truth is among the fitted ones (its knots, from KNOTS, were passed often enough)
    for path, terms in (("graph", TRUTH_GRAPH), ("eager", TRUTH_EAGER)):
        assert all(k in KNOTS[b] for b, k, _ in terms if b in KNOTS)
        fitted_terms = {(b, k) for b, k, _ in fit.paths[path].terms}
        assert {(b, k) for b, k, _ in terms} <= fitted_terms, path
        assert fit.paths[path].p90_rel_err < 1e-6
    for p in plans:
        assert fit.step_seconds(p) == pytest.approx(truth.step_seconds(p), rel=1e-6, abs=0), p
    # fresh plans of the same kinds, within the profiled range
    fresh = [p for p in synthetic_plans(seed=1, graph=150, eager=150)]
    inside = 0
    for p in fresh:
        before = fit.num_extrapolated
        predicted = fit.step_seconds(p)
        if fit.num_extrapolated == before:
            inside += 1
            assert predicted == pytest.approx(truth.step_seconds(p), rel=1e-6, abs=0), p
    assert inside >= 200


def test_noiseless_fit_recovers_the_truth_coefficients(fitted):
    truth, fit, _ = fitted
    for path in ("graph", "eager"):
        want = {(b, k): c for b, k, c in truth.paths[path].terms}
        for b, k, c in fit.paths[path].terms:
            assert c == pytest.approx(want.get((b, k), 0.0), rel=1e-5, abs=1e-9 * max(want.values())), (path, b, k)


def test_fit_reads_rows_from_mappings_as_from_the_csv(fitted, tmp_path):
    truth, fit, plans = fitted
    rows = [profile_row(p, truth.step_seconds(p)) for p in plans]
    again = ProfileCost.fit(rows, meta={"max_graph_batch": MAX_GRAPH_BATCH, "overlap": True})
    assert again.paths["graph"].terms == fit.paths["graph"].terms
    assert again.paths["eager"].terms == fit.paths["eager"].terms


def test_overlap_terms_are_fitted_only_for_an_overlapped_engine(fitted, tmp_path):
    truth, _, plans = fitted
    path = tmp_path / "p.csv"
    write_synthetic(path, plans, truth, {"max_graph_batch": MAX_GRAPH_BATCH, "overlap": False})
    fit = ProfileCost.fit(path)
    for p in fit.paths.values():
        assert not {"strict", "dropped", "dropped_kv"} & {b for b, _, _ in p.terms}


def test_without_graphs_every_step_is_eager_and_the_graph_path_is_not_profiled(fitted, tmp_path):
    truth, _, plans = fitted
    path = tmp_path / "p.csv"
    write_synthetic(path, plans, truth, {"max_graph_batch": 0, "overlap": True})
    fit = ProfileCost.fit(path)
    assert fit.max_graph_batch == 0 and not fit.paths["graph"].observed and fit.paths["graph"].terms == ()
    assert fit.paths["eager"].rows == len(plans)
    # the eager path has no `reqs_over` knots and no `strict` term: it cannot match graph steps
    assert "not profiled" in fit.describe()


def test_coefficients_are_never_negative_where_seconds_fall_as_a_feature_grows():
    rng = np.random.default_rng(5)
    plans = [eager_plan(rng) for _ in range(300)]
    features, prefill = features_of(plans)
    cols = {f: features[:, i] for i, f in enumerate(FEATURES)}
    # more sampled rows make a step *cheaper* here: an unconstrained fit would price `sampled` below 0
    seconds = 2e-3 + 2e-6 * cols["num_tokens"] - 4e-7 * cols["num_sampled"]
    assert (seconds > 0).all()
    rows = [profile_row(p, s) for p, s in zip(plans, seconds)]
    fit = ProfileCost.fit(rows)
    eager = {(b, k): c for b, k, c in fit.paths["eager"].terms}
    assert all(c >= 0 for c in eager.values())
    assert ("sampled", 0.0) in eager and eager[("sampled", 0.0)] == 0.0
    # ... while plain least squares on the same design does go negative
    design = ProfilePath(tuple((b, k, 0.0) for b, k in eager)).design({**cols, PREFILL_ROWS: prefill})
    unconstrained = np.linalg.lstsq(design / seconds[:, None], np.ones(len(seconds)), rcond=None)[0]
    assert unconstrained[list(eager).index(("sampled", 0.0))] < 0
    # adding work never makes a fitted step cheaper
    base = PlanFeatures.of_requests([1000, 0], [1, 300])
    more = PlanFeatures.of_requests([1000, 0, 50], [1, 300, 1])
    assert fit.step_seconds(more) >= fit.step_seconds(base)


def test_nonnegative_least_squares_matches_scipy():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(2)
    for trial in range(40):
        m, n = int(rng.integers(5, 40)), int(rng.integers(1, 12))
        a = rng.normal(size=(m, n))
        b = rng.normal(size=m)
        x = nonnegative_least_squares(a, b)
        ref, _ = optimize.nnls(a, b)
        assert (x >= 0).all()
        assert np.linalg.norm(a @ x - b) == pytest.approx(np.linalg.norm(a @ ref - b), rel=1e-9, abs=1e-12), trial


def test_hiccups_are_trimmed_and_the_fit_still_recovers_the_truth(tmp_path):
    truth = truth_cost()
    plans = synthetic_plans(seed=3)
    rng = np.random.default_rng(4)
    slow = set(rng.choice(250, 5, replace=False).tolist()) | set((250 + rng.choice(350, 6, replace=False)).tolist())
    scale = [20.0 if i in slow else 1.0 for i in range(len(plans))]
    path = tmp_path / "p.csv"
    write_synthetic(path, plans, truth, META, scale)
    fit = ProfileCost.fit(path)
    assert fit.paths["graph"].trimmed > 0 and fit.paths["eager"].trimmed > 0
    assert fit.paths["graph"].trimmed + fit.paths["eager"].trimmed <= len(slow) + 2
    for i, p in enumerate(plans):
        if i not in slow:
            assert fit.step_seconds(p) == pytest.approx(truth.step_seconds(p), rel=0.01), (i, p)
    assert "trimmed" in fit.describe()


# --------------------------------------------------------------------------- refusals


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv: empty profile \(no header line\)"):
        ProfileCost.fit(path)


def test_a_header_without_rows_is_refused(tmp_path):
    path = tmp_path / "header.csv"
    write_profile(path, [], META)
    with pytest.raises(ValueError, match=r"header\.csv: empty profile \(no data rows\)"):
        ProfileCost.fit(path)
    with pytest.raises(ValueError, match=r"<rows>: empty profile"):
        ProfileCost.fit([])


def test_a_profile_lacking_a_column_is_refused_naming_it_and_the_older_format(fitted, tmp_path):
    truth, _, plans = fitted
    rows = [profile_row(p, truth.step_seconds(p)) for p in plans[:30]]
    for row in rows:
        del row["continues_decode"], row["decode_kv_tokens"]
    path = tmp_path / "old.csv"
    path.write_text(
        "# tandem-profile/1\n"
        + ",".join(rows[0])
        + "\n"
        + "".join(",".join(str(v) for v in r.values()) + "\n" for r in rows)
    )
    with pytest.raises(ValueError, match=r"lacks \['decode_kv_tokens', 'continues_decode'\].*older format"):
        ProfileCost.fit(path)


@pytest.mark.parametrize(
    "value, message",
    [
        ("abc", r"'num_reqs': 'abc' is not a number"),
        ("-3", r"'num_reqs': '-3' must be finite and >= 0"),
        ("nan", r"'num_reqs': 'nan' must be finite"),
    ],
)
def test_a_bad_value_is_refused_naming_file_and_line(fitted, tmp_path, value, message):
    truth, _, plans = fitted
    path = tmp_path / "bad.csv"
    write_synthetic(path, plans[:40], truth, META)
    lines = path.read_text().splitlines(keepends=True)
    # lines: format, meta, column names, then rows; break the 5th row (line 8 of the file)
    header = lines[2].rstrip("\n").split(",")
    cells = lines[7].rstrip("\n").split(",")
    cells[header.index("num_reqs")] = value
    lines[7] = ",".join(cells) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"bad\.csv:8: column {message}"):
        ProfileCost.fit(path)


def test_a_bad_prefill_rows_value_is_refused(fitted, tmp_path):
    truth, _, plans = fitted
    rows = [profile_row(p, truth.step_seconds(p)) for p in plans]
    rows[3][PREFILL_ROWS] = "12:x"
    with pytest.raises(ValueError, match=r"<rows>\[3\]: column 'prefill_rows': '12:x' is not q:c"):
        ProfileCost.fit(rows, meta=META)


def test_too_few_steps_on_a_path_are_refused(fitted, tmp_path):
    truth, _, plans = fitted
    graph = [p for p in plans if 0 < p.num_tokens == p.num_reqs <= MAX_GRAPH_BATCH]
    eager = [p for p in plans if p not in graph]
    path = tmp_path / "few.csv"
    write_synthetic(path, graph[:10] + eager, truth, META)
    with pytest.raises(ValueError, match=r"few\.csv: the graph path has 10 measured steps.*too few rows"):
        ProfileCost.fit(path)
    write_synthetic(path, graph + eager[:15], truth, META)
    with pytest.raises(ValueError, match=r"the eager path has 15 measured steps.*too few rows"):
        ProfileCost.fit(path)


def test_a_profile_of_another_model_shape_is_refused(fitted, tmp_path):
    truth, fit, plans = fitted
    llama, qwen = load_model_spec("llama3_8b"), load_model_spec("qwen3_8b")
    fit.check_model(llama)
    with pytest.raises(ValueError, match=r"another model shape than qwen3_8b: num_layers 32 \(profile\) vs 36"):
        fit.check_model(qwen)
    path = tmp_path / "p.csv"
    write_synthetic(path, plans, truth, {**META, "model_shape": shape_of("llama3_8b")})
    ProfileCost.fit(path, model=llama)
    with pytest.raises(ValueError, match=r"p\.csv: measured on another model shape than qwen3_8b"):
        ProfileCost.fit(path, model=qwen)
    # the differing keys, with both values
    spec = dataclasses.replace(llama, name="wide", hidden_size=8192)
    with pytest.raises(ValueError, match=r"hidden_size 4096 \(profile\) vs 8192"):
        fit.check_model(spec)
    # and after a save/load round trip
    saved = tmp_path / "p.json"
    fit.save(saved)
    with pytest.raises(ValueError, match=r"p\.json: measured on another model shape than wide"):
        ProfileCost.load(saved).check_model(spec)


def test_a_json_of_another_format_or_with_unknown_keys_is_refused(fitted, tmp_path):
    _, fit, _ = fitted
    path = tmp_path / "p.json"
    data = fit.to_dict()
    path.write_text(json.dumps({**data, "format": "tandem.ProfileCost/1"}))
    with pytest.raises(
        ValueError,
        match=r"not a saved ProfileCost of format tandem\.ProfileCost/2 "
        r"\(found 'tandem\.ProfileCost/1'\).*--fit",
    ):
        ProfileCost.load(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"found None"):
        ProfileCost.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"p\.json: not JSON"):
        ProfileCost.load(path)
    path.write_text(json.dumps({**data, "coefficients": {}}))
    with pytest.raises(ValueError, match=r"unknown keys \['coefficients'\]"):
        ProfileCost.load(path)
    bad_path = {**data["paths"]["eager"], "knots": [1]}
    path.write_text(json.dumps({**data, "paths": {**data["paths"], "eager": bad_path}}))
    with pytest.raises(ValueError, match=r"paths\.eager: unknown keys \['knots'\]"):
        ProfileCost.load(path)
    terms = data["paths"]["graph"]["terms"] + [["flops", 0.0, 1.0]]
    path.write_text(
        json.dumps({**data, "paths": {**data["paths"], "graph": {**data["paths"]["graph"], "terms": terms}}})
    )
    with pytest.raises(ValueError, match=r"paths\.graph: a term is \[basis, knot, coefficient\].*'flops'"):
        ProfileCost.load(path)
    terms = data["paths"]["graph"]["terms"] + [["one", 0.0, -1.0]]
    path.write_text(
        json.dumps({**data, "paths": {**data["paths"], "graph": {**data["paths"]["graph"], "terms": terms}}})
    )
    with pytest.raises(ValueError, match=r"coefficient must be finite and >= 0"):
        ProfileCost.load(path)
    path.write_text(json.dumps({**data, "paths": {"eager": data["paths"]["eager"]}}))
    with pytest.raises(ValueError, match=r"needs the paths 'graph' and 'eager'"):
        ProfileCost.load(path)


def test_a_prefill_waves_term_without_a_knot_is_refused_by_the_cpp_constructor(fitted, tmp_path):
    eager = ProfilePath((("one", 0.0, 1e-3), ("prefill_waves_kv", 0.0, 1e-9)))
    with pytest.raises(ValueError, match=r"prefill_waves_kv term needs a knot"):
        _native.StepCost.profile([], [("one", 0.0, 1e-3), ("prefill_waves_kv", 0.0, 1e-9)], [], [], False, True, 0)
    with pytest.raises(ValueError, match=r"prefill_waves_kv term needs a knot"):
        ProfileCost({"graph": ProfilePath((), observed=False), "eager": eager}, 0)
    _, fit, _ = fitted
    data = fit.to_dict()
    data["paths"]["eager"]["terms"].append(["prefill_waves_kv", 0.0, 1e-9])
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"prefill_waves_kv term needs a knot"):
        ProfileCost.load(path)
    # a positive knot is fine
    _native.StepCost.profile([], [("prefill_waves_kv", 128.0, 1e-9)], [], [], False, True, 0)


def test_constructor_refusals():
    graph, eager = ProfilePath(TRUTH_GRAPH), ProfilePath(TRUTH_EAGER)
    with pytest.raises(ValueError, match=r"max_graph_batch must be an integer >= 0"):
        ProfileCost({"graph": graph, "eager": eager}, -1)
    with pytest.raises(ValueError, match=r"max_graph_batch must be an integer >= 0"):
        ProfileCost({"graph": graph, "eager": eager}, True)
    with pytest.raises(ValueError, match=r"ran decode graphs but no graph step was profiled"):
        ProfileCost({"graph": ProfilePath((), observed=False), "eager": eager}, 8)
    with pytest.raises(ValueError, match=r"unknown basis 'flops'"):
        ProfileCost({"graph": graph, "eager": ProfilePath((("flops", 0.0, 1.0),))}, 8)


# --------------------------------------------------------------------------- the saved form


def test_save_and_load_round_trip(fitted, tmp_path):
    _, fit, plans = fitted
    path = tmp_path / "sub" / "p.json"
    fit.save(path)
    text = path.read_text()
    assert json.loads(text)["format"] == FORMAT == "tandem.ProfileCost/2"
    loaded = ProfileCost.load(path)
    want = fit.to_dict()
    got = loaded.to_dict()
    assert got["meta"].pop("source_file") == str(path)
    want["meta"].pop("source_file")
    assert got == want
    for p in plans[::7]:
        assert loaded.step_seconds(p) == fit.step_seconds(p)
    # and again: the file written from a loaded model is the same numbers
    again = tmp_path / "again.json"
    loaded.save(again)
    assert json.loads(again.read_text())["paths"] == json.loads(text)["paths"]


# --------------------------------------------------------------------------- range and evaluators


def test_num_extrapolated_counts_steps_beyond_the_profiled_limits(fitted):
    _, fit, _ = fitted
    cost = ProfileCost(fit.paths, fit.max_graph_batch, fit.meta)  # counts of its own
    limits = cost.paths["eager"].limits
    assert limits["tokens"] > 0 and cost.paths["graph"].limits["reqs"] == MAX_GRAPH_BATCH
    inside = PlanFeatures.of_requests([100, 0], [1, 200])
    assert cost.step_seconds(inside) > 0 and cost.num_extrapolated == 0
    cost.step_seconds(PlanFeatures())  # an empty plan: not priced, not counted
    assert cost.num_extrapolated == 0 and cost.native.num_steps == 1
    too_many_tokens = PlanFeatures.of_requests([0], [int(limits["tokens"]) + 1])
    assert cost.step_seconds(too_many_tokens) > cost.step_seconds(inside)
    assert cost.num_extrapolated == 1
    long_context = PlanFeatures.of_requests([int(cost.paths["graph"].limits["decode_kv"]) + 10], [1])
    cost.step_seconds(long_context)
    assert cost.num_extrapolated == 2 and cost.native.num_steps == 4  # inside was priced twice
    # a path no profiled step took: everything on it is an extrapolation
    blind = ProfileCost({"graph": cost.paths["graph"], "eager": ProfilePath((), observed=False)}, MAX_GRAPH_BATCH)
    blind.step_seconds(PlanFeatures.of_requests([10], [1]))  # graph: profiled
    assert blind.num_extrapolated == 0
    blind.step_seconds(PlanFeatures.of_requests([10], [20]))  # eager: never profiled
    assert blind.num_extrapolated == 1
    blind.native.reset_counts()
    assert blind.num_extrapolated == 0


def profile_sim_config(profile_path, lookahead: int = 1, fast_forward: bool = True) -> dict:
    return {
        "model": dataclasses.asdict(load_model_spec("smollm2_135m")),
        "hardware": dataclasses.asdict(load_hardware_spec("h100_sxm")),
        "workload": {
            "name": "swe_smith",
            "params": {
                "first_turn_tokens": 3000,
                "later_turn_tokens": 200,
                "output_tokens": 20,
                "turns_min": 2,
                "turns_max": 2,
            },
        },
        "scheduler": {"num_lookahead_tokens": lookahead},
        "sim": {
            "num_sessions": 3,
            "progress": False,
            "cost_model": "profile",
            "profile_path": str(profile_path),
            "fast_forward": fast_forward,
        },
        "wandb": {"mode": "disabled"},
    }


def hand_made_cost(limits: dict, meta: dict | None = None) -> ProfileCost:
    graph = ProfilePath(
        (("one", 0.0, 5e-3), ("reqs", 0.0, 1e-4), ("decode_kv", 0.0, 1e-8)),
        {"reqs": limits.get("reqs", 1e9), "decode_kv": limits.get("decode_kv", 1e9)},
    )
    eager = ProfilePath(
        (("one", 0.0, 6e-3), ("tokens", 0.0, 2e-6), ("prefill_pairs", 0.0, 1e-11)),
        {"tokens": limits.get("tokens", 1e9), "prefill_pairs": 1e18},
    )
    return ProfileCost({"graph": graph, "eager": eager}, 16, meta)


@pytest.mark.parametrize("fast_forward", [False, True])
def test_simulation_summaries_report_extrapolated_steps_with_a_note(tmp_path, fast_forward):
    wide, narrow = tmp_path / "wide.json", tmp_path / "narrow.json"
    hand_made_cost({}, {"overlap": True}).save(wide)
    hand_made_cost({"tokens": 1024}, {"overlap": True}).save(narrow)
    inside = Simulation(profile_sim_config(wide, fast_forward=fast_forward)).run()
    assert inside.summary["cost_steps"] == inside.summary["num_steps"] > 0
    assert inside.summary["cost_steps_extrapolated"] == 0
    assert not any("beyond the profiled range" in n for n in inside.notes)
    outside = Simulation(profile_sim_config(narrow, fast_forward=fast_forward)).run()
    n = outside.summary["cost_steps_extrapolated"]
    assert 0 < n < outside.summary["cost_steps"]
    assert f"{n} of {outside.summary['cost_steps']} steps lie beyond the profiled range" in " ".join(outside.notes)


def test_simulation_notes_a_profile_of_another_decode_loop(tmp_path):
    path = tmp_path / "p.json"
    hand_made_cost({}, {"overlap": True}).save(path)
    result = Simulation(profile_sim_config(path, lookahead=0)).run()
    assert any("overlapped decode on" in n and "num_lookahead_tokens=0" in n for n in result.notes)
    result = Simulation(profile_sim_config(path, lookahead=1)).run()
    assert not any("overlapped decode" in n for n in result.notes)


def random_plan(rng: np.random.Generator) -> PlanFeatures:
    kind = rng.integers(0, 3)
    if kind == 0:
        return graph_plan(rng, max_context=200_000)
    if kind == 1:
        return eager_plan(rng, max_context=200_000, max_query=9000)
    return PlanFeatures()  # empty: 0 seconds on both


def test_predict_equals_step_seconds(fitted):
    truth, fit, _ = fitted
    rng = np.random.default_rng(7)
    plans = [random_plan(rng) for _ in range(600)]
    features, prefill = features_of(plans)
    for cost in (truth, fit, ProfileCost(fit.paths, 0, {})):
        predicted = cost.predict(features, prefill)
        native = np.array([cost.step_seconds(p) for p in plans])
        assert (
            native[[p.num_tokens == 0 and not p.num_swap_in_blocks and not p.num_swap_out_blocks for p in plans]] == 0
        ).all()
        np.testing.assert_allclose(predicted, native, rtol=1e-12, atol=0)
    # without the prefill rows, the per-request terms count 0 (as the C++ evaluator without the rows)
    bare = [dataclasses.replace(p, query_lens=(), cached_lens=()) for p in plans]
    np.testing.assert_allclose(truth.predict(features), [truth.step_seconds(p) for p in bare], rtol=1e-12, atol=0)
    assert not np.allclose(truth.predict(features), truth.predict(features, prefill), rtol=1e-6)


def test_step_seconds_of_a_controlplane_plan_equals_that_of_its_features(fitted):
    truth, _, _ = fitted
    sched = cp.Scheduler(num_blocks=256, vocab_size=1000, max_num_batched_tokens=300, chunk_size=128)
    for i in range(5):
        sched.add_request(i, np.arange(40 + 90 * i) % 1000, max_new_tokens=6, ignore_eos=True)
    now, seen = 0.0, 0
    while sched.has_unfinished():
        plan = sched.step(now)
        if plan.is_empty:
            break
        record = PlanFeatures(
            **{f: int(getattr(plan, f)) for f in FEATURES},
            block_size=plan.block_size,
            query_lens=tuple(plan.query_lens.tolist()),
            cached_lens=tuple(plan.cached_lens.tolist()),
        )
        seconds = truth.step_seconds(plan)
        assert seconds == truth.step_seconds(record) > 0
        row, prefill = features_of([record])
        assert truth.predict(row, prefill)[0] == pytest.approx(seconds, rel=1e-12)
        sched.commit(plan, np.zeros(plan.num_sampled, dtype=np.int64), now + seconds)
        now += seconds
        seen += 1
    assert seen > 5


# --------------------------------------------------------------------------- shipped fits


def test_the_profile_cost_model_reads_the_shipped_fit_by_model_and_hardware(fitted, tmp_path, monkeypatch):
    _, fit, _ = fitted
    monkeypatch.setattr(sim_cost, "CONF_DIR", tmp_path)
    spec, h100, h200 = load_model_spec("llama3_8b"), load_hardware_spec("h100_sxm"), load_hardware_spec("h200")
    assert sim_cost.shipped_profile_path("llama3_8b", "h100_sxm") == tmp_path / "profiles/h100_sxm/llama3_8b.json"
    with pytest.raises(ValueError, match=r"no fit of llama3_8b on h100_sxm in conf/profiles \(shipped: none\)"):
        make_cost_model("profile", spec, h100)
    fit.save(tmp_path / "profiles" / "h200" / "llama3_8b.json")
    with pytest.raises(
        ValueError,
        match=r"no fit of llama3_8b on h100_sxm .*shipped: \['h200/llama3_8b'\]"
        r".*experiments\.calibrate",
    ):
        make_cost_model("profile", spec, h100)
    cost = make_cost_model("profile", spec, h200)
    assert isinstance(cost, ProfileCost)
    assert cost.paths["eager"].terms == fit.paths["eager"].terms
    assert cost.meta["source_file"] == str(tmp_path / "profiles" / "h200" / "llama3_8b.json")
    # the shipped fit of another shape is refused for this model
    with pytest.raises(ValueError, match=r"another model shape than qwen3_8b"):
        make_cost_model("profile", load_model_spec("qwen3_8b"), h200, tmp_path / "profiles/h200/llama3_8b.json")


def test_a_profile_path_may_be_a_csv_to_fit(fitted, tmp_path):
    truth, fit, plans = fitted
    path = tmp_path / "p.csv"
    write_synthetic(path, plans, truth, META)
    cost = make_cost_model("profile", load_model_spec("llama3_8b"), load_hardware_spec("h100_sxm"), path)
    assert cost.paths["graph"].terms == fit.paths["graph"].terms


@pytest.mark.parametrize("hardware, low_ms, high_ms", [("h100_sxm", 5.0, 20.0), ("h200", 3.0, 20.0)])
def test_shipped_fits_load_match_the_model_and_price_a_long_decode_plausibly(hardware, low_ms, high_ms):
    spec = load_model_spec("llama3_8b")
    path = sim_cost.shipped_profile_path("llama3_8b", hardware)
    assert path.is_file(), f"{hardware}/llama3_8b" + f" not in {sim_cost.shipped_profiles()}"
    cost = ProfileCost.load(path)
    assert cost.meta["model"] == "llama3_8b" and cost.meta["hardware"] == hardware
    assert cost.meta["model_shape"] == {k: getattr(spec, k) for k in SHAPE_KEYS}
    cost.check_model(spec)
    assert cost.paths["graph"].observed and cost.paths["eager"].observed and cost.max_graph_batch > 0
    made = make_cost_model("profile", spec, load_hardware_spec(hardware))
    assert made.to_dict()["paths"] == cost.to_dict()["paths"]
    # one request decoding at 50K tokens of context, steady overlapped decode (a graph replay)
    steady = dataclasses.replace(PlanFeatures.of_requests([50_000], [1]), follows_decode=1, continues_decode=1)
    seconds = cost.step_seconds(steady)
    assert low_ms * 1e-3 < seconds < high_ms * 1e-3, seconds
    assert cost.num_extrapolated == 0
    # more context, more requests or a prefill never cost less
    assert (
        cost.step_seconds(
            dataclasses.replace(steady, decode_kv_tokens=100_001, kv_read_tokens=100_001, attn_pairs=100_001)
        )
        >= seconds
    )
    assert cost.step_seconds(PlanFeatures.of_requests([50_000, 0], [1, 2048])) > seconds
