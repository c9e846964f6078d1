"""Decoder-only transformers of the Llama family: Llama 3.x and SmolLM2, Qwen2/2.5, Qwen3.

Written once, for one device. The three families differ only in flags of
ModelConfig: Qwen2 has q/k/v biases, Qwen3 a per-head RMSNorm on q and k
before rotary. Every module is annotated with its placement (engine.placement)
and lists its children in execution order (`flow`), so a tensor-parallel pass
can derive the collectives. Kernels are not chosen here: the runner hands a
KernelSet in through the ForwardContext.

Activations are packed tokens, [T, hidden]; attention reads and writes the
paged KV cache through the context's metadata (engine.attention).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import ForwardContext
from engine.config import ModelConfig
from engine.placement import Partial, Placement, Replicate, Shard, column_parallel, head_local, replicated, row_parallel


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, placement: Placement) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.placement = placement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


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

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: ForwardContext, qk_norm: tuple[RMSNorm, RMSNorm] | None = None) -> torch.Tensor:
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
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        hq, hk, d = config.num_heads, config.num_kv_heads, config.head_dim
        self.hq, self.hk, self.d = hq, hk, d
        self.qkv_proj = Linear(config.hidden_size, (hq + 2 * hk) * d, config.attention_bias,
                               column_parallel(segments=(hq * d, hk * d, hk * d)))
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # their weights; the fused rotary / KV-write op applies them (PagedAttention)
            self.q_norm = RMSNorm(d, config.rms_norm_eps, head_local())
            self.k_norm = RMSNorm(d, config.rms_norm_eps, head_local())
        self.attn = PagedAttention(layer, hq, hk, d)
        self.o_proj = Linear(hq * d, config.hidden_size, False, row_parallel())
        self.flow = ["qkv_proj"] + (["q_norm"] if self.qk_norm else []) + ["attn", "o_proj"]

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.hq * self.d, self.hk * self.d, self.hk * self.d], dim=-1)
        # strided views of the qkv output: the fused rotary / KV-write kernel reads them in place
        q, k, v = q.reshape(t, self.hq, self.d), k.reshape(t, self.hk, self.d), v.reshape(t, self.hk, self.d)
        out = self.attn(positions, q, k, v, ctx, (self.q_norm, self.k_norm) if self.qk_norm else None)
        return self.o_proj(out.reshape(t, self.hq * self.d))


class MLP(nn.Module):
    flow = ["gate_up_proj", "act", "down_proj"]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        i = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * i, False, column_parallel(segments=(i, i)))
        self.act = SiluAndMul()
        self.down_proj = Linear(i, config.hidden_size, False, row_parallel())

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x), ctx))


class SiluAndMul(nn.Module):
    placement = head_local()

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return ctx.ops.silu_and_mul(x)


class DecoderLayer(nn.Module):
    flow = ["input_layernorm", "self_attn", "post_attention_layernorm", "mlp"]

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, positions, x, residual, ctx: ForwardContext):
        if residual is None:
            residual = x
            x = self.input_layernorm(x, ctx)
        else:
            x, residual = self.input_layernorm(x, ctx, residual)
        x = self.self_attn(positions, x, ctx)
        x, residual = self.post_attention_layernorm(x, ctx, residual)
        return self.mlp(x, ctx), residual


class DecoderModel(nn.Module):
    flow = ["embed_tokens", "layers", "norm"]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
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
    """The whole model: `forward` gives final hidden states, `compute_logits` the float32 logits."""

    flow = ["model", "lm_head"]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
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

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face names, fused tensors split again (for transformers references)."""
        params = dict(self.named_parameters())
        out = {}
        for name, (target, offset, rows) in self.fused_targets().items():
            if target in params:
                out[name] = params[target].data.narrow(0, offset, rows)
        fused = {t for t, _, _ in self.fused_targets().values()}
        for name, p in params.items():
            if name not in fused:
                out[name] = p.data
        if not self.config.tie_word_embeddings:
            out["lm_head.weight"] = params["lm_head.weight"].data
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies checkpoint tensors (Hugging Face names) into the parameters; every parameter must be set.

        Raises:
            ValueError: a tensor with an unknown name or the wrong shape, or parameters left unset.
        """
        params = dict(self.named_parameters())
        fused = self.fused_targets()
        filled: dict[str, int] = {}
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue
            target, offset, rows = fused.get(name, (name, 0, None))
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            param = params[target]
            dst = param.data if rows is None else param.data.narrow(0, offset, rows)
            if tuple(tensor.shape) != tuple(dst.shape):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            filled[target] = filled.get(target, 0) + dst.numel()
        missing = [n for n, p in params.items() if filled.get(n, 0) != p.numel()]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
