"""Split-KV decode attention over a paged KV cache on the CUDA cores: FMAs and sums, no tl.dot.

An alternative to attention._decode_split_kernel for FP8 (float8_e4m3fn, with per-slot scales) and 16-bit
(bf16, f16; also f32) caches. Decode has G = Hq / Hk query rows per KV head (4 for Llama-3-8B), so the
arithmetic is small next to the bytes read, and where decode is latency-bound (short contexts, modest
batches) the tl.dot kernel's mma tiles (G padded to 16 rows; an FP8 tile widened in registers and staged
through shared memory again) cost more than they save. Here each K/V tile is loaded once, 16 bytes at a
time along D (VEC elements: 16 FP8, 8 bf16/f16, 4 f32; fewer for G > 4, see tile_shape), widened to
float32 in registers, and q.k and p.v are FMAs and sums.

One program per (request, KV head, split) owns all G query heads of its KV head (each K/V tile is read once
per group). Grid (B, Hk, S) and the partial (o, lse) per split are those of attention.py (S from
decode_splits, each request's split length from _split_len), merged by attention._decode_reduce_kernel.

Tile layout: BLOCK_N keys = R rows side by side x A rows inside each thread, key n0 + a * R + r at [0, r, a]::

    K, V tile [1, R, A, D]    a thread: A keys x VEC elements of D (A loads of VEC elements); lanes:
                              D / VEC along D x 32 / (D / VEC) along R; warps along R
    q [G, 1, 1, D], acc [G, R, D]: G inside the thread
    s[g, r, a]   = sum_d q[g, d] k[r, a, d]         in-thread FMAs, then log2(D / VEC) shuffles in the warp
    acc[g, r, :] += sum_a p[g, r, a] v[r, a, :]     in-thread FMAs only

(D = 128, G = 4, one warp: FP8, VEC = 16: 8 lanes along D, R = 4, A = BLOCK_N / 4; bf16, VEC = 8: 16 lanes
along D, R = 2, A = BLOCK_N / 2.) VEC is also the most elements Triton's coalescing gives a thread's load
(128 bits), so the layout the launcher assumes (R, A) is the one the loads get. Every row group r keeps its
own online softmax (m[g, r], l[g, r], acc[g, r, :]) over its keys n = r (mod R), so the tile's max and the
p.v sum over keys are in-thread: the inner loop has no shared-memory reduction and no cross-lane one but
the q.k shuffles over D. The R softmaxes are merged once a split, at the end (an lse merge, as between
splits). K and V are loaded as 4-D [1, R, A, D] tensors, not expanded after the load, so that their layout
is the one the [G, R, A, D] products and sums inherit (an expand_dims after the load left q's layout in
charge, with a shared-memory conversion of every tile); the per-key block ids and scales are loaded as A
tensors of R keys (see _load_tile) for the same reason.

G is a tensor dimension (in-thread) rather than a tl.static_range loop over heads: Triton keeps no lists
of tensors as loop state, so a loop over heads would have to carry G named accumulators, or cut each head
out of a [G, ...] tensor with masked sums inside the loop. The [G, R, A, D] products are never live whole:
each element is one FMA into an in-thread sum. A thread holds q and acc (G x VEC float32 each), one
widened tile (A x VEC float32, BLOCK_N x D / 32 / num_warps whatever the cache) and m, l, s, p (G x A).
For G = 4, D = 128, BLOCK_N = 16, one warp: FP8 64 + 64 + 64 + ~40 registers; bf16 32 + 32 + 64 and s, p
of 32 each (half FP8's q and acc, twice its keys a thread, and a raw tile of twice the bytes).

ptxas -v (sm_90a, Triton 3.6's ptxas), G = 4, D = 128, bf16 q, 16-slot blocks, the defaults (block_n=16,
num_warps=1, num_stages=2), no spills and no shared memory or barrier in the loop:
  FP8: 255 registers, ~1,110 SASS instructions a 16-key tile (FFMA 516, HADD2 + F2FP (the FP8 -> float32
    widening) 192, FMUL 112, SHFL 48, FADD 64). Also without spills: num_stages=1 (1,171 a tile),
    block_n=32 with 2 or 4 warps, D = 64, float32 q, and G = 8 at D = 128 with num_warps=2, num_stages=1.
    block_n=32 with one warp spills (420 bytes; 180 with num_stages=1: its float32 tile alone is 128
    registers).
  bf16: 247 registers, ~1,200 a tile (FFMA 484, FADD 192, SHFL 128, SHF + PRMT (the bf16 -> float32
    widening) 193, FMUL 64): 16 lanes along D cost 4 shuffles a score where FP8's 8 lanes cost 3, and
    twice the scores a thread. f16: 255 registers, ~1,135 a tile (HADD2 widening). f32 caches: 184.
    block_n=32 with one warp: 255 registers and no spills over 16-slot blocks (the per-key addresses are
    recomputed instead, ~1,435 instructions per 16 keys), but it spills (272 bytes) when a tile lies in one
    block (64-slot blocks), as FP8's does (424). D = 64: 168 registers, and an 8-byte spill outside the loop
    (none with num_stages=1). G = 8 at D = 128 spills at the defaults (~1 KB), none with num_warps=2,
    num_stages=1 (as FP8).
G = 16 at D = 128 spills with either cache (VEC = 4 elements: 32 lanes along D, s and p G x BLOCK_N).
One-warp programs of up to 255 registers fit 8 to an SM (programs_per_sm=8).

num_stages unrolls the loop over whole tiles that many times (tl.range loop_unroll_factor), so that the
compiler can issue the next tile's loads during the current one's math (at the defaults it issues them
halfway through); it is not Triton's software pipelining, which is off: Triton's own pipelining of this loop
(tl.range num_stages, cp.async) spilled kilobytes, and a prefetch carried in registers holds each FP8
byte in a register of its own (spills too).

FP8 caches (SCALED): the scales (k_scale, v_scale [NB, BS, Hk] float32, the real value is FP8 value x
scale) multiply columns, as in attention.py: s = (q . k8) x k_scale, acc += (p x v_scale) . v8, l sums the
unscaled p. 16-bit and f32 caches (not SCALED): no scale is loaded or multiplied; s = q . k, acc += p . v on
the widened values. q is multiplied by scale x log2(e) once (exp2 domain). A split's whole tiles are read
unmasked; its last, partial tile masks keys past the context at the load (an unwritten slot's values and
scale may be NaN) and scores them -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.torch_ops import check_kv_scales
from engine.kernels.triton.attention import (
    _LOG2E,
    DecodeConfig,
    _scale_args,
    _split_len,
    decode_splits,
    num_sms,
    reduce_splits,
    split_partials,
)

_UNSCALED = (torch.bfloat16, torch.float16, torch.float32)  # the caches read without scales


def tile_shape(group_pad: int, d_pad: int, block_n: int, num_warps: int, elem_bytes: int) -> tuple[int, int, int]:
    """(VEC, R, A): cache elements of D a thread loads at once, rows of a key tile side by side over the lanes
    and warps, and keys a thread holds. VEC is 16 bytes of the cache's elements (16 FP8, 8 bf16/f16, 4 f32),
    fewer for G x VEC > 64 (so that q and acc, G x VEC float32 each, stay at 64 registers), at least 4
    elements and at most 32 lanes along D."""
    vec = min(16 // elem_bytes, max(4, 64 // group_pad))
    vec = min(d_pad, max(vec, d_pad // 32))  # at most 32 lanes along D
    rows = min(block_n, (32 // (d_pad // vec)) * num_warps)
    return vec, rows, block_n // rows


@triton.jit
def _load_tile(
    n0,
    stop,
    bt_row,
    bt_st1,
    k_base,
    v_base,
    ks_base,
    vs_base,
    kc_st0,
    kc_st1,
    kc_st3,
    vc_st0,
    vc_st1,
    vc_st3,
    ks_st0,
    ks_st1,
    vs_st0,
    vs_st1,
    keys,
    r3,
    a3,
    d4,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R: tl.constexpr,
    A: tl.constexpr,
    MASKED: tl.constexpr,
    SCALED: tl.constexpr,
):
    """Keys [n0, n0 + BLOCK_N): k, v [1, R, A, D_PAD] as stored (FP8, 16-bit or f32), their scales k_sc, v_sc
    [1, R, A] (SCALED; else zeros, never loaded and unused) and live [1, R, A] (key < stop). MASKED: keys >=
    stop read as 0 with scale 0 (none is read past the context); else every key is below stop and nothing
    is masked (bar D's padding)."""
    n = n0 + keys
    live = n < stop
    k_rows = tl.zeros([1, R, A], tl.int64)
    v_rows = tl.zeros([1, R, A], tl.int64)
    if BS % BLOCK_N == 0:  # the tile lies in one block (n0 is a multiple of BLOCK_N): one table entry
        blk = tl.load(bt_row + (n0 // BS) * bt_st1).to(tl.int64)  # n0 < stop: a live entry
        first = n0 % BS  # the slot of key n0; key n0 + j sits in slot first + j
        k_rows = (blk * kc_st0 + first * kc_st1) + keys.to(tl.int64) * kc_st1
        v_rows = (blk * vc_st0 + first * vc_st1) + keys.to(tl.int64) * vc_st1
    # the per-key block ids (a tile across blocks) and scales: A loads of R keys, [1, R, 1] each, put in
    # place by a select that resolves at compile time (a is a register index of the thread). One
    # [1, R, A] load of >= 32 x num_warps elements would keep a layout of its own, converted through
    # shared memory every tile.
    k_sc = tl.zeros([1, R, A], tl.float32)
    v_sc = tl.zeros([1, R, A], tl.float32)
    for i in tl.static_range(A):
        n_i = n0 + i * R + r3  # [1, R, 1]
        live_i = n_i < stop
        slot_i = (n_i % BS).to(tl.int64)
        here = a3 == i
        if BS % BLOCK_N == 0:
            blk_i = blk
        else:
            if MASKED:
                blk_i = tl.load(bt_row + (n_i // BS) * bt_st1, mask=live_i, other=0).to(tl.int64)
            else:
                blk_i = tl.load(bt_row + (n_i // BS) * bt_st1).to(tl.int64)
            k_rows = tl.where(here, blk_i * kc_st0 + slot_i * kc_st1, k_rows)
            v_rows = tl.where(here, blk_i * vc_st0 + slot_i * vc_st1, v_rows)
        if SCALED:
            if MASKED:
                ks_i = tl.load(ks_base + blk_i * ks_st0 + slot_i * ks_st1, mask=live_i, other=0.0)
                vs_i = tl.load(vs_base + blk_i * vs_st0 + slot_i * vs_st1, mask=live_i, other=0.0)
            else:
                ks_i = tl.load(ks_base + blk_i * ks_st0 + slot_i * ks_st1)
                vs_i = tl.load(vs_base + blk_i * vs_st0 + slot_i * vs_st1)
            k_sc = tl.where(here, ks_i, k_sc)
            v_sc = tl.where(here, vs_i, v_sc)
    k_ptrs = k_base + k_rows[:, :, :, None] + d4 * kc_st3
    v_ptrs = v_base + v_rows[:, :, :, None] + d4 * vc_st3
    if MASKED:
        kv_mask = live[:, :, :, None] & (d4 < D)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif D != D_PAD:
        k = tl.load(k_ptrs, mask=d4 < D, other=0.0)
        v = tl.load(v_ptrs, mask=d4 < D, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v, k_sc, v_sc, live


@triton.jit
def _attend(acc, l, m, q, k, v, k_sc, v_sc, live, MASKED: tl.constexpr, SCALED: tl.constexpr):
    """One tile of every row group's online softmax (m, l [G_PAD, R], acc [G_PAD, R, D_PAD]); q is in the
    exp2 domain. MASKED: keys not live score -inf, and a row group may have seen no key yet. SCALED: k and v
    are FP8 with per-key scales k_sc, v_sc [1, R, A]; else k_sc, v_sc are unused."""
    s = tl.sum(q * k.to(tl.float32), 3)  # [G_PAD, R, A]: in-thread FMAs, then shuffles over D
    if SCALED:
        s = s * k_sc
    if MASKED:
        s = tl.where(live, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 2))  # in-thread (A)
    if MASKED:
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    else:
        m_ref = m_new
    alpha = tl.exp2(m - m_ref)
    p = tl.exp2(s - m_ref[:, :, None])
    l = l * alpha + tl.sum(p, 2)
    if SCALED:
        pv = (p * v_sc)[:, :, :, None] * v.to(tl.float32)  # [G_PAD, R, A, D_PAD], summed in-thread over A
    else:
        pv = p[:, :, :, None] * v.to(tl.float32)
    acc = acc * alpha[:, :, None] + tl.sum(pv, 2)
    return acc, l, m_new


@triton.jit(do_not_specialize=["bt_st0", "o_st0", "o_st1", "lse_st0", "lse_st1", "num_splits"])
def _decode_fma_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    ks_ptr,
    vs_ptr,
    seq_lens_ptr,
    bt_ptr,
    o_ptr,
    lse_ptr,
    out_ptr,
    q_st0,
    q_st1,
    q_st2,
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
    bt_st0,
    bt_st1,
    o_st0,
    o_st1,
    o_st2,
    lse_st0,
    lse_st1,
    out_st0,
    out_st1,
    out_st2,
    qk_scale,
    num_splits,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R: tl.constexpr,
    VEC: tl.constexpr,
    MIN_TILES: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    UNROLL: tl.constexpr,
    SCALED: tl.constexpr,
):
    A: tl.constexpr = BLOCK_N // R
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    part = _split_len(seq_len, num_splits, BLOCK_N, MIN_TILES)
    start = split * part
    stop = tl.minimum(start + part, seq_len)
    full_stop = start + tl.maximum(stop - start, 0) // BLOCK_N * BLOCK_N  # the end of its whole tiles

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * G + g
    # q [G_PAD, 1, 1, D_PAD] in float32, times scale * log2(e): scores come out in the exp2 domain
    g4 = g[:, None, None, None]
    dq = d[None, None, None, :]
    q = tl.load(
        q_ptr + b.to(tl.int64) * q_st0 + (kvh * G + g4) * q_st1 + dq * q_st2,
        mask=(g4 < G) & (dq < D),
        other=0.0,
    )
    q = q.to(tl.float32) * qk_scale

    # key n0 + a * R + r of a tile sits at [0, r, a]: lanes and warps along r, a inside the thread.
    # K and V are loaded as [1, R, A, D_PAD] (not expanded after the load), so that their layout, VEC cache
    # elements of D a thread, is the one the [G_PAD, R, A, D_PAD] products and their sums inherit.
    r3 = tl.arange(0, R)[None, :, None]
    a3 = tl.arange(0, A)[None, None, :]
    keys = a3 * R + r3  # [1, R, A]
    d4 = tl.max_contiguous(tl.arange(0, D_PAD), VEC)[None, None, None, :]
    bt_row = bt_ptr + b.to(tl.int64) * bt_st0
    k_base = kc_ptr + kvh.to(tl.int64) * kc_st2
    v_base = vc_ptr + kvh.to(tl.int64) * vc_st2
    ks_base = ks_ptr + kvh.to(tl.int64) * ks_st2
    vs_base = vs_ptr + kvh.to(tl.int64) * vs_st2

    m = tl.full([G_PAD, R], float("-inf"), tl.float32)  # per row group r: its keys n = r (mod R)
    l = tl.zeros([G_PAD, R], tl.float32)
    acc = tl.zeros([G_PAD, R, D_PAD], tl.float32)
    for n0 in tl.range(start, full_stop, BLOCK_N, loop_unroll_factor=UNROLL):  # whole tiles, unmasked
        k, v, k_sc, v_sc, live = _load_tile(
            n0, full_stop, bt_row, bt_st1, k_base, v_base, ks_base, vs_base, kc_st0, kc_st1, kc_st3,
            vc_st0, vc_st1, vc_st3, ks_st0, ks_st1, vs_st0, vs_st1, keys, r3, a3, d4,
            D, D_PAD, BS, BLOCK_N, R, A, False, SCALED,
        )  # fmt: skip
        acc, l, m = _attend(acc, l, m, q, k, v, k_sc, v_sc, live, False, SCALED)
    for n0 in range(full_stop, stop, BLOCK_N):  # the split's last, partial tile (if any)
        k, v, k_sc, v_sc, live = _load_tile(
            n0, stop, bt_row, bt_st1, k_base, v_base, ks_base, vs_base, kc_st0, kc_st1, kc_st3,
            vc_st0, vc_st1, vc_st3, ks_st0, ks_st1, vs_st0, vs_st1, keys, r3, a3, d4,
            D, D_PAD, BS, BLOCK_N, R, A, True, SCALED,
        )  # fmt: skip
        acc, l, m = _attend(acc, l, m, q, k, v, k_sc, v_sc, live, True, SCALED)

    # merge the R row groups' softmaxes (once a split): lse = top + log2(sum_r l_r 2^(m_r - top))
    top = tl.max(m, 1)  # [G_PAD]
    top = tl.where(top > float("-inf"), top, 0.0)
    w = tl.exp2(m - top[:, None])  # 0 for a row group that saw no key
    l_all = tl.sum(l * w, 1)
    l_safe = tl.where(l_all > 0.0, l_all, 1.0)
    o = tl.sum(acc * w[:, :, None], 1) / l_safe[:, None]  # [G_PAD, D_PAD]
    o_mask = (g < G)[:, None] & (d < D)[None, :]
    if SINGLE_SPLIT:
        tl.store(
            out_ptr + b.to(tl.int64) * out_st0 + heads[:, None] * out_st1 + d[None, :] * out_st2,
            o.to(out_ptr.dtype.element_ty),
            mask=o_mask,
        )
    else:
        seen = start < seq_len
        base = b.to(tl.int64) * o_st0 + split * o_st2
        tl.store(o_ptr + base + heads[:, None] * o_st1 + d[None, :], o, mask=o_mask & seen)
        tl.store(
            lse_ptr + b.to(tl.int64) * lse_st0 + heads * lse_st1 + split, top + tl.log2(l_safe), mask=(g < G) & seen
        )


def decode_attention_fma(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    block_n: int = 16,
    num_warps: int = 1,
    programs_per_sm: int = 8,
    num_stages: int = 2,
    min_tiles_per_split: int = 4,
    max_splits: int = 128,
) -> torch.Tensor:
    """Paged decode attention on the CUDA cores, torch_ops.decode_attention's contract.

    q [B, Hq, D] (bf16, f16 or f32); k_cache, v_cache [NB, BS, Hk, D], either float8_e4m3fn with k_scale,
    v_scale [NB, BS, Hk] float32, or bf16, f16 or f32 without scales (None); seq_lens [B] int32 (>= 1);
    block_table [B, W] int32. Returns [B, Hq, D] in q's dtype. The split count S comes from the block
    table's width (no host sync: CUDA-graph safe) through attention.decode_splits: ~programs_per_sm
    programs an SM, at most max_splits, splits of at least min_tiles_per_split tiles (one tile off CUDA, so
    that short contexts split under the interpreter). block_n: keys a tile (a power of two); num_warps:
    warps a program; num_stages: whole tiles an unrolled loop iteration (see the module docstring for what
    compiles without spills).
    """
    scaled = check_kv_scales(k_cache, k_scale, v_scale)  # raises: FP8 without scales, scales with 16-bit
    if not scaled and k_cache.dtype not in _UNSCALED:
        raise ValueError(f"decode_attention_fma reads FP8, bf16, f16 or f32 caches, not {k_cache.dtype}")
    if v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {v_cache.dtype} {tuple(v_cache.shape)} differs from k_cache's")
    for name, value in (("block_n", block_n), ("num_warps", num_warps)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    batch, hq, d = q.shape
    _, bs, hk, _ = k_cache.shape
    if hq % hk:
        raise ValueError(f"{hq} query heads are not a multiple of {hk} KV heads")
    group = hq // hk
    out = torch.empty_like(q)
    if batch == 0:
        return out
    if q.device.type != "cuda":  # the interpreter: splits of a tile, so that short contexts still split
        min_tiles_per_split = 1
    cfg = DecodeConfig(
        block_n=block_n,
        programs_per_sm=programs_per_sm,
        min_tiles_per_split=min_tiles_per_split,
        max_splits=max_splits,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    max_context = block_table.shape[1] * bs  # bounds every seq_len: no host sync needed
    splits = decode_splits(batch, hk, max_context, num_sms(q.device), cfg)
    d_pad = max(16, triton.next_power_of_2(d))
    vec, rows, _ = tile_shape(triton.next_power_of_2(group), d_pad, block_n, num_warps, k_cache.element_size())
    o, lse, o_strides, lse_strides = split_partials(out, splits)
    scales, scale_strides = _scale_args(k_cache, k_scale, v_scale)  # placeholders without scales (never read)
    _decode_fma_kernel[(batch, hk, splits)](
        q,
        k_cache,
        v_cache,
        *scales,
        seq_lens,
        block_table,
        o,
        lse,
        out,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *scale_strides,
        *block_table.stride(),
        *o_strides,
        *lse_strides,
        *out.stride(),
        scale * _LOG2E,
        splits,
        G=group,
        G_PAD=triton.next_power_of_2(group),
        D=d,
        D_PAD=d_pad,
        BS=bs,
        BLOCK_N=block_n,
        R=rows,
        VEC=vec,
        MIN_TILES=cfg.min_tiles_per_split,
        SINGLE_SPLIT=splits == 1,
        UNROLL=num_stages,
        SCALED=scaled,
        num_warps=num_warps,
        num_stages=1,  # no software pipelining (see the module docstring)
    )
    reduce_splits(o, lse, seq_lens, out, splits, cfg)
    return out


__all__ = ["decode_attention_fma", "tile_shape"]
