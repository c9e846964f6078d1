"""Per-rank loading on one CUDA device (run with `make test-gpu`; skipped elsewhere).

A rank of a tensor-parallel group loads only its shard (engine.loader.load_model with a TPGroup): no
process group is needed to load, so one card checks what several would run. Llama-3.1-70B's rank 1 of 4
(35 GB of its 141 GB) loads on an 80 GB card and its peak allocation is its shard plus one draw chunk;
the Llama-3-8B shape's ranks at TP 2 equal the whole model's shards.
"""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def _config(shape: str):
    from engine.config import EngineConfig

    return EngineConfig.from_dict({"model": shape, "load_format": "dummy", "device": "cuda", "dtype": "bfloat16"})


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def test_a_70b_rank_loads_its_quarter_on_one_card_and_peaks_at_its_shard() -> None:
    from engine.loader import load_model
    from engine.loader.dummy import CHUNK_ELEMENTS, _draws
    from engine.tensor_parallel import TPGroup

    _free()
    before = torch.cuda.memory_allocated()
    model = load_model(_config("llama-3.1-70b"), torch.device("cuda"), torch.bfloat16, TPGroup(1, 4)).model
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() - before
    print(f"\n70B rank 1 of 4: shard {shard / 1e9:.2f} GB, peak allocation while loading {peak / 1e9:.2f} GB")
    assert 34e9 < shard < 36e9  # a quarter of 141 GB
    assert peak <= shard + 2 * CHUNK_ELEMENTS * 4 + 64 * 2**20
    # its values are the whole model's: layer 0's q|k|v drawn whole and cut equals the rank's
    name = "model.layers.0.self_attn.qkv_proj.weight"
    shape, part = model.tp_param_parts[name]
    whole = torch.cat(list(_draws(name, shape, None, 0, torch.device("cuda"))))
    got = model.get_parameter(name)
    assert torch.equal(got, (0.02 * part.take(whole)).to(torch.bfloat16))
    del model, whole
    _free()


def test_8b_ranks_at_tp2_equal_the_whole_models_shards() -> None:
    from engine.loader import load_model
    from engine.tensor_parallel import TPGroup, shard_model

    _free()
    cfg, cuda = _config("llama-3.1-8b"), torch.device("cuda")
    for rank in range(2):
        whole = shard_model(load_model(cfg, cuda, torch.bfloat16).model, TPGroup(rank, 2))
        torch.cuda.empty_cache()
        got = load_model(cfg, cuda, torch.bfloat16, TPGroup(rank, 2)).model
        for (name, a), (_, b) in zip(got.named_parameters(), whole.named_parameters()):
            assert torch.equal(a, b), name
        del whole, got
        _free()


@pytest.mark.parametrize("size", [2, 4])
def test_the_engine_over_gpus_gives_tp1s_greedy_tokens_within_bf16_tolerance(size: int) -> None:
    """Llama-3.2-1B's shape in bf16 at TP 2 and 4 over NCCL (one process a GPU) against TP 1 on the same
    random weights: the same greedy tokens, their logprobs within bf16 rounding, until a step where TP 1's
    two best tokens were within that rounding of each other (a near-tie either may break). Needs `size` GPUs
    (skipped on one)."""
    if torch.cuda.device_count() < size:
        pytest.skip(f"needs {size} GPUs, this machine has {torch.cuda.device_count()}")
    from engine import LLM, SamplingParams

    tol = 0.05  # bf16 logits of a 16-layer model summed in another order
    prompts = [list(range(100, 164)), list(range(7, 1000, 3)), [128000] + list(range(5000, 5100))]
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=2, ignore_eos=True)
    runs = {}
    for tp in (1, size):
        llm = LLM(model="llama-3.2-1b", load_format="dummy", dtype="bfloat16", device="cuda", tensor_parallel_size=tp)
        try:
            runs[tp] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.close()
        _free()
    compared = 0
    for want, got in zip(runs[1], runs[size]):
        for step, (token, top) in enumerate(zip(want.token_ids, want.logprobs)):
            best = sorted(top.values(), reverse=True)
            if got.token_ids[step] != token:
                assert best[0] - best[1] < 2 * tol, f"step {step}: TP {size} chose another token, no near-tie"
                break
            assert got.logprobs[step][token] == pytest.approx(top[token], abs=tol)
            compared += 1
    assert compared >= 12  # most steps compared
