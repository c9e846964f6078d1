"""Bad input gets a clear error, never a crash: models, GGUF files, sampling parameters, prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine_helpers import tiny_config


def core_for(tmp_path, **kwargs):
    from engine.config import EngineConfig
    from engine.core import EngineCore

    defaults = dict(device="cpu", num_gpu_blocks=8)
    defaults.update(kwargs)
    return EngineCore(EngineConfig.from_dict(defaults))


def test_missing_model_directory(tmp_path):
    from engine.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not exist"):
        core_for(tmp_path, model=str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    from engine.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="no config.json"):
        core_for(tmp_path, model=str(tmp_path))


def test_malformed_config_json(tmp_path):
    from engine.loader import ModelLoadError

    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        core_for(tmp_path, model=str(tmp_path))


def test_config_missing_a_field(tmp_path):
    from engine.config import ModelConfigError

    cfg = tiny_config("LlamaForCausalLM").to_hf()
    del cfg["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="num_hidden_layers"):
        core_for(tmp_path, model=str(tmp_path))


def test_unsupported_architecture(tmp_path):
    from engine.config import ModelConfigError

    cfg = {**tiny_config("LlamaForCausalLM").to_hf(), "architectures": ["MambaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="unsupported architecture.*Mamba"):
        core_for(tmp_path, model=str(tmp_path))


def test_directory_without_weights(tmp_path):
    from engine.loader import ModelLoadError

    (tmp_path / "config.json").write_text(json.dumps(tiny_config("LlamaForCausalLM").to_hf()))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        core_for(tmp_path, model=str(tmp_path))


def test_checkpoint_with_a_wrong_shape(tmp_path):
    from safetensors.torch import save_file

    from engine.loader import ModelLoadError

    cfg = tiny_config("LlamaForCausalLM")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="embed_tokens.*shape"):
        core_for(tmp_path, model=str(tmp_path))


def _write_gguf(path, tensor_type_name: str):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(256)
    w.add_vocab_size(256)
    w.add_layer_norm_rms_eps(1e-5)
    qtype = gguf.GGMLQuantizationType[tensor_type_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = 256 * 64
    raw = np.zeros(n // block * type_size, dtype=np.uint8)
    w.add_tensor("token_embd.weight", raw, raw_shape=(256, 64 // block * type_size), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_with_an_unread_quantization_type(tmp_path):
    from engine.loader import ModelLoadError

    path = tmp_path / "model.gguf"
    _write_gguf(path, "TQ2_0")
    with pytest.raises(ModelLoadError, match="quantization type TQ2_0.*readable types: F32"):
        core_for(tmp_path, model=str(path))


def test_not_a_gguf_file(tmp_path):
    from engine.loader import ModelLoadError

    path = tmp_path / "model.gguf"
    path.write_bytes(b"definitely not gguf")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        core_for(tmp_path, model=str(path))


def test_unknown_engine_option():
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match="unknown engine config keys: \\['gpu_mem'\\]"):
        EngineConfig.from_dict({"gpu_mem": 0.5})
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)


def test_unknown_dummy_shape():
    from engine.config import EngineConfig
    from engine.core import EngineCore

    with pytest.raises(ValueError, match="built-in shape"):
        EngineCore(EngineConfig(model="llama-9000", load_format="dummy", device="cpu"))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("temperature", -0.1, "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -2, "top_k"),
        ("min_p", 2.0, "min_p"),
        ("max_tokens", 0, "max_tokens"),
        ("n", 0, "n must"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("presence_penalty", 3.0, "presence_penalty"),
        ("frequency_penalty", -2.5, "frequency_penalty"),
        ("logprobs", 21, "logprobs"),
        ("stop", [""], "stop"),
        ("stop_token_ids", [-1], "stop_token_ids"),
        ("seed", 1.5, "seed"),
    ],
)
def test_sampling_params_out_of_range(field, value, message):
    from engine import SamplingParams

    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_prompts_the_engine_refuses(tmp_path):
    from engine import SamplingParams

    cfg = tiny_config("LlamaForCausalLM", max_position_embeddings=64)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    core = core_for(tmp_path, model=str(tmp_path / "config.json"), load_format="dummy")
    sp = SamplingParams()
    with pytest.raises(ValueError, match="max_model_len is 64"):
        core.add_request(0, list(range(64)), sp)
    with pytest.raises(ValueError, match="empty"):
        core.add_request(1, [], sp)
    with pytest.raises(ValueError, match="token ids must be in \\[0, 512\\)"):
        core.add_request(2, [5, 512], sp)
    assert not core.has_unfinished()  # nothing was queued
