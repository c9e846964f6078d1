"""Row-wise Triton kernels: RMSNorm (with the residual add fused), rotary embedding, SiLU-and-mul,
the paged KV write, and rotary fused with the KV write (optionally after Qwen3's q/k norm).

Each kernel handles one token (one row) per program, or a row and a column tile for
silu_and_mul; widths are padded to powers of two and masked. Arithmetic is float32 and the
roundings to the storage dtype happen where the torch reference rounds, so bf16 results agree
with it to the last bit in most elements.

Rotary kernels see a head as two halves of HALF = D/2 columns (rotate-half pairs column i with
i + HALF), each a [heads, HALF] tile; q, k and v may be strided views (e.g. of a fused qkv
projection's output [T, (Hq + 2 Hk) * D]), so every pointer comes with its strides::

    qkv row t:  [ q h0 | q h1 | ... | k h0 | ... | v h0 | ... ]      head h: [ x1 (HALF) | x2 (HALF) ]
    rotated:    [ x1 cos - x2 sin | x2 cos + x1 sin ]                cos, sin = cos_sin[pos[t]]

The KV writes quantize into FP8 caches (float8e4nv, with float32 scales [NB, BS, Hk] at the same
slots; torch_ops.quantize_fp8 is the contract): one scale per (token, KV head), max|x| / 448 of
the value as the unquantized write would store it, and x / scale rounded to nearest even, both
with IEEE division (div_rn) so that the bits match the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.torch_ops import check_kv_scales


def _row_warps(block: int) -> int:
    """Warps for a program that owns `block` elements of one row: ~512 elements a warp, 1-16."""
    return max(1, min(16, block // 512))


FP8_MAX = tl.constexpr(448.0)  # float8e4nv's largest finite value (torch_ops.FP8_MAX)


@triton.jit
def _fp8_scale(amax):
    """Per-row scales of a quantized head: max|x| / 448, 1 for a zero row (IEEE division)."""
    return tl.where(amax > 0.0, tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32)), 1.0)


@triton.jit
def _fp8_quantize(x, scale):
    """float32 rows x [H, C] / scale [H], clamped to +-448, rounded to nearest even float8e4nv."""
    y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    return tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX).to(tl.float8e4nv)


def _scale_args(cache: torch.Tensor, scale: torch.Tensor | None) -> tuple:
    """A scale tensor and its 3 strides for a launch; the cache itself and zeros without one."""
    return (scale, *scale.stride()) if scale is not None else (cache, 0, 0, 0)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    s_ptr,
    x_st0,
    x_st1,
    r_st0,
    r_st1,
    y_st0,
    s_st0,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * x_st0 + cols * x_st1, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * r_st0 + cols * r_st1, mask=mask, other=0.0).to(tl.float32)
        # the sum is rounded to its storage dtype first: the reference normalises the rounded sum
        summed = (x + r).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * s_st0 + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / H
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x * rstd) * w
    tl.store(y_ptr + row * y_st0 + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    y: torch.Tensor,
    summed: torch.Tensor | None,
) -> None:
    rows, hidden = x.shape
    if rows == 0:
        return
    block = triton.next_power_of_2(hidden)
    r = residual if residual is not None else x
    s = summed if summed is not None else y
    _rms_norm_kernel[(rows,)](
        x,
        r,
        weight.contiguous(),
        y,
        s,
        x.stride(0),
        x.stride(1),
        r.stride(0),
        r.stride(1),
        y.stride(0),
        s.stride(0),
        hidden,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=_row_warps(block),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32 over the last dim of x [T, H], returned in x's dtype (a new tensor)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch_rms_norm(x2, None, weight, eps, y, None)
    return y.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), both new tensors in torch's promoted dtype."""
    dtype = torch.result_type(x, residual)
    x2, r2 = x.reshape(-1, x.shape[-1]), residual.reshape(-1, residual.shape[-1])
    summed = torch.empty(x2.shape, dtype=dtype, device=x.device)
    y = torch.empty(x2.shape, dtype=dtype, device=x.device)
    _launch_rms_norm(x2, r2, weight, eps, y, summed)
    return y.view(x.shape), summed.view(x.shape)


@triton.jit
def _rope(x1, x2, cos, sin):
    """Rotate-half of a head tile's halves x1, x2 [heads, HALF] (float32) by cos, sin [HALF]."""
    return x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :]


@triton.jit
def _rms_norm_halves(x1, x2, w_ptr, c, cmask, eps, HALF: tl.constexpr, out_ty: tl.constexpr):
    """Per-head RMSNorm of [heads, 2*HALF] given as halves (masked lanes 0), weight w_ptr [2*HALF].

    Float32 like rms_norm, rounded to `out_ty` as the reference's rms_norm output is, and returned
    in float32 for the rotary that follows.
    """
    mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
    rstd = (1.0 / tl.sqrt(mean_sq + eps))[:, None]
    w1 = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y1 = ((x1 * rstd) * w1).to(out_ty).to(tl.float32)
    y2 = ((x2 * rstd) * w2).to(out_ty).to(tl.float32)
    return y1, y2


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr, x_st1, x_st2, o_st1, num_heads, cos, sin, c, cmask, HALF: tl.constexpr, H_PAD: tl.constexpr
):
    """Rotate-half on the [num_heads, 2*HALF] row at x_ptr, written to o_ptr (contiguous head dim)."""
    h = tl.arange(0, H_PAD)[:, None]
    mask = (h < num_heads) & cmask[None, :]
    src = x_ptr + h * x_st1 + c[None, :] * x_st2
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF * x_st2, mask=mask, other=0.0).to(tl.float32)
    y1, y2 = _rope(x1, x2, cos, sin)
    dst = o_ptr + h * o_st1 + c[None, :]
    out_ty = o_ptr.dtype.element_ty
    tl.store(dst, y1.to(out_ty), mask=mask)
    tl.store(dst + HALF, y2.to(out_ty), mask=mask)


@triton.jit
def cos_sin_row(pos_ptr, cs_ptr, t, cs_st0, cs_st1, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Token t's rotary row: (cos, sin) in float32 over the half width, its columns and their mask."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.arange(0, HALF_PAD)
    cmask = c < HALF
    cos = tl.load(cs_ptr + pos * cs_st0 + c * cs_st1, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * cs_st0 + (c + HALF) * cs_st1, mask=cmask, other=0.0).to(tl.float32)
    return cos, sin, c, cmask


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cs_ptr,
    qo_ptr,
    ko_ptr,
    q_st0,
    q_st1,
    q_st2,
    k_st0,
    k_st1,
    k_st2,
    qo_st0,
    qo_st1,
    ko_st0,
    ko_st1,
    cs_st0,
    cs_st1,
    HQ,
    HK,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HQ_PAD: tl.constexpr,
    HK_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin, c, cmask = cos_sin_row(pos_ptr, cs_ptr, t, cs_st0, cs_st1, HALF, HALF_PAD)
    _rotate_heads(q_ptr + t * q_st0, qo_ptr + t * qo_st0, q_st1, q_st2, qo_st1, HQ, cos, sin, c, cmask, HALF, HQ_PAD)
    _rotate_heads(k_ptr + t * k_st0, ko_ptr + t * ko_st0, k_st1, k_st2, ko_st1, HK, cos, sin, c, cmask, HALF, HK_PAD)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q [T, Hq, D] and k [T, Hk, D]; new tensors (see torch_ops)."""
    tokens, hq, _ = q.shape
    hk = k.shape[1]
    half = cos_sin.shape[1] // 2
    q_out = torch.empty((tokens, hq, 2 * half), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, hk, 2 * half), dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    width = triton.next_power_of_2(max(hq, hk)) * triton.next_power_of_2(half)
    _rotary_kernel[(tokens,)](
        positions,
        q,
        k,
        cos_sin,
        q_out,
        k_out,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        cos_sin.stride(0),
        cos_sin.stride(1),
        hq,
        hk,
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        HQ_PAD=triton.next_power_of_2(hq),
        HK_PAD=triton.next_power_of_2(hk),
        num_warps=_row_warps(width),
    )
    return q_out, k_out


@triton.jit
def _rotary_write_kv_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    cs_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    qo_ptr,
    qw_ptr,
    kw_ptr,
    ks_ptr,
    vs_ptr,
    q_st0,
    q_st1,
    q_st2,
    k_st0,
    k_st1,
    k_st2,
    v_st0,
    v_st1,
    v_st2,
    kc_st0,
    kc_st1,
    kc_st2,
    kc_st3,
    vc_st0,
    vc_st1,
    vc_st2,
    vc_st3,
    ks_st0,
    ks_st1,
    ks_st2,
    vs_st0,
    vs_st1,
    vs_st2,
    qo_st0,
    qo_st1,
    cs_st0,
    cs_st1,
    HQ,
    HK,
    eps,
    BS: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HQ_PAD: tl.constexpr,
    HK_PAD: tl.constexpr,
    Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """One token: [q norm], rotary -> q_out; [k norm], rotary -> k_cache[slot]; v -> v_cache[slot].

    Roundings as rms_norm -> rotary_embedding -> write_kv: the norm's output to the input dtype,
    the rotated q and k to theirs, then k and v to the cache's (KV_FP8: quantized per head, the
    scales stored at the slot of ks_ptr / vs_ptr).
    """
    t = tl.program_id(0).to(tl.int64)
    cos, sin, c, cmask = cos_sin_row(pos_ptr, cs_ptr, t, cs_st0, cs_st1, HALF, HALF_PAD)
    hq = tl.arange(0, HQ_PAD)[:, None]
    rotate_q_heads(
        q_ptr + t * q_st0, qo_ptr + t * qo_st0, q_st1, q_st2, qo_st1, hq, hq < HQ, qw_ptr, cos, sin, c, cmask, eps,
        HALF, Q_NORM,
    )  # fmt: skip
    hk = tl.arange(0, HK_PAD)[:, None]
    write_token_kv(
        t, hk, hk < HK, k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, kw_ptr, ks_ptr, vs_ptr, k_st0, k_st1, k_st2, v_st0,
        v_st1, v_st2, kc_st0, kc_st1, kc_st2, kc_st3, vc_st0, vc_st1, vc_st2, vc_st3, ks_st0, ks_st1, ks_st2, vs_st0,
        vs_st1, vs_st2, cos, sin, c, cmask, eps, BS, HALF, K_NORM, KV_FP8,
    )  # fmt: skip


@triton.jit
def rotate_q_heads(
    src_ptr, dst_ptr, st1, st2, dst_st1, h, hmask, w_ptr, cos, sin, c, cmask, eps, HALF: tl.constexpr,
    NORM: tl.constexpr,
):  # fmt: skip
    """One token's heads h [H, 1] (hmask: the real ones) of q at src_ptr: [per-head RMSNorm,] rotary, stored
    in dst_ptr's dtype at dst_ptr (contiguous head dim)."""
    mask = hmask & cmask[None, :]
    src = src_ptr + h * st1 + c[None, :] * st2
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF * st2, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        x1, x2 = _rms_norm_halves(x1, x2, w_ptr, c, cmask, eps, HALF, src_ptr.dtype.element_ty)
    x1, x2 = _rope(x1, x2, cos, sin)
    dst = dst_ptr + h * dst_st1 + c[None, :]
    tl.store(dst, x1.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, x2.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def write_token_kv(
    t, hk, hmask, k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, kw_ptr, ks_ptr, vs_ptr, k_st0, k_st1, k_st2, v_st0, v_st1,
    v_st2, kc_st0, kc_st1, kc_st2, kc_st3, vc_st0, vc_st1, vc_st2, vc_st3, ks_st0, ks_st1, ks_st2, vs_st0, vs_st1,
    vs_st2, cos, sin, c, cmask, eps, BS: tl.constexpr, HALF: tl.constexpr, K_NORM: tl.constexpr,
    KV_FP8: tl.constexpr,
):  # fmt: skip
    """Token t's KV heads hk [H, 1] (hmask: the real ones): [k norm,] rotary -> k_cache[slot]; v -> v_cache[slot].
    Tokens without a slot (padding: -1) are neither read nor written."""
    slot = tl.load(slot_ptr + t).to(tl.int64)
    keep = slot >= 0
    slot = tl.maximum(slot, 0)
    blk = slot // BS
    off = slot % BS
    kmask = hmask & cmask[None, :] & keep
    src = k_ptr + t * k_st0 + hk * k_st1 + c[None, :] * k_st2
    k1 = tl.load(src, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(src + HALF * k_st2, mask=kmask, other=0.0).to(tl.float32)
    if K_NORM:
        k1, k2 = _rms_norm_halves(k1, k2, kw_ptr, c, cmask, eps, HALF, k_ptr.dtype.element_ty)
    k1, k2 = _rope(k1, k2, cos, sin)
    k_ty = k_ptr.dtype.element_ty
    kc_ty = kc_ptr.dtype.element_ty
    dst = kc_ptr + blk * kc_st0 + off * kc_st1 + hk * kc_st2 + c[None, :] * kc_st3
    src = v_ptr + t * v_st0 + hk * v_st1 + c[None, :] * v_st2
    vdst = vc_ptr + blk * vc_st0 + off * vc_st1 + hk * vc_st2 + c[None, :] * vc_st3
    if KV_FP8:
        # the rotated k rounded to its dtype (what an unquantized cache would hold), then quantized
        k1 = k1.to(k_ty).to(tl.float32)
        k2 = k2.to(k_ty).to(tl.float32)
        v1 = tl.load(src, mask=kmask, other=0.0).to(tl.float32)
        v2 = tl.load(src + HALF * v_st2, mask=kmask, other=0.0).to(tl.float32)
        ks = _fp8_scale(tl.maximum(tl.max(tl.abs(k1), 1), tl.max(tl.abs(k2), 1)))
        vs = _fp8_scale(tl.maximum(tl.max(tl.abs(v1), 1), tl.max(tl.abs(v2), 1)))
        tl.store(dst, _fp8_quantize(k1, ks), mask=kmask)
        tl.store(dst + HALF * kc_st3, _fp8_quantize(k2, ks), mask=kmask)
        tl.store(vdst, _fp8_quantize(v1, vs), mask=kmask)
        tl.store(vdst + HALF * vc_st3, _fp8_quantize(v2, vs), mask=kmask)
        h = tl.reshape(hk, (hk.shape[0],))
        smask = tl.reshape(hmask, (hk.shape[0],)) & keep
        tl.store(ks_ptr + blk * ks_st0 + off * ks_st1 + h * ks_st2, ks, mask=smask)
        tl.store(vs_ptr + blk * vs_st0 + off * vs_st1 + h * vs_st2, vs, mask=smask)
    else:
        tl.store(dst, k1.to(k_ty).to(kc_ty), mask=kmask)
        tl.store(dst + HALF * kc_st3, k2.to(k_ty).to(kc_ty), mask=kmask)
        vc_ty = vc_ptr.dtype.element_ty
        tl.store(vdst, tl.load(src, mask=kmask).to(vc_ty), mask=kmask)
        tl.store(vdst + HALF * vc_st3, tl.load(src + HALF * v_st2, mask=kmask).to(vc_ty), mask=kmask)


def rotary_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """rotary_embedding then write_kv (after a per-head q/k RMSNorm if given) in one kernel.

    q [T, Hq, D], k and v [T, Hk, D] may be strided views; caches [NB, BS, Hk, D]. Returns the
    rotated q, a new [T, Hq, D] tensor in q's dtype; the rotated k and v land in the caches
    (slots < 0 skipped), quantized when they are FP8 (scales into k_scale / v_scale [NB, BS, Hk]).
    One program per token; no host synchronisation (CUDA-graph safe).
    """
    fp8 = check_kv_scales(k_cache, k_scale, v_scale)
    tokens, hq, _ = q.shape
    hk = k.shape[1]
    half = cos_sin.shape[1] // 2
    q_out = torch.empty((tokens, hq, 2 * half), dtype=q.dtype, device=q.device)
    if tokens == 0:
        return q_out
    qw = q_norm.contiguous() if q_norm is not None else q_out
    kw = k_norm.contiguous() if k_norm is not None else q_out
    half_pad = triton.next_power_of_2(half)
    width = triton.next_power_of_2(max(hq, hk)) * half_pad
    ks, *ks_st = _scale_args(k_cache, k_scale)
    vs, *vs_st = _scale_args(v_cache, v_scale)
    _rotary_write_kv_kernel[(tokens,)](
        positions,
        q,
        k,
        v,
        cos_sin,
        k_cache,
        v_cache,
        slot_mapping,
        q_out,
        qw,
        kw,
        ks,
        vs,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *ks_st,
        *vs_st,
        q_out.stride(0),
        q_out.stride(1),
        cos_sin.stride(0),
        cos_sin.stride(1),
        hq,
        hk,
        float(eps),
        BS=k_cache.shape[1],
        HALF=half,
        HALF_PAD=half_pad,
        HQ_PAD=triton.next_power_of_2(hq),
        HK_PAD=triton.next_power_of_2(hk),
        Q_NORM=q_norm is not None,
        K_NORM=k_norm is not None,
        KV_FP8=fp8,
        num_warps=_row_warps(width),
    )
    return q_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, x_st0, x_st1, y_st0, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(x_ptr + row * x_st0 + cols * x_st1, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_st0 + (cols + F) * x_st1, mask=mask, other=0.0).to(tl.float32)
    out_ty = y_ptr.dtype.element_ty
    # torch rounds silu(gate) to the storage dtype before the product: so do we
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ty).to(tl.float32)
    tl.store(y_ptr + row * y_st0 + cols, (act * up).to(out_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :F]) * x[..., F:] for x [T, 2F]; a new tensor in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    rows, width = x2.shape
    f = width // 2
    y = torch.empty((rows, f), dtype=x.dtype, device=x.device)
    if rows and f:
        block = min(1024, triton.next_power_of_2(f))
        _silu_and_mul_kernel[(rows, triton.cdiv(f, block))](
            x2, y, x2.stride(0), x2.stride(1), y.stride(0), f, BLOCK=block, num_warps=max(1, block // 256)
        )
    return y.view(*x.shape[:-1], f)


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    ks_ptr,
    vs_ptr,
    k_st0,
    k_st1,
    k_st2,
    v_st0,
    v_st1,
    v_st2,
    kc_st0,
    kc_st1,
    kc_st2,
    kc_st3,
    vc_st0,
    vc_st1,
    vc_st2,
    vc_st3,
    ks_st0,
    ks_st1,
    ks_st2,
    vs_st0,
    vs_st1,
    vs_st2,
    HK,
    D,
    BS: tl.constexpr,
    HK_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    keep = slot >= 0  # padding tokens carry slot -1: nothing is written for them
    slot = tl.maximum(slot, 0)
    blk = slot // BS
    off = slot % BS
    h = tl.arange(0, HK_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < HK) & (d < D) & keep
    k_dst = kc_ptr + blk * kc_st0 + off * kc_st1 + h * kc_st2 + d * kc_st3
    v_dst = vc_ptr + blk * vc_st0 + off * vc_st1 + h * vc_st2 + d * vc_st3
    if KV_FP8:  # one scale per (token, head): the max over its head dim
        k = tl.load(k_ptr + t * k_st0 + h * k_st1 + d * k_st2, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * v_st0 + h * v_st1 + d * v_st2, mask=mask, other=0.0).to(tl.float32)
        ks = _fp8_scale(tl.max(tl.abs(k), 1))
        vs = _fp8_scale(tl.max(tl.abs(v), 1))
        tl.store(k_dst, _fp8_quantize(k, ks), mask=mask)
        tl.store(v_dst, _fp8_quantize(v, vs), mask=mask)
        hs = tl.arange(0, HK_PAD)
        smask = (hs < HK) & keep
        tl.store(ks_ptr + blk * ks_st0 + off * ks_st1 + hs * ks_st2, ks, mask=smask)
        tl.store(vs_ptr + blk * vs_st0 + off * vs_st1 + hs * vs_st2, vs, mask=smask)
    else:
        k = tl.load(k_ptr + t * k_st0 + h * k_st1 + d * k_st2, mask=mask)
        v = tl.load(v_ptr + t * v_st0 + h * v_st1 + d * v_st2, mask=mask)
        tl.store(k_dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Stores k/v [T, Hk, D] at their slots of the paged caches, in place; slots < 0 are skipped.

    FP8 caches: quantized per (token, head), the scales stored into k_scale / v_scale [NB, BS, Hk].
    """
    fp8 = check_kv_scales(k_cache, k_scale, v_scale)
    tokens, hk, d = k.shape
    if tokens == 0:
        return
    hk_pad, d_pad = triton.next_power_of_2(hk), triton.next_power_of_2(d)
    ks, *ks_st = _scale_args(k_cache, k_scale)
    vs, *vs_st = _scale_args(v_cache, v_scale)
    _write_kv_kernel[(tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        ks,
        vs,
        *k.stride(),
        *v.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *ks_st,
        *vs_st,
        hk,
        d,
        BS=k_cache.shape[1],
        HK_PAD=hk_pad,
        D_PAD=d_pad,
        KV_FP8=fp8,
        num_warps=_row_warps(hk_pad * d_pad),
    )
