"""Random weights of a real shape (vLLM's `load_format=dummy`): benchmarks without checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch

from engine.config import EngineConfig, ModelConfig

CHUNK_ELEMENTS = 1 << 22  # values drawn at a time: whole rows, at most this many elements (16 MiB in float32)


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _draws(name: str, shape: tuple[int, ...], part, seed: int, device: torch.device):
    """Standard normal float32 values of the whole parameter `name` of `shape`, chunk by chunk of whole
    rows (each chunk its own generator, seeded from the seed, the name and the chunk's index): yields
    the rows of each chunk that `part` keeps (engine.tensor_parallel.Part; None: all), its columns
    only where `part` cuts them. Any rank of any size thus gets its part of the same whole values,
    and never holds more of another rank's than one chunk."""
    rows = shape[0]
    width = math.prod(shape[1:])
    per = max(1, CHUNK_ELEMENTS // max(1, width))
    for chunk, first in enumerate(range(0, rows, per)):
        count = min(per, rows - first)
        keep = part.within(first, count) if part is not None and part.dim == 0 else None
        if keep is not None and not keep.ranges:
            continue  # no row of this chunk is this rank's: not drawn
        gen = torch.Generator(device=device).manual_seed(_chunk_seed(seed, name, chunk))
        values = torch.randn((count, *shape[1:]), generator=gen, device=device, dtype=torch.float32)
        if keep is not None:
            values = keep.view(values)
        elif part is not None:
            values = part.view(values)
        yield values
        del values  # before the next chunk is drawn


def init_random(model, seed: int, std: float = 0.02) -> None:
    """Fills every parameter in place on its device: norms at 1 + 0.1 N(0, 1), the rest N(0, std).

    The values are the whole model's (chunks of rows drawn from per-chunk seeds, `_draws`); a model
    sharded by engine.tensor_parallel.shard_model (`model.tp_param_parts`) gets exactly its rank's part
    of them, without drawing the other ranks' rows. An FP8 model gets the same draws as the unquantized
    one of the same seed, rounded to the model's dtype and then quantized chunk by chunk (per output
    channel: its weight scales are derived, not drawn; a rank's row-parallel part is quantized on its
    own columns).
    """
    from engine.quant import FP8

    parts = getattr(model, "tp_param_parts", {})
    dtype = model.model.embed_tokens.weight.dtype
    for name, p in model.named_parameters():
        if name.endswith(".weight_scale"):
            continue
        shape, part = parts.get(name, (tuple(p.shape), None))
        at = 0
        for values in _draws(name, shape, part, seed, p.device):
            if name.endswith("norm.weight"):
                values.mul_(0.1).add_(1.0)  # in place: one chunk at a time is all a load holds beyond its part
            else:
                values.mul_(std)
            if p.dtype == FP8:
                model.get_submodule(name.rsplit(".", 1)[0]).load_float_(values.to(dtype), at)
            else:
                p.data.narrow(0, at, values.shape[0]).copy_(values)
            at += values.shape[0]
            del values
        if at != p.shape[0]:
            raise AssertionError(f"{name}: drew {at} rows for {p.shape[0]}")
    if getattr(model, "tp", None) is not None:  # a rank's shard: a row-parallel bias enters once (rank 0's)
        from engine.tensor_parallel import zero_partial_biases

        zero_partial_biases(model)


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


def load(source: str, cfg: EngineConfig, device, dtype, tp=None):
    from engine.loader import LoadedModel, build_model

    config = config_for(source)
    model = build_model(config, device, dtype, cfg.quantization, tp)
    init_random(model, cfg.seed)
    return LoadedModel(model, config, None, f"dummy:{source}", cfg.quantization)
