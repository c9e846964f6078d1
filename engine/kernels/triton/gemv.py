"""The one-row decode GEMV, with the layer's small operations fused in front of it.

A batch-1 decode step reads every weight once; between its matrix products sit RMSNorms (with the
residual add) and SiLU-and-mul, each a kernel of a few microseconds and a launch. Here they become
the GEMV's prologue, computed on the input row as the weight tiles stream past:

    PROLOGUE  input of the product                         also returns
    none      x
    norm      rms_norm(x [+ residual]) * norm_weight        x [+ residual] (the new residual stream)
    silu      silu(x[:F]) * x[F:]                           -

One program owns BLOCK_N output channels over the whole K (no split over K, so no second pass and
no atomics): it walks K in BLOCK_K tiles, widens the weight tile to float32 in registers, and keeps
[BLOCK_N, BLOCK_K] running products that it reduces once at the end (the CUDA cores: one row would
fill a sixteenth of a tensor-core tile). For the norm the program also sums the squares of the
input as it goes and applies 1/rms to its outputs at the end: the norm is linear in its input
row, so rms_norm(s) @ W^T = (s * g) @ W^T / rms(s) and no pass over the row precedes the product.
The residual sum is rounded to the stream's dtype before use, as add_rms_norm stores it; the
normalised input itself is not rounded to bf16 (the unfused path rounds it), so outputs differ from
the unfused ops by about a bf16 rounding (tests/test_gemv.py bounds it). Program 0 writes the new
residual (to a new tensor: the others still read the old one).

Weights are bf16/fp16, or float8_e4m3fn with a float32 scale per output channel (engine.quant),
widened by integer operations (widen_e4m3_bits, as quant's FP8 GEMV with BITS). engine.kernels.triton_ops routes the
registry's `linear` op here for one-row inputs where `use_gemv` says it pays; the tiles come from
`gemv_config` (experiments.tune_gemv sweeps them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PROLOGUES = ("none", "norm", "silu")


@triton.jit
def widen_e4m3_bits(w8):
    """float8e4nv values as float32 by integer operations, not the conversion instructions: the sign to
    bit 31 (sign-extended over 31..27), exponent and mantissa to bits 26..20 (mask 0x87F00000). The
    result is the value times 2**-120 (e4m3's exponent bias 7 against float32's 127; e4m3 subnormals
    become float32 ones): scale the other factor by 2**64 and the sums by 2**56 (powers of two, so every
    product and sum rounds as with the conversion instructions, and none is a float32 subnormal)."""
    return ((w8.to(tl.int8, bitcast=True).to(tl.int32) << 20) & -2014314496).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(
    x_ptr,
    r_ptr,
    g_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    o_ptr,
    ro_ptr,
    N,
    K,
    stride_wn,
    eps,
    PROLOGUE: tl.constexpr,  # 0 none, 1 norm, 2 silu
    HAS_RESIDUAL: tl.constexpr,
    W_FP8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    stream_ty = x_ptr.dtype.element_ty
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = (k < K) | EVEN_K
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if PROLOGUE == 2:  # silu(gate) * up, rounded where silu_and_mul rounds
            gate = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + k, mask=k_ok, other=0.0).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(stream_ty).to(tl.float32)
            a = (act * up).to(stream_ty).to(tl.float32)
        else:
            a = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            if PROLOGUE == 1:
                if HAS_RESIDUAL:
                    a = (a + tl.load(r_ptr + k, mask=k_ok, other=0.0).to(tl.float32)).to(stream_ty)
                    tl.store(ro_ptr + k, a, mask=k_ok & (pid == 0))
                    a = a.to(tl.float32)
                squares += a * a
                a = a * tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        if W_FP8:
            wf = widen_e4m3_bits(w)
            a = a * 18446744073709551616.0  # 2**64
        else:
            wf = w.to(tl.float32)
        acc += wf * a[None, :]
    total = tl.sum(acc, axis=1)
    if W_FP8:
        total = total * 72057594037927936.0 * tl.load(s_ptr + rn, mask=n_ok, other=0.0)  # 2**56 * scale
    if PROLOGUE == 1:
        total = total / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
    if HAS_BIAS:
        total += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(o_ptr + rn, total.to(o_ptr.dtype.element_ty), mask=n_ok)


def gemv_config(n: int, k: int, fp8: bool) -> dict:
    """Tiles of the one-row GEMV for an [n, k] weight (experiments.tune_gemv; docs/perf.md has the sweep).

    bf16: 4 x 2048, 4 warps: on an H100 80GB HBM3 (2026-12-06) the best tile at o and gate|up and as good as
    the best at down; at q|k|v it was not among the four best (20.1-20.6 us against 8 x 512's 20.6). A layer
    at 8 x 512 took 157.9 us, at the best tiles 153.3. FP8: 8 x 1024, 4 warps, the FP8 GEMV's tile
    (quant.gemv_config)."""
    if fp8:
        return {"BLOCK_N": 8, "BLOCK_K": min(1024, max(16, triton.next_power_of_2(k))), "num_warps": 4}
    return {"BLOCK_N": 4, "BLOCK_K": min(2048, max(16, triton.next_power_of_2(k))), "num_warps": 4}


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    *,
    prologue: str = "none",
    norm_weight: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 0.0,
    config: dict | None = None,
):
    """One row x [1, K] (or [1, 2K] for silu) times weight [N, K]^T, with the prologue in front.

    Returns y [1, N] in x's dtype; with prologue "norm" the pair (y, x [+ residual]) like
    add_rms_norm's second result (a new tensor where there is a residual, x itself where not).
    """
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    n, k = weight.shape
    width = 2 * k if prologue == "silu" else k
    if x.shape[-1] != width or x.numel() != width:
        raise ValueError(f"gemv takes one row of {width} values for a [{n}, {k}] weight, got {tuple(x.shape)}")
    fp8 = weight.dtype == torch.float8_e4m3fn
    if fp8 and weight_scale is None:
        raise ValueError("an FP8 weight needs its weight_scale")
    if prologue == "norm" and norm_weight is None:
        raise ValueError("prologue 'norm' needs norm_weight")
    x1 = x.reshape(width)
    if x1.stride(0) != 1:
        x1 = x1.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    has_residual = prologue == "norm" and residual is not None
    r1 = residual.reshape(k).contiguous() if has_residual else x1
    summed = torch.empty_like(x1) if has_residual else x1
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    cfg = dict(config or gemv_config(n, k, fp8))
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x1,
        r1,
        norm_weight if norm_weight is not None else x1,
        weight,
        weight_scale if fp8 else x1,
        bias if bias is not None else x1,
        out,
        summed,
        n,
        k,
        weight.stride(0),
        float(eps),
        PROLOGUE=PROLOGUES.index(prologue),
        HAS_RESIDUAL=has_residual,
        W_FP8=fp8,
        HAS_BIAS=bias is not None,
        EVEN_K=k % cfg["BLOCK_K"] == 0,
        **cfg,
    )
    if prologue == "norm":
        return out, summed.view(x.shape)
    return out
