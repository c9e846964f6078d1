"""Random weights of a real shape (vLLM's `load_format=dummy`): benchmarks without checkpoints."""

from __future__ import annotations

import json
import os

import torch

from engine.config import EngineConfig, ModelConfig


def init_random(model, seed: int, std: float = 0.02) -> None:
    """Fills every parameter in place on its device: norms at 1 + noise, the rest N(0, std).

    An FP8 model gets the same draws as the unquantized one of the same seed, rounded to the model's
    dtype and then quantized layer by layer (its weight scales are derived, not drawn).
    """
    from engine.quant import FP8

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    dtype = model.model.embed_tokens.weight.dtype
    for name, p in model.named_parameters():
        if name.endswith(".weight_scale"):
            continue
        if name.endswith("norm.weight"):
            values = 1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        else:
            values = std * torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        if p.dtype == FP8:
            model.get_submodule(name.rsplit(".", 1)[0]).load_float_(values.to(dtype))
        else:
            p.data.copy_(values)


def config_for(source: str) -> ModelConfig:
    """A built-in shape name, a config.json path, or a directory holding one."""
    from engine.models.shapes import SHAPES, shape_config

    if source in SHAPES:
        return shape_config(source)
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise ValueError(
            f"load_format=dummy needs a built-in shape ({sorted(SHAPES)}), a config.json "
            f"or a directory with one; got {source!r}"
        )
    with open(path) as f:
        return ModelConfig.from_hf(json.load(f))


def load(source: str, cfg: EngineConfig, device, dtype):
    from engine.loader import LoadedModel, build_model

    config = config_for(source)
    model = build_model(config, device, dtype, cfg.quantization)
    init_random(model, cfg.seed)
    return LoadedModel(model, config, None, f"dummy:{source}", cfg.quantization)
