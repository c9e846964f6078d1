"""Paged attention in Triton: split-KV decode (flash-decoding) and varlen causal prefill.

Both read K/V through the block table, one key tile at a time (or, for prefill on Hopper, through a
contiguous copy of the context: see "Prefill through a copy" below)::

    key n of request r  ->  cache[block_table[r, n // BS], n % BS, kv_head, :]

    tile of BLOCK_N keys:  n0 .. n0+BLOCK_N-1   (any BS: each key's block id is gathered)

and both keep an online softmax in float32 (running max m, sum l, accumulator acc) in the
exp2 domain (scores pre-multiplied by scale * log2 e). One program owns every query head of one
KV head (GQA group), so each K/V tile is read once per group and fed to tl.dot.

Decode, grid (B, Hk, S): the context of each request is cut into S equal partitions::

    request b:  |-- split 0 --|-- split 1 --|-- split 2 --|  (lse, o) each, float32, then
                _decode_reduce_kernel merges them per (b, head)

S is chosen on the host from the batch, the KV heads and the longest possible context
(block_table width * BS: known without a device sync, so the launch is CUDA-graph safe) to
give ~4 programs per SM. Each request's own partition length is computed in the kernel from
its seq_len (a whole number of tiles, at least MIN_TILES of them), so a short request in a
wide block table still spreads over all S splits or, when it is very short, over fewer.

Prefill, grid (query tiles, Hk): rows of a tile are (token, head-of-group) pairs::

    row m -> query token tok0 + m // G, query head kv_head * G + m % G      (BQ = BLOCK_M // G tokens)

A tile of request r at query offsets [tok0, tok0 + BQ) reads keys [0, last position]: the full
tiles below its first position unmasked, the rest with the causal mask key <= position.

Prefill through a copy (PrefillConfig.gather, the default on Hopper for 16-bit tiles): the launch's
context is first copied block by block into contiguous rows (gathered_context; an FP8 cache's dequantized
copy is the same layout), request r's keys at rows r * W * BS + n of a [rows, Hk * D] view, every slot past
a context zero. _prefill_gather_kernel then loads whole BLOCK_N-key tiles through tensor descriptors (TMA on
Hopper: no per-key address, no pointer tensors in registers) straight into shared memory for the tensor
cores; tiles that run past a context read zeros or the next request's finite keys, masked out of the
scores like any causal tile. Same programs, rows, splits and merge as the paged kernel.

Decode over an FP8 cache runs on the CUDA cores by default (DecodeConfig.fma, decode_fma.py).

FP8 caches (float8e4nv, KV_FP8; scales [NB, BS, Hk] float32 per slot and KV head, see
torch_ops): a tile is loaded as FP8 (half the bytes of bf16) and converted in registers to q's dtype
(exact: every e4m3 value is a bf16, f16 and f32 value); the scales are applied to the tile's
columns, not its elements: s = (q @ k8^T) * k_scale[None, :] and acc += (p * v_scale[None, :]) @ v8,
with l summing the unscaled p. q stays in its own dtype (never cast to FP8).

Integer arguments that change from step to step (the block table's row stride, which is the batch's
widest context in blocks; the split and tile counts; strides that follow them) are not specialized
(`do_not_specialize`): Triton would otherwise compile another variant, for about a second, the first
time such a value is 1 or a multiple of 16, in the middle of serving.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from engine.kernels import cudnn_prompt
from engine.kernels.torch_ops import check_kv_scales
from engine.kernels.triton import elementwise
from engine.kernels.triton.elementwise import cos_sin_row, rotate_q_heads, write_token_kv

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    """Tiling and split heuristic of decode_attention (see module docstring)."""

    block_n: int = 64  # keys per inner-loop tile
    programs_per_sm: int = 4  # aim for this many programs on each SM
    min_tiles_per_split: int = 4  # a split amortises its q load and partial write over >= this
    max_splits: int = 128
    num_warps: int = 4
    num_stages: int = 2
    fma: bool = False  # the CUDA-core kernel (decode_fma: no tl.dot; num_stages is its loop unrolling there)
    maxnreg: int | None = None  # the split kernel's register cap a thread (ptxas spills above it); None: ptxas's


@dataclass(frozen=True)
class PrefillConfig:
    """Tiling of prefill_attention, BLOCK_M (token, head) rows x BLOCK_N keys, and its key-range split."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2
    max_splits: int = 16  # 1: never split the key range
    min_split_keys: int = 1024  # a split amortises its q load and partial write over >= this many keys
    split_waves: int = 2  # aim for at least this many waves of programs (see prefill_splits)
    gather: bool = False  # read K/V through contiguous copies with tensor descriptors (PREFILL_GATHER_BYTES)
    warp_specialize: bool = False  # with gather: Triton's warp-specialized key loop (producer/consumer warps)


# The CUDA-core kernel's one-warp programs need keys to fill the card: a launch over fewer (batch x the block
# table's width) runs the tl.dot kernel on the FP8 cache instead (H100, experiments.tune_attention --only
# decode-fp8, 2026-12-06: batch 1 x 512 22.2 us against 34.5, the bf16 cache's 20.3; batch 64 x 512, 32K keys,
# was faster on the CUDA cores: 58 against 68 us)
FMA_MIN_KEYS = 8192


def decode_config(
    device: torch.device,
    head_dim: int,
    dtype: torch.dtype,
    kv_fp8: bool = False,
    group: int = 1,
    keys: int | None = None,
) -> DecodeConfig:
    """Tiles for q and tiles multiplied in `dtype` (the cache's, or q's for an FP8 cache: kv_fp8), `group` query
    heads a KV head; `keys`: the most keys the launch reads (batch x the block table's width in tokens)."""
    if device.type != "cuda":  # the interpreter: small tiles, still split so every path runs
        return DecodeConfig(block_n=16, min_tiles_per_split=1, num_warps=1, num_stages=1)
    if kv_fp8 and head_dim <= 128 and group <= 4 and (keys is None or keys >= FMA_MIN_KEYS):
        # the CUDA-core kernel: FP8 tiles widened in registers, no shared-memory round trip for mma. Against the
        # tl.dot kernel's default on the same FP8 cache (H100, experiments.tune_attention --only decode-fp8,
        # 2026-12-06): batch 4 x 50K ~235 vs 335 us (its best tile: 227), batch 1 x 50K 83 vs 103 us; batch 64 x
        # 512 58 us (a bf16 cache: 68 us). 255 registers and 180 bytes of spills at G 4 (ptxas, sm_90; the fastest
        # tile even so); at G 8 it spills ~2 KB, so larger groups keep the tl.dot kernel
        return DecodeConfig(fma=True, block_n=32, num_warps=1, programs_per_sm=16, num_stages=1)
    if kv_fp8 and dtype == torch.float32:
        # FP8 -> fp32 tiles (tl.dot): two stages spill (255 registers + ~300 bytes); one takes 63 (ptxas, sm_90)
        return DecodeConfig(block_n=16, num_stages=1)
    # sized from ptxas -v for sm_90: no spills (fp32 tl.dot runs on FMA units, hence its small tile)
    if dtype == torch.float32:
        return DecodeConfig(block_n=16)
    # one tile a split: a short context still spreads over enough programs to hide load latency (at
    # 512 tokens, 4 tiles a split left 16 programs a layer, latency-bound at ~10 us; measured on an H200)
    return DecodeConfig(block_n=64 if head_dim <= 128 else 32, min_tiles_per_split=1)


def prefill_config(
    device: torch.device, head_dim: int, dtype: torch.dtype, kv_fp8: bool = False, gather: bool = True
) -> PrefillConfig:
    """Tiles for tiles multiplied in `dtype` (the cache's, or q's for an FP8 cache: kv_fp8); gather=False: the
    paged kernel's even where the gathered one is the default (prefill_attention's fallback)."""
    if device.type != "cuda":  # the interpreter: small tiles, splits from short contexts so that path runs
        return PrefillConfig(block_m=32, block_n=16, num_warps=1, num_stages=1, min_split_keys=32)
    # sized from ptxas -v for sm_90: 116-181 registers a thread and no spills for 16-bit caches
    if dtype == torch.float32:
        return PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    if kv_fp8:
        # FP8 tiles converted in registers: the 16-bit caches' tiles spill (255 registers + 32 bytes at
        # head_dim 128 and 256); these take 194 and 228 registers, no spills (ptxas -v, sm_90; not timed)
        if head_dim > 128:
            return PrefillConfig(block_m=64, block_n=16, num_warps=8, num_stages=2)
        return PrefillConfig(block_m=128, block_n=32, num_warps=8, num_stages=3)
    if head_dim > 128:
        return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    if gather and 90 <= _cuda_arch() < 120:  # sm_120's 99 KiB of shared memory a block do not hold 3 stages
        # tiles through tensor descriptors (TMA) from contiguous copies: 0.63-0.68 of the bf16 matmul rate at
        # 1.3K-16K-token chunks over 0-55K cached tokens, against 0.36-0.45 for the paged loads below
        # (experiments.tune_attention --only prefill --gather, H100, 2026-12-06)
        return PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3, gather=True)
    return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)


def _cuda_arch() -> int:
    """The compile target's SM version (90 for Hopper): Triton's, so a stand-in target (compiling for sm_90
    without a GPU, as the CPU tests do) answers too."""
    return int(triton.runtime.driver.active.get_current_target().arch)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 caches must not be rounded to tf32 inside tl.dot (it would cost ~1e-3 relative)
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _tile_scales(head_ptr, offsets, nmask, CAUSAL: tl.constexpr):
    """A key tile's FP8 scales of one head (keys past the context masked to 0 in a causal tile)."""
    if CAUSAL:
        return tl.load(head_ptr + offsets, mask=nmask, other=0.0)
    return tl.load(head_ptr + offsets)


@triton.jit
def _attend_tile(
    acc,
    l,
    m,
    q,
    kc_ptr,
    vc_ptr,
    bt_row,
    bt_st1,
    k_head,
    v_head,
    kc_st0,
    kc_st1,
    kc_st3,
    vc_st0,
    vc_st1,
    vc_st3,
    n0,
    pos,
    n_end,
    qk_scale,
    ks_ptr,
    vs_ptr,
    ks_head,
    vs_head,
    ks_st0,
    ks_st1,
    vs_st0,
    vs_st1,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """One key tile [n0, n0 + BLOCK_N) of the online softmax; keys >= n_end are never loaded.

    With CAUSAL, row i sees key n iff n <= pos[i]; without, every key of the tile is visible and
    loaded unmasked (the caller guarantees the whole tile is below every row's position and n_end).
    The running max m is kept in scaled units (score x qk_scale), so p = 2^(score x qk_scale - m)
    is one fused multiply-add an element. KV_FP8: k and v are FP8, converted to q's dtype, and
    each key's scale multiplies its score column and its probability column.
    """
    n = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D_PAD)
    in_blk = (n % BS).to(tl.int64)
    d_mask = (d < D)[None, :]
    nmask = n < n_end  # used by a causal tile only
    if CAUSAL:
        blk = tl.load(bt_row + (n // BS) * bt_st1, mask=nmask, other=0).to(tl.int64)
        kv_mask = nmask[:, None] & d_mask
    else:
        blk = tl.load(bt_row + (n // BS) * bt_st1).to(tl.int64)
        kv_mask = d_mask
    k_ptrs = kc_ptr + (blk * kc_st0 + in_blk * kc_st1 + k_head)[:, None] + d[None, :] * kc_st3
    if CAUSAL or D != D_PAD:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
    if KV_FP8:
        k_sc = _tile_scales(ks_ptr + ks_head, blk * ks_st0 + in_blk * ks_st1, nmask, CAUSAL)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * k_sc[None, :]
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if CAUSAL:
        s = tl.where((n[None, :] <= pos[:, None]) & nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
    if CAUSAL:  # a row may see no key yet (a split of the key range starting past its position)
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    else:
        m_ref = m_new
    alpha = tl.exp2(m - m_ref)
    p = tl.exp2(s * qk_scale - m_ref[:, None])
    l = l * alpha + tl.sum(p, 1)
    v_ptrs = vc_ptr + (blk * vc_st0 + in_blk * vc_st1 + v_head)[:, None] + d[None, :] * vc_st3
    if CAUSAL or D != D_PAD:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        v = tl.load(v_ptrs)
    if KV_FP8:
        v_sc = _tile_scales(vs_ptr + vs_head, blk * vs_st0 + in_blk * vs_st1, nmask, CAUSAL)
        pv = tl.dot((p * v_sc[None, :]).to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    acc = acc * alpha[:, None] + pv
    return acc, l, m_new


@triton.jit
def _split_len(seq_len, num_splits, BLOCK_N: tl.constexpr, MIN_TILES: tl.constexpr):
    """Keys per split of one request: its tiles shared evenly by the splits, >= MIN_TILES each."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits), MIN_TILES) * BLOCK_N


@triton.jit(do_not_specialize=["bt_st0", "o_st0", "o_st1", "lse_st0", "lse_st1", "num_splits"])
def _decode_split_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    seq_lens_ptr,
    bt_ptr,
    o_ptr,
    lse_ptr,
    out_ptr,
    ks_ptr,
    vs_ptr,
    pos_ptr,
    qr_ptr,
    kn_ptr,
    vn_ptr,
    cs_ptr,
    slot_ptr,
    qw_ptr,
    kw_ptr,
    cnt_ptr,
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
    ks_st0,
    ks_st1,
    ks_st2,
    vs_st0,
    vs_st1,
    vs_st2,
    qr_st0,
    qr_st1,
    qr_st2,
    kn_st0,
    kn_st1,
    kn_st2,
    vn_st0,
    vn_st1,
    vn_st2,
    cs_st0,
    cs_st1,
    eps,
    qk_scale,
    num_splits,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_TILES: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr,
    ROTARY: tl.constexpr,
    Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    MERGE: tl.constexpr,
    S_PAD: tl.constexpr,
    S_CHUNK: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    part = _split_len(seq_len, num_splits, BLOCK_N, MIN_TILES)
    start = split * part
    stop = tl.minimum(start + part, seq_len)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * G + g
    q_mask = (g < G)[:, None] & (d < D)[None, :]
    if ROTARY:
        # rotary_write_kv's work for this row's group, in front of the attention: every split rotates the
        # group's q (the same values) into q_ptr (the output buffer, read back below); the split that holds
        # the row's last position, seq_len - 1, stores this KV head's k and v at the row's slot and is the
        # only one to read that key. The barrier makes this program's stores visible to its own loads.
        cos, sin, c, cmask = cos_sin_row(pos_ptr, cs_ptr, b, cs_st0, cs_st1, HALF, HALF_PAD)
        gh = g[:, None]
        rotate_q_heads(
            qr_ptr + b.to(tl.int64) * qr_st0 + (kvh * G).to(tl.int64) * qr_st1,
            q_ptr + b.to(tl.int64) * q_st0 + (kvh * G).to(tl.int64) * q_st1,
            qr_st1, qr_st2, q_st1, gh, gh < G, qw_ptr, cos, sin, c, cmask, eps, HALF, Q_NORM,
        )  # fmt: skip
        if split == (seq_len - 1) // part:
            hk = kvh + tl.zeros([1, 1], tl.int32)
            write_token_kv(
                b.to(tl.int64), hk, hk >= 0, kn_ptr, vn_ptr, slot_ptr, kc_ptr, vc_ptr, kw_ptr, ks_ptr, vs_ptr,
                kn_st0, kn_st1, kn_st2, vn_st0, vn_st1, vn_st2, kc_st0, kc_st1, kc_st2, kc_st3, vc_st0, vc_st1,
                vc_st2, vc_st3, ks_st0, ks_st1, ks_st2, vs_st0, vs_st1, vs_st2, cos, sin, c, cmask, eps, BS, HALF,
                K_NORM, KV_FP8,
            )  # fmt: skip
        tl.debug_barrier()
    q = tl.load(q_ptr + b.to(tl.int64) * q_st0 + heads[:, None] * q_st1 + d[None, :] * q_st2, mask=q_mask, other=0.0)
    if not KV_FP8:  # an FP8 cache is read in q's dtype instead
        q = q.to(kc_ptr.dtype.element_ty)

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    pos = tl.zeros([G_PAD], tl.int32) + (stop - 1)  # the query is last: every key of the split is visible
    bt_row = bt_ptr + b.to(tl.int64) * bt_st0
    k_head = kvh.to(tl.int64) * kc_st2
    v_head = kvh.to(tl.int64) * vc_st2
    ks_head = kvh.to(tl.int64) * ks_st2
    vs_head = kvh.to(tl.int64) * vs_st2
    for n0 in range(start, stop, BLOCK_N):  # no iteration for a split past the context
        acc, l, m = _attend_tile(
            acc,
            l,
            m,
            q,
            kc_ptr,
            vc_ptr,
            bt_row,
            bt_st1,
            k_head,
            v_head,
            kc_st0,
            kc_st1,
            kc_st3,
            vc_st0,
            vc_st1,
            vc_st3,
            n0,
            pos,
            stop,
            qk_scale,
            ks_ptr,
            vs_ptr,
            ks_head,
            vs_head,
            ks_st0,
            ks_st1,
            vs_st0,
            vs_st1,
            BS,
            BLOCK_N,
            D,
            D_PAD,
            True,
            DOT_PREC,
            KV_FP8,
        )

    l_safe = tl.where(l > 0.0, l, 1.0)
    o = acc / l_safe[:, None]
    if SINGLE_SPLIT:
        tl.store(
            out_ptr + b.to(tl.int64) * out_st0 + heads[:, None] * out_st1 + d[None, :] * out_st2,
            o.to(out_ptr.dtype.element_ty),
            mask=q_mask,
        )
    else:
        live = start < seq_len
        base = b.to(tl.int64) * o_st0 + split * o_st2
        tl.store(o_ptr + base + heads[:, None] * o_st1 + d[None, :], o, mask=q_mask & live)
        tl.store(lse_ptr + b.to(tl.int64) * lse_st0 + heads * lse_st1 + split, m + tl.log2(l_safe), mask=(g < G) & live)
        if MERGE:
            # the last of the row's splits to finish merges them (no reduce launch): every thread's partial
            # stores precede the barrier, the counter's release and acquire order them before the merger's
            # loads (.cg: from L2, past this SM's L1), and the merger resets the counter for the next launch
            tl.debug_barrier()
            counter = cnt_ptr + b * tl.num_programs(1) + kvh
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
                merged = tl.minimum(tl.cdiv(seq_len, part), num_splits)  # splits that saw at least one key
                for j in tl.static_range(G):
                    h = (kvh * G + j).to(tl.int64)
                    _merge_head(
                        o_ptr + b.to(tl.int64) * o_st0 + h * o_st1, lse_ptr + b.to(tl.int64) * lse_st0 + h * lse_st1,
                        out_ptr + b.to(tl.int64) * out_st0 + h * out_st1, merged, o_st2, out_st2, D, D_PAD, S_PAD,
                        S_CHUNK, ".cg",
                    )  # fmt: skip


@triton.jit
def _merge_head(
    o_row, lse_row, out_row, live, o_st2, out_st2, D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
    S_CHUNK: tl.constexpr, CACHE: tl.constexpr,
):  # fmt: skip
    """One head's `live` split partials (o_row + s * o_st2: [D] float32, lse_row + s: log2-sum-exp) merged into
    out_row. S_CHUNK splits a step, loaded together, so that the merge waits ~live / S_CHUNK memory latencies,
    not live (b1 x 50K on an H100 has 66 splits). CACHE: the loads' cache modifier (".cg" where another program
    of this launch stored the partials)."""
    s = tl.arange(0, S_PAD)
    lse = tl.load(lse_row + s, mask=s < live, other=float("-inf"), cache_modifier=CACHE)
    top = tl.max(lse, 0)
    top = tl.where(top > float("-inf"), top, 0.0)
    denom = tl.sum(tl.exp2(lse - top), 0)
    c = tl.arange(0, S_CHUNK)
    d = tl.arange(0, D_PAD)
    acc = tl.zeros([S_CHUNK, D_PAD], tl.float32)
    for s0 in range(0, live, S_CHUNK):
        sc = s0 + c
        w = tl.exp2(tl.load(lse_row + sc, mask=sc < live, other=float("-inf"), cache_modifier=CACHE) - top)
        o_mask = (sc < live)[:, None] & (d < D)[None, :]
        acc += w[:, None] * tl.load(o_row + sc[:, None] * o_st2 + d[None, :], mask=o_mask, other=0.0,
                                    cache_modifier=CACHE)  # fmt: skip
    denom = tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_row + d * out_st2, (tl.sum(acc, 0) / denom).to(out_row.dtype.element_ty), mask=d < D)


@triton.jit(do_not_specialize=["o_st0", "o_st1", "lse_st0", "lse_st1", "num_splits"])
def _decode_reduce_kernel(
    o_ptr,
    lse_ptr,
    seq_lens_ptr,
    out_ptr,
    o_st0,
    o_st1,
    o_st2,
    lse_st0,
    lse_st1,
    out_st0,
    out_st1,
    out_st2,
    num_splits,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_TILES: tl.constexpr,
    S_CHUNK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    part = _split_len(seq_len, num_splits, BLOCK_N, MIN_TILES)
    live = tl.minimum(tl.cdiv(seq_len, part), num_splits)  # splits that saw at least one key
    _merge_head(
        o_ptr + b * o_st0 + h * o_st1, lse_ptr + b * lse_st0 + h * lse_st1, out_ptr + b * out_st0 + h * out_st1, live,
        o_st2, out_st2, D, D_PAD, S_PAD, S_CHUNK, "",
    )  # fmt: skip


def decode_splits(batch: int, kv_heads: int, max_context: int, sms: int, cfg: DecodeConfig) -> int:
    """The number of splits S of one launch.

    As many as keep batch * kv_heads * S within programs_per_sm programs per SM (rounded down: the
    programs past a wave run after it; rounded up, 4 x 50K on an H100 gave 544 programs where 4 an
    SM hold 528, the likely cause of the fused kernel's 1.155x step there, docs/perf.md), at most
    max_splits, and no more than a context of max_context keys can fill with splits of
    min_tiles_per_split tiles.
    """
    tiles = max(1, triton.cdiv(max_context, cfg.block_n))
    want = max(1, cfg.programs_per_sm * sms // max(1, batch * kv_heads))
    return max(1, min(want, cfg.max_splits, tiles // cfg.min_tiles_per_split))


def _compute_dtype(q: torch.Tensor, k_cache: torch.Tensor, k_scale, v_scale) -> tuple[bool, torch.dtype]:
    """(FP8 cache?, the dtype tiles are multiplied in: the cache's, or q's for an FP8 cache)."""
    fp8 = check_kv_scales(k_cache, k_scale, v_scale)
    return fp8, q.dtype if fp8 else k_cache.dtype


def _scale_args(k_cache: torch.Tensor, k_scale, v_scale) -> tuple:
    """k_scale, v_scale and their strides for a launch (the cache and zeros without them)."""
    if k_scale is None:
        return (k_cache, k_cache), (0, 0, 0, 0, 0, 0)
    return (k_scale, v_scale), (*k_scale.stride(), *v_scale.stride())


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    cfg: DecodeConfig | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged decode attention, same contract as torch_ops.decode_attention; `cfg` overrides the tiling."""
    batch, hq, d = q.shape
    _, bs, hk, _ = k_cache.shape
    fp8, compute = _compute_dtype(q, k_cache, k_scale, v_scale)
    cfg = cfg or decode_config(q.device, d, compute, fp8, hq // hk, batch * block_table.shape[1] * bs)
    if cfg.fma:
        from engine.kernels.triton.decode_fma import decode_attention_fma

        return decode_attention_fma(
            q,
            k_cache,
            v_cache,
            seq_lens,
            block_table,
            scale,
            k_scale=k_scale,
            v_scale=v_scale,
            block_n=cfg.block_n,
            num_warps=cfg.num_warps,
            programs_per_sm=cfg.programs_per_sm,
            num_stages=cfg.num_stages,
            min_tiles_per_split=cfg.min_tiles_per_split,
            max_splits=cfg.max_splits,
        )
    out = torch.empty_like(q)
    _decode(out, q, k_cache, v_cache, seq_lens, block_table, scale, cfg, k_scale, v_scale, fp8, compute, None)
    return out


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
    cfg: DecodeConfig | None = None,
) -> torch.Tensor:
    """rotary_write_kv then decode_attention (contract: torch_ops.composed_rotary_decode_attention) in the
    split-KV kernel: each program rotates its group's q, the program holding a row's last position stores
    that row's k and v (ROTARY in _decode_split_kernel). The CUDA-core FP8 kernel (cfg.fma) composes the two."""
    batch, hq, d = q.shape
    _, bs, hk, _ = k_cache.shape
    fp8, compute = _compute_dtype(q, k_cache, k_scale, v_scale)
    cfg = cfg or decode_config(q.device, d, compute, fp8, hq // hk, batch * block_table.shape[1] * bs)
    half = cos_sin.shape[1] // 2
    if cfg.fma or 2 * half != d:
        kv = {"k_scale": k_scale, "v_scale": v_scale}
        q = elementwise.rotary_write_kv(
            positions, q, k, v, cos_sin, k_cache, v_cache, slot_mapping, q_norm=q_norm, k_norm=k_norm, eps=eps, **kv
        )
        return decode_attention(q, k_cache, v_cache, seq_lens, block_table, scale, cfg, **kv)
    out = torch.empty((batch, hq, d), dtype=q.dtype, device=q.device)
    rotary = (positions, q, k, v, cos_sin, slot_mapping, q_norm, k_norm, eps)
    _decode(out, out, k_cache, v_cache, seq_lens, block_table, scale, cfg, k_scale, v_scale, fp8, compute, rotary)
    return out


# The last split of a row merges the row's splits in the decode kernel (MERGE in _decode_split_kernel), not a
# reduce launch after it. Off: on an H100 (2026-12-07, b88ad41) the 8B step with it was 1.6-5.2% slower than
# with the reduce kernel at b1 512 to b4 50K (the -attn variants of experiments.bench_engine and the GPU tests
# turn it on). Its arrival counters, one a (row, KV head), live in one zeroed buffer a device that the mergers
# reset: launches on one device must not overlap (the engine's forward passes run on one stream), and a launch
# that needs more counters than the buffer holds, or the first on a device while a CUDA graph is being captured
# (the buffer's zeroing would only be captured), runs the reduce kernel instead.
MERGE_IN_KERNEL = False
MERGE_COUNTERS = 1 << 16
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """The device's arrival counters (zeros between launches), or None where the kernel must not merge."""
    if not MERGE_IN_KERNEL or needed > MERGE_COUNTERS:
        return None
    counters = _COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS[device] = torch.zeros(MERGE_COUNTERS, dtype=torch.int32, device=device)
    return counters


def _decode(out, q, k_cache, v_cache, seq_lens, block_table, scale, cfg, k_scale, v_scale, fp8, compute, rotary):
    """One split-KV decode launch into `out` (and its reduce, unless the kernel merges): q is read from `q`,
    or, with `rotary` (positions, q, k, v, cos_sin, slot_mapping, q_norm, k_norm, eps), rotated into `out`
    by the kernel and k, v stored in the cache first; fp8, compute: the caller's _compute_dtype."""
    batch, hq, d = out.shape
    _, bs, hk, _ = k_cache.shape
    if batch == 0:
        return
    group = hq // hk
    max_context = block_table.shape[1] * bs  # bounds every seq_len: no host sync needed
    splits = decode_splits(batch, hk, max_context, num_sms(out.device), cfg)
    d_pad = max(16, triton.next_power_of_2(d))
    o, lse, o_strides, lse_strides = split_partials(out, splits)
    scales, scale_strides = _scale_args(k_cache, k_scale, v_scale)
    counters = split_counters(out.device, batch * hk) if splits > 1 else None
    if rotary is None:
        rot_ptrs, rot_strides, half, q_norm, k_norm, eps = (out,) * 8, (0,) * 11, 1, None, None, 0.0
    else:
        positions, q_in, k, v, cos_sin, slot_mapping, q_norm, k_norm, eps = rotary
        half = cos_sin.shape[1] // 2
        norms = tuple(w.contiguous() if w is not None else out for w in (q_norm, k_norm))
        rot_ptrs = (positions, q_in, k, v, cos_sin, slot_mapping, *norms)
        rot_strides = (*q_in.stride(), *k.stride(), *v.stride(), *cos_sin.stride())
    rot_ptrs = (*rot_ptrs, counters if counters is not None else out)
    _decode_split_kernel[(batch, hk, splits)](
        q,
        k_cache,
        v_cache,
        seq_lens,
        block_table,
        o,
        lse,
        out,
        *scales,
        *rot_ptrs,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *block_table.stride(),
        *o_strides,
        *lse_strides,
        *out.stride(),
        *scale_strides,
        *rot_strides,
        float(eps),
        scale * _LOG2E,
        splits,
        G=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        D=d,
        D_PAD=d_pad,
        BS=bs,
        BLOCK_N=cfg.block_n,
        MIN_TILES=cfg.min_tiles_per_split,
        SINGLE_SPLIT=splits == 1,
        DOT_PREC=_dot_precision(compute),
        KV_FP8=fp8,
        ROTARY=rotary is not None,
        Q_NORM=q_norm is not None,
        K_NORM=k_norm is not None,
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        MERGE=counters is not None,
        S_PAD=triton.next_power_of_2(splits) if counters is not None else 1,
        S_CHUNK=merge_chunk(splits) if counters is not None else 1,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}),
    )
    if counters is None:
        reduce_splits(o, lse, seq_lens, out, splits, cfg)


def merge_chunk(splits: int) -> int:
    """Split partials a merge step loads together (_merge_head): at most 16, a power of two."""
    return min(16, triton.next_power_of_2(max(1, splits)))


def split_partials(out: torch.Tensor, splits: int):
    """(o, lse, o's strides, lse's strides) a split-KV launch writes: float32 partials [T, H, S, D] and
    [T, H, S] with several splits; with one, the kernel writes `out` itself (placeholders, zero strides)."""
    if splits <= 1:
        return out, out, (0, 0, 0), (0, 0)
    t, h, d = out.shape
    o = torch.empty((t, h, splits, d), dtype=torch.float32, device=out.device)
    lse = torch.empty((t, h, splits), dtype=torch.float32, device=out.device)
    return o, lse, o.stride()[:3], lse.stride()[:2]


def reduce_splits(o, lse, seq_lens, out: torch.Tensor, splits: int, cfg: DecodeConfig) -> None:
    """A decode launch's split partials merged into `out` (nothing to do for one split); `cfg`'s tile and
    split rule are the launch's, so that the merge sees the splits it made."""
    if splits <= 1:
        return
    batch, hq, d = out.shape
    _decode_reduce_kernel[(batch, hq)](
        o,
        lse,
        seq_lens,
        out,
        *o.stride()[:3],
        *lse.stride()[:2],
        *out.stride(),
        splits,
        D=d,
        D_PAD=triton.next_power_of_2(d),
        S_PAD=triton.next_power_of_2(splits),
        BLOCK_N=cfg.block_n,
        MIN_TILES=cfg.min_tiles_per_split,
        S_CHUNK=merge_chunk(splits),
        num_warps=1 if d <= 64 else 2,
    )


@triton.jit
def _prefill_rows(
    q_ptr,
    qsl_ptr,
    seq_lens_ptr,
    tile_req_ptr,
    q_st0,
    q_st1,
    q_st2,
    num_tiles,
    num_splits,
    kvh,
    G: tl.constexpr,
    BQ: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """A prefill program's rows (see the module docstring), its q tile and its key range.

    Returns (request, token offsets of the rows, their heads, valid rows, q, positions, kv_end, full_end,
    lo, hi): keys [0, full_end) are visible to every row, [full_end, kv_end) need the causal mask, and this
    program (split program_id(2) of the key range with SPLIT) attends keys [lo, hi) in whole tiles.
    """
    tile = num_tiles - 1 - tl.program_id(0)  # the last (longest) tiles of a request start first
    req = tl.load(tile_req_ptr + tile)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
    ctx_start = seq_len - q_len  # position of the request's first query token
    tok0 = (tile - (q_start // BQ + req)) * BQ  # this tile's first query token, within the request

    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // G
    row_ok = (rows < BQ * G) & (tok < q_len)
    heads = kvh * G + rows % G
    d = tl.arange(0, D_PAD)
    q_mask = row_ok[:, None] & (d < D)[None, :]
    q_off = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_off[:, None] * q_st0 + heads[:, None] * q_st1 + d[None, :] * q_st2, mask=q_mask, other=0.0)
    pos = tl.where(row_ok, ctx_start + tok, seq_len - 1)  # padding rows see everything: stay finite

    first_pos = ctx_start + tok0
    kv_end = tl.where(tok0 < q_len, ctx_start + tl.minimum(tok0 + BQ, q_len), 0)
    full_end = tl.minimum(((first_pos + 1) // BLOCK_N) * BLOCK_N, kv_end)
    lo = 0
    hi = kv_end
    if SPLIT:  # this program's share of the key range: whole tiles
        part = tl.cdiv(tl.cdiv(kv_end, BLOCK_N), num_splits) * BLOCK_N
        lo = tl.minimum(tl.program_id(2) * part, kv_end)
        hi = tl.minimum(lo + part, kv_end)
    return req, q_off, heads, row_ok, q, pos, kv_end, full_end, lo, hi


@triton.jit
def _prefill_store(
    acc,
    l,
    m,
    out_ptr,
    o_ptr,
    lse_ptr,
    q_off,
    heads,
    row_ok,
    out_st0,
    out_st1,
    out_st2,
    o_st0,
    o_st1,
    o_st2,
    lse_st0,
    lse_st1,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """The rows' output, or with SPLIT their partial (o, lse) of split program_id(2) (a split past the keys
    leaves o = 0, lse = -inf)."""
    d = tl.arange(0, D_PAD)
    q_mask = row_ok[:, None] & (d < D)[None, :]
    l_safe = tl.where(l > 0.0, l, 1.0)
    o = acc / l_safe[:, None]
    if SPLIT:
        split = tl.program_id(2)
        base = q_off[:, None] * o_st0 + heads[:, None] * o_st1 + split * o_st2
        tl.store(o_ptr + base + d[None, :], o, mask=q_mask)
        tl.store(
            lse_ptr + q_off * lse_st0 + heads * lse_st1 + split,
            tl.where(l > 0.0, m + tl.log2(l_safe), float("-inf")),
            mask=row_ok,
        )
    else:
        tl.store(
            out_ptr + q_off[:, None] * out_st0 + heads[:, None] * out_st1 + d[None, :] * out_st2,
            o.to(out_ptr.dtype.element_ty),
            mask=q_mask,
        )


@triton.jit
def _attend_tile_desc(
    acc,
    l,
    m,
    q,
    k_desc,
    v_desc,
    row0,
    col,
    n0,
    pos,
    n_end,
    qk_scale,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """_attend_tile on contiguous K/V read through tensor descriptors (TMA on Hopper): the tile's keys are
    rows row0 + n0 .. row0 + n0 + BLOCK_N - 1, its head's columns start at col; they are loaded unmasked
    (rows past the context are zeros or another request's finite keys, masked out of the scores)."""
    k = k_desc.load([row0 + n0, col])
    s = tl.dot(q, tl.trans(k))
    if CAUSAL:
        n = n0 + tl.arange(0, BLOCK_N)
        s = tl.where((n[None, :] <= pos[:, None]) & (n < n_end)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    else:
        m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
        m_ref = m_new
    alpha = tl.exp2(m - m_ref)
    p = tl.exp2(s * qk_scale - m_ref[:, None])
    l = l * alpha + tl.sum(p, 1)
    v = v_desc.load([row0 + n0, col])
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l, m_new


@triton.jit(do_not_specialize=["row_stride", "num_tiles", "num_splits", "o_st0", "o_st1", "lse_st0", "lse_st1"])
def _prefill_gather_kernel(
    q_ptr,
    k_desc,
    v_desc,
    out_ptr,
    o_ptr,
    lse_ptr,
    qsl_ptr,
    tile_req_ptr,
    seq_lens_ptr,
    q_st0,
    q_st1,
    q_st2,
    out_st0,
    out_st1,
    out_st2,
    o_st0,
    o_st1,
    o_st2,
    lse_st0,
    lse_st1,
    row_stride,
    qk_scale,
    num_tiles,
    num_splits,
    G: tl.constexpr,
    BQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """_prefill_kernel over gathered_context's copies: request r's keys are rows r * row_stride + n of the
    descriptors' [rows, Hk * D] views, KV head kvh's columns kvh * D .. kvh * D + D - 1."""
    kvh = tl.program_id(1)
    req, q_off, heads, row_ok, q, pos, kv_end, full_end, lo, hi = _prefill_rows(
        q_ptr,
        qsl_ptr,
        seq_lens_ptr,
        tile_req_ptr,
        q_st0,
        q_st1,
        q_st2,
        num_tiles,
        num_splits,
        kvh,
        G,
        BQ,
        D,
        D,
        BLOCK_M,
        BLOCK_N,
        SPLIT,
    )
    q = q.to(k_desc.dtype)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    row0 = req.to(tl.int32) * row_stride
    col = kvh * D
    for n0 in tl.range(lo, tl.minimum(full_end, hi), BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        acc, l, m = _attend_tile_desc(
            acc, l, m, q, k_desc, v_desc, row0, col, n0, pos, kv_end, qk_scale, BLOCK_N, False
        )
    for n0 in tl.range(tl.maximum(full_end, lo), hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        acc, l, m = _attend_tile_desc(acc, l, m, q, k_desc, v_desc, row0, col, n0, pos, kv_end, qk_scale, BLOCK_N, True)
    _prefill_store(
        acc,
        l,
        m,
        out_ptr,
        o_ptr,
        lse_ptr,
        q_off,
        heads,
        row_ok,
        out_st0,
        out_st1,
        out_st2,
        o_st0,
        o_st1,
        o_st2,
        lse_st0,
        lse_st1,
        D,
        D,
        SPLIT,
    )


@triton.jit(do_not_specialize=["bt_st0", "num_tiles", "num_splits", "o_st0", "o_st1", "lse_st0", "lse_st1"])
def _prefill_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    out_ptr,
    o_ptr,
    lse_ptr,
    qsl_ptr,
    seq_lens_ptr,
    bt_ptr,
    tile_req_ptr,
    ks_ptr,
    vs_ptr,
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
    out_st0,
    out_st1,
    out_st2,
    bt_st0,
    bt_st1,
    o_st0,
    o_st1,
    o_st2,
    lse_st0,
    lse_st1,
    ks_st0,
    ks_st1,
    ks_st2,
    vs_st0,
    vs_st1,
    vs_st2,
    qk_scale,
    num_tiles,
    num_splits,
    G: tl.constexpr,
    BQ: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    kvh = tl.program_id(1)
    req, q_off, heads, row_ok, q, pos, kv_end, full_end, lo, hi = _prefill_rows(
        q_ptr,
        qsl_ptr,
        seq_lens_ptr,
        tile_req_ptr,
        q_st0,
        q_st1,
        q_st2,
        num_tiles,
        num_splits,
        kvh,
        G,
        BQ,
        D,
        D_PAD,
        BLOCK_M,
        BLOCK_N,
        SPLIT,
    )
    if not KV_FP8:  # an FP8 cache is read in q's dtype instead
        q = q.to(kc_ptr.dtype.element_ty)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = bt_ptr + req.to(tl.int64) * bt_st0
    k_head = kvh.to(tl.int64) * kc_st2
    v_head = kvh.to(tl.int64) * vc_st2
    ks_head = kvh.to(tl.int64) * ks_st2
    vs_head = kvh.to(tl.int64) * vs_st2
    for n0 in range(lo, tl.minimum(full_end, hi), BLOCK_N):
        acc, l, m = _attend_tile(
            acc,
            l,
            m,
            q,
            kc_ptr,
            vc_ptr,
            bt_row,
            bt_st1,
            k_head,
            v_head,
            kc_st0,
            kc_st1,
            kc_st3,
            vc_st0,
            vc_st1,
            vc_st3,
            n0,
            pos,
            kv_end,
            qk_scale,
            ks_ptr,
            vs_ptr,
            ks_head,
            vs_head,
            ks_st0,
            ks_st1,
            vs_st0,
            vs_st1,
            BS,
            BLOCK_N,
            D,
            D_PAD,
            False,
            DOT_PREC,
            KV_FP8,
        )
    for n0 in range(tl.maximum(full_end, lo), hi, BLOCK_N):
        acc, l, m = _attend_tile(
            acc,
            l,
            m,
            q,
            kc_ptr,
            vc_ptr,
            bt_row,
            bt_st1,
            k_head,
            v_head,
            kc_st0,
            kc_st1,
            kc_st3,
            vc_st0,
            vc_st1,
            vc_st3,
            n0,
            pos,
            kv_end,
            qk_scale,
            ks_ptr,
            vs_ptr,
            ks_head,
            vs_head,
            ks_st0,
            ks_st1,
            vs_st0,
            vs_st1,
            BS,
            BLOCK_N,
            D,
            D_PAD,
            True,
            DOT_PREC,
            KV_FP8,
        )

    _prefill_store(
        acc,
        l,
        m,
        out_ptr,
        o_ptr,
        lse_ptr,
        q_off,
        heads,
        row_ok,
        out_st0,
        out_st1,
        out_st2,
        o_st0,
        o_st1,
        o_st2,
        lse_st0,
        lse_st1,
        D,
        D_PAD,
        SPLIT,
    )


@triton.jit(do_not_specialize=["o_st0", "o_st1", "lse_st0", "lse_st1", "num_heads"])
def _merge_splits_kernel(
    o_ptr,
    lse_ptr,
    out_ptr,
    o_st0,
    o_st1,
    o_st2,
    lse_st0,
    lse_st1,
    out_st0,
    out_st1,
    out_st2,
    num_heads,
    S: tl.constexpr,
    S_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    H_BLOCK: tl.constexpr,
):
    """out[t, h] = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse): H_BLOCK heads of one token."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * H_BLOCK + tl.arange(0, H_BLOCK)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    hmask = h < num_heads
    lse = tl.load(
        lse_ptr + t * lse_st0 + h[:, None] * lse_st1 + s[None, :],
        mask=hmask[:, None] & (s < S)[None, :],
        other=float("-inf"),
    )
    top = tl.max(lse, 1)
    top = tl.where(top > float("-inf"), top, 0.0)
    w = tl.exp2(lse - top[:, None])  # [H_BLOCK, S_PAD]
    denom = tl.sum(w, 1)
    acc = tl.zeros([H_BLOCK, D_PAD], tl.float32)
    for i in tl.static_range(S):
        wi = tl.sum(tl.where(s[None, :] == i, w, 0.0), 1)
        oi = tl.load(
            o_ptr + t * o_st0 + h[:, None] * o_st1 + i * o_st2 + d[None, :],
            mask=hmask[:, None] & (d < D)[None, :],
            other=0.0,
        )
        acc += wi[:, None] * oi
    out = acc / tl.where(denom > 0.0, denom, 1.0)[:, None]
    tl.store(
        out_ptr + t * out_st0 + h[:, None] * out_st1 + d[None, :] * out_st2,
        out.to(out_ptr.dtype.element_ty),
        mask=hmask[:, None] & (d < D)[None, :],
    )


def prefill_splits(
    tokens: int, reqs: int, kv_heads: int, bq: int, max_context: int, sms: int, cfg: PrefillConfig
) -> int:
    """Key-range splits S of one prefill launch (1 = none), from host-known sizes only.

    A short query over a long cached prefix gives few (query tile, KV head) programs, each with a
    long key loop: fewer programs than SMs leaves SMs idle, and a few more than a whole number of
    waves leaves the last wave mostly idle. S splits every program's key range in S parts (merged
    by _merge_splits_kernel). S is the smallest that fills `cfg.split_waves` waves or wastes at
    most 1/8 of the last one, and no more than the widest context can give `cfg.min_split_keys`
    keys a split; a long prompt (many programs) gets S = 1.
    """
    if cfg.max_splits <= 1:
        return 1
    programs = max(1, (tokens // bq + reqs) * kv_heads)
    best = 1
    limit = max(1, min(cfg.max_splits, max_context // max(1, cfg.min_split_keys)))
    for s in range(1, limit + 1):
        n = programs * s
        waves = -(-n // sms)
        best = s
        if waves >= cfg.split_waves * 4 or (waves >= cfg.split_waves and n / (waves * sms) >= 7 / 8):
            break
    return best


# An FP8 cache's prefill reads its context through a 16-bit copy when the copy takes at most this many bytes
# (K and V of every block the launch's block table names): the copy holds the dequantized values (FP8 value
# x scale, rounded to nearest in the 16-bit dtype: the precision a 16-bit cache would have had), and the
# 16-bit kernel runs on it, with its tiles going to the tensor cores (wgmma on Hopper) from shared memory.
# The FP8-reading kernel widens its tiles in registers on the way and multiplies the scales in, which costs
# it wgmma and registers: on an H100 it made a 1,300-token turn on 55K cached tokens 2.07x slower than bf16
# (docs/perf.md). The copy costs one read of the FP8 context and one write of the copy a layer. Above the
# limit (many requests with long contexts in one launch) the FP8 tiles are read directly.
FP8_PREFILL_COPY_BYTES = 512 << 20

# PrefillConfig.gather reads the context through contiguous copies (gathered_context) when they take at most
# this many bytes: tiles of consecutive keys can then be loaded by tensor descriptors (TMA on Hopper) straight
# into shared memory for the tensor cores, instead of each key's address being gathered through the block
# table. The copy costs one read and one write of the context a layer.
PREFILL_GATHER_BYTES = 512 << 20


@triton.jit
def _dequant_rows(c_ptr, s_ptr, t, d, c_st1, c_st3, s_st1, mask, live, dtype: tl.constexpr, SCALED: tl.constexpr):
    """One block's rows t of one head: FP8 values x their scales (SCALED) or the values as they are, rounded to
    `dtype` (0 where masked)."""
    x = tl.load(c_ptr + t[:, None] * c_st1 + d[None, :] * c_st3, mask=mask, other=0.0)
    if SCALED:
        scale = tl.load(s_ptr + t * s_st1, mask=live, other=0.0)
        return (x.to(tl.float32) * scale[:, None]).to(dtype)
    return x.to(dtype)


@triton.jit(do_not_specialize=["bt_st0", "W"])
def _dequant_blocks_kernel(
    kc_ptr,
    vc_ptr,
    ks_ptr,
    vs_ptr,
    bt_ptr,
    seq_lens_ptr,
    ko_ptr,
    vo_ptr,
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
    ko_st0,
    ko_st1,
    ko_st2,
    W,
    BS: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    SCALED: tl.constexpr,
    ZERO_TO: tl.constexpr,
):
    """Block j of request r (program r * W + j), KV head h: its K and V (FP8 ones times their scales: SCALED),
    rounded to nearest in the copies' dtype, into block r * W + j of the copies; slots past the request's
    length get zeros, and so do the blocks wholly past it up to its length rounded up to ZERO_TO keys (at
    least ZERO_TO; 0: none), the keys a tile of ZERO_TO keys may read. Later blocks are left unwritten."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    r = pid // W
    j = pid % W
    seq = tl.load(seq_lens_ptr + r)
    if ZERO_TO > 0 and j * BS >= seq and j * BS < tl.maximum(tl.cdiv(seq, ZERO_TO), 1) * ZERO_TO:
        t = tl.arange(0, BS)
        d = tl.arange(0, D_PAD)
        out = pid.to(tl.int64) * ko_st0 + t[:, None] * ko_st1 + h * ko_st2 + d[None, :]
        zero = tl.zeros([BS, D_PAD], ko_ptr.dtype.element_ty)
        tl.store(ko_ptr + out, zero, mask=(d < D)[None, :])
        tl.store(vo_ptr + out, zero, mask=(d < D)[None, :])
    if j * BS < seq:
        src = tl.load(bt_ptr + r * bt_st0 + j * bt_st1).to(tl.int64)
        t = tl.arange(0, BS)
        d = tl.arange(0, D_PAD)
        live = (j * BS + t) < seq
        mask = live[:, None] & (d < D)[None, :]
        dst = ko_ptr.dtype.element_ty  # the copies' dtype
        out = pid.to(tl.int64) * ko_st0 + t[:, None] * ko_st1 + h * ko_st2 + d[None, :]
        tl.store(
            ko_ptr + out,
            _dequant_rows(
                kc_ptr + src * kc_st0 + h * kc_st2,
                ks_ptr + src * ks_st0 + h * ks_st2,
                t,
                d,
                kc_st1,
                kc_st3,
                ks_st1,
                mask,
                live,
                dst,
                SCALED,
            ),
            mask=(d < D)[None, :],
        )
        tl.store(
            vo_ptr + out,
            _dequant_rows(
                vc_ptr + src * vc_st0 + h * vc_st2,
                vs_ptr + src * vs_st0 + h * vs_st2,
                t,
                d,
                vc_st1,
                vc_st3,
                vs_st1,
                mask,
                live,
                dst,
                SCALED,
            ),
            mask=(d < D)[None, :],
        )


def dequantized_context(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    dtype: torch.dtype,
    zero_to: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k, v, block_table): `dtype` copies of the FP8 blocks a prefill reads, dequantized; request r's block j
    is block r * W + j of the copies (W = block_table's width). No host sync. zero_to: see gathered_context."""
    return _copy_context(k_cache, v_cache, k_scale, v_scale, seq_lens, block_table, dtype, zero_to)


def gathered_context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, zero_to: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k, v, block_table): copies of the blocks a prefill reads, in order, so that request r's keys are rows
    [r * W * BS, r * W * BS + seq_len) of the copies seen as [rows, Hk * D] (W = block_table's width). The
    slots past a request's length are zero up to its length rounded up to `zero_to` keys (at least `zero_to`),
    so a tile of `zero_to` keys that reads past a context, into its own rows or the next request's first
    ones, multiplies zeros or finite keys. No host sync."""
    return _copy_context(k_cache, v_cache, None, None, seq_lens, block_table, k_cache.dtype, zero_to)


def _copy_context(k_cache, v_cache, k_scale, v_scale, seq_lens, block_table, dtype, zero_to):
    reqs, width = block_table.shape
    _, bs, hk, d = k_cache.shape
    k_out = torch.empty((reqs * width, bs, hk, d), dtype=dtype, device=k_cache.device)
    v_out = torch.empty_like(k_out)
    table = torch.arange(reqs * width, dtype=torch.int32, device=k_cache.device).view(reqs, width)
    scaled = k_scale is not None
    if not scaled:
        k_scale = v_scale = k_cache.new_empty((1, 1, 1), dtype=torch.float32)
    if reqs * width:
        _dequant_blocks_kernel[(reqs * width, hk)](
            k_cache,
            v_cache,
            k_scale,
            v_scale,
            block_table,
            seq_lens,
            k_out,
            v_out,
            *k_cache.stride(),
            *v_cache.stride(),
            *k_scale.stride(),
            *v_scale.stride(),
            *block_table.stride(),
            *k_out.stride()[:3],
            width,
            BS=bs,
            D=d,
            D_PAD=max(16, triton.next_power_of_2(d)),
            SCALED=scaled,
            ZERO_TO=zero_to,
            num_warps=4,
        )
    return k_out, v_out, table


def prefill_copy_limit(device: torch.device, head_dim: int, dtype: torch.dtype, kv_fp8: bool) -> int:
    """The most bytes prefill_attention's default path copies a context into (0: it reads the cache itself):
    an FP8 cache's dequantized copy, or a 16-bit cache's gathered one where the gathered kernel is the default.
    `dtype` is the model's (q's)."""
    if kv_fp8:
        return FP8_PREFILL_COPY_BYTES
    gather = prefill_config(device, head_dim, dtype).gather and dtype in (torch.bfloat16, torch.float16)
    return PREFILL_GATHER_BYTES if gather and head_dim == triton.next_power_of_2(head_dim) else 0


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    cfg: PrefillConfig | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    cached_prefix: int | None = None,
) -> torch.Tensor:
    """Paged causal prefill attention, same contract as torch_ops.prefill_attention. Without `cfg`, one request's
    long chunk whose cached prefix the caller states (`cached_prefix`) goes to cuDNN where it runs
    (engine.kernels.cudnn_prompt)."""
    tokens, hq, d = q.shape
    _, bs, hk, _ = k_cache.shape
    group = hq // hk
    reqs = seq_lens.shape[0]
    fp8, compute = _compute_dtype(q, k_cache, k_scale, v_scale)
    if cfg is None and cudnn_prompt.eligible(q, hk, bs, reqs, compute, cached_prefix):

        def copy_context(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
            # zero past the chunk up to a multiple of PAD past the prefix (a multiple of PAD): `rows` itself;
            # a constant, not `rows`, so the copy kernel compiles once, not for every length
            width = max(-(-rows // bs), block_table.shape[1])
            table = torch.nn.functional.pad(block_table, (0, width - block_table.shape[1]))
            k, v, _ = _copy_context(k_cache, v_cache, k_scale, v_scale, seq_lens, table, compute, cudnn_prompt.PAD)
            return k.view(-1, hk, d)[:rows], v.view(-1, hk, d)[:rows]

        out = cudnn_prompt.prompt_attention(q, copy_context, scale, cached_prefix)
        if out is not None:
            return out
    copy_bytes = 2 * block_table.numel() * bs * hk * d * torch.finfo(compute).bits // 8
    some = bool(tokens and reqs)
    copy = fp8 and some and copy_bytes <= FP8_PREFILL_COPY_BYTES and (cfg is None or cfg.gather)
    given = cfg
    cfg = cfg or prefill_config(q.device, d, compute, fp8 and not copy)
    gather = (
        cfg.gather
        and some
        and (copy or not fp8)
        and compute in (torch.bfloat16, torch.float16)
        and copy_bytes <= PREFILL_GATHER_BYTES
        and d >= 16
        and d == triton.next_power_of_2(d)
    )
    if given is None and cfg.gather and not gather:  # the paged kernel's own tiles, not the gather kernel's
        cfg = prefill_config(q.device, d, compute, fp8 and not copy, gather=False)
    zero_to = cfg.block_n if gather else 0
    if copy:
        k_cache, v_cache, block_table = dequantized_context(
            k_cache, v_cache, k_scale, v_scale, seq_lens, block_table, compute, zero_to
        )
        fp8, k_scale, v_scale = False, None, None
    elif gather:
        k_cache, v_cache, block_table = gathered_context(k_cache, v_cache, seq_lens, block_table, zero_to)
    out = torch.empty_like(q)
    if tokens == 0 or reqs == 0:
        return out
    block_m = max(cfg.block_m, triton.next_power_of_2(group))
    bq = block_m // group
    # tile t belongs to the last request r with first_tile[r] <= t, first_tile[r] = start_r // BQ + r:
    # an upper bound on each request's tile count that needs no host sync
    qsl = query_start_loc.to(torch.int32)
    first_tile = qsl[:reqs] // bq + torch.arange(reqs, dtype=torch.int32, device=q.device)
    num_tiles = tokens // bq + reqs
    tiles = torch.arange(num_tiles, dtype=torch.int32, device=q.device)
    tile_req = torch.searchsorted(first_tile, tiles, right=True, out_int32=True) - 1
    splits = prefill_splits(tokens, reqs, hk, bq, block_table.shape[1] * bs, num_sms(q.device), cfg)
    d_pad = max(16, triton.next_power_of_2(d))
    o, lse, o_strides, lse_strides = split_partials(out, splits)
    if gather:
        rows = k_cache.shape[0] * bs
        k_desc, v_desc = (
            TensorDescriptor(
                c.view(rows, hk * d), shape=[rows, hk * d], strides=[hk * d, 1], block_shape=[cfg.block_n, d]
            )
            for c in (k_cache, v_cache)
        )
        _prefill_gather_kernel[(num_tiles, hk, splits)](
            q,
            k_desc,
            v_desc,
            out,
            o,
            lse,
            qsl,
            tile_req,
            seq_lens,
            *q.stride(),
            *out.stride(),
            *o_strides,
            *lse_strides,
            block_table.shape[1] * bs,
            scale * _LOG2E,
            num_tiles,
            splits,
            G=group,
            BQ=bq,
            D=d,
            BLOCK_M=block_m,
            BLOCK_N=cfg.block_n,
            SPLIT=splits > 1,
            WARP_SPECIALIZE=cfg.warp_specialize,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        _merge(o, lse, out, splits, d_pad)
        return out
    scales, scale_strides = _scale_args(k_cache, k_scale, v_scale)
    _prefill_kernel[(num_tiles, hk, splits)](
        q,
        k_cache,
        v_cache,
        out,
        o,
        lse,
        qsl,
        seq_lens,
        block_table,
        tile_req,
        *scales,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *out.stride(),
        *block_table.stride(),
        *o_strides,
        *lse_strides,
        *scale_strides,
        scale * _LOG2E,
        num_tiles,
        splits,
        G=group,
        BQ=bq,
        D=d,
        D_PAD=d_pad,
        BS=bs,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        SPLIT=splits > 1,
        DOT_PREC=_dot_precision(compute),
        KV_FP8=fp8,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    _merge(o, lse, out, splits, d_pad)
    return out


def _merge(o: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, splits: int, d_pad: int) -> None:
    """out from the splits' partial (o, lse) (nothing to do for one split)."""
    if splits <= 1:
        return
    tokens, hq, d = out.shape
    h_block = min(triton.next_power_of_2(hq), 8)
    _merge_splits_kernel[(tokens, triton.cdiv(hq, h_block))](
        o,
        lse,
        out,
        *o.stride()[:3],
        *lse.stride()[:2],
        *out.stride(),
        hq,
        S=splits,
        S_PAD=triton.next_power_of_2(splits),
        D=d,
        D_PAD=d_pad,
        H_BLOCK=h_block,
        num_warps=4,
    )


__all__ = [
    "DecodeConfig",
    "FP8_PREFILL_COPY_BYTES",
    "PrefillConfig",
    "decode_attention",
    "decode_splits",
    "dequantized_context",
    "gathered_context",
    "prefill_attention",
    "prefill_copy_limit",
    "prefill_splits",
    "reduce_splits",
    "split_partials",
]
