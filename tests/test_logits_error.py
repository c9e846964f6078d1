"""experiments.logits_error on the CPU: a tiny random-weight Llama, each FP8 option against float32."""

from __future__ import annotations

from experiments import logits_error

from engine_helpers import write_tiny_config


def test_fp8_options_move_the_logits_a_little_and_the_reference_not_at_all(tmp_path, capsys):
    config = write_tiny_config(tmp_path, "LlamaForCausalLM", vocab_size=512, max_position_embeddings=1024)
    rows = logits_error.main([
        "--model", config, "--tokens", "96", "--rows", "32", "--device", "cpu", "--dtype", "float32",
    ])  # fmt: skip
    by = {r["option"]: r for r in rows}
    assert by["auto/none"]["rel_err_max"] == 0.0 and by["auto/none"]["argmax_agree"] == 1.0
    for option in ("fp8_e4m3/none", "auto/fp8", "fp8_e4m3/fp8"):
        assert 0.0 < by[option]["rel_err_mean"] < 0.2, by[option]
    assert "rel err mean" in capsys.readouterr().out
