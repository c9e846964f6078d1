"""Decoder-only transformers of the Llama family: Llama 3.x and SmolLM2, Qwen2/2.5, Qwen3.

Written once, for one device. The three families differ only in flags of
ModelConfig: Qwen2 has q/k/v biases, Qwen3 a per-head RMSNorm on q and k
before rotary. Every module is annotated with its placement (engine.placement)
and lists its children in execution order (`flow`), so a tensor-parallel pass
can derive the collectives. Kernels are not chosen here: the runner hands a
KernelSet in through the ForwardContext.

Activations are packed tokens, [T, hidden]; attention reads and writes the
paged KV cache through the context's metadata (engine.attention).

With quantization="fp8" the decoder layers' linear weights are FP8 with per-output-channel
scales (engine.quant, docs/fp8.md); everything else stays in the model's dtype.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine import quant
from engine.attention import ForwardContext
from engine.config import ModelConfig
from engine.placement import Partial, Placement, Replicate, Shard, column_parallel, head_local, replicated, row_parallel


class Linear(nn.Module):
    """y = x W^T (+ b). With quantization="fp8" the weight is float8_e4m3fn with a float32 scale per output
    channel (`weight_scale`, [out]) and the product runs through engine.quant.fp8_linear; the bias stays
    in the model's dtype. Fused q|k|v and gate|up keep one scale per row, so their parts' scales simply
    stack."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, placement: Placement, quantization: str = "none"
    ) -> None:
        super().__init__()
        if quantization not in ("none", "fp8"):
            raise ValueError(f"quantization must be none or fp8, got {quantization!r}")
        self.quantized = quantization == "fp8"
        if self.quantized:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=quant.FP8), requires_grad=False)
            # the scale shards like the weight's rows (column-parallel) or is whole on every rank (row-parallel)
            rows = placement.params.get("weight")
            scale_placement = rows if isinstance(rows, Shard) and rows.dim == 0 else Replicate()
            placement = Placement(
                placement.input, placement.output, {**placement.params, "weight_scale": scale_placement}
            )
            self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.placement = placement

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        norm: RMSNorm | None = None,
        residual: torch.Tensor | None = None,
        act: bool = False,
    ):
        """x W^T (+ b) through the context's kernels' `linear`, which fuses a prologue into one-row
        products (the decode GEMV): `norm` applies that RMSNorm to x (+ residual) first and the pair
        (y, new residual) comes back, as add_rms_norm returns it; `act` takes silu(x[:, :K]) * x[:, K:]
        as the input."""
        scale = self.weight_scale if self.quantized else None
        if norm is not None:
            return ctx.ops.linear(
                x,
                self.weight,
                self.bias,
                scale,
                prologue="norm",
                norm_weight=norm.weight,
                residual=residual,
                eps=norm.eps,
            )
        return ctx.ops.linear(x, self.weight, self.bias, scale, prologue="silu" if act else "none")

    def load_float_(self, tensor: torch.Tensor, offset: int = 0) -> None:
        """Quantizes a floating-point [rows, in] slice of the weight (a checkpoint's bf16 tensor, or one
        part of a fused weight) on this layer's device and writes rows offset.. of weight and weight_scale."""
        rows = tensor.shape[0]
        q, scale = quant.quantize_fp8_per_channel(tensor.to(self.weight.device))
        self.weight.data.narrow(0, offset, rows).copy_(q)
        self.weight_scale.data.narrow(0, offset, rows).copy_(scale)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, placement: Placement | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.placement = placement or replicated()

    def forward(self, x: torch.Tensor, ctx: ForwardContext, residual: torch.Tensor | None = None):
        if residual is None:
            return ctx.ops.rms_norm(x, self.weight, self.eps)
        return ctx.ops.add_rms_norm(x, residual, self.weight, self.eps)


class VocabEmbedding(nn.Module):
    """Vocabulary-parallel: each rank embeds its slice of the vocabulary, zeros elsewhere (partial sums)."""

    placement = Placement(Replicate(), Partial(), {"weight": Shard(0)})

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class PagedAttention(nn.Module):
    """Rotary on q and k and this layer's new k/v into the paged cache (one fused kernel), then
    attention over the cache (head-local). Qwen3's per-head q/k norms, when passed, run in the
    fused kernel too."""

    placement = head_local()

    def __init__(self, layer: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, num_heads, num_kv_heads, head_dim
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: ForwardContext,
        qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> torch.Tensor:
        if qk_norm is None:
            return ctx.attention(self.layer, positions, q, k, v, self.scale)
        q_norm, k_norm = qk_norm
        return ctx.attention(self.layer, positions, q, k, v, self.scale, q_norm.weight, k_norm.weight, q_norm.eps)


def rope_cos_sin(config: ModelConfig, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos in the first half of the columns, sin in the second."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, quantization: str = "none") -> None:
        super().__init__()
        hq, hk, d = config.num_heads, config.num_kv_heads, config.head_dim
        self.hq, self.hk, self.d = hq, hk, d
        self.qkv_proj = Linear(
            config.hidden_size,
            (hq + 2 * hk) * d,
            config.attention_bias,
            column_parallel(segments=(hq * d, hk * d, hk * d), unit=d),
            quantization,
        )
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # their weights; the fused rotary / KV-write op applies them (PagedAttention)
            self.q_norm = RMSNorm(d, config.rms_norm_eps, head_local())
            self.k_norm = RMSNorm(d, config.rms_norm_eps, head_local())
        self.attn = PagedAttention(layer, hq, hk, d)
        self.o_proj = Linear(hq * d, config.hidden_size, False, row_parallel(), quantization)
        self.flow = ["qkv_proj"] + (["q_norm"] if self.qk_norm else []) + ["attn", "o_proj"]

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        ctx: ForwardContext,
        norm: RMSNorm,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input norm (x + residual) runs as the q|k|v product's prologue; returns the
        attention block's output and the residual stream."""
        t = x.shape[0]
        qkv, residual = self.qkv_proj(x, ctx, norm=norm, residual=residual)
        q, k, v = qkv.split([self.hq * self.d, self.hk * self.d, self.hk * self.d], dim=-1)
        # strided views of the qkv output: the fused rotary / KV-write kernel reads them in place
        q, k, v = q.reshape(t, self.hq, self.d), k.reshape(t, self.hk, self.d), v.reshape(t, self.hk, self.d)
        out = self.attn(positions, q, k, v, ctx, (self.q_norm, self.k_norm) if self.qk_norm else None)
        return self.o_proj(out.reshape(t, self.hq * self.d), ctx), residual


class MLP(nn.Module):
    flow = ["gate_up_proj", "act", "down_proj"]

    def __init__(self, config: ModelConfig, quantization: str = "none") -> None:
        super().__init__()
        i = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * i, False, column_parallel(segments=(i, i)), quantization)
        self.act = SiluAndMul()
        self.down_proj = Linear(i, config.hidden_size, False, row_parallel(), quantization)

    def forward(
        self, x: torch.Tensor, ctx: ForwardContext, norm: RMSNorm, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The post-attention norm runs as gate|up's prologue, SiLU-and-mul as down's (one-row decode
        fuses each into its GEMV); returns the MLP's output and the residual stream."""
        h, residual = self.gate_up_proj(x, ctx, norm=norm, residual=residual)
        return self.down_proj(h, ctx, act=True), residual


class SiluAndMul(nn.Module):
    """silu(x[:, :F]) * x[:, F:]: down_proj's prologue (MLP.forward); a module for its placement."""

    placement = head_local()

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return ctx.ops.silu_and_mul(x)


class DecoderLayer(nn.Module):
    flow = ["input_layernorm", "self_attn", "post_attention_layernorm", "mlp"]

    def __init__(self, config: ModelConfig, layer: int, quantization: str = "none") -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, quantization)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, quantization)

    def forward(self, positions, x, residual, ctx: ForwardContext):
        # the norms are the next product's prologue (Linear.forward): one kernel for a one-row decode
        x, residual = self.self_attn(positions, x, ctx, self.input_layernorm, residual)
        return self.mlp(x, ctx, self.post_attention_layernorm, residual)


class DecoderModel(nn.Module):
    flow = ["embed_tokens", "layers", "norm"]

    def __init__(self, config: ModelConfig, quantization: str = "none") -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, quantization) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        x, _ = self.norm(x, ctx, residual)
        return x


class LMHead(nn.Module):
    """Vocabulary-parallel output projection: each rank computes its slice of the logits."""

    placement = Placement(Replicate(), Shard(-1), {"weight": Shard(0)})

    def __init__(self, embedding: VocabEmbedding | None, vocab: int, dim: int) -> None:
        super().__init__()
        if embedding is None:
            self.weight = nn.Parameter(torch.empty(vocab, dim), requires_grad=False)
        else:
            self.tied = embedding  # shares the embedding's weight (tie_word_embeddings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.tied.weight if hasattr(self, "tied") else self.weight
        return F.linear(x, weight)


class CausalLM(nn.Module):
    """The whole model: `forward` gives final hidden states, `compute_logits` the float32 logits.

    quantization="fp8": every Linear of the decoder layers (q|k|v, o, gate|up, down) holds FP8 weights
    with per-output-channel scales; the embedding table, the LM head and the norms stay in the model's
    dtype (as vLLM runs FP8 per-channel checkpoints, whose lm_head is left unquantized).
    """

    flow = ["model", "lm_head"]

    def __init__(self, config: ModelConfig, quantization: str = "none") -> None:
        super().__init__()
        self.config = config
        self.quantization = quantization
        self.model = DecoderModel(config, quantization)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(tied, config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # Loading -----------------------------------------------------------------------------------
    def fused_targets(self) -> dict[str, tuple[str, int, int]]:
        """Checkpoint name -> (parameter name, row offset, rows) for weights fused here (q|k|v, gate|up)."""
        c = self.config
        q, kv, i = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        out: dict[str, tuple[str, int, int]] = {}
        for n in range(c.num_layers):
            a, m = f"model.layers.{n}.self_attn", f"model.layers.{n}.mlp"
            for suffix in ("weight", "bias"):
                out[f"{a}.q_proj.{suffix}"] = (f"{a}.qkv_proj.{suffix}", 0, q)
                out[f"{a}.k_proj.{suffix}"] = (f"{a}.qkv_proj.{suffix}", q, kv)
                out[f"{a}.v_proj.{suffix}"] = (f"{a}.qkv_proj.{suffix}", q + kv, kv)
            out[f"{m}.gate_proj.weight"] = (f"{m}.gate_up_proj.weight", 0, i)
            out[f"{m}.up_proj.weight"] = (f"{m}.gate_up_proj.weight", i, i)
        return out

    def hf_state_dict(self, quantized: bool = False) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face names, fused tensors split again (for transformers references).

        An FP8 model's linear weights come dequantized to the model's dtype (new tensors, not views);
        with `quantized=True` they come as they are, float8_e4m3fn, each with its `<name>.weight_scale`
        of shape [rows, 1] (the layout of compressed-tensors' per-channel FP8 checkpoints).
        """
        params = dict(self.named_parameters())
        dtype = self.model.embed_tokens.weight.dtype
        dequantized: dict[str, torch.Tensor] = {}

        def value(target: str) -> torch.Tensor:
            p = params[target]
            if p.dtype != quant.FP8 or quantized:
                return p.data
            if target not in dequantized:
                dequantized[target] = quant.dequantize(p.data, params[target + "_scale"].data, dtype)
            return dequantized[target]

        out = {}
        for name, (target, offset, rows) in self.fused_targets().items():
            if target in params:
                out[name] = value(target).narrow(0, offset, rows)
                if quantized and params[target].dtype == quant.FP8:
                    out[name + "_scale"] = params[target + "_scale"].data.narrow(0, offset, rows).unsqueeze(1)
        fused = {t for t, _, _ in self.fused_targets().values()}
        for name, p in params.items():
            if name in fused or name.endswith(".weight_scale"):
                continue
            out[name] = value(name)
            if quantized and p.dtype == quant.FP8:
                out[name + "_scale"] = params[name + "_scale"].data.unsqueeze(1)
        if not self.config.tie_word_embeddings:
            out["lm_head.weight"] = params["lm_head.weight"].data
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies checkpoint tensors (Hugging Face names) into the parameters; every parameter must be set.

        In an FP8 model a linear layer's weight may come as float8_e4m3fn (copied as it is, its scale from
        `<name>.weight_scale`: per-channel [rows, 1] / [rows] or per-tensor, broadcast to the rows) or in
        floating point (quantized here, per output channel, on the model's device, tensor by tensor).
        Static activation and KV-cache scales (quant.IGNORED_SUFFIXES) are read past.

        Raises:
            ValueError: a tensor with an unknown name or the wrong shape, an FP8 tensor for a parameter
                kept in the model's dtype, or parameters left unset.
        """
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        fused = self.fused_targets()
        filled: dict[str, int] = {}
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name.endswith(("rotary_emb.inv_freq", *quant.IGNORED_SUFFIXES)):
                continue
            if name.endswith(".weight_scale"):
                weight_name = name[: -len("_scale")]
                target, offset, rows = fused.get(weight_name, (weight_name, 0, None))
                target += "_scale"
                if target not in params:
                    raise ValueError(
                        f"checkpoint tensor {name!r} has no place in {self.config.architecture}"
                        + (
                            ""
                            if self.quantization == "fp8"
                            else " (an FP8 scale, but the model is not quantized: quantization=fp8)"
                        )
                    )
                dst = params[target].data if rows is None else params[target].data.narrow(0, offset, rows)
                dst.copy_(quant.per_channel_scale(tensor, dst.shape[0]))
                filled[target] = filled.get(target, 0) + dst.numel()
                continue
            target, offset, rows = fused.get(name, (name, 0, None))
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            param = params[target]
            dst = param.data if rows is None else param.data.narrow(0, offset, rows)
            if tuple(tensor.shape) != tuple(dst.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}"
                )
            if tensor.dtype in quant.OTHER_FP8_DTYPES:
                raise ValueError(f"checkpoint tensor {name!r} is {tensor.dtype}; FP8 weights must be float8_e4m3fn")
            if tensor.dtype == quant.FP8 and param.dtype != quant.FP8:
                raise ValueError(
                    f"checkpoint tensor {name!r} is FP8, but {target} stays in {param.dtype} "
                    f"(only the linear layers of the decoder layers hold FP8 weights)"
                )
            if param.dtype == quant.FP8 and tensor.dtype != quant.FP8:
                modules[target.rsplit(".", 1)[0]].load_float_(tensor, offset)
                filled[target + "_scale"] = filled.get(target + "_scale", 0) + dst.shape[0]
            else:
                dst.copy_(tensor)
            filled[target] = filled.get(target, 0) + dst.numel()
        missing = [n for n, p in params.items() if filled.get(n, 0) != p.numel()]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        if getattr(self, "tp", None) is not None:  # a rank's shard (engine.tensor_parallel): its biases once
            from engine.tensor_parallel import zero_partial_biases

            zero_partial_biases(self)
