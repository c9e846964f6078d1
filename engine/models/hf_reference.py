"""A transformers model holding exactly an engine model's weights: the reference of tests and benchmarks."""

from __future__ import annotations

import torch


def transformers_model(
    engine_model,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str = "sdpa",
):
    """transformers' own implementation of `engine_model`'s architecture, with its weights (split q|k|v, gate|up).

    Args:
        dtype, device: of the copy; the engine model's by default.
    Raises:
        ValueError: transformers' model has parameters the engine model does not fill.
    """
    import transformers

    params = next(engine_model.parameters())
    dtype = dtype or params.dtype
    device = device or params.device
    cfg = engine_model.config.to_hf()
    arch = cfg.pop("architectures")[0]
    cfg.pop("model_type")
    config_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
    }[arch]
    hf_cfg = config_cls(**cfg)
    hf_cfg.architectures = [arch]
    with torch.device(device):
        model = getattr(transformers, arch)._from_config(hf_cfg, dtype=dtype, attn_implementation=attn_implementation)
    # tensor by tensor into transformers' own parameters: converting the whole state dict first would hold a
    # second full copy (32 GB for an 8B model in float32) beside the model on the device
    state = engine_model.hf_state_dict()
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(
            f"weights do not line up with transformers' {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
    if engine_model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
