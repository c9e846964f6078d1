"""A Hugging Face model directory: config.json, *.safetensors shards, tokenizer files."""

from __future__ import annotations

import glob
import json
import os

from engine.config import ModelConfig, ModelConfigError


def read_config(path: str) -> ModelConfig:
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
    return ModelConfig.from_hf(raw)


def iter_safetensors(path: str):
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
                yield name, f.get_tensor(name)


def load_tokenizer(path: str):
    """The directory's tokenizer (tokenizer.json / tokenizer_config.json), or None if it has none."""
    if not any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json",
                                                                 "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load(path: str, device, dtype):
    from engine.loader import LoadedModel, ModelLoadError, build_model

    config = read_config(path)
    model = build_model(config, device, dtype)
    try:
        model.load_weights(iter_safetensors(path))
    except (ValueError, ModelConfigError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: {exc}") from None
    return LoadedModel(model, config, load_tokenizer(path), path)
