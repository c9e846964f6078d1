"""FP8 weights: e4m3 values with one float32 scale per output channel (row), `quantization="fp8"`.

    w ~= w_fp8.float() * scale[:, None]        scale = amax(|row|) / 448 (1 for an all-zero row)

What runs where (`fp8_linear`):

    CPU, or any device as the reference     dequantize to x's dtype, then F.linear
    CUDA, more than DECODE_ROWS rows        per-token dynamic FP8 activations and torch._scaled_mm with
        (prefill, large decode batches)     row-wise scales on the FP8 tensor cores (Hopper, Ada)
    CUDA, at most DECODE_ROWS rows          a Triton GEMV reading the FP8 weight tiles and widening them in
        (batch-1..16 decode)                registers: weight-only, half the bytes of bf16

Checkpoint formats (`checkpoint_format`, read from config.json's `quantization_config`) are the FP8
ones on the Hugging Face Hub with per-channel or per-tensor weight scales: compressed-tensors
(llm-compressor's FP8 / FP8-dynamic), fbgemm_fp8 (Meta's Llama 3.1 FP8) and AutoFP8's `fp8`
without blocks. docs/fp8.md says more.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
OTHER_FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)
)
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
DECODE_ROWS = 16  # at most this many rows on CUDA: the weight-only GEMV; more: FP8 tensor cores
_MIN_ACT_SCALE = 1.0 / (FP8_MAX * 512.0)  # a token of zeros still gets a finite scale (as vLLM)


# Quantization ----------------------------------------------------------------------------------
def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8 [out, in] float8_e4m3fn, scale [out] float32) of a [out, in] weight, on w's device.

    The scale maps each row's largest magnitude to 448 (e4m3's largest finite value); a row of
    zeros gets scale 1. Computed in float32, whatever w's dtype.
    """
    if w.dim() != 2:
        raise ValueError(f"per-channel FP8 quantization takes a [out, in] matrix, got shape {tuple(w.shape)}")
    w32 = w.float()
    amax = w32.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w32 / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize(w_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_fp8 * scale per row, in `dtype` (the product is formed in float32; bitwise the same on every path)."""
    scale = scale.float().reshape(-1, 1)
    if w_fp8.device.type == "cpu":
        return (_fp8_bits_as_half(w_fp8).float() * (scale * 256.0)).to(dtype)
    return (w_fp8.float() * scale).to(dtype)


def _fp8_bits_as_half(w_fp8: torch.Tensor) -> torch.Tensor:
    """w_fp8 * 2^-8 as float16, exactly, by moving bits: e4m3's sign, then its 4 exponent and 3 mantissa
    bits, land in a half's sign and low exponent / high mantissa bits (exponent bias 15 = 7 + 8; e4m3's
    subnormals become the half's, same scaling). Several times faster than torch's scalar fp8 -> float
    conversion on the CPU. The NaN codes (never produced by quantization) read as +-480 * 2^-8."""
    u = w_fp8.view(torch.uint8).to(torch.int16)
    return (((u & 0x80) << 8) | ((u & 0x7F) << 7)).view(torch.float16)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: (x_fp8 [M, K], scale [M, 1] float32) of a [M, K] activation."""
    # amax in x's own dtype is exact; one float32 copy of x, divided and clamped in place
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_(min=_MIN_ACT_SCALE)
    x32 = x.to(torch.float32, copy=True)
    return x32.div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def per_channel_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint's weight scale as [rows] float32: per-tensor (a scalar, [1], [1, 1]) broadcast,
    per-channel ([rows] or [rows, 1]) as it is."""
    flat = scale.float().reshape(-1)
    if flat.numel() == 1:
        return flat.expand(rows)
    if flat.numel() == rows and (scale.dim() == 1 or (scale.dim() == 2 and scale.shape[1] == 1)):
        return flat
    raise ValueError(
        f"weight scale of shape {tuple(scale.shape)} is neither per-tensor nor per-channel for {rows} output channels"
    )


# The linear op -----------------------------------------------------------------------------------
def reference_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The CPU path and the reference of the others: dequantize to x's dtype, then F.linear."""
    return F.linear(x, dequantize(w_fp8, scale, x.dtype), bias)


def scaled_mm_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x W^T on FP8 tensor cores: x quantized per token (dynamic), torch._scaled_mm with row-wise scales
    ([M, 1] for x, [1, N] for W), output in x's dtype. torch's CPU build runs it too (tests)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_fp8, x_scale = quantize_rows(x2) if x.is_cuda and _have_triton() else quantize_fp8_per_token(x2)
    out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*shape[:-1], w_fp8.shape[0])


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _have_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def fp8_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, dequantize(w_fp8, scale), bias), by the fastest path the device has (module docstring).

    Args:
        x: [..., K] activations (bfloat16/float16 for the GPU paths; float32 takes the reference path).
        w_fp8: [N, K] float8_e4m3fn, row-major.
        scale: [N] float32, per output channel.
        bias: [N] in x's dtype, or None.
    """
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        k, n = x.shape[-1], w_fp8.shape[0]
        rows = x.numel() // k if k else 0
        if 0 < rows <= DECODE_ROWS and _have_triton():
            return fp8_gemv(x, w_fp8, scale, bias)
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        if rows > DECODE_ROWS and _capability(index) >= (8, 9) and k % 16 == 0 and n % 16 == 0:
            return scaled_mm_linear(x, w_fp8, scale, bias)
    return reference_linear(x, w_fp8, scale, bias)


# The decode GEMV (Triton) ------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _gemv_kernels() -> dict:
    """The Triton kernels, decorated on first use (so TRITON_INTERPRET=1 set before that call applies)."""
    import triton
    import triton.language as tl

    # a module global, not a closure: the kernels resolve the helper through their globals (the
    # interpreter sees no closures)
    global widen_e4m3_bits
    from engine.kernels.triton.gemv import widen_e4m3_bits

    @triton.jit
    def fp8_gemv_dot_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        b_ptr,
        o_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # one program: BLOCK_N output channels for all (<= BLOCK_M) rows; the FP8 weight tile is read
        # once, widened to x's dtype in registers, and multiplied on the tensor cores (fp32 accumulate)
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        m_ok = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            k_ok = (k < K) | EVEN_K
            w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        s = tl.load(s_ptr + rn, mask=n_ok, other=0.0)
        out = acc * s[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(
            o_ptr + rm[:, None] * stride_om + rn[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )

    @triton.jit
    def fp8_gemv_fma_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        b_ptr,
        o_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BITS: tl.constexpr = False,
    ):
        # one program: BLOCK_N output channels for the (<= BLOCK_M, a few) rows, on the CUDA cores: each
        # weight element is widened to float32 once and multiplied into every row's running products,
        # [BLOCK_M, BLOCK_N, BLOCK_K] of them, reduced over K once at the end (no tensor-core padding of
        # one row to 16, no per-tile reduction). BITS widens by integer operations instead of the
        # conversion instructions (e4m3x2 -> f16x2 -> f32, 16 a clock an SM, the bound of the default):
        # the sign to bit 31, exponent and mantissa to bits 26..20, a float32 that is the value times
        # 2**-120 (e4m3's exponent bias 7 against float32's 127; e4m3 subnormals become float32 ones).
        # x is scaled by 2**64 and the sums by 2**56: powers of two, so every product and sum rounds as
        # the default's do, and none is a float32 subnormal.
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        m_ok = rm < M
        w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            k_ok = (k < K) | EVEN_K
            w8 = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(
                tl.float32
            )
            if BITS:
                w = widen_e4m3_bits(w8)
                x = x * 18446744073709551616.0  # 2**64
            else:
                w = w8.to(tl.float32)
            acc += w[None, :, :] * x[:, None, :]
        s = tl.load(s_ptr + rn, mask=n_ok, other=0.0)
        total = tl.sum(acc, axis=2)
        if BITS:
            total = total * 72057594037927936.0  # 2**56
        out = total * s[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(
            o_ptr + rm[:, None] * stride_om + rn[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )

    return {"dot": fp8_gemv_dot_kernel, "fma": fp8_gemv_fma_kernel}


def gemv_config(m: int, n: int, k: int) -> dict:
    """The kernel and tiles of the decode GEMV for m rows of [n, k] weights, from experiments.tune_fp8_gemv
    (Llama-3.1-8B's four linear shapes, GPU time in CUDA graphs; the sweeps are in docs/perf.md):

      one row      `fma` (CUDA cores: each weight widened to float32 once, [BLOCK_N, BLOCK_K] running
                   products, reduced at the end): BLOCK_N 8 x BLOCK_K 1024, 4 warps, BITS (widened by integer
                   operations, not the conversion instructions that bound it before; see below). The best
                   or within 6% of it at every shape on an H100 80GB HBM3 and an H200 (2026-12-06): a layer
                   87.9 us against cuBLAS bf16's 152.2 on an H100 (0.58x; 90.0 without BITS, in the same
                   sweep), 84.4 against 113.9 on the H200 (0.74x, without BITS). Prefetching the next tile
                   was slower on the H200 (97.2 us). It tops out at ~2.4-2.7 TB/s on both cards; BITS
                   removed the conversion instructions and gained 2%, so they are not what bounds it.
      2-16 rows    `dot` (tensor cores, the rows padded to 16): BLOCK_N 32 x BLOCK_K 512, or 1024 for
                   k >= 8192; 4 warps (H100: 0.65x bf16 at 4 and 16 rows; `fma` at 4 rows was 1.30x).
    Neither loop is software-pipelined by Triton (the weight tile is widened in registers, not staged
    through shared memory), so the tile is what a program has in flight."""

    def pow2(v: int) -> int:
        return max(16, 1 << (max(v, 1) - 1).bit_length())

    if m == 1:
        return {"kind": "fma", "BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": min(1024, pow2(k)), "num_warps": 4, "BITS": True}
    return {
        "kind": "dot",
        "BLOCK_M": DECODE_ROWS,
        "BLOCK_N": 32,
        "BLOCK_K": min(1024 if k >= 8192 else 512, pow2(k)),
        "num_warps": 4,
    }


def fp8_gemv(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """x W^T for at most DECODE_ROWS rows, reading the FP8 weights once (the decode path). `config`
    overrides gemv_config's choice (experiments.tune_fp8_gemv)."""
    shape = x.shape
    k, n = shape[-1], w_fp8.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > DECODE_ROWS:
        raise ValueError(f"fp8_gemv takes at most {DECODE_ROWS} rows, got {m}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w_fp8.stride(-1) != 1:
        w_fp8 = w_fp8.contiguous()
    cfg = dict(config or gemv_config(m, n, k))
    kernel = _gemv_kernels()[cfg.pop("kind")]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (-(-n // cfg["BLOCK_N"]),)
    kernel[grid](
        x2,
        w_fp8,
        scale,
        bias if bias is not None else scale,
        out,
        m,
        n,
        k,
        x2.stride(0),
        w_fp8.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        EVEN_K=k % cfg["BLOCK_K"] == 0,
        **cfg,
    )
    return out.reshape(*shape[:-1], n)


# Per-token activation quantization on the GPU (Triton): one pass over x ------------------------
@functools.lru_cache(maxsize=1)
def _quantize_rows_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_quantize_rows_kernel(
        x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, MIN_SCALE, FP8_LIMIT: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        # one program a row: amax, the row's scale, the row divided, clamped and rounded to e4m3
        row = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, BLOCK_K)
        ok = k < K
        x = tl.load(x_ptr + row * stride_xm + k, mask=ok, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8_LIMIT, MIN_SCALE)
        y = tl.minimum(tl.maximum(x / scale, -FP8_LIMIT), FP8_LIMIT)
        tl.store(q_ptr + row * stride_qm + k, y.to(tl.float8e4nv), mask=ok)
        tl.store(s_ptr + row, scale)

    return fp8_quantize_rows_kernel


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_per_token in one Triton kernel (read x once, write its FP8 codes and scales) instead of
    torch's six passes over a float32 copy; the same values up to the rounding of the scale's division."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = max(16, 1 << (k - 1).bit_length())
        _quantize_rows_kernel()[(m,)](
            x,
            q,
            scale,
            k,
            x.stride(0),
            q.stride(0),
            _MIN_ACT_SCALE,
            FP8_LIMIT=FP8_MAX,
            BLOCK_K=block,
            num_warps=max(1, min(16, block // 1024)),
        )
    return q, scale


# Checkpoint formats ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointFP8:
    """An FP8 checkpoint's format: `method` (quant_method) and the weights' scale `strategy`."""

    method: str  # "compressed-tensors" | "fbgemm_fp8" | "fp8"
    strategy: str  # "channel" | "tensor"


SUPPORTED_FORMATS = (
    "compressed-tensors (float 8-bit weights, strategy channel or tensor)",
    "fbgemm_fp8",
    "fp8 (per-tensor, no weight_block_size)",
)

# checkpoint tensors we read past: static activation scales (activations are quantized per token
# here), their upper bounds, and KV-cache scales of compressed-tensors' kv_cache_scheme
IGNORED_SUFFIXES = (".input_scale", ".input_scale_ub", ".output_scale", ".k_scale", ".v_scale", ".q_scale")


def checkpoint_format(hf_config: Mapping[str, Any], where: str = "config.json") -> CheckpointFP8 | None:
    """The FP8 format a Hugging Face config declares (`quantization_config`, or compressed-tensors'
    older `compression_config`), None for an unquantized checkpoint.

    Raises:
        ValueError: a quantized checkpoint this engine does not read (block-wise FP8, integer or
            4-bit schemes, other methods), naming what it found and what is supported.
    """
    qc = hf_config.get("quantization_config") or hf_config.get("compression_config")
    if not qc:
        return None
    if not isinstance(qc, Mapping):
        raise ValueError(f"{where}: quantization_config must be an object, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    supported = "; supported: " + ", ".join(SUPPORTED_FORMATS)
    if method == "compressed-tensors" or (not method and "config_groups" in qc):
        strategies = set()
        for name, group in (qc.get("config_groups") or {}).items():
            w = (group or {}).get("weights") or {}
            kind, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy")
            if kind != "float" or bits != 8:
                raise ValueError(
                    f"{where}: compressed-tensors group {name!r} quantizes weights to {bits}-bit "
                    f"{kind}; this engine reads only FP8 (float 8-bit) weights{supported}"
                )
            if w.get("symmetric") is False:
                raise ValueError(
                    f"{where}: compressed-tensors group {name!r} has asymmetric FP8 weights (zero points){supported}"
                )
            if strategy == "block" or w.get("block_structure"):
                raise ValueError(
                    f"{where}: block-wise FP8 weights (compressed-tensors group {name!r}, "
                    f"block_structure {w.get('block_structure')}) are not supported; use the "
                    f"bf16 checkpoint with quantization=fp8{supported}"
                )
            if strategy not in ("channel", "tensor"):
                raise ValueError(
                    f"{where}: compressed-tensors group {name!r} has FP8 weight strategy {strategy!r}{supported}"
                )
            strategies.add(strategy)
        if not strategies:
            raise ValueError(f"{where}: compressed-tensors quantization_config has no config_groups")
        return CheckpointFP8("compressed-tensors", "channel" if "channel" in strategies else "tensor")
    if method == "fbgemm_fp8":
        return CheckpointFP8("fbgemm_fp8", "channel")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if block:
            raise ValueError(
                f"{where}: block-wise FP8 (quant_method fp8, weight_block_size {list(block)}, "
                f"weight_scale_inv per {block[0]}x{block[1]} block, as DeepSeek and Qwen3 FP8 "
                f"checkpoints) is not supported; use the bf16 checkpoint with "
                f"quantization=fp8{supported}"
            )
        fmt = str(qc.get("fmt") or "e4m3").lower()
        if fmt != "e4m3":
            raise ValueError(
                f"{where}: FP8 weights in {fmt} (quant_method fp8, fmt {qc.get('fmt')!r}) are not supported; "
                f"this engine reads e4m3{supported}"
            )
        return CheckpointFP8("fp8", "tensor")
    raise ValueError(f"{where}: quantization method {method or qc!r} is not supported{supported}")
