"""The engine on a CUDA device (run with `make test-gpu`; skipped elsewhere).

Llama-3-8B- and Qwen3-8B-shaped models with random weights in bf16 against
transformers on the same weights, prompts up to 32K tokens; CUDA-graph decode
against eager decode.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def _core(shape: str, **kwargs):
    from engine.config import EngineConfig
    from engine.core import EngineCore

    cfg = dict(model=shape, load_format="dummy", dtype="bfloat16", device="cuda", num_gpu_blocks=4096,
               max_num_seqs=16, max_num_batched_tokens=8192, chunk_size=8192, max_model_len=33000,
               enable_prefix_caching=False, cuda_graph_batch_sizes=(1, 2, 4, 8, 16))
    cfg.update(kwargs)
    return EngineCore(EngineConfig(**cfg))


def _hf(core):
    import transformers

    cfg = core.model_config.to_hf()
    arch = cfg.pop("architectures")[0]
    cfg.pop("model_type")
    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen3ForCausalLM": transformers.Qwen3Config}[arch]
    with torch.device("cuda"):
        model = getattr(transformers, arch)._from_config(config_cls(**cfg), dtype=torch.bfloat16,
                                                         attn_implementation="sdpa")
    model.load_state_dict(core.model.hf_state_dict(), strict=False)
    return model.eval()


def _engine_logits(core, prompt: list[int], decode_steps: int) -> tuple[torch.Tensor, list[int]]:
    """Logits the engine sampled from: after the prompt, then after each greedy token."""
    from engine import SamplingParams

    captured = []
    forward = core.runner.forward
    core.runner.forward = lambda batch, plan: captured.append(forward(batch, plan).clone()) or captured[-1]
    core.add_request(0, prompt, SamplingParams(temperature=0.0, max_tokens=decode_steps + 1, ignore_eos=True))
    tokens = []
    while core.has_unfinished():
        tokens += core.step().tokens.tolist()
    core.runner.forward = forward
    return torch.cat(captured, 0), tokens


@pytest.mark.parametrize("shape", ["llama-3.1-8b", "qwen3-8b"])
@pytest.mark.parametrize("length", [1000, 32000])
def test_bf16_logits_match_transformers(shape, length):
    core = _core(shape)
    rng = np.random.default_rng(length)
    prompt = rng.integers(0, core.model_config.vocab_size, length).tolist()
    ours, tokens = _engine_logits(core, prompt, decode_steps=3)
    hf = _hf(core)
    with torch.inference_mode():
        ids = torch.tensor([prompt + tokens[:-1]], device="cuda")
        ref = hf(ids, logits_to_keep=len(tokens)).logits[0].float()
    err = ((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item()
    print(f"{shape} {length} tokens: max relative logit error {err:.3e}, min cosine {cos:.5f}, "
          f"kernels {core.ops.chosen['decode_attention']}/{core.ops.chosen['prefill_attention']}")
    assert err < 5e-2 and cos > 0.998
    del core, hf
    gc.collect()
    torch.cuda.empty_cache()


def test_cuda_graph_decode_equals_eager_decode():
    from engine import SamplingParams

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128256, int(n)).tolist() for n in rng.integers(20, 700, 8)]
    results = {}
    for eager in (True, False):
        core = _core("llama-3.2-1b", enforce_eager=eager, max_model_len=4096)
        assert (core.runner.graphs is None) == eager
        captured = []
        forward = core.runner.forward
        core.runner.forward = lambda batch, plan: captured.append(forward(batch, plan).clone()) or captured[-1]
        sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        for i, p in enumerate(prompts):
            core.add_request(i, p, sp)
        out = {}
        while core.has_unfinished():
            for f in core.step().finished:
                out[f.request_id] = list(f.output_token_ids)
        results[eager] = (out, torch.cat(captured[-20:], 0))
        del core
        gc.collect()
        torch.cuda.empty_cache()
    (eager_tokens, eager_logits), (graph_tokens, graph_logits) = results[True], results[False]
    err = ((graph_logits - eager_logits).norm() / eager_logits.norm()).item()
    assert err < 1e-2, err
    assert graph_tokens == eager_tokens
