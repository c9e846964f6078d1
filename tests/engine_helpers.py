"""Shared pieces of the engine tests: the embedded model, Hugging Face references, tiny random models."""

from __future__ import annotations

import functools
import os

import torch

PROMPTS = [
    "The capital of France is",
    "Write a Python function that reverses a string.",
    "Hi",
    "In a distant galaxy, a small robot named Pim woke up to find that every star had gone dark. "
    "It checked its sensors, then its memory, then the old map its makers had left behind.",
    "List three fruits:",
    "Explain, step by step and in plain words, how a hash map resolves collisions with open addressing "
    "and why deleting entries needs care. Use an example with five keys.",
    "1, 2, 3, 4,",
    "Translate to French: the cat sleeps on the warm windowsill while rain falls outside.",
]


@functools.lru_cache(maxsize=1)
def smollm2_path() -> str:
    from engine.loader import embedded_default_path

    return embedded_default_path()


@functools.lru_cache(maxsize=1)
def hf_smollm2():
    """transformers' own SmolLM2 from the same GGUF file, float32 (dequantized by transformers)."""
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding with transformers' KV cache, one prompt at a time (no padding)."""
    ids = torch.tensor([prompt_ids])
    out = model(ids, use_cache=True)
    past, tokens = out.past_key_values, []
    nxt = out.logits[0, -1].argmax()
    for _ in range(new_tokens):
        tokens.append(int(nxt))
        out = model(nxt.view(1, 1), past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[0, -1].argmax()
    return tokens


def hf_model_from_engine(engine_model):
    """A transformers model with exactly the engine model's weights (for random-weight shapes)."""
    from engine.models.hf_reference import transformers_model

    return transformers_model(engine_model)


def tiny_config(arch: str, **overrides):
    """A small random-weight shape of a real family (CPU-sized)."""
    from engine.config import ModelConfig

    base = {
        "architectures": [arch],
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "eos_token_id": 1,
    }
    base.update(overrides)
    return ModelConfig.from_hf(base)


def write_tiny_config(directory, arch: str, **overrides) -> str:
    """tiny_config's config.json in `directory`; its path (an EngineConfig model for load_format=dummy)."""
    import json
    import os

    path = os.path.join(str(directory), "config.json")
    with open(path, "w") as f:
        json.dump(tiny_config(arch, **overrides).to_hf(), f)
    return path
