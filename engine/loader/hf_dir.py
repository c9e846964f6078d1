"""A Hugging Face model directory: config.json, *.safetensors shards, tokenizer files.

FP8 checkpoints (config.json's `quantization_config`: compressed-tensors, fbgemm_fp8, or per-tensor
`fp8`; engine.quant.checkpoint_format) load as FP8 whatever EngineConfig.quantization says, as vLLM
does; a bf16 checkpoint with quantization="fp8" is quantized tensor by tensor as it loads.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import torch

from engine.config import ModelConfig, ModelConfigError

log = logging.getLogger(__name__)


def read_config(path: str) -> ModelConfig:
    return ModelConfig.from_hf(read_hf_config(path))


def read_hf_config(path: str) -> dict:
    """config.json as a mapping (with generation_config.json's eos_token_id when config.json has none)."""
    from engine.loader import ModelLoadError

    if not os.path.isdir(path):
        raise ModelLoadError(f"model directory {path!r} does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"model directory {path!r} has no config.json")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{cfg_path} must hold a JSON object")
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path) and "eos_token_id" not in raw:
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            raw = {**raw, "eos_token_id": eos}
    return raw


def resolve_quantization(path: str, raw: dict, quantization: str) -> str:
    """The quantization the weights load with: "fp8" for a checkpoint declaring FP8 (logged when
    `quantization` said "none"), else `quantization`. Raises ModelLoadError for formats not read."""
    from engine.loader import ModelLoadError
    from engine.quant import checkpoint_format

    try:
        fmt = checkpoint_format(raw, os.path.join(path, "config.json"))
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if fmt is None:
        return quantization
    if quantization != "fp8":
        log.info(
            "%s is an FP8 checkpoint (%s, %s scales): loading FP8 weights (quantization=fp8)",
            path,
            fmt.method,
            fmt.strategy,
        )
    return "fp8"


def _read(f, name: str, model):
    """Checkpoint tensor `name` of the open file `f`, or only the part of it `model`'s rank holds (read
    through the file's slices: the other ranks' elements are never copied out of the file)."""
    from engine.loader import checkpoint_part

    if model is None or not hasattr(model, "tp_checkpoint_parts"):
        return f.get_tensor(name)
    view = f.get_slice(name)
    shape = tuple(view.get_shape())
    part = checkpoint_part(model, name, shape)
    if part is None:
        return f.get_tensor(name)
    pieces = []
    for start, count in part.ranges:
        index = [slice(None)] * len(shape)
        index[part.dim] = slice(start, start + count)
        pieces.append(view[tuple(index)])
    return torch.cat(pieces, part.dim) if len(pieces) > 1 else pieces[0]


def iter_safetensors(path: str, model=None):
    """(name, tensor) of every tensor of the directory's *.safetensors files; with a sharded `model`
    (engine.loader.build_model with tp), each tensor's part that the model's rank holds."""
    from safetensors import safe_open

    from engine.loader import ModelLoadError

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"model directory {path!r} has no *.safetensors weights")
    for file in files:
        try:
            handle = safe_open(file, framework="pt")
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{file} is not a readable safetensors file: {exc}") from None
        with handle as f:
            for name in f.keys():
                if model is not None and name == "lm_head.weight" and model.config.tie_word_embeddings:
                    continue  # load_weights reads past it: not read at all (a rank would read it whole)
                yield name, _read(f, name, model)


def load_tokenizer(path: str):
    """The directory's tokenizer (tokenizer.json / tokenizer_config.json), or None if it has none."""
    if not any(
        os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load(path: str, device, dtype, quantization: str = "none", tp=None):
    from engine.loader import LoadedModel, ModelLoadError, build_model

    raw = read_hf_config(path)
    config = ModelConfig.from_hf(raw)
    quantization = resolve_quantization(path, raw, quantization)
    model = build_model(config, device, dtype, quantization, tp)
    try:
        model.load_weights(iter_safetensors(path, model))
    except (ValueError, ModelConfigError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: {exc}") from None
    return LoadedModel(model, config, load_tokenizer(path), path, quantization)
