"""FP8 weights (quantization="fp8", engine/quant.py): e4m3 with per-output-channel scales, on the CPU.

The quantization math and its error bounds; the CPU path (dequantize, then matmul) against the
dequantized weights; the tensor-core path's math through torch's CPU _scaled_mm; tiny random models
against their unquantized twins and against transformers holding the dequantized weights;
pre-quantized Hugging Face checkpoints (compressed-tensors per channel and per tensor, fbgemm_fp8)
against quantization at load; refused formats; the embedded SmolLM2 (GGUF) quantized at load.

The decode GEMV (Triton) runs here under the Triton interpreter and is compiled for sm_90 without a
GPU, both in subprocesses (this file run as a script); the tests marked gpu run the CUDA paths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine_helpers import PROMPTS, hf_model_from_engine, tiny_config, write_tiny_config

REPO = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ quantization math


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_dequantize_round_trip_error_bounds(dtype):
    from engine.quant import FP8_MAX, dequantize, quantize_fp8_per_channel

    g = _gen(0)
    # rows of very different magnitudes, a row with an outlier, a row of zeros
    w = torch.randn(64, 96, generator=g) * torch.logspace(-4, 2, 64)[:, None]
    w[5, 7] = 300.0
    w[9] = 0.0
    w = w.to(dtype)
    q, scale = quantize_fp8_per_channel(w)
    assert q.dtype == FP8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (64,)
    w32 = w.float()
    amax = w32.abs().amax(dim=1)
    nonzero = amax > 0
    torch.testing.assert_close(scale[nonzero], amax[nonzero] / FP8_MAX, rtol=0, atol=0)
    assert scale[9] == 1.0 and torch.all(q[9].float() == 0)
    back = dequantize(q, scale)
    # e4m3 keeps 3 mantissa bits: round to nearest is within 2^-4 relative for normal values, and
    # within half the subnormal step (2^-9 / 2 of the scale) below 2^-6
    bound = torch.maximum(w32.abs() * 2.0**-4, scale[:, None] * 2.0**-10)
    assert torch.all((back - w32).abs() <= bound * (1 + 1e-6))
    # each row's largest magnitude comes back (it maps to 448, a code)
    rows = torch.arange(64)[nonzero]
    peak = w32.abs().argmax(dim=1)[nonzero]
    torch.testing.assert_close(back[rows, peak], w32[rows, peak], rtol=1e-6, atol=0)
    # the whole-matrix error of Gaussian rows: about 2-3 % (the e4m3 rounding noise)
    g2 = torch.randn(256, 512, generator=g).to(dtype)
    q2, s2 = quantize_fp8_per_channel(g2)
    rel = (dequantize(q2, s2) - g2.float()).norm() / g2.float().norm()
    assert 0.01 < rel < 0.04, rel
    # quantizing the dequantized weights again gives the same codes and scales
    q3, s3 = quantize_fp8_per_channel(dequantize(q2, s2))
    assert torch.equal(q3.view(torch.uint8), q2.view(torch.uint8))
    torch.testing.assert_close(s3, s2, rtol=1e-6, atol=0)


def test_dequantize_is_bitwise_torchs_conversion():
    """The CPU's bit-moving fp8 -> float (quant._fp8_bits_as_half) equals torch's for every finite code."""
    from engine.quant import dequantize

    codes = torch.arange(256, dtype=torch.uint8).view(FP8).reshape(16, 16)
    finite = ~codes.float().isnan()
    scale = torch.rand(16, generator=_gen(1)) * 3 + 1e-3
    ours = dequantize(codes, scale)
    torch_way = codes.float() * scale[:, None]
    assert torch.equal(ours[finite], torch_way[finite])
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize(codes, scale, dtype)[finite], torch_way.to(dtype)[finite])


def test_per_channel_scale_shapes():
    from engine.quant import per_channel_scale

    assert torch.equal(per_channel_scale(torch.tensor(0.5), 3), torch.full((3,), 0.5))
    assert torch.equal(per_channel_scale(torch.tensor([0.5]), 3), torch.full((3,), 0.5))
    assert torch.equal(
        per_channel_scale(torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.bfloat16), 3), torch.tensor([1.0, 2.0, 3.0])
    )
    with pytest.raises(ValueError, match="neither per-tensor nor per-channel"):
        per_channel_scale(torch.ones(2, 3), 6)


# ------------------------------------------------------------------------------ the linear op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 96), (2, 3, 96), (96,)])
def test_fp8_linear_on_cpu_is_the_dequantized_matmul(dtype, shape):
    from engine.quant import dequantize, fp8_linear, quantize_fp8_per_channel

    g = _gen(2)
    q, scale = quantize_fp8_per_channel(torch.randn(48, 96, generator=g) * 0.05)
    bias = torch.randn(48, generator=g).to(dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    for b in (None, bias):
        assert torch.equal(fp8_linear(x, q, scale, b), F.linear(x, dequantize(q, scale, dtype), b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tensor_core_path_math_with_torchs_cpu_scaled_mm(dtype):
    """scaled_mm_linear (per-token FP8 activations, row-wise scaled FP8 GEMM), through torch's CPU
    _scaled_mm: the activation quantization adds e4m3 noise, nothing else."""
    from engine.quant import quantize_fp8_per_channel, quantize_fp8_per_token, reference_linear, scaled_mm_linear

    g = _gen(3)
    q, scale = quantize_fp8_per_channel(torch.randn(64, 128, generator=g) * 0.05)
    x = (torch.randn(40, 128, generator=g) * torch.logspace(-3, 1, 40)[:, None]).to(dtype)
    x[7] = 0  # a token of zeros
    bias = torch.randn(64, generator=g).to(dtype)
    ref = reference_linear(x.float(), q, scale, bias.float())
    out = scaled_mm_linear(x, q, scale, bias)
    assert out.dtype == dtype and out.shape == (40, 64)
    # per token: e4m3 activations, ~2-3 % relative noise at every magnitude
    rel = (out.float() - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.max() < 0.08, rel
    assert torch.equal(out[7].float(), bias.float().to(dtype).float())
    x_fp8, x_scale = quantize_fp8_per_token(x)
    assert x_fp8.dtype == FP8 and x_scale.shape == (40, 1) and torch.all(x_scale > 0)


# ------------------------------------------------------------------------------ models


def _engine(path, quantization="none", **kwargs):
    from engine.config import EngineConfig
    from engine.core import EngineCore

    cfg = EngineConfig.from_dict(
        dict(
            model=str(path),
            load_format=kwargs.pop("load_format", "dummy"),
            device="cpu",
            dtype=kwargs.pop("dtype", "float32"),
            num_gpu_blocks=64,
            seed=3,
            quantization=quantization,
            **kwargs,
        )
    )
    return EngineCore(cfg)


def _run_greedy(core, prompt, steps=6):
    """Greedy tokens and the logits of every step (prefill, then decode steps)."""
    from engine import SamplingParams

    captured: list[torch.Tensor] = []
    forward = core.runner.forward
    core.runner.forward = lambda batch, plan, **kw: captured.append(forward(batch, plan, **kw)) or captured[-1]
    core.add_request(0, prompt, SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True))
    tokens = []
    while core.has_unfinished():
        tokens += core.step().tokens.tolist()
    return tokens, torch.cat(captured, dim=0)


def _agreeing_steps(tokens0, tokens1) -> int:
    """How many steps ran on the same inputs: up to and including the first differing greedy token."""
    return next((i for i, (a, b) in enumerate(zip(tokens0, tokens1)) if a != b), len(tokens0) - 1) + 1


def config_tied(core) -> bool:
    return core.model_config.tie_word_embeddings


FAMILIES = {
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {}),
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_fp8_model_against_unquantized_and_transformers(family, tmp_path):
    """Same seed, same draws: the FP8 model is the unquantized one with its decoder-layer linears
    quantized. Its logits stay within e4m3 noise of the unquantized model's, and equal (1e-4) those of
    transformers holding the dequantized weights, through prefill and decode steps."""
    from engine.models.decoder import Linear

    arch, overrides = FAMILIES[family]
    path = write_tiny_config(tmp_path, arch, **overrides)
    base, fp8 = _engine(path), _engine(path, "fp8")
    assert fp8.model.quantization == "fp8" and base.model.quantization == "none"
    linears = {n: m for n, m in fp8.model.named_modules() if isinstance(m, Linear)}
    assert len(linears) == 4 * fp8.model_config.num_layers
    for name, m in linears.items():
        assert m.quantized and m.weight.dtype == FP8 and m.weight_scale.dtype == torch.float32, name
        assert m.weight_scale.shape == (m.weight.shape[0],)
    assert fp8.model.model.embed_tokens.weight.dtype == torch.float32  # embedding, LM head, norms: model dtype
    if not config_tied(fp8):
        assert fp8.model.lm_head.weight.dtype == torch.float32
    for (n0, w0), (n1, w1) in zip(base.model.hf_state_dict().items(), fp8.model.hf_state_dict().items()):
        assert n0 == n1 and w1.dtype == torch.float32
        if n0.endswith("proj.weight"):
            assert 0.01 < (w1 - w0).norm() / w0.norm() < 0.04, n0
        else:
            assert torch.equal(w0, w1), n0

    prompt = np.random.default_rng(7).integers(0, 512, size=150).tolist()
    tokens0, logits0 = _run_greedy(base, prompt)
    tokens1, logits1 = _run_greedy(fp8, prompt)
    assert len(tokens1) == 6
    # step i's logits follow tokens[:i]: compare the steps whose inputs agree (random tiny models have
    # near-ties, so a later greedy token may differ)
    same = _agreeing_steps(tokens0, tokens1)
    err = (logits1[:same] - logits0[:same]).norm() / logits0[:same].norm()
    assert err < 0.08, f"{family}: FP8 vs unquantized relative logit error {err:.3f}"  # 0.038-0.051 when written

    hf = hf_model_from_engine(fp8.model)  # transformers with the dequantized weights
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt + tokens1])).logits[0].float()
    expect = ref[len(prompt) - 1 : len(prompt) - 1 + len(logits1)]
    err = (logits1 - expect).norm() / expect.norm()
    assert err < 1e-4, f"{family}: FP8 engine vs transformers on the dequantized weights {err:.2e}"
    assert tokens1 == expect.argmax(-1).tolist()


def test_fp8_weights_with_an_fp8_kv_cache(tmp_path):
    """Both halves of FP8 together: the same greedy tokens as FP8 weights alone, or close logits."""
    path = write_tiny_config(tmp_path, "LlamaForCausalLM", tie_word_embeddings=True)
    prompt = np.random.default_rng(5).integers(0, 512, size=90).tolist()
    t0, l0 = _run_greedy(_engine(path, "fp8"), prompt)
    t1, l1 = _run_greedy(_engine(path, "fp8", kv_cache_dtype="fp8_e4m3"), prompt)
    same = _agreeing_steps(t0, t1)
    assert len(t1) == 6 and (l1[:same] - l0[:same]).norm() / l0[:same].norm() < 0.08


def test_fp8_weights_take_half_the_bytes_of_bf16(tmp_path):
    path = write_tiny_config(tmp_path, "LlamaForCausalLM")
    nbytes = {}
    for q in ("none", "fp8"):
        model = _engine(path, q, dtype="bfloat16").model
        nbytes[q] = sum(
            p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." in n and "proj." in n
        )
    c = tiny_config("LlamaForCausalLM")
    rows = c.num_layers * (
        (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + 2 * c.hidden_size + 2 * c.intermediate_size
    )
    assert nbytes["fp8"] == nbytes["none"] // 2 + 4 * rows  # + one float32 scale per output channel


def test_fp8_placement_annotations():
    """The scales shard with the weight's rows (column-parallel) or stay whole (row-parallel); the
    collectives are those of the unquantized model."""
    from engine.models.decoder import CausalLM
    from engine.placement import Replicate, Shard, collectives

    config = tiny_config("Qwen3ForCausalLM")
    with torch.device("meta"):
        plain, fp8 = CausalLM(config), CausalLM(config, "fp8")
    assert collectives(plain) == collectives(fp8)
    attn = fp8.model.layers[0].self_attn
    rows = attn.qkv_proj.placement.params["weight"]
    assert attn.qkv_proj.placement.params["weight_scale"] == Shard(0, rows.segments, rows.unit)
    assert attn.o_proj.placement.params["weight_scale"] == Replicate()


# ------------------------------------------------------------------------------ checkpoints

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_linear(name: str) -> bool:
    return ".layers." in name and name.endswith(".weight") and name.split(".")[-2] in LINEARS


def _bf16_state(tmp_path, arch="Qwen2ForCausalLM"):
    """A tiny random model's weights in bfloat16 (Hugging Face names) and its config."""
    path = write_tiny_config(tmp_path, arch)
    core = _engine(path, dtype="bfloat16")
    return core.model_config, {k: v.contiguous().clone() for k, v in core.model.hf_state_dict().items()}


def _write_checkpoint(directory, config, tensors, quantization_config=None):
    from safetensors.torch import save_file

    directory.mkdir()
    hf = config.to_hf()
    if quantization_config is not None:
        hf["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(hf))
    names = sorted(tensors)
    half = len(names) // 2  # two shards: a weight and its scale may sit in different files
    save_file({k: tensors[k] for k in names[:half]}, str(directory / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(directory / "model-00002-of-00002.safetensors"))
    return directory


def _load(directory, quantization="none", dtype="bfloat16"):
    return _engine(directory, quantization, load_format="auto", dtype=dtype)


def _assert_same_params(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        x, y = pa[name].data, pb[name].data
        assert x.dtype == y.dtype, name
        if x.dtype == FP8:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), name


CHANNEL_FORMATS = {
    "compressed-tensors": {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "token",
                    "symmetric": True,
                    "dynamic": True,
                },
            }
        },
        "ignore": ["lm_head", "model.layers.1.mlp.down_proj"],
    },
    "fbgemm_fp8": {
        "quant_method": "fbgemm_fp8",
        "activation_scale_ub": 1200.0,
        "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.down_proj"],
    },
}


@pytest.mark.parametrize("fmt", sorted(CHANNEL_FORMATS))
def test_prequantized_per_channel_checkpoint_equals_quantization_at_load(fmt, tmp_path):
    """An FP8 checkpoint (per-channel scales [out, 1] beside each float8_e4m3fn weight; one module left
    in bf16 as `ignore` / `modules_to_not_convert` do) loads bit for bit as the bf16 checkpoint quantized
    at load, and loads as FP8 although the engine asked for quantization=none (the checkpoint decides)."""
    from engine.quant import quantize_fp8_per_channel

    config, state = _bf16_state(tmp_path)
    bf16_dir = _write_checkpoint(tmp_path / "bf16", config, state)
    quantized = dict(state)
    for name, w in state.items():
        if _is_linear(name) and name != "model.layers.1.mlp.down_proj.weight":
            q, scale = quantize_fp8_per_channel(w)
            quantized[name], quantized[name + "_scale"] = q, scale[:, None].contiguous()
            if fmt == "compressed-tensors":  # a static-activation checkpoint's input scale: read past
                quantized[name.replace(".weight", ".input_scale")] = torch.tensor([0.02])
    fp8_dir = _write_checkpoint(tmp_path / "fp8", config, quantized, CHANNEL_FORMATS[fmt])

    at_load = _load(bf16_dir, "fp8")
    read = _load(fp8_dir, "none")
    assert read.model.quantization == "fp8"
    # what the engine says it runs (/v1/models, tandem_model_info, the admission policy's step cost): the
    # weights as loaded, not the option
    assert read.quantization == at_load.quantization == "fp8" and read.config.quantization == "none"
    _assert_same_params(at_load.model, read.model)
    prompt = list(range(3, 40))
    assert _run_greedy(read, prompt, 4)[0] == _run_greedy(at_load, prompt, 4)[0]


PER_TENSOR_FORMATS = {
    "compressed-tensors": {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False},
            }
        },
        "ignore": ["lm_head"],
    },
    "fp8": {"quant_method": "fp8", "activation_scheme": "static"},  # AutoFP8
}


@pytest.mark.parametrize("fmt", sorted(PER_TENSOR_FORMATS))
def test_prequantized_per_tensor_checkpoint(fmt, tmp_path):
    """One scale per tensor (a scalar, or [1]) broadcasts to its rows; fused q|k|v and gate|up keep
    each part's own scale. The loaded model computes exactly with codes * scale."""
    from engine.config import EngineConfig
    from engine.loader import load_model
    from engine.models.decoder import Linear
    from engine.quant import FP8_MAX, dequantize

    config, state = _bf16_state(tmp_path, "LlamaForCausalLM")
    quantized, expect = dict(state), {}
    for i, (name, w) in enumerate(sorted(state.items())):
        if _is_linear(name):
            s = w.float().abs().max() / FP8_MAX
            q = (w.float() / s).to(FP8)
            quantized[name] = q
            quantized[name + "_scale"] = s.reshape([1] if i % 2 else [])
            quantized[name.replace(".weight", ".input_scale")] = torch.tensor(0.05)
            expect[name] = q.float() * s
    directory = _write_checkpoint(tmp_path / "fp8", config, quantized, PER_TENSOR_FORMATS[fmt])
    loaded = load_model(EngineConfig(model=str(directory), device="cpu"), torch.device("cpu"), torch.float32)
    assert loaded.quantization == "fp8"
    got = loaded.model.hf_state_dict()
    for name, want in expect.items():
        assert torch.equal(got[name], want), name
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Linear) and len(set(qkv.weight_scale.tolist())) == 3
    raw = loaded.model.hf_state_dict(quantized=True)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(raw[name].view(torch.uint8), quantized[name].view(torch.uint8))
    assert torch.equal(dequantize(raw[name], raw[name + "_scale"]), expect[name])


@pytest.mark.parametrize(
    "qc, match",
    [
        (
            {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]},
            r"block-wise FP8 \(quant_method fp8, weight_block_size \[128, 128\].*not supported",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {
                    "g": {
                        "targets": ["Linear"],
                        "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]},
                    }
                },
            },
            "block-wise FP8 weights .*not supported",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {
                    "g": {
                        "targets": ["Linear"],
                        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
                    }
                },
            },
            "4-bit int; this engine reads only FP8",
        ),
        ({"quant_method": "gptq", "bits": 4}, "quantization method 'gptq' is not supported"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, r"FP8 weights in e5m2 \(quant_method fp8, fmt 'e5m2'\) are not"),
    ],
)
def test_unsupported_quantized_checkpoints_are_refused(qc, match, tmp_path):
    from engine.loader import ModelLoadError

    config, state = _bf16_state(tmp_path)
    directory = _write_checkpoint(tmp_path / "q", config, state, qc)
    with pytest.raises(ModelLoadError, match=match) as info:
        _load(directory)
    assert "supported: compressed-tensors" in str(info.value)


def test_blockwise_checkpoint_names_the_way_out(tmp_path):
    """A DeepSeek / Qwen3-FP8 style checkpoint (weight_scale_inv per 128 x 128 block) is refused before
    any tensor is read, pointing at the bf16 checkpoint with quantization=fp8."""
    from engine.loader import ModelLoadError

    config, state = _bf16_state(tmp_path)
    blocked = dict(state)
    for name, w in state.items():
        if _is_linear(name):
            blocked[name] = w.to(FP8)
            blocked[name + "_scale_inv"] = torch.ones(-(-w.shape[0] // 128), -(-w.shape[1] // 128))
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    directory = _write_checkpoint(tmp_path / "q", config, blocked, qc)
    with pytest.raises(ModelLoadError, match="use the bf16 checkpoint with quantization=fp8"):
        _load(directory, "fp8")


def test_fp8_checkpoint_errors(tmp_path):
    from engine.loader import ModelLoadError
    from engine.quant import quantize_fp8_per_channel

    config, state = _bf16_state(tmp_path)
    qc = CHANNEL_FORMATS["fbgemm_fp8"]
    no_scale = dict(state)
    no_scale["model.layers.0.self_attn.o_proj.weight"] = quantize_fp8_per_channel(
        state["model.layers.0.self_attn.o_proj.weight"]
    )[0]
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensors.*o_proj.weight_scale"):
        _load(_write_checkpoint(tmp_path / "a", config, no_scale, qc))
    fp8_embedding = {**state, "model.embed_tokens.weight": state["model.embed_tokens.weight"].to(FP8)}
    with pytest.raises(ModelLoadError, match="embed_tokens.weight' is FP8, but .* stays in torch.bfloat16"):
        _load(_write_checkpoint(tmp_path / "b", config, fp8_embedding, qc))
    e5m2 = {
        **state,
        "model.layers.0.mlp.up_proj.weight": state["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e5m2),
    }
    with pytest.raises(ModelLoadError, match="float8_e5m2; FP8 weights must be float8_e4m3fn"):
        _load(_write_checkpoint(tmp_path / "c", config, e5m2, qc))
    stray_scale = {**state, "model.layers.0.mlp.up_proj.weight_scale": torch.ones(256, 1)}
    with pytest.raises(ModelLoadError, match="no place .*model is not quantized: quantization=fp8"):
        _load(_write_checkpoint(tmp_path / "d", config, stray_scale))


# ------------------------------------------------------------------------------ SmolLM2 (GGUF)


@pytest.fixture(scope="module")
def smollm2_pair():
    from engine.config import EngineConfig
    from engine.loader import load_model

    cpu = torch.device("cpu")
    return (
        load_model(EngineConfig(), cpu, torch.float32),
        load_model(EngineConfig(quantization="fp8"), cpu, torch.float32),
    )


def test_smollm2_fp8_answers_paris(smollm2_pair):
    from engine import LLM, SamplingParams

    _, fp8 = smollm2_pair
    assert fp8.quantization == "fp8"
    llm = LLM(loaded=fp8, device="cpu", dtype="float32", num_gpu_blocks=256)
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0.0, max_tokens=24)
    )
    assert "Paris" in out[0].outputs[0].text, out[0].outputs[0].text


def test_smollm2_fp8_greedy_tokens_mostly_match(smollm2_pair):
    """Teacher-forced on the unquantized model's greedy continuation (64 tokens of each prompt), the
    FP8 model's greedy choice agrees at nearly every step (0.969 = 496/512 when written). Free-running,
    one early disagreement changes the rest of a sequence, so whole-sequence match is lower."""
    from engine import LLM, SamplingParams

    base, fp8 = smollm2_pair
    llm = LLM(loaded=base, device="cpu", dtype="float32", num_gpu_blocks=1024)
    ids = [base.tokenizer.encode(p) for p in PROMPTS]
    sp = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": i} for i in ids], sp, use_tqdm=False)]
    hf = hf_model_from_engine(fp8.model)  # equals the FP8 engine (test_tiny_fp8_model_...)
    agree = total = 0
    with torch.inference_mode():
        for prompt, cont in zip(ids, ref):
            pred = hf(torch.tensor([prompt + list(cont)])).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(pred, cont))
            total += len(cont)
    assert agree / total >= 0.9, f"teacher-forced greedy agreement {agree}/{total}"


# ------------------------------------------------------------------------------ the Triton GEMV


def interpreter_cases() -> dict[str, str | None]:
    """fp8_gemv under TRITON_INTERPRET=1 against the reference (run in a fresh process)."""
    try:
        from engine.kernels.triton.interpreter_compat import fix_interpreter

        fix_interpreter()  # exact fp8 conversions in the interpreter (and its other fixes)
    except ImportError:
        pass
    from engine.quant import DECODE_ROWS, fp8_gemv, quantize_fp8_per_channel, reference_linear

    results: dict[str, str | None] = {}
    g = _gen(11)
    for m, n, k, dtype, bias in [
        (1, 48, 80, torch.float32, False),
        (3, 70, 600, torch.float16, True),
        (DECODE_ROWS, 64, 512, torch.bfloat16, False),
        (2, 33, 1030, torch.float16, True),
        (1, 20, 2100, torch.bfloat16, True),
    ]:
        name = f"m{m}-n{n}-k{k}-{str(dtype).split('.')[-1]}{'-bias' if bias else ''}"
        try:
            q, s = quantize_fp8_per_channel(torch.randn(n, k, generator=g) * 0.05)
            x = torch.randn(m, k, generator=g).to(dtype)
            b = torch.randn(n, generator=g).to(dtype) if bias else None
            out = fp8_gemv(x, q, s, b)
            ref = reference_linear(x.float(), q, s, None if b is None else b.float())
            tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            assert out.dtype == dtype and out.shape == (m, n) and rel < tol, f"relative error {rel:.2e}"
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    for m, n, k, dtype in [(1, 24, 1030, torch.bfloat16), (2, 8, 512, torch.float16)]:
        name = f"fma-bits-m{m}-n{n}-k{k}-{str(dtype).split('.')[-1]}"
        try:  # the integer widening (BITS) rounds as the conversions do: equal to the bit, subnormals too
            q, s = quantize_fp8_per_channel(torch.randn(n, k, generator=g) * 0.05)
            q.view(torch.uint8)[:, :8] = torch.tensor(
                [0x01, 0x81, 0x07, 0x87, 0x08, 0x7E, 0xFE, 0x00], dtype=torch.uint8
            )
            x = torch.randn(m, k, generator=g).to(dtype)
            cfg = {"kind": "fma", "BLOCK_M": 1 << (m - 1).bit_length(), "BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4}
            plain, bits = (fp8_gemv(x, q, s, config={**cfg, "BITS": b}) for b in (False, True))
            assert torch.equal(plain, bits), f"{(plain.float() - bits.float()).abs().max().item()} apart"
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    from engine.quant import quantize_fp8_per_token, quantize_rows

    for m, k, dtype in [(5, 300, torch.bfloat16), (3, 1024, torch.float16), (2, 70, torch.float32)]:
        name = f"quantize_rows-m{m}-k{k}-{str(dtype).split('.')[-1]}"
        try:
            x = (torch.randn(m, k, generator=g) * 3).to(dtype)
            x[1] = 0.0  # a row of zeros: the minimum scale, zeros stored
            q, s = quantize_rows(x)
            q_ref, s_ref = quantize_fp8_per_token(x)
            torch.testing.assert_close(s, s_ref, rtol=2e-7, atol=0)
            codes_differ = (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
            assert q.dtype == FP8 and codes_differ < 0.01, f"{codes_differ:.1%} of the FP8 codes differ"
            assert bool((q[1].float() == 0).all())
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    return results


def compile_for_hopper() -> dict[str, str | None]:
    """The GEMV compiled to an sm_90 cubin without a GPU (Triton ships ptxas), for each dtype it serves."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.quant import _gemv_kernels, gemv_config

    results: dict[str, str | None] = {}
    for xdt in ("bf16", "fp16"):
        for bias in (False, True):
            for m, n, k in [
                (1, 6144, 4096),
                (1, 4096, 14336),
                (4, 4096, 14336),
                (16, 6144, 4096),
                (1, 576, 1000),
                (9, 576, 1000),
            ]:
                name = f"{xdt}-m{m}-n{n}-k{k}{'-bias' if bias else ''}"
                try:
                    sig = {
                        "x_ptr": f"*{xdt}",
                        "w_ptr": "*fp8e4nv",
                        "s_ptr": "*fp32",
                        "b_ptr": f"*{xdt}",
                        "o_ptr": f"*{xdt}",
                        "M": "i32",
                        "N": "i32",
                        "K": "i32",
                        "stride_xm": "i32",
                        "stride_wn": "i32",
                        "stride_om": "i32",
                        "HAS_BIAS": "constexpr",
                        "EVEN_K": "constexpr",
                        "BLOCK_M": "constexpr",
                        "BLOCK_N": "constexpr",
                        "BLOCK_K": "constexpr",
                    }
                    cfg = gemv_config(m, n, k)
                    kind, warps = cfg.pop("kind"), cfg.pop("num_warps")
                    if "BITS" in cfg:
                        sig["BITS"] = "constexpr"
                    constexprs = {"HAS_BIAS": bias, "EVEN_K": k % cfg["BLOCK_K"] == 0, **cfg}
                    src = ASTSource(fn=_gemv_kernels()[kind], signature=sig, constexprs=constexprs)
                    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                    ptx = kernel.asm["ptx"]
                    if cfg.get("BITS"):  # the weights widened by integer operations
                        assert "e4m3" not in ptx and "shl.b32" in ptx, "BITS without its integer widening"
                    else:
                        assert "cvt.rn.f16x2.e4m3x2" in ptx, "no hardware FP8 conversion"
                    assert kind != "dot" or "mma.sync" in ptx, "the dot kernel without tensor cores"
                    results[name] = None
                except Exception:
                    results[name] = traceback.format_exc()
    return results


def _run_self(flag: str, interpret: bool) -> dict[str, str | None]:
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, __file__, flag], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"subprocess {flag} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def test_decode_gemv_under_the_triton_interpreter():
    failures = {k: v for k, v in _run_self("--interpret", interpret=True).items() if v}
    assert not failures, "\n".join(f"{k}:\n{v}" for k, v in failures.items())


def test_decode_gemv_compiles_for_hopper_without_a_gpu():
    failures = {k: v for k, v in _run_self("--compile-sm90", interpret=False).items() if v}
    assert not failures, "\n".join(f"{k}:\n{v}" for k, v in failures.items())


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 300])
def test_fp8_linear_paths_on_gpu(rows):
    """Rows <= 16: the Triton GEMV (bf16 rounding only); more: per-token FP8 activations on the tensor
    cores (e4m3 noise); N not a multiple of 16: the dequantizing fallback."""
    from engine.quant import DECODE_ROWS, fp8_linear, quantize_fp8_per_channel, reference_linear

    g = torch.Generator(device="cuda").manual_seed(rows)
    for n, k in [(4096, 4096), (1000, 576)]:
        q, s = quantize_fp8_per_channel(torch.randn(n, k, generator=g, device="cuda") * 0.05)
        x = torch.randn(rows, k, generator=g, device="cuda").to(torch.bfloat16)
        bias = torch.randn(n, generator=g, device="cuda").to(torch.bfloat16)
        out = fp8_linear(x, q, s, bias)
        ref = reference_linear(x.float(), q, s, bias.float())
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        tensor_cores = rows > DECODE_ROWS and n % 16 == 0
        assert out.dtype == torch.bfloat16 and rel < (0.06 if tensor_cores else 1e-2), (n, k, rel)


@pytest.mark.gpu
def test_decode_gemv_replays_in_a_cuda_graph_gpu():
    from engine.quant import fp8_linear, quantize_fp8_per_channel, reference_linear

    q, s = quantize_fp8_per_channel(torch.randn(2048, 1024, device="cuda") * 0.05)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    fp8_linear(x, q, s)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_linear(x, q, s)
    x.copy_(torch.randn_like(x))
    graph.replay()
    ref = reference_linear(x.float(), q, s)
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
def test_batch1_decode_gemv_takes_about_half_the_bf16_time_gpu():
    """Llama-3.1-8B's linear shapes at batch 1: the FP8 GEMV reads half the bytes of bf16 and should take
    not much more than half cuBLAS's bf16 time (the issue asks "close to half"). GPU time as decode runs
    it, in CUDA graphs (host launch cost is not the kernel's)."""
    from engine.quant import fp8_linear, quantize_fp8_per_channel
    from experiments.tune_fp8_gemv import SHAPES, graph_us

    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in SHAPES]
    quantized = [quantize_fp8_per_channel(w) for w in weights]
    xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _, k in SHAPES]
    bf16 = graph_us(lambda: [F.linear(x, w) for x, w in zip(xs, weights)])
    fp8 = graph_us(lambda: [fp8_linear(x, q, s) for x, (q, s) in zip(xs, quantized)])
    print(f"batch-1 linears of a Llama-3.1-8B layer: bf16 {bf16:.1f} us, fp8 {fp8:.1f} us ({fp8 / bf16:.2f}x)")
    assert fp8 < 0.65 * bf16


@pytest.mark.gpu
def test_tiny_fp8_model_on_gpu(tmp_path):
    from engine.config import EngineConfig
    from engine.core import EngineCore

    path = write_tiny_config(tmp_path, "Qwen3ForCausalLM")
    cores = [
        EngineCore(
            EngineConfig(model=path, load_format="dummy", device="cuda", num_gpu_blocks=64, seed=3, quantization=q)
        )
        for q in ("none", "fp8")
    ]
    prompt = np.random.default_rng(7).integers(0, 512, size=150).tolist()
    (t0, l0), (t1, l1) = (_run_greedy(c, prompt, 8) for c in cores)
    assert len(t1) == 8
    same = _agreeing_steps(t0, t1)
    assert (l1[:same] - l0[:same]).norm() / l0[:same].norm() < 0.08


def test_the_step_cost_prices_the_weights_as_loaded():
    """make_step_cost (the admission policy's prediction) prices the weights the engine loaded: an FP8
    checkpoint's with quantization=none is an FP8 decode step, half the weight bytes' time."""
    from engine.config import EngineConfig
    from engine.core import make_step_cost
    from sim.cost import PlanFeatures

    cfg = EngineConfig.from_dict(dict(model="x", step_cost={"model": "llama3_8b", "hardware": "h100_sxm"}))
    as_option, as_loaded = make_step_cost(cfg, torch.bfloat16), make_step_cost(cfg, torch.bfloat16, "fp8")
    assert (as_option.model.quantization, as_loaded.model.quantization) == ("none", "fp8")
    decode = PlanFeatures(num_tokens=1, num_reqs=1, num_sampled=1, num_decode_reqs=1, decode_kv_tokens=512)
    assert as_loaded.step_seconds(decode) < 0.6 * as_option.step_seconds(decode)


def test_a_model_given_loaded_must_hold_the_quantization_asked_for(tmp_path):
    """LLM(loaded=..., quantization="fp8") on bf16 weights would run bf16 while saying FP8: refused; an FP8
    model given with the option left out runs (and says) FP8."""
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.loader import load_model

    from engine_helpers import write_tiny_config

    path = write_tiny_config(tmp_path, "LlamaForCausalLM")
    config = lambda **kw: EngineConfig.from_dict(dict(model=path, load_format="dummy", device="cpu", **kw))  # noqa: E731
    cpu = torch.device("cpu")
    plain = load_model(config(), cpu, torch.float32)
    with pytest.raises(ValueError, match="quantization=fp8 but the model given .* holds none weights"):
        EngineCore(config(quantization="fp8"), loaded=plain)
    fp8 = load_model(config(quantization="fp8"), cpu, torch.float32)
    assert EngineCore(config(), loaded=fp8).quantization == "fp8"
    assert EngineCore(config(quantization="fp8"), loaded=fp8).quantization == "fp8"


@pytest.mark.parametrize(
    "options, match",
    [
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype must be one of auto, fp8_e4m3, got 'fp8'"),
        ({"kv_cache_dtype": "int8"}, "kv_cache_dtype must be one of auto, fp8_e4m3, got 'int8'"),
        ({"quantization": "awq"}, "quantization must be one of none, fp8, got 'awq'"),
        ({"quantization": None}, "quantization must be one of none, fp8, got None"),
    ],
)
def test_bad_fp8_options_are_refused_naming_the_choices(options, match):
    """EngineConfig (so LLM(...) and engine.serve, which build one before anything loads) names the values."""
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match=match):
        EngineConfig.from_dict(options)


def test_quant_method_fp8_reads_e4m3_however_it_is_spelled():
    from engine.quant import checkpoint_format

    for fmt in ({}, {"fmt": None}, {"fmt": "E4M3"}, {"fmt": "e4m3"}):
        found = checkpoint_format({"quantization_config": {"quant_method": "fp8", **fmt}})
        assert (found.method, found.strategy) == ("fp8", "tensor"), fmt


if __name__ == "__main__":
    # the subprocesses:  TRITON_INTERPRET=1 python tests/test_fp8_weights.py --interpret
    #                    python tests/test_fp8_weights.py --compile-sm90
    torch.set_num_threads(1)
    if sys.argv[1:2] == ["--compile-sm90"]:
        print(json.dumps(compile_for_hopper()))
    elif sys.argv[1:2] == ["--interpret"] and os.environ.get("TRITON_INTERPRET") == "1":
        print(json.dumps(interpreter_cases()))
    else:
        sys.exit("usage: TRITON_INTERPRET=1 python tests/test_fp8_weights.py --interpret | --compile-sm90")
