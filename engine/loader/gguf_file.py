"""A GGUF file (llama.cpp's format): metadata -> ModelConfig, tensors dequantized to float at load.

Tensor names map to Hugging Face names (`blk.3.attn_q.weight` ->
`model.layers.3.self_attn.q_proj.weight`). llama.cpp's converter permutes the
rows of Llama's q and k projections (interleaved rotary halves); we undo that
so the weights are exactly the Hugging Face ones. The tokenizer and chat
template come from the file's metadata, through transformers.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from engine.config import ARCHITECTURES, ModelConfig, ModelConfigError

_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Quantization types we dequantize (gguf's numpy reference); others are refused by name.
READABLE_TYPES = (
    "F32",
    "F16",
    "BF16",
    "F64",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)

_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _reader(path: str):
    from engine.loader import ModelLoadError

    try:
        import gguf
    except ImportError:  # pragma: no cover - a declared dependency
        raise ModelLoadError("reading GGUF files needs the package gguf") from None
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/struct errors on bad files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def read_config(reader, path: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH:
        raise ModelConfigError(
            f"{path}: unsupported GGUF architecture {arch!r}; "
            f"this engine runs {sorted(_ARCH)} ({sorted(ARCHITECTURES)})"
        )

    def need(key: str):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ModelConfigError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ModelConfigError(f"{path}: GGUF metadata gives no vocabulary size")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    scaling = None
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    hf = {
        "architectures": [_ARCH[arch]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 8192)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": int(eos) if eos is not None else None,
        "rope_scaling": scaling,
    }
    return ModelConfig.from_hf({k: v for k, v in hf.items() if v is not None})


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors we do not use (e.g. rope_freqs)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)", name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: per head, rows (2, d/2) back to (d/2, 2)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_COLUMN_ROWS = 256  # rows dequantized at a time where a column slice is not whole quantization blocks


def _columns(t, start: int, count: int) -> np.ndarray:
    """Columns start..start+count of a 2-D GGUF tensor (rows of the Hugging Face layout), float32.

    Quantized rows are runs of blocks: a slice of whole blocks is cut in the bytes, so only this part
    is dequantized; otherwise rows are dequantized a few at a time and cut."""
    from gguf import GGML_QUANT_SIZES, quants

    data, kind = t.data, t.tensor_type
    if data.dtype != np.uint8:  # F32 / F16 / F64: elements
        return np.asarray(quants.dequantize(np.ascontiguousarray(data[:, start : start + count]), kind), np.float32)
    block, size = GGML_QUANT_SIZES[kind]
    if start % block == 0 and count % block == 0:
        raw = np.ascontiguousarray(data[:, start // block * size : (start + count) // block * size])
        return np.asarray(quants.dequantize(raw, kind), dtype=np.float32)
    out = np.empty((data.shape[0], count), dtype=np.float32)
    for row in range(0, data.shape[0], _COLUMN_ROWS):
        rows = quants.dequantize(data[row : row + _COLUMN_ROWS], kind)
        out[row : row + _COLUMN_ROWS] = rows[:, start : start + count]
    return out


def _read(t, part) -> np.ndarray:
    """A GGUF tensor in the Hugging Face layout, float32: whole, or a rank's part (rows cut before
    dequantizing; columns per _columns)."""
    from gguf import quants

    if part is None:
        return np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    pieces = [
        np.asarray(quants.dequantize(t.data[start : start + count], t.tensor_type), dtype=np.float32)
        if part.dim == 0
        else _columns(t, start, count)
        for start, count in part.ranges
    ]
    return np.concatenate(pieces, axis=part.dim) if len(pieces) > 1 else pieces[0]


def iter_tensors(reader, config: ModelConfig, path: str, model=None):
    """(Hugging Face name, float32 tensor) of the file's tensors; with a sharded `model`
    (engine.loader.build_model with tp), the part of each that the model's rank holds."""
    from engine.loader import ModelLoadError, checkpoint_part

    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        kind = t.tensor_type.name
        if kind not in READABLE_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {t.name} uses GGUF quantization type {kind}, which this "
                f"engine does not read; readable types: {', '.join(READABLE_TYPES)}"
            )
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first
        part = checkpoint_part(model, name, shape) if model is not None else None
        array = _read(t, part)
        if config.family == "llama" and (".q_proj." in name or ".k_proj." in name):
            array = _unpermute(array, array.shape[0] // config.head_dim)  # whole heads, whole or a rank's
        yield name, torch.from_numpy(np.array(array, copy=True, order="C"))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))


def load(path: str, device, dtype, quantization: str = "none", tp=None):
    """quantization="fp8": the decoder layers' linear weights, dequantized from the file's types to
    float32 tensor by tensor, are quantized to FP8 per output channel as each is loaded. `tp`: this
    rank's shard, reading only its part of each tensor (engine.loader.load_model)."""
    from engine.loader import LoadedModel, ModelLoadError, build_model

    reader = _reader(path)
    config = read_config(reader, path)
    model = build_model(config, device, dtype, quantization, tp)
    try:
        model.load_weights(iter_tensors(reader, config, path, model))
    except ModelLoadError:
        raise
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    return LoadedModel(model, config, load_tokenizer(path), path, quantization)
