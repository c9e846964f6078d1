"""Random-weight models of each family against transformers' own implementation, on the CPU.

Logits are compared for a prefill and then for decode steps that read the
paged KV cache, through the engine's runner and the torch kernels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine_helpers import hf_model_from_engine, tiny_config

FAMILIES = {
    "qwen3": ("Qwen3ForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "llama3-scaled-rope": (
        "LlamaForCausalLM",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True, "num_key_value_heads": 8}),
}


def engine_for(config, tmp_path, **kwargs):
    from engine.config import EngineConfig
    from engine.core import EngineCore

    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_hf()))
    cfg = EngineConfig.from_dict(
        dict(model=str(path), load_format="dummy", device="cpu", dtype="float32", num_gpu_blocks=64, seed=3, **kwargs)
    )
    return EngineCore(cfg)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_model_logits_match_transformers(family, tmp_path):
    arch, overrides = FAMILIES[family]
    config = tiny_config(arch, **overrides)
    core = engine_for(config, tmp_path)
    hf = hf_model_from_engine(core.model)
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, config.vocab_size, size=150).tolist()

    captured: list[torch.Tensor] = []
    forward = core.runner.forward
    core.runner.forward = lambda batch, plan, **kw: captured.append(forward(batch, plan, **kw)) or captured[-1]
    from engine import SamplingParams

    core.add_request(0, prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    tokens = []
    while core.has_unfinished():
        out = core.step()
        tokens += out.tokens.tolist()
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt + tokens])).logits[0].float()
    # step 0: logits after the prompt; step k: after prompt + k generated tokens
    ours = torch.cat(captured, dim=0)
    expect = ref[len(prompt) - 1 : len(prompt) - 1 + len(captured)]
    err = (ours - expect).norm() / expect.norm()
    assert err < 1e-4, f"{family}: relative logit error {err:.2e}"
    assert tokens == expect.argmax(-1).tolist()


def test_placement_annotations_imply_two_all_reduces_per_layer():
    from engine.models.decoder import CausalLM
    from engine.placement import collectives

    config = tiny_config("Qwen3ForCausalLM", num_hidden_layers=3)
    with torch.device("meta"):
        model = CausalLM(config)
    ops = collectives(model)
    reduces = [c for c in ops if c.op == "all_reduce"]
    # one after the vocab-parallel embedding, one after each o_proj and each down_proj
    assert len(reduces) == 1 + 2 * config.num_layers
    assert {c.where.split(".")[-1] for c in reduces} == {"input_layernorm", "post_attention_layernorm", "norm"}
    assert ops[-1].op == "all_gather" and ops[-1].where == "<output>"  # vocab-sharded logits
    assert not [c for c in ops if c.op not in ("all_reduce", "all_gather")]


def test_hf_directory_round_trip(tmp_path):
    """Weights saved as a Hugging Face directory (safetensors) load back to the same logits."""
    from safetensors.torch import save_file

    from engine.config import EngineConfig
    from engine.core import EngineCore

    config = tiny_config("Qwen2ForCausalLM")
    core = engine_for(config, tmp_path)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config.to_hf()))
    tensors = {k: v.contiguous().clone() for k, v in core.model.hf_state_dict().items()}
    half = len(tensors) // 2
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:half]}, str(model_dir / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(model_dir / "model-00002-of-00002.safetensors"))
    loaded = EngineCore(EngineConfig(model=str(model_dir), device="cpu", num_gpu_blocks=8))
    for (name, a), (_, b) in zip(sorted(core.model.state_dict().items()), sorted(loaded.model.state_dict().items())):
        assert torch.equal(a, b), name
