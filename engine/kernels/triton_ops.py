"""The `triton` backend: GPU kernels for the operations of registry.OPS (CPU under TRITON_INTERPRET=1).

    rms_norm, add_rms_norm, rotary_embedding, silu_and_mul, write_kv,
    rotary_write_kv (one kernel: [q/k norm,] rotary and the KV write)  engine/kernels/triton/elementwise.py
    linear (one row: the GEMV with its RMSNorm / SiLU prologue fused)   engine/kernels/triton/gemv.py
    prefill_attention, decode_attention,                                engine/kernels/triton/attention.py
    rotary_decode_attention (the rotary and the KV write in the decode kernel)

Signatures, layouts and return conventions are those of the torch reference (torch_ops.py),
FP8 KV caches included: the writes quantize, the attention kernels dequantize in registers.
The sampling helpers (apply_penalties, top_k_top_p_min_p) are not implemented here: the
registry falls back to the torch reference for them.

On CPU the kernels run only under the Triton interpreter, which `@triton.jit` picks when the
kernels are decorated (this module's first import). So the probe claims "cpu" only when
TRITON_INTERPRET=1 both was set at that import and still is: a process that set it too late
holds compiled-for-GPU kernels and falls back to the torch reference.
"""

from __future__ import annotations

import os

import torch

from engine.kernels import torch_ops
from engine.kernels.registry import register, register_probe
from engine.kernels.triton import attention, elementwise, gemv  # raises ImportError without triton

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # as the kernels were decorated


def _probe(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "cpu":
        return _INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"
    return False


register_probe("triton", _probe)

rms_norm = register("rms_norm", "triton")(elementwise.rms_norm)
add_rms_norm = register("add_rms_norm", "triton")(elementwise.add_rms_norm)
rotary_embedding = register("rotary_embedding", "triton")(elementwise.rotary_embedding)
silu_and_mul = register("silu_and_mul", "triton")(elementwise.silu_and_mul)
write_kv = register("write_kv", "triton")(elementwise.write_kv)
rotary_write_kv = register("rotary_write_kv", "triton")(elementwise.rotary_write_kv)
_composed_linear = torch_ops.composed_linear(elementwise.rms_norm, elementwise.add_rms_norm, elementwise.silu_and_mul)


# the one-row GEMV on or off; benchmarks turn it off for their baseline (experiments.bench_engine's -unfused
# variants: off while such an engine is built, its CUDA graphs captured, and run)
FUSED_GEMV = True


def use_gemv(x: torch.Tensor, weight: torch.Tensor, prologue: str) -> bool:
    """Whether `linear` runs the fused one-row GEMV (gemv.py): one row, a weight in x's dtype or FP8,
    and a GPU, or the interpreter on CPU (so CI runs it). Everything else composes the prologue kernel
    with cuBLAS (F.linear) or engine.quant's FP8 paths."""
    if not FUSED_GEMV or x.numel() != x.shape[-1] or weight.dim() != 2:
        return False
    if weight.dtype != x.dtype and weight.dtype != torch.float8_e4m3fn:
        return False
    return x.is_cuda or _INTERPRETED


@register("linear", "triton")
def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    *,
    prologue: str = "none",
    norm_weight: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 0.0,
):
    """x W^T (+ bias) after the prologue (contract: torch_ops.linear): one fused kernel for one row
    (gemv.py), the prologue's kernel and the product's otherwise."""
    fn = gemv.gemv if use_gemv(x, weight, prologue) else _composed_linear
    return fn(x, weight, bias, weight_scale, prologue=prologue, norm_weight=norm_weight, residual=residual, eps=eps)


@register("prefill_attention", "triton")
def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    cached_prefix: int | None = None,
) -> torch.Tensor:
    """Paged causal attention with a cached prefix (contract: torch_ops.prefill_attention).

    Varlen flash attention: tiles of (query token, GQA head) rows against key tiles gathered
    through the block table; no host synchronisation. One request's long chunk whose cached prefix the
    caller states (`cached_prefix`) runs on cuDNN where it can (engine.kernels.cudnn_prompt).
    """
    return attention.prefill_attention(
        q,
        k_cache,
        v_cache,
        query_start_loc,
        seq_lens,
        block_table,
        scale,
        k_scale=k_scale,
        v_scale=v_scale,
        cached_prefix=cached_prefix,
    )


@register("decode_attention", "triton")
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged decode attention (contract: torch_ops.decode_attention).

    Split-KV (flash-decoding): each request's context is cut into partitions sized to fill the
    GPU, then merged by the last partition to finish (or a small reduce kernel); no host
    synchronisation (CUDA-graph safe).
    """
    return attention.decode_attention(
        q, k_cache, v_cache, seq_lens, block_table, scale, k_scale=k_scale, v_scale=v_scale
    )


# the decode attention with the rotary and the KV write in its kernel (attention.rotary_decode_attention) on or
# off. On: on an H100 (2026-12-07, b88ad41) it took 1.4% / 1.0% / 0.3% off the 8B bf16 step at b1 512 / b1 50K /
# b4 50K (2.2% / 1.2% / 0.4% with FP8 weights) and was faster than the two kernels it replaces at every shape of
# experiments.tune_attention --only decode-fused (docs/perf.md). Its splits' merge stays in the reduce kernel
# (attention.MERGE_IN_KERNEL, slower at 50K). experiments.bench_engine's -composed variants turn it off.
FUSED_DECODE_ATTENTION = True


@register("rotary_decode_attention", "triton")
def rotary_decode_attention(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decode-only step's attention from its projections (contract: torch_ops.composed_rotary_decode_attention):
    the rotary and the KV write run in the split-KV decode kernel, whose last split merges the row
    (FUSED_DECODE_ATTENTION off: rotary_write_kv, then decode_attention)."""
    if not FUSED_DECODE_ATTENTION:
        return _composed_rotary_decode_attention(
            positions, q, k, v, cos_sin, k_cache, v_cache, slot_mapping, seq_lens, block_table, scale,
            q_norm=q_norm, k_norm=k_norm, eps=eps, k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
    return attention.rotary_decode_attention(
        positions, q, k, v, cos_sin, k_cache, v_cache, slot_mapping, seq_lens, block_table, scale,
        q_norm=q_norm, k_norm=k_norm, eps=eps, k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip


_composed_rotary_decode_attention = torch_ops.composed_rotary_decode_attention(rotary_write_kv, decode_attention)
