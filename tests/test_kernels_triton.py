"""The triton backend against the torch reference (engine/kernels/torch_ops.py), op by op.

On CPU the kernels can only run under the Triton interpreter, which `@triton.jit` picks when
TRITON_INTERPRET=1 is already set as the kernels are decorated; in a whole-suite run
triton_ops may have been imported before this file. So the CPU tests run every case of CASES
once, in a fresh interpreter subprocess (this file run as a script), and each pytest item
reports one case. On CUDA (@pytest.mark.gpu) the same cases run in-process with the GPU tile
configurations, plus long-context checks at real sizes in bf16.

The fused rotary_write_kv is checked bit for bit against the triton ops it fuses (rotary_embedding
then write_kv), and through a tiny model's prefill and decode steps (tests/model_steps.py).

Every case draws fresh inputs from its own seed: ragged seq_lens that are not multiples of
the block size, block tables that are random permutations padded with -1, GQA groups of
1/3/4, head dims 64/128. Cache slots that hold no live token are poisoned with NaN before
the triton kernel runs (the reference reads the clean caches), so a kernel that reads past a
request's context fails loudly.

FP8 KV caches (kv_fp8=True; docs/fp8.md): the writes must store the reference's bytes and scales
exactly (torch_ops.quantize_fp8), and the attention kernels read the same FP8 caches as the
reference does, so they are held to q's dtype's tolerance (the poison is an FP8 NaN and a NaN
scale).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 600

# |triton - torch| <= atol * max|torch| + rtol * |torch|: scaled by the output's peak, since an
# attention output over long random contexts is small everywhere
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),  # the interpreter truncates to bf16: one ulp is 2^-7
}

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FP8 = torch.float8_e4m3fn


def _ops():
    from engine.kernels import torch_ops, triton_ops

    return triton_ops, torch_ops


def _rng(device: str, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _randn(shape, gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, device=gen.device) * scale).to(dtype)


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape)
    assert not got.isnan().any(), f"{what}: NaN in the triton output"
    atol, rtol = TOL[dtype]
    peak = float(want.float().abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(
        got.float(), want.float(), atol=atol * max(peak, 1e-3), rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def _agreed_steps(
    got_tokens: list[list[int]], want_tokens: list[list[int]], want_logits: list[torch.Tensor], dtype: torch.dtype
) -> int:
    """How many steps two greedy runs of a tiny random model share: their tokens must agree, except where the
    reference's two candidates were within the dtype's rounding of each other (a near-tie either run may break;
    a random model's logits are flat). After such a step the runs feed different tokens, so the caller
    compares logits up to and including it only."""
    atol, rtol = TOL[dtype]
    for step in range(len(want_logits)):
        differ = [q for q, (g, w) in enumerate(zip(got_tokens, want_tokens)) if g[step] != w[step]]
        for q in differ:
            row = want_logits[step][q].float()
            pair = row[[want_tokens[q][step], got_tokens[q][step]]]
            gap = float(pair[0] - pair[1])
            # each run's logit may be off by _assert_close's tolerance: atol * peak + rtol * |logit|
            tol = 2 * (atol * max(float(row.abs().max()), 1e-3) + rtol * float(pair.abs().max()))
            assert gap <= tol, f"step {step}, row {q}: another token with a logit gap {gap:.4g} > {tol:.4g}"
        if differ:
            return step + 1
    return len(want_logits)


# ---------------------------------------------------------------- elementwise cases


def check_rms_norm(device: str, seed: int, dtype: torch.dtype, tokens: int, hidden: int) -> None:
    triton_ops, torch_ops = _ops()
    gen = _rng(device, seed)
    x = _randn((tokens, hidden + 5), gen, dtype, 3.0)[:, :hidden]  # row stride != hidden
    w = _randn((hidden,), gen, dtype)
    _assert_close(triton_ops.rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6), dtype, "rms_norm")


def check_add_rms_norm(
    device: str, seed: int, dtype: torch.dtype, residual_dtype: torch.dtype, tokens: int, hidden: int
) -> None:
    triton_ops, torch_ops = _ops()
    gen = _rng(device, seed)
    x, r = _randn((tokens, hidden), gen, dtype), _randn((tokens, hidden), gen, residual_dtype, 2.0)
    w = _randn((hidden,), gen, F32)
    got, want = triton_ops.add_rms_norm(x, r, w, 1e-5), torch_ops.add_rms_norm(x, r, w, 1e-5)
    _assert_close(got[1], want[1], dtype, "add_rms_norm sum")
    _assert_close(got[0], want[0], dtype, "add_rms_norm norm")


def _cos_sin(max_pos: int, d: int, device: str) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device, dtype=F32) / d))
    freqs = torch.arange(max_pos, device=device, dtype=F32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def check_rotary(device: str, seed: int, dtype: torch.dtype, tokens: int, hq: int, hk: int, d: int) -> None:
    triton_ops, torch_ops = _ops()
    gen = _rng(device, seed)
    qkv = _randn((tokens, (hq + 2 * hk) * d), gen, dtype)  # q and k as views of a fused projection
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    cos_sin = _cos_sin(512, d, device)
    positions = torch.randint(0, 512, (tokens,), generator=gen, device=device)
    got = triton_ops.rotary_embedding(positions, q, k, cos_sin)
    want = torch_ops.rotary_embedding(positions, q, k, cos_sin)
    _assert_close(got[0], want[0], dtype, "rotary q")
    _assert_close(got[1], want[1], dtype, "rotary k")


def check_silu_and_mul(device: str, seed: int, dtype: torch.dtype, tokens: int, f: int) -> None:
    triton_ops, torch_ops = _ops()
    x = _randn((tokens, 2 * f), _rng(device, seed), dtype, 2.0)
    _assert_close(triton_ops.silu_and_mul(x), torch_ops.silu_and_mul(x), dtype, "silu_and_mul")


def check_linear(
    device: str,
    seed: int,
    dtype: torch.dtype,
    n: int,
    k: int,
    prologue: str,
    rows: int = 1,
    residual: bool = False,
    fp8: bool = False,
    bias: bool = False,
    config: dict | None = None,
) -> None:
    """The `linear` op (one row: the fused GEMV, gemv.py) against the torch reference's composition; the
    new residual stream of the norm prologue bit for bit."""
    from engine import quant
    from engine.kernels.triton import gemv

    triton_ops, torch_ops = _ops()
    gen = _rng(device, seed)
    x = _randn((rows, 2 * k if prologue == "silu" else k), gen, dtype, 2.0)
    weight = _randn((n, k), gen, dtype, k**-0.5)
    scale = None
    if fp8:
        weight, scale = quant.quantize_fp8_per_channel(weight.float())
    kw = dict(prologue=prologue, eps=1e-5)
    if prologue == "norm":
        kw["norm_weight"] = (1 + 0.2 * torch.randn(k, generator=gen, device=device)).to(dtype)
        kw["residual"] = _randn((rows, k), gen, dtype) if residual else None
    b = _randn((n,), gen, dtype) if bias else None
    assert triton_ops.use_gemv(x, weight, prologue) == (rows == 1)
    if config is not None:
        assert rows == 1
        got = gemv.gemv(x, weight, b, scale, config=config, **kw)
    else:
        got = triton_ops.linear(x, weight, b, scale, **kw)
    want = torch_ops.linear(x, weight, b, scale, **kw)
    what = f"linear {prologue} {n}x{k} rows={rows} fp8={fp8}"
    if prologue == "norm":
        (got, got_res), (want, want_res) = got, want
        assert torch.equal(got_res, want_res), f"{what}: the new residual stream differs"
    _assert_close(got, want, dtype, what)


def check_write_kv(
    device: str, seed: int, src_dtype: torch.dtype, cache_dtype: torch.dtype, tokens: int, hk: int, d: int, bs: int
) -> None:
    triton_ops, torch_ops = _ops()
    gen = _rng(device, seed)
    num_blocks = tokens // bs + 3
    k, v = _randn((tokens, hk, d), gen, src_dtype), _randn((tokens, hk, d), gen, src_dtype)
    slots = torch.randperm(num_blocks * bs, generator=gen, device=device)[:tokens]
    slots[::3] = -1  # padding tokens: must not be written
    k_cache = torch.full((num_blocks, bs, hk, d), float("nan"), dtype=cache_dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    got_k, got_v, want_k, want_v = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    assert triton_ops.write_kv(k, v, got_k, got_v, slots) is None
    torch_ops.write_kv(k, v, want_k, want_v, slots)
    atol, rtol = (0.0, 0.0) if src_dtype == cache_dtype else TOL[cache_dtype]
    for got, want in ((got_k, want_k), (got_v, want_v)):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True)


def _fp8_caches(num_blocks: int, bs: int, hk: int, d: int, device: str) -> list[torch.Tensor]:
    """k, v FP8 caches and their scales, every byte and scale NaN (so unwritten slots show)."""
    cache = torch.full((num_blocks, bs, hk, d), 0x7F, dtype=torch.uint8, device=device).view(FP8)  # e4m3fn NaN
    scale = torch.full((num_blocks, bs, hk), float("nan"), device=device)
    return [cache, cache.clone(), scale, scale.clone()]


def _assert_same_fp8(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    """FP8 caches and scales bit for bit (NaN where nothing was written)."""
    for a, b in zip(got, want):
        if a.dtype == FP8:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{what}: FP8 bytes differ"
        else:
            torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{what} scales: {m}")


def check_write_kv_fp8(device: str, seed: int, src_dtype: torch.dtype, tokens: int, hk: int, d: int, bs: int) -> None:
    """Quantizing writes: the reference's FP8 bytes and scales exactly (an all-zero head included)."""
    triton_ops, torch_ops = _ops()
    gen = _rng(device, seed)
    num_blocks = tokens // bs + 3
    k, v = _randn((tokens, hk, d), gen, src_dtype, 5.0), _randn((tokens, hk, d), gen, src_dtype)
    k[0, 0] = 0.0  # scale 1, zeros stored
    v[1] *= 1e-3
    slots = torch.randperm(num_blocks * bs, generator=gen, device=device)[:tokens]
    slots[2::3] = -1
    got, want = _fp8_caches(num_blocks, bs, hk, d, device), _fp8_caches(num_blocks, bs, hk, d, device)
    assert triton_ops.write_kv(k, v, got[0], got[1], slots, *got[2:]) is None
    torch_ops.write_kv(k, v, want[0], want[1], slots, *want[2:])
    _assert_same_fp8(got, want, "write_kv fp8")
    assert float(want[2].view(-1, hk)[slots[0], 0]) == 1.0  # the all-zero head
    assert bool((want[2].view(-1, hk)[slots[slots >= 0].long()] > 0).all())


def _assert_cache_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Caches poisoned with NaN: the same slots written, the written values close."""
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: other slots written"
    live = ~want.isnan()
    _assert_close(got[live], want[live], dtype, what)


def check_rotary_write_kv_fp8(
    device: str,
    seed: int,
    dtype: torch.dtype,
    tokens: int,
    hq: int,
    hk: int,
    d: int,
    bs: int,
    q_norm: bool = False,
    k_norm: bool = False,
) -> None:
    """Into FP8 caches: the fused op's bytes and scales are the reference's, and those of the triton ops it fuses."""
    triton_ops, torch_ops = _ops()
    gen = _rng(device, seed)
    qkv = _randn((tokens, (hq + 2 * hk) * d), gen, dtype, 2.0)
    q, k, v = (t.view(tokens, -1, d) for t in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    cos_sin = _cos_sin(512, d, device)
    positions = torch.randint(0, 512, (tokens,), generator=gen, device=device)
    num_blocks = tokens // bs + 3
    slots = torch.randperm(num_blocks * bs, generator=gen, device=device)[:tokens]
    slots[1::3] = -1
    qw = (1.0 + 0.3 * _randn((d,), gen, F32)).to(dtype) if q_norm else None
    kw = (1.0 + 0.3 * _randn((d,), gen, F32)).to(dtype) if k_norm else None
    caches = {name: _fp8_caches(num_blocks, bs, hk, d, device) for name in ("fused", "composed", "reference")}
    fused, comp, ref = caches["fused"], caches["composed"], caches["reference"]
    q_fused = triton_ops.rotary_write_kv(
        positions, q, k, v, cos_sin, fused[0], fused[1], slots, q_norm=qw, k_norm=kw, k_scale=fused[2], v_scale=fused[3]
    )
    q_ref = torch_ops.rotary_write_kv(
        positions, q, k, v, cos_sin, ref[0], ref[1], slots, q_norm=qw, k_norm=kw, k_scale=ref[2], v_scale=ref[3]
    )
    _assert_close(q_fused, q_ref, dtype, "rotary_write_kv fp8 q")
    norms = q_norm or k_norm
    if not norms:  # the roundings of rotary_embedding then write_kv: the same bits
        _, k_rot = triton_ops.rotary_embedding(positions, q, k, cos_sin)
        triton_ops.write_kv(k_rot, v, comp[0], comp[1], slots, comp[2], comp[3])
        _assert_same_fp8(fused, comp, "rotary_write_kv fp8 vs rotary_embedding + write_kv")
    if dtype == F32 and not norms and device == "cpu":
        _assert_same_fp8(fused, ref, "rotary_write_kv fp8 vs the reference")
    else:  # k rounded to a 16-bit dtype (the interpreter truncates), normed in another order, or rotated with
        # the GPU compiler's fused multiply-adds (torch rounds the product first): an ulp apart
        _assert_fp8_near(fused, ref, dtype, "rotary_write_kv fp8 vs the reference")


def _assert_fp8_near(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype, what: str) -> None:
    """FP8 caches whose inputs were an ulp of `dtype` apart: the same slots written, most codes equal,
    and the dequantized values within one FP8 step (2^-3 relative) plus TOL of the peak (a rotated
    element that cancels to near zero keeps its input's absolute error); the scales within an ulp."""
    from engine.kernels.torch_ops import dequantize_fp8

    for a, b in zip(got[:2], want[:2]):
        assert torch.equal(a.view(torch.uint8) == 0x7F, b.view(torch.uint8) == 0x7F), f"{what}: other slots written"
        assert float((a.view(torch.uint8) != b.view(torch.uint8)).float().mean()) < 0.05, f"{what}: many codes differ"
    ulp = torch.finfo(dtype).eps
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a, b, atol=0, rtol=ulp, equal_nan=True, msg=lambda m: f"{what} scales: {m}")
    for name, (a, sa), (b, sb) in (("k", got[::2], want[::2]), ("v", got[1::2], want[1::2])):
        live = ~sb.isnan()
        da, db = dequantize_fp8(a, sa)[live], dequantize_fp8(b, sb)[live]
        peak = float(db.abs().max()) if db.numel() else 1.0
        torch.testing.assert_close(
            da,
            db,
            atol=TOL[dtype][0] * peak,
            rtol=2.0**-3,
            msg=lambda m, name=name: f"{what} {name} (dequantized): {m}",
        )


def check_rotary_write_kv(
    device: str,
    seed: int,
    dtype: torch.dtype,
    tokens: int,
    hq: int,
    hk: int,
    d: int,
    bs: int,
    cache_dtype: torch.dtype | None = None,
    q_norm: bool = False,
    k_norm: bool = False,
) -> None:
    """The fused op against the triton ops it fuses (bit for bit) and the torch reference (TOL)."""
    triton_ops, torch_ops = _ops()
    gen = _rng(device, seed)
    cache_dtype = cache_dtype or dtype
    qkv = _randn((tokens, (hq + 2 * hk) * d), gen, dtype, 2.0)  # q, k, v: strided views, as in the model
    q, k, v = (t.view(tokens, -1, d) for t in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    cos_sin = _cos_sin(512, d, device)
    positions = torch.randint(0, 512, (tokens,), generator=gen, device=device)
    num_blocks = tokens // bs + 3
    slots = torch.randperm(num_blocks * bs, generator=gen, device=device)[:tokens]
    slots[1::3] = -1  # padding tokens: k/v not written, q still rotated
    qw = (1.0 + 0.3 * _randn((d,), gen, F32)).to(dtype) if q_norm else None
    kw = (1.0 + 0.3 * _randn((d,), gen, F32)).to(dtype) if k_norm else None
    eps = 1e-6
    empty = torch.full((num_blocks, bs, hk, d), float("nan"), dtype=cache_dtype, device=device)
    caches = {name: (empty.clone(), empty.clone()) for name in ("fused", "composed", "reference")}

    q_fused = triton_ops.rotary_write_kv(
        positions, q, k, v, cos_sin, *caches["fused"], slots, q_norm=qw, k_norm=kw, eps=eps
    )
    qn = triton_ops.rms_norm(q, qw, eps) if q_norm else q
    kn = triton_ops.rms_norm(k, kw, eps) if k_norm else k
    q_comp, k_comp = triton_ops.rotary_embedding(positions, qn, kn, cos_sin)
    triton_ops.write_kv(k_comp, v, *caches["composed"], slots)
    q_ref = torch_ops.rotary_write_kv(
        positions, q, k, v, cos_sin, *caches["reference"], slots, q_norm=qw, k_norm=kw, eps=eps
    )

    assert q_fused.shape == (tokens, hq, d) and q_fused.is_contiguous()
    if not (q_norm or k_norm):
        # the same roundings in the same order as rotary_embedding then write_kv: identical bits
        assert torch.equal(q_fused, q_comp), "rotary_write_kv q differs from rotary_embedding's"
        for got, want in zip(caches["fused"], caches["composed"]):
            torch.testing.assert_close(got, want, atol=0.0, rtol=0.0, equal_nan=True)
    else:
        # the fused norm sums each head's squares in another order than rms_norm: an ulp at most
        _assert_close(q_fused, q_comp, dtype, "rotary_write_kv q vs the triton ops")
        _assert_cache_close(caches["fused"][0], caches["composed"][0], cache_dtype, "k cache vs the triton ops")
        torch.testing.assert_close(caches["fused"][1], caches["composed"][1], atol=0.0, rtol=0.0, equal_nan=True)
    _assert_close(q_fused, q_ref, dtype, "rotary_write_kv q")
    _assert_cache_close(caches["fused"][0], caches["reference"][0], cache_dtype, "rotary_write_kv k cache")
    v_tol = (0.0, 0.0) if cache_dtype == dtype else TOL[cache_dtype]
    torch.testing.assert_close(caches["fused"][1], caches["reference"][1], atol=v_tol[0], rtol=v_tol[1], equal_nan=True)


# ---------------------------------------------------------------- paged attention cases


@dataclass
class PagedKV:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [R, W] int32, -1 past each request's blocks
    seq_lens: torch.Tensor  # [R] int32
    k_scale: torch.Tensor | None = None  # [NB, BS, Hk] float32 with FP8 caches
    v_scale: torch.Tensor | None = None

    @property
    def scales(self) -> dict[str, torch.Tensor]:
        return {} if self.k_scale is None else {"k_scale": self.k_scale, "v_scale": self.v_scale}

    def poisoned(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Copies of the caches (and scales) with NaN in every slot that holds no live token."""
        bs = self.k_cache.shape[1]
        live = torch.zeros(self.k_cache.shape[:2], dtype=torch.bool, device=self.k_cache.device)
        offsets = torch.arange(bs, device=live.device)
        for r, length in enumerate(self.seq_lens.tolist()):
            blocks = self.block_table[r, : -(-length // bs)].long()
            live.view(-1)[(blocks[:, None] * bs + offsets).flatten()[:length]] = True
        if self.k_scale is None:
            k, v = self.k_cache.clone(), self.v_cache.clone()
            k[~live], v[~live] = float("nan"), float("nan")
            return k, v, {}
        out = []
        for cache in (self.k_cache, self.v_cache):
            raw = cache.view(torch.uint8).clone()
            raw[~live] = 0x7F  # e4m3fn NaN
            out.append(raw.view(FP8))
        scales = {name: t.clone() for name, t in self.scales.items()}
        for t in scales.values():
            t[~live] = float("nan")
        return out[0], out[1], scales


def paged_kv(
    lens: list[int], hk: int, d: int, bs: int, dtype: torch.dtype, gen: torch.Generator, kv_fp8: bool = False
) -> PagedKV:
    """Random caches holding `lens` tokens; each request's blocks are scattered over the pool.

    kv_fp8: the caches quantized to FP8 (torch_ops.quantize_fp8) with scales, the keys' heads of
    magnitudes spread over two decades (so that the per-head scales matter)."""
    device = gen.device
    nblk = [-(-n // bs) for n in lens]
    num_blocks = sum(nblk) + 3
    order = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    table = torch.full((len(lens), max(nblk) + 2), -1, dtype=torch.int32, device=device)
    used = 0
    for r, n in enumerate(nblk):
        table[r, :n] = order[used : used + n]
        used += n
    k = _randn((num_blocks, bs, hk, d), gen, dtype)
    v = _randn((num_blocks, bs, hk, d), gen, dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    if not kv_fp8:
        return PagedKV(k, v, table, seq_lens)
    from engine.kernels.torch_ops import quantize_fp8

    spread = 10.0 ** (2 * torch.rand((num_blocks, bs, hk, 1), generator=gen, device=device) - 1)
    (k8, ks), (v8, vs) = quantize_fp8(k.float() * spread), quantize_fp8(v)
    return PagedKV(k8, v8, table, seq_lens, ks, vs)


def _attention_cfg(kind: str, cfg: dict | None):
    if cfg is None:
        return None
    from engine.kernels.triton import attention

    return (attention.DecodeConfig if kind == "decode" else attention.PrefillConfig)(**cfg)


def check_decode(
    device: str,
    seed: int,
    dtype: torch.dtype,
    lens: list[int],
    hq: int,
    hk: int,
    d: int,
    bs: int,
    cfg: dict | None = None,
    q_scale: float = 1.0,
    kv_fp8: bool = False,
) -> None:
    triton_ops, torch_ops = _ops()
    from engine.kernels.triton import attention

    gen = _rng(device, seed)
    kv = paged_kv(lens, hk, d, bs, dtype, gen, kv_fp8)
    q = _randn((len(lens), hq, d), gen, dtype, q_scale)
    scale = d**-0.5
    want = torch_ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.seq_lens, kv.block_table, scale, **kv.scales)
    k_bad, v_bad, scales_bad = kv.poisoned()
    if cfg is None:
        got = triton_ops.decode_attention(q, k_bad, v_bad, kv.seq_lens, kv.block_table, scale, **scales_bad)
    else:
        got = attention.decode_attention(
            q, k_bad, v_bad, kv.seq_lens, kv.block_table, scale, _attention_cfg("decode", cfg), **scales_bad
        )
    _assert_close(got, want, dtype, f"decode_attention lens={lens[:4]}")


# a cache element's tolerance between two GPU kernels that store the same value (about one unit in its last place)
_CACHE_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float8_e4m3fn: 0.125}


def check_rotary_decode(
    device: str,
    seed: int,
    dtype: torch.dtype,
    lens: list[int],
    hq: int,
    hk: int,
    d: int,
    bs: int,
    cfg: dict | None = None,
    kv_fp8: bool = False,
    qk_norm: bool = False,
    merge: bool = True,
    pad_row: bool = True,
) -> None:
    """rotary_decode_attention (the rotary and the KV write in the decode kernel) against the triton ops it
    fuses, rotary_write_kv then decode_attention (the same output and cache bits on CPU), and the torch
    reference. Row r's new token sits at position lens[r] - 1, its slot in the row's blocks poisoned (NaN) so
    that a key read before the kernel's write would show; `pad_row` adds a padding row as the CUDA-graph
    runner pads (slot -1, a one-token context in block 0). `merge`: the last split merges (else the reduce)."""
    triton_ops, torch_ops = _ops()
    from engine.kernels.triton import attention

    gen = _rng(device, seed)
    kv = paged_kv(lens, hk, d, bs, dtype, gen, kv_fp8)
    k_bad, v_bad, scales_bad = kv.poisoned()
    seq_lens, table = kv.seq_lens, kv.block_table
    positions = (seq_lens - 1).long()
    slots = (table.gather(1, (positions // bs)[:, None]).squeeze(1).long() * bs + positions % bs).to(torch.int64)
    for cache in (k_bad, v_bad):  # the new tokens' slots hold NaN until the op stores them
        flat = cache.view(torch.uint8).view(-1, hk, d) if cache.dtype == torch.float8_e4m3fn else cache.view(-1, hk, d)
        flat[slots] = 0x7F if cache.dtype == torch.float8_e4m3fn else float("nan")
    if pad_row:
        seq_lens = torch.cat([seq_lens, seq_lens.new_ones(1)])
        table = torch.cat([table, table[:1]])  # a one-token context in the first row's first block
        positions = torch.cat([positions, positions.new_zeros(1)])
        slots = torch.cat([slots, slots.new_full((1,), -1)])
    rows = len(seq_lens)
    qkv = _randn((rows, (hq + 2 * hk) * d), gen, dtype, 2.0)  # strided views, as the model passes them
    q, k, v = (t.view(rows, -1, d) for t in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    qw = (1.0 + 0.3 * _randn((d,), gen, F32)).to(dtype) if qk_norm else None
    kw = (1.0 + 0.3 * _randn((d,), gen, F32)).to(dtype) if qk_norm else None
    cos_sin = _cos_sin(max(lens) + 1, d, device)
    scale = d**-0.5

    def caches():
        return k_bad.clone(), v_bad.clone(), {name: t.clone() for name, t in scales_bad.items()}

    kr, vr, sr = kv.k_cache.clone(), kv.v_cache.clone(), {name: t.clone() for name, t in kv.scales.items()}

    def fused(ops, kc, vc, sc):
        return ops.rotary_decode_attention(
            positions, q, k, v, cos_sin, kc, vc, slots, seq_lens, table, scale, q_norm=qw, k_norm=kw, **sc
        )

    saved = attention.MERGE_IN_KERNEL
    attention.MERGE_IN_KERNEL = merge
    try:
        dcfg = _attention_cfg("decode", cfg)
        (kf, vf, sf), (kc_, vc_, sc_) = caches(), caches()
        got = attention.rotary_decode_attention(  # the kernel, whatever triton_ops.FUSED_DECODE_ATTENTION says
            positions, q, k, v, cos_sin, kf, vf, slots, seq_lens, table, scale, q_norm=qw, k_norm=kw, **sf, cfg=dcfg
        )
        q_rot = triton_ops.rotary_write_kv(positions, q, k, v, cos_sin, kc_, vc_, slots, q_norm=qw, k_norm=kw, **sc_)
        composed = attention.decode_attention(q_rot, kc_, vc_, seq_lens, table, scale, dcfg, **sc_)
    finally:
        attention.MERGE_IN_KERNEL = saved
    want = fused(torch_ops, kr, vr, sr)  # the torch reference on clean caches (it reads every slot of a block)
    what = f"rotary_decode_attention lens={lens[:4]} merge={merge}"
    new = [r for r in range(rows) if slots[r] >= 0]
    for got_c, want_c in ((kf, kc_), (vf, vc_)):  # the values rotary_write_kv stores
        if device == "cpu":  # the same bytes
            assert torch.equal(got_c.view(torch.uint8), want_c.view(torch.uint8)), f"{what}: the cache differs"
        else:  # the same jit helpers compiled into two kernels: the GPU compiler may order the norm's sum or
            # contract its products differently (measured: float32 caches with the k norm differ in the last bit)
            tol = _CACHE_TOL[got_c.dtype]
            torch.testing.assert_close(got_c.float(), want_c.float(), rtol=tol, atol=tol, equal_nan=True, msg=what)
    for name in sf:
        tol = 0.0 if device == "cpu" else 1e-6
        torch.testing.assert_close(sf[name], sc_[name], atol=0.0, rtol=tol, equal_nan=True)
    if device == "cpu":
        assert torch.equal(got, composed), f"{what}: differs from rotary_write_kv + decode_attention"
    else:  # two kernels the GPU compiler may contract differently
        _assert_close(got, composed, dtype, f"{what} vs the triton ops")
    _assert_close(got[new], want[new], dtype, what)
    assert not got.isnan().any(), f"{what}: NaN (a poisoned key was read)"


def check_prefill(
    device: str,
    seed: int,
    dtype: torch.dtype,
    reqs: list[tuple[int, int]],
    hq: int,
    hk: int,
    d: int,
    bs: int,
    cfg: dict | None = None,
    q_scale: float = 1.0,
    kv_fp8: bool = False,
    fp8_copy: bool | None = None,
    cached_prefix: int | None = None,
) -> None:
    """`reqs`: (cached prefix, new query tokens) per request; `cached_prefix`: the default path is told it (the
    hint engine.kernels.cudnn_prompt's route needs). With an FP8 cache and no `cfg` or one with
    gather=True, the kernel reads a dequantized 16-bit copy of the context (attention.FP8_PREFILL_COPY_BYTES;
    fp8_copy=False sets it to 0): the reference then attends over that copy's values (FP8 x scale rounded to
    the 16-bit dtype). A `cfg` with gather=True and 16-bit tiles must run the gathered kernel where its copy fits
    attention.PREFILL_GATHER_BYTES, and the paged one above it (checked)."""
    triton_ops, torch_ops = _ops()
    from engine.kernels.torch_ops import dequantize_fp8
    from engine.kernels.triton import attention

    gen = _rng(device, seed)
    kv = paged_kv([p + n for p, n in reqs], hk, d, bs, dtype, gen, kv_fp8)
    qlens = torch.tensor([0] + [n for _, n in reqs], device=device)
    query_start_loc = qlens.cumsum(0).to(torch.int32)
    q = _randn((int(query_start_loc[-1]), hq, d), gen, dtype, q_scale)
    scale = d**-0.5
    args = (kv.seq_lens, kv.block_table, scale)
    copied = kv_fp8 and (cfg is None or cfg.get("gather", False)) and fp8_copy is not False
    if copied:
        k16, v16 = (
            dequantize_fp8(c, kv.scales[n]).to(dtype) for c, n in ((kv.k_cache, "k_scale"), (kv.v_cache, "v_scale"))
        )
        want = torch_ops.prefill_attention(q, k16, v16, query_start_loc, *args)
    else:
        want = torch_ops.prefill_attention(q, kv.k_cache, kv.v_cache, query_start_loc, *args, **kv.scales)
    k_bad, v_bad, scales_bad = kv.poisoned()
    if fp8_copy is False:
        with mock.patch.object(attention, "FP8_PREFILL_COPY_BYTES", 0):
            got = triton_ops.prefill_attention(q, k_bad, v_bad, query_start_loc, *args, **scales_bad)
    elif cfg is None:
        hint = {} if cached_prefix is None else {"cached_prefix": cached_prefix}
        got = triton_ops.prefill_attention(q, k_bad, v_bad, query_start_loc, *args, **scales_bad, **hint)
    else:
        with mock.patch.object(attention, "TensorDescriptor", wraps=attention.TensorDescriptor) as descriptors:
            got = attention.prefill_attention(
                q, k_bad, v_bad, query_start_loc, *args, _attention_cfg("prefill", cfg), **scales_bad
            )
        if cfg.get("gather") and dtype in (BF16, F16) and sum(n for _, n in reqs):
            copy = 2 * kv.block_table.numel() * bs * hk * d * dtype.itemsize
            if copy <= attention.PREFILL_GATHER_BYTES:  # K's and V's
                assert descriptors.call_count == 2, "the gathered kernel did not run"
            else:  # a copy over the limit: the paged kernel reads the cache
                assert descriptors.call_count == 0, f"a {copy}-byte copy went past the gather limit"
    _assert_close(got, want, dtype, f"prefill_attention reqs={reqs[:3]}")


def _sdpa_top_left(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """cudnn_prompt.attend in float32 torch (causal from the top left or unmasked, GQA): its CPU stand-in."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1).float() for t in (k, v))
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype), scores.logsumexp(-1)


def check_cudnn_merge(device: str, dtype: torch.dtype, d: int) -> None:
    """cudnn_prompt.merge against float32 torch: two partials laid out as cuDNN returns them ([1, H, S, D]
    viewed as [S, H, D] rows), S padded past the rows kept; rows counts that fill the merge's blocks, leave a
    block part-full and are under one block; log-sum-exps far apart (one side's weight underflows). The same
    for the blocked candidate that experiments.tune_attention --only cudnn-merge times against it."""
    from engine.kernels import cudnn_prompt
    from experiments.tune_attention import merge_blocked

    h = 3
    for seed, (tokens, rows) in enumerate(((1, 16), (31, 32), (32, 48), (33, 64), (100, 128))):
        g = torch.Generator().manual_seed(seed)
        a, b = (torch.randn(1, h, rows, d, generator=g).to(dtype) for _ in range(2))
        la, lb = (torch.randn(1, h, rows, generator=g) * 4 for _ in range(2))
        la[0, 0, : tokens // 2] += 200.0  # b's weight is 0 in float32 there
        want_w = torch.softmax(torch.stack([la, lb]), dim=0)  # [2, 1, H, S]
        want = (a.float() * want_w[0, ..., None] + b.float() * want_w[1, ..., None])[0].permute(1, 0, 2)[:tokens]
        as_rows = lambda t: t.to(device)[0].permute(1, 0, 2)  # noqa: E731
        for name, merge in (("engine", cudnn_prompt.merge), ("blocked candidate", merge_blocked)):
            got = merge(as_rows(a), la.to(device), as_rows(b), lb.to(device), tokens)
            assert got.shape == (tokens, h, d) and got.dtype == dtype, (name, got.shape, got.dtype)
            _assert_close(got.cpu(), want.to(dtype), dtype, f"cudnn merge, {name}, tokens={tokens} rows={rows}")


def _skip_where_the_route_is_off(device: str) -> None:
    """On a GPU the route runs only where cudnn_prompt.on() (Hopper, cuDNN enabled): elsewhere its cases skip."""
    from engine.kernels import cudnn_prompt

    if device == "cuda" and not cudnn_prompt.on(cudnn_prompt.sm(torch.device("cuda"))):
        pytest.skip(f"the cuDNN route is not on for SM {cudnn_prompt.sm(torch.device('cuda'))}")


def check_prompt_route(device: str, dtype: torch.dtype, bs: int, kv_fp8: bool = False) -> None:
    """One request's chunk long enough for engine.kernels.cudnn_prompt, with a stated cached prefix that is a
    multiple of its padding (0 or not), goes to cuDNN and matches the reference: chunk lengths that are a
    multiple of the padding and not, a block larger than the padding; with a prefix, the unmasked call over it
    and the causal one over the chunk, merged. Launches it must not take (no hint; a prefix off the padding;
    under MIN_TOKENS; two requests) do not call it. On the CPU cuDNN is stood in by the same attention in
    torch, so what is checked is the padding, the copy, the merge and the rows kept; on the GPU cuDNN runs."""
    _skip_where_the_route_is_off(device)
    from engine.kernels import cudnn_prompt

    calls = []
    real = _sdpa_top_left if device == "cpu" else cudnn_prompt.attend

    tails = []  # the chunk's own K and V as cuDNN reads them, padded rows included

    def counted(q, k, v, scale, causal):
        out = real(q, k, v, scale, causal)  # recorded once it ran: a call that raised falls back to Triton
        calls.append((q.shape[2], k.shape[2], causal))
        if causal:
            tails.append((k.clone(), v.clone()))
        return out

    shape = dict(hq=8, hk=2, d=64, bs=bs, q_scale=2.0, kv_fp8=kv_fp8)
    with (
        mock.patch.object(cudnn_prompt, "MIN_TOKENS", 16),
        mock.patch.object(cudnn_prompt, "PAD", 16),
        mock.patch.object(cudnn_prompt, "attend", counted),
        mock.patch.object(cudnn_prompt, "usable", lambda device: True) if device == "cpu" else contextlib.nullcontext(),
    ):
        for seed, (prefix, tokens) in enumerate(((0, 16), (0, 37), (32, 16), (48, 21))):
            del calls[:]
            check_prefill(device, seed, dtype, [(prefix, tokens)], **shape, cached_prefix=prefix)
            padded = -(-tokens // 16) * 16
            want = [(padded, padded, True)] + ([(padded, prefix, False)] if prefix else [])
            assert calls == want, (prefix, tokens, calls)
            k, v = tails.pop()  # the copy is zero past the chunk (a NaN there could reach a masked score)
            assert not k[:, :, tokens:].any() and not v[:, :, tokens:].any(), (prefix, tokens)
            assert k[:, :, :tokens].abs().sum(-1).all(), "the chunk's own keys are not in the copy"
        del calls[:]
        check_prefill(device, 5, dtype, [(0, 37)], **shape)  # no hint
        check_prefill(device, 6, dtype, [(20, 37)], **shape, cached_prefix=20)  # a prefix off the padding
        check_prefill(device, 7, dtype, [(0, 15)], **shape, cached_prefix=0)  # under MIN_TOKENS
        check_prefill(device, 8, dtype, [(0, 20), (0, 17)], **shape, cached_prefix=0)  # two requests
        assert not calls, calls
    assert not cudnn_prompt._broken, cudnn_prompt._broken


def check_prompt_route_fallbacks(device: str) -> None:
    """Where the cuDNN route cannot run a chunk, the Triton kernel does and the result is the same: memory
    running out in its K/V copy or in cuDNN sends that chunk there and keeps the route for the next (nothing
    marked planned or broken); cuDNN raising otherwise sends every later launch on that device there too
    (the device marked broken, its next launch not even tried)."""
    _skip_where_the_route_is_off(device)
    from engine.kernels import cudnn_prompt
    from engine.kernels.triton import attention

    real = _sdpa_top_left if device == "cpu" else cudnn_prompt.attend
    calls = []

    def failing(exc):
        def attend(q, k, v, scale, causal):
            calls.append(causal)
            if exc is not None:
                raise exc
            return real(q, k, v, scale, causal)

        return attend

    copies = []
    real_copy = attention._copy_context

    def copy_out_of_memory(*args):  # the first copy, the route's (zeroing to PAD), runs out; any later one runs
        copies.append(args[-1])
        if len(copies) == 1:
            raise torch.OutOfMemoryError("test: the route's K/V copy")
        return real_copy(*args)

    shape = dict(hq=8, hk=2, d=64, bs=8, q_scale=2.0, cached_prefix=32)
    dev = torch.device(device)
    key = cudnn_prompt._key(dev)
    on_cpu = lambda device: cudnn_prompt._key(device) not in cudnn_prompt._broken  # noqa: E731
    with (
        mock.patch.object(cudnn_prompt, "MIN_TOKENS", 16),
        mock.patch.object(cudnn_prompt, "PAD", 16),
        mock.patch.object(cudnn_prompt, "usable", on_cpu) if device == "cpu" else contextlib.nullcontext(),
    ):
        try:
            with mock.patch.object(cudnn_prompt, "attend", failing(torch.OutOfMemoryError("test: cuDNN"))):
                check_prefill(device, 50, BF16, [(32, 21)], **shape)
            assert calls == [True] and key not in cudnn_prompt._broken, (calls, cudnn_prompt._broken)
            assert not cudnn_prompt.planned(dev, 32, 21)
            del calls[:]
            with (
                mock.patch.object(cudnn_prompt, "attend", failing(None)),
                mock.patch.object(attention, "_copy_context", copy_out_of_memory),
            ):
                check_prefill(device, 51, BF16, [(32, 21)], **shape)
            assert copies[:1] == [16] and not calls and key not in cudnn_prompt._broken, (copies, calls)
            with mock.patch.object(cudnn_prompt, "attend", failing(None)):  # the route runs the next
                check_prefill(device, 52, BF16, [(32, 21)], **shape)
            assert calls == [True, False] and cudnn_prompt.planned(dev, 32, 21), calls
            del calls[:]
            with mock.patch.object(cudnn_prompt, "attend", failing(RuntimeError("test: no fused attention"))):
                check_prefill(device, 53, BF16, [(32, 21)], **shape)
                assert calls == [True] and key in cudnn_prompt._broken, (calls, cudnn_prompt._broken)
                check_prefill(device, 54, BF16, [(0, 40)], **{**shape, "cached_prefix": 0})
                assert calls == [True], calls  # not tried again on this device
        finally:
            cudnn_prompt._broken.discard(key)


def check_cudnn_warm_up(device: str, kv_fp8: bool) -> None:
    """EngineCore's start-up run of a lone prompt's chunks (engine.kernels.cudnn_prompt.warm_up_prefixes): the
    idle chunk on 0, 1, 2, ... chunks of prefix below max_model_len, through the Triton prefill op on the
    engine's own KV cache, each taking the cuDNN route (the stand-in on the CPU), none falling back; a chunk
    size the route does not take runs nothing."""
    _skip_where_the_route_is_off(device)
    from types import SimpleNamespace

    from engine.attention import KVCache
    from engine.core import EngineCore
    from engine.kernels import cudnn_prompt
    from engine.kernels.registry import KernelSet

    calls = []
    real = _sdpa_top_left if device == "cpu" else cudnn_prompt.attend

    def counted(q, k, v, scale, causal):
        out = real(q, k, v, scale, causal)
        calls.append((q.shape[2], k.shape[2], causal))
        return out

    kv = KVCache.allocate(2, 40, 8, 2, 64, dtype=FP8 if kv_fp8 else BF16, device=device)
    core = SimpleNamespace(
        model_config=SimpleNamespace(num_heads=8, num_kv_heads=2, head_dim=64),
        runner=SimpleNamespace(kv=kv),
        ops=KernelSet(device, prefer=("triton", "torch")),
        idle_chunk_size=64,
        max_model_len=300,
        num_blocks=40,
        dtype=BF16,
        device=torch.device(device),
    )
    sc = SimpleNamespace(block_size=8, chunk_size=16, max_num_batched_tokens=32)
    with (
        mock.patch.object(cudnn_prompt, "MIN_TOKENS", 16),
        mock.patch.object(cudnn_prompt, "PAD", 16),
        mock.patch.object(cudnn_prompt, "attend", counted),
        mock.patch.object(cudnn_prompt, "usable", lambda device: True) if device == "cpu" else contextlib.nullcontext(),
    ):
        EngineCore._warm_up_cudnn_prompt(core, sc)
        # chunks of 64 on 0, 64, 128, 192 cached tokens (256 + 64 > 300 stops it); 40 blocks of 8 hold 320
        want = [(64, 64, True)] + [c for p in (64, 128, 192) for c in ((64, 64, True), (64, p, False))]
        assert calls == want, calls
        del calls[:]
        core.idle_chunk_size = 0  # chunks of min(chunk_size, budget) = 16 tokens: PAD's multiple, MIN_TOKENS
        EngineCore._warm_up_cudnn_prompt(core, sc)
        assert len(calls) == 2 * (300 // 16) - 1, calls
        del calls[:]
        core.idle_chunk_size, sc.chunk_size = 48, 64  # idle <= chunk_size: min(chunk_size, budget 32)
        EngineCore._warm_up_cudnn_prompt(core, sc)
        assert calls[:3] == [(32, 32, True), (32, 32, True), (32, 32, False)], calls
        del calls[:]
        core.num_blocks, core.idle_chunk_size, sc.chunk_size = 20, 64, 16  # 160 slots: chunks on 0 and 64 fit
        EngineCore._warm_up_cudnn_prompt(core, sc)
        assert calls == want[:3], calls
        del calls[:]
        core.num_blocks, sc.chunk_size, core.idle_chunk_size = 40, 8, 0  # under MIN_TOKENS: nothing runs
        EngineCore._warm_up_cudnn_prompt(core, sc)
        assert not calls, calls
        sc.chunk_size, core.idle_chunk_size = 16, 64
        tries = []

        def out_of_memory(q, k, v, scale, causal):
            tries.append(causal)
            raise torch.OutOfMemoryError("test")

        oom = mock.patch.object(cudnn_prompt, "attend", out_of_memory)
        with oom, mock.patch.object(cudnn_prompt, "_planned", set()):
            EngineCore._warm_up_cudnn_prompt(core, sc)  # the first chunk fell back to Triton: it stops there
        assert tries == [True], tries
    assert not cudnn_prompt._broken, cudnn_prompt._broken
    if device == "cpu":  # no cuDNN here: the route is not eligible and the warm-up stops before any run
        core.idle_chunk_size, sc.chunk_size = 64, 16
        with mock.patch.object(cudnn_prompt, "MIN_TOKENS", 16), mock.patch.object(cudnn_prompt, "PAD", 16):
            core.ops = SimpleNamespace(prefill_attention=mock.Mock(side_effect=AssertionError("it ran")))
            EngineCore._warm_up_cudnn_prompt(core, sc)


def check_model_fused_vs_unfused(device: str, arch: str, dtype: torch.dtype, exact: bool) -> None:
    """A tiny model's logits with rotary_write_kv fused, and with the triton ops it replaces, one by one."""
    from engine.kernels.registry import KernelSet

    from model_steps import UnfusedRotaryWriteKV, prefill_then_decode, tiny_model

    model = tiny_model(arch, dtype=dtype, device=device)
    ops = KernelSet(device, prefer=("triton", "torch"))
    assert ops.chosen["rotary_write_kv"] == "triton"
    fused, fused_tokens = prefill_then_decode(model, ops, [9, 20], steps=2)
    unfused, unfused_tokens = prefill_then_decode(model, UnfusedRotaryWriteKV(ops), [9, 20], steps=2)
    steps = _agreed_steps(fused_tokens, unfused_tokens, unfused, dtype) if not exact else len(fused)
    if exact:
        assert fused_tokens == unfused_tokens
    assert steps >= 2, "no decode step left to compare"
    for step, (a, b) in enumerate(zip(fused[:steps], unfused[:steps])):
        if exact:
            assert torch.equal(a, b), f"step {step}: logits differ"
        else:
            _assert_close(a, b, dtype, f"step {step} logits")


def check_model_gemv_vs_composed(device: str, arch: str, dtype: torch.dtype) -> None:
    """A tiny model's one-request decode steps (one row: the fused GEMVs) against the same steps with the
    norms, SiLU and products as separate kernels (triton_ops.FUSED_GEMV off): the same greedy tokens (in 16
    bits, but for a near-tie: _agreed_steps), logits within the dtype's tolerance."""
    from engine.kernels.registry import KernelSet

    from model_steps import prefill_then_decode, tiny_model

    triton_ops, _ = _ops()
    model = tiny_model(arch, dtype=dtype, device=device)
    ops = KernelSet(device, prefer=("triton", "torch"))
    fused, fused_tokens = prefill_then_decode(model, ops, [11], steps=3, pad_row=False)
    triton_ops.FUSED_GEMV = False
    try:
        composed, composed_tokens = prefill_then_decode(model, ops, [11], steps=3, pad_row=False)
    finally:
        triton_ops.FUSED_GEMV = True
    steps = _agreed_steps(fused_tokens, composed_tokens, composed, dtype) if dtype != F32 else len(fused)
    if dtype == F32:
        assert fused_tokens == composed_tokens
    assert torch.equal(fused[0], composed[0])  # the prefill (many rows) does not take the GEMV
    assert steps >= 2, "no decode step left to compare"
    for step, (a, b) in enumerate(zip(fused[1:steps], composed[1:steps]), 1):
        assert not torch.equal(a, b) or dtype == F32, f"step {step}: the fused path did not run"
        _assert_close(a, b, dtype, f"decode step {step} logits")


def check_model_fused_decode_attention(device: str, arch: str, dtype: torch.dtype) -> None:
    """A tiny model's decode steps (three requests and a padding row) with the rotary, the KV write and the split
    merge in the decode kernel (triton_ops.FUSED_DECODE_ATTENTION, attention.MERGE_IN_KERNEL) against the
    same steps as rotary_write_kv, decode_attention and its reduce: the same greedy tokens (but for a near-tie:
    _agreed_steps), logits within the dtype's tolerance, and the fused op did run."""
    from engine.kernels.registry import KernelSet
    from engine.kernels.triton import attention

    from model_steps import RecordingOps, prefill_then_decode, tiny_model

    triton_ops, _ = _ops()
    model = tiny_model(arch, dtype=dtype, device=device)
    ops = RecordingOps(KernelSet(device, prefer=("triton", "torch")))
    before = triton_ops.FUSED_DECODE_ATTENTION, attention.MERGE_IN_KERNEL, attention.rotary_decode_attention
    launches = {True: 0, False: 0}

    def counted(*args, **kwargs):
        launches[triton_ops.FUSED_DECODE_ATTENTION] += 1
        return before[2](*args, **kwargs)

    try:
        attention.rotary_decode_attention = counted
        runs = {}
        for on in (True, False):
            triton_ops.FUSED_DECODE_ATTENTION = attention.MERGE_IN_KERNEL = on
            runs[on] = prefill_then_decode(model, ops, [11, 30, 4], steps=3)
    finally:
        triton_ops.FUSED_DECODE_ATTENTION, attention.MERGE_IN_KERNEL, attention.rotary_decode_attention = before
    assert "rotary_decode_attention" in ops.calls
    assert launches[True] == 3 * model.config.num_layers and launches[False] == 0, launches
    (fused, fused_tokens), (composed, composed_tokens) = runs[True], runs[False]
    steps = _agreed_steps(fused_tokens, composed_tokens, composed, dtype)
    assert torch.equal(fused[0], composed[0])  # the prefill does not take the decode kernel
    assert steps >= 2, "no decode step left to compare"
    for step, (a, b) in enumerate(zip(fused[1:steps], composed[1:steps]), 1):
        _assert_close(a, b, dtype, f"decode step {step} logits")


def check_registry(device: str) -> None:
    from engine.kernels.registry import OPS, KernelSet

    kernels = KernelSet(device, prefer=("triton", "torch"))
    expected = {op: "torch" if op in ("apply_penalties", "top_k_top_p_min_p") else "triton" for op in OPS}
    assert kernels.chosen == expected, kernels.chosen


# prefill tiles of the interpreter that split every key range in up to 7 parts (see prefill_splits)
SPLIT_CFG = dict(block_m=32, block_n=16, num_warps=1, num_stages=1, min_split_keys=16, max_splits=7, split_waves=8)


# Small enough for the interpreter (two slow cores): every case is a few dozen programs.
CASES: dict[str, Callable[[str], None]] = {
    "registry_picks_triton": check_registry,
    "rms_norm_f32": partial(check_rms_norm, seed=1, dtype=F32, tokens=7, hidden=96),
    "rms_norm_bf16": partial(check_rms_norm, seed=2, dtype=BF16, tokens=3, hidden=512),
    "add_rms_norm_bf16": partial(check_add_rms_norm, seed=3, dtype=BF16, residual_dtype=BF16, tokens=5, hidden=256),
    "add_rms_norm_f16_f32_residual": partial(
        check_add_rms_norm, seed=4, dtype=F16, residual_dtype=F32, tokens=4, hidden=80
    ),
    "rotary_f32_gqa4_d64": partial(check_rotary, seed=5, dtype=F32, tokens=6, hq=8, hk=2, d=64),
    "rotary_bf16_gqa3_d128": partial(check_rotary, seed=6, dtype=BF16, tokens=3, hq=6, hk=2, d=128),
    "silu_and_mul_f32": partial(check_silu_and_mul, seed=7, dtype=F32, tokens=5, f=200),
    "silu_and_mul_bf16_two_column_tiles": partial(check_silu_and_mul, seed=8, dtype=BF16, tokens=2, f=1100),
    "write_kv_f32": partial(check_write_kv, seed=9, src_dtype=F32, cache_dtype=F32, tokens=20, hk=2, d=64, bs=16),
    "write_kv_f32_into_bf16": partial(
        check_write_kv, seed=10, src_dtype=F32, cache_dtype=BF16, tokens=13, hk=3, d=128, bs=8
    ),
    # linear: the one-row GEMV with its prologue fused (K off the tile grid, N off the program grid, bias,
    # FP8 weights widened by integer operations, the residual stream), and the composed path for two rows
    "linear_f32_plain_ragged": partial(check_linear, seed=70, dtype=F32, n=37, k=300, prologue="none", bias=True),
    "linear_bf16_norm_residual": partial(
        check_linear, seed=71, dtype=BF16, n=64, k=1100, prologue="norm", residual=True
    ),
    "linear_bf16_norm_first_layer": partial(check_linear, seed=72, dtype=BF16, n=40, k=256, prologue="norm"),
    "linear_bf16_silu": partial(check_linear, seed=73, dtype=BF16, n=24, k=700, prologue="silu"),
    "linear_f16_fp8_norm_residual": partial(
        check_linear, seed=74, dtype=F16, n=48, k=512, prologue="norm", residual=True, fp8=True, bias=True
    ),
    "linear_bf16_fp8_silu": partial(check_linear, seed=75, dtype=BF16, n=33, k=200, prologue="silu", fp8=True),
    "linear_bf16_gpu_tile": partial(
        check_linear,
        seed=76,
        dtype=BF16,
        n=20,
        k=2048,
        prologue="norm",
        residual=True,
        config=dict(BLOCK_N=16, BLOCK_K=1024, num_warps=4),
    ),
    "linear_bf16_two_rows_composed": partial(
        check_linear, seed=77, dtype=BF16, n=32, k=128, prologue="norm", rows=2, residual=True
    ),
    # rotary + KV write fused: strided views of one qkv tensor, GQA, slots -1, Qwen3's q/k norms
    "rotary_write_kv_f32_gqa4_d64": partial(
        check_rotary_write_kv, seed=20, dtype=F32, tokens=7, hq=8, hk=2, d=64, bs=16
    ),
    "rotary_write_kv_bf16_gqa3_d128_bs8": partial(
        check_rotary_write_kv, seed=21, dtype=BF16, tokens=5, hq=6, hk=2, d=128, bs=8
    ),
    "rotary_write_kv_f32_into_bf16_mha_d96": partial(
        check_rotary_write_kv, seed=22, dtype=F32, tokens=4, hq=3, hk=3, d=96, bs=4, cache_dtype=BF16
    ),
    "rotary_write_kv_bf16_qk_norm_gqa4_d128": partial(
        check_rotary_write_kv, seed=23, dtype=BF16, tokens=4, hq=8, hk=2, d=128, bs=16, q_norm=True, k_norm=True
    ),
    "rotary_write_kv_f32_qk_norm_gqa2_d64": partial(
        check_rotary_write_kv, seed=24, dtype=F32, tokens=6, hq=4, hk=2, d=64, bs=8, q_norm=True, k_norm=True
    ),
    "rotary_write_kv_f16_q_norm_only": partial(
        check_rotary_write_kv, seed=25, dtype=F16, tokens=3, hq=2, hk=1, d=64, bs=16, q_norm=True
    ),
    # the model's path: the fused op against the ops it replaces (Qwen3: q/k norms fused, an ulp apart)
    "model_llama_fused_equals_unfused_f32": partial(
        check_model_fused_vs_unfused, arch="LlamaForCausalLM", dtype=F32, exact=True
    ),
    "model_qwen3_fused_vs_unfused_f32": partial(
        check_model_fused_vs_unfused, arch="Qwen3ForCausalLM", dtype=F32, exact=False
    ),
    # the decode path through the fused one-row GEMVs against the composed ops (Qwen3: q/k norms, biases: Qwen2)
    "model_llama_gemv_vs_composed_bf16": partial(check_model_gemv_vs_composed, arch="LlamaForCausalLM", dtype=BF16),
    "model_llama_fused_decode_attention_bf16": partial(
        check_model_fused_decode_attention, arch="LlamaForCausalLM", dtype=BF16
    ),
    "model_qwen3_fused_decode_attention_f32": partial(
        check_model_fused_decode_attention, arch="Qwen3ForCausalLM", dtype=F32
    ),
    "model_qwen2_gemv_vs_composed_f32": partial(check_model_gemv_vs_composed, arch="Qwen2ForCausalLM", dtype=F32),
    "model_qwen3_gemv_vs_composed_f16": partial(check_model_gemv_vs_composed, arch="Qwen3ForCausalLM", dtype=F16),
    # decode: seq_len 1, lengths off the block grid, several splits, tiles spanning and inside blocks
    "decode_f32_gqa4_d64": partial(check_decode, seed=11, dtype=F32, lens=[1, 37, 100], hq=8, hk=2, d=64, bs=16),
    "decode_bf16_gqa3_d128_bs8": partial(check_decode, seed=12, dtype=BF16, lens=[50, 3], hq=6, hk=2, d=128, bs=8),
    "rotary_decode_bf16_gqa4_d128": partial(
        check_rotary_decode, seed=90, dtype=BF16, lens=[37, 200, 49], hq=8, hk=2, d=128, bs=16
    ),
    "rotary_decode_bf16_gqa4_d128_reduce": partial(
        check_rotary_decode, seed=90, dtype=BF16, lens=[37, 200, 49], hq=8, hk=2, d=128, bs=16, merge=False
    ),
    "rotary_decode_bf16_one_split": partial(
        check_rotary_decode,
        seed=91,
        dtype=BF16,
        lens=[20, 65],
        hq=4,
        hk=1,
        d=64,
        bs=16,
        cfg={"block_n": 16, "min_tiles_per_split": 1, "num_warps": 1, "num_stages": 1, "max_splits": 1},
    ),
    "rotary_decode_f32_qk_norm_d64": partial(
        check_rotary_decode, seed=92, dtype=F32, lens=[9, 64, 30], hq=4, hk=2, d=64, bs=8, qk_norm=True
    ),
    "rotary_decode_f16_mha_d96": partial(
        check_rotary_decode, seed=93, dtype=F16, lens=[5, 13], hq=3, hk=3, d=96, bs=4, pad_row=False
    ),
    "decode_f16_mha_d64_bs32": partial(check_decode, seed=13, dtype=F16, lens=[77], hq=2, hk=2, d=64, bs=32),
    "decode_bf16_gpu_tiles_one_split": partial(
        check_decode,
        seed=14,
        dtype=BF16,
        lens=[130, 1, 64],
        hq=8,
        hk=2,
        d=128,
        bs=16,
        cfg=dict(block_n=64, max_splits=1),
    ),
    "decode_f32_gpu_tiles_splits": partial(
        check_decode,
        seed=15,
        dtype=F32,
        lens=[300, 20],
        hq=4,
        hk=1,
        d=64,
        bs=16,
        cfg=dict(block_n=64, min_tiles_per_split=1),
        q_scale=3.0,
    ),
    # prefill: cached prefixes, chunks crossing tiles, one-token chunks, an empty request
    "prefill_f32_gqa4_d64": partial(
        check_prefill, seed=16, dtype=F32, reqs=[(0, 40), (83, 17), (5, 1)], hq=8, hk=2, d=64, bs=16
    ),
    "prefill_bf16_gqa3_d128_bs8": partial(
        check_prefill, seed=17, dtype=BF16, reqs=[(30, 33), (0, 7)], hq=6, hk=2, d=128, bs=8
    ),
    "prefill_f16_mha_d64_bs32_empty_request": partial(
        check_prefill, seed=18, dtype=F16, reqs=[(100, 20), (10, 0), (0, 3)], hq=2, hk=2, d=64, bs=32
    ),
    "prefill_bf16_gpu_tiles": partial(
        check_prefill,
        seed=19,
        dtype=BF16,
        reqs=[(150, 70), (0, 90)],
        hq=8,
        hk=2,
        d=128,
        bs=16,
        cfg=dict(block_m=128, block_n=64),
        q_scale=2.0,
    ),
    # short queries over long prefixes: the key range split over 7 programs and merged (splits that see no
    # key of some rows, a prefix ending mid-block, ragged requests, one-token queries)
    "prefill_bf16_split_key_range": partial(
        check_prefill,
        seed=40,
        dtype=BF16,
        reqs=[(300, 3), (20, 2)],
        hq=4,
        hk=1,
        d=64,
        bs=16,
        cfg=SPLIT_CFG,
        q_scale=3.0,
    ),
    "prefill_f32_split_ragged": partial(
        check_prefill,
        seed=41,
        dtype=F32,
        reqs=[(250, 9), (0, 5), (37, 1)],
        hq=8,
        hk=2,
        d=64,
        bs=16,
        cfg=SPLIT_CFG,
        q_scale=3.0,
    ),
    # prefill through contiguous copies of the context and tensor descriptors (tiles spanning blocks and reading
    # past a context's end into the copies' zeros, the split key range, an FP8 cache's dequantized copy)
    "prompt_cudnn_route_bf16_bs4": partial(check_prompt_route, dtype=BF16, bs=4),
    "prompt_cudnn_route_f16_bs32": partial(check_prompt_route, dtype=F16, bs=32),
    "prompt_cudnn_route_fp8_bf16_bs8": partial(check_prompt_route, dtype=BF16, bs=8, kv_fp8=True),
    "prompt_cudnn_route_fallbacks": check_prompt_route_fallbacks,
    "cudnn_merge_bf16_d128": partial(check_cudnn_merge, dtype=BF16, d=128),
    "cudnn_merge_f16_d64": partial(check_cudnn_merge, dtype=F16, d=64),
    "cudnn_warm_up_bf16": partial(check_cudnn_warm_up, kv_fp8=False),
    "cudnn_warm_up_fp8": partial(check_cudnn_warm_up, kv_fp8=True),
    "prefill_bf16_gather": partial(
        check_prefill,
        seed=63,
        dtype=BF16,
        reqs=[(150, 70), (0, 90), (33, 1)],
        hq=8,
        hk=2,
        d=128,
        bs=16,
        cfg=dict(block_m=128, block_n=64, gather=True),
        q_scale=2.0,
    ),
    "prefill_f16_gather_split_bs8": partial(
        check_prefill,
        seed=64,
        dtype=F16,
        reqs=[(300, 3), (20, 2), (0, 0)],
        hq=4,
        hk=1,
        d=64,
        bs=8,
        cfg={**SPLIT_CFG, "gather": True},
        q_scale=3.0,
    ),
    "prefill_fp8_bf16_gather": partial(
        check_prefill,
        seed=65,
        dtype=BF16,
        reqs=[(100, 40), (7, 30)],
        hq=8,
        hk=2,
        d=128,
        bs=16,
        cfg=dict(block_m=64, block_n=32, gather=True),
        q_scale=2.0,
        kv_fp8=True,
    ),
    # FP8 KV caches: quantizing writes bit for bit; attention reading FP8 (every path: one and several
    # splits, GPU tiles, prefixes ending mid-block, the split key range) against the reference on the same caches
    "write_kv_fp8_from_f32": partial(check_write_kv_fp8, seed=50, src_dtype=F32, tokens=13, hk=3, d=64, bs=8),
    "write_kv_fp8_from_bf16_d128": partial(check_write_kv_fp8, seed=51, src_dtype=BF16, tokens=9, hk=2, d=128, bs=16),
    "rotary_write_kv_fp8_bf16_gqa3": partial(
        check_rotary_write_kv_fp8, seed=52, dtype=BF16, tokens=5, hq=6, hk=2, d=128, bs=8
    ),
    "rotary_write_kv_fp8_f32_d96": partial(
        check_rotary_write_kv_fp8, seed=53, dtype=F32, tokens=4, hq=3, hk=3, d=96, bs=4
    ),
    "rotary_write_kv_fp8_bf16_qk_norm": partial(
        check_rotary_write_kv_fp8, seed=54, dtype=BF16, tokens=4, hq=8, hk=2, d=128, bs=16, q_norm=True, k_norm=True
    ),
    "decode_fp8_f32_gqa4_d64": partial(
        check_decode, seed=55, dtype=F32, lens=[1, 37, 100], hq=8, hk=2, d=64, bs=16, kv_fp8=True
    ),
    "rotary_decode_fp8_bf16_gqa3": partial(
        check_rotary_decode, seed=94, dtype=BF16, lens=[50, 3], hq=6, hk=2, d=128, bs=8, kv_fp8=True
    ),
    "rotary_decode_fp8_f32_qk_norm": partial(
        check_rotary_decode, seed=95, dtype=F32, lens=[2, 37, 100], hq=8, hk=2, d=64, bs=16, kv_fp8=True, qk_norm=True
    ),
    "rotary_decode_fp8_fma_composes": partial(
        check_rotary_decode,
        seed=96,
        dtype=BF16,
        lens=[40, 7],
        hq=8,
        hk=2,
        d=64,
        bs=16,
        kv_fp8=True,
        cfg={"fma": True, "block_n": 16, "num_warps": 1, "programs_per_sm": 16, "num_stages": 1},
    ),
    "decode_fp8_bf16_gqa3_d128_bs8": partial(
        check_decode, seed=56, dtype=BF16, lens=[50, 3], hq=6, hk=2, d=128, bs=8, kv_fp8=True, q_scale=2.0
    ),
    "decode_fp8_f16_gpu_tiles_one_split": partial(
        check_decode,
        seed=57,
        dtype=F16,
        lens=[130, 1, 64],
        hq=8,
        hk=2,
        d=64,
        bs=16,
        cfg=dict(block_n=64, max_splits=1),
        kv_fp8=True,
    ),
    "prefill_fp8_f32_gqa4_d64": partial(
        check_prefill, seed=58, dtype=F32, reqs=[(0, 40), (83, 17), (5, 1)], hq=8, hk=2, d=64, bs=16, kv_fp8=True
    ),
    "prefill_fp8_bf16_gpu_tiles": partial(
        check_prefill,
        seed=59,
        dtype=BF16,
        reqs=[(150, 70), (0, 90)],
        hq=8,
        hk=2,
        d=128,
        bs=16,
        cfg=dict(block_m=128, block_n=64),
        q_scale=2.0,
        kv_fp8=True,
    ),
    "prefill_fp8_bf16_via_16bit_copy": partial(
        check_prefill,
        seed=61,
        dtype=BF16,
        reqs=[(150, 70), (0, 90), (33, 1)],
        hq=8,
        hk=2,
        d=128,
        bs=16,
        q_scale=2.0,
        kv_fp8=True,
    ),
    "prefill_fp8_bf16_without_the_copy": partial(
        check_prefill,
        seed=62,
        dtype=BF16,
        reqs=[(150, 70), (0, 20)],
        hq=8,
        hk=2,
        d=128,
        bs=16,
        kv_fp8=True,
        fp8_copy=False,
    ),
    "prefill_fp8_bf16_split_key_range": partial(
        check_prefill,
        seed=60,
        dtype=BF16,
        reqs=[(300, 3), (21, 2)],
        hq=4,
        hk=1,
        d=64,
        bs=16,
        cfg=SPLIT_CFG,
        q_scale=3.0,
        kv_fp8=True,
    ),
}


def run_cases(device: str, names: list[str]) -> dict[str, str | None]:
    """Case name -> None if it passed, else its traceback."""
    results: dict[str, str | None] = {}
    for name in names:
        try:
            CASES[name](device)
            results[name] = None
        except Exception:  # reported per case by the pytest side
            results[name] = traceback.format_exc()
    return results


# ---------------------------------------------------------------- compiling for the GPU, without one


def _hopper_compile_variants() -> dict[str, Callable[[], None]]:
    """Each kernel through its real launcher, with the tile configurations a CUDA device gets."""
    from engine.kernels import cudnn_prompt
    from engine.kernels.triton import attention, elementwise, gemv

    cuda = torch.device("cuda")

    def caches(dtype, hk, d, kv_fp8):
        """A cache (for k and v) and the scale keywords: FP8 with scales, or `dtype` and none."""
        if not kv_fp8:
            return torch.zeros(8, 16, hk, d, dtype=dtype), {}
        scale = torch.ones(8, 16, hk)
        return torch.zeros(8, 16, hk, d, dtype=FP8), {"k_scale": scale, "v_scale": scale}

    def decode(dtype, hq, hk, d, kv_fp8=False, **cfg):
        kc, scales = caches(dtype, hk, d, kv_fp8)
        seq_lens, table = torch.full((2,), 100, dtype=torch.int32), torch.zeros(2, 8, dtype=torch.int32)
        config = attention.DecodeConfig(**{**vars(attention.decode_config(cuda, d, dtype, kv_fp8)), **cfg})
        attention.decode_attention(torch.zeros(2, hq, d, dtype=dtype), kc, kc, seq_lens, table, 0.1, config, **scales)

    def rotary_decode(dtype, kv_fp8=False, qk_norm=False, merge=True, **cfg):
        kc, scales = caches(dtype, 8, 128, kv_fp8)
        seq_lens, table = torch.full((2,), 100, dtype=torch.int32), torch.zeros(2, 8, dtype=torch.int32)
        config = attention.DecodeConfig(**{**vars(attention.decode_config(cuda, 128, dtype, kv_fp8)), **cfg})
        q, k, v = torch.zeros(2, 48 * 128, dtype=dtype).split([32 * 128, 8 * 128, 8 * 128], dim=-1)
        norms = {"q_norm": torch.ones(128, dtype=dtype), "k_norm": torch.ones(128, dtype=dtype)} if qk_norm else {}
        index = torch.zeros(2, dtype=torch.long)
        rot = (index, q.view(2, 32, 128), k.view(2, 8, 128), v.view(2, 8, 128), torch.zeros(128, 128))
        with mock.patch.object(attention, "MERGE_IN_KERNEL", merge):
            attention.rotary_decode_attention(
                *rot, kc, kc, index, seq_lens, table, 0.1, **norms, **scales, cfg=config
            )  # fmt: skip

    def prefill(dtype, hq, hk, d, tokens=100, context=100, kv_fp8=False):
        kc, scales = caches(dtype, hk, d, kv_fp8)
        seq_lens = torch.full((2,), context, dtype=torch.int32)
        table = torch.zeros(2, -(-context // 16), dtype=torch.int32)
        qsl = torch.tensor([0, tokens // 2, tokens], dtype=torch.int32)
        cfg = attention.prefill_config(cuda, d, dtype, kv_fp8)
        assert (
            attention.prefill_splits(tokens, 2, hk, cfg.block_m // (hq // hk), table.shape[1] * 16, 132, cfg) > 1
        ) == (context > 10_000)
        with mock.patch.object(attention, "num_sms", lambda device: 132):  # an H100's, not the CPU stand-in's
            attention.prefill_attention(
                torch.zeros(tokens, hq, d, dtype=dtype), kc, kc, qsl, seq_lens, table, 0.1, cfg, **scales
            )

    x, w = torch.zeros(4, 4096, dtype=BF16), torch.zeros(4096, dtype=BF16)
    kv, cache = torch.zeros(4, 8, 128, dtype=BF16), torch.zeros(2, 16, 8, 128, dtype=BF16)
    q, k, v = torch.zeros(4, (32 + 2 * 8) * 128, dtype=BF16).split([32 * 128, 8 * 128, 8 * 128], dim=-1)
    fused_args = (
        torch.zeros(4, dtype=torch.long),
        q.view(4, 32, 128),
        k.view(4, 8, 128),
        v.view(4, 8, 128),
        torch.zeros(16, 128),
        cache,
        cache,
        torch.zeros(4, dtype=torch.long),
    )
    norm_w = torch.zeros(128, dtype=BF16)
    fp8_cache, fp8_scale = torch.zeros(2, 16, 8, 128, dtype=FP8), torch.ones(2, 16, 8)
    fp8_args = (*fused_args[:5], fp8_cache, fp8_cache, fused_args[7])
    fp8_scales = {"k_scale": fp8_scale, "v_scale": fp8_scale}
    return {
        "decode_bf16_d128_gqa4_splits": partial(decode, BF16, 32, 8, 128, programs_per_sm=64, min_tiles_per_split=1),
        "decode_bf16_d128_gqa4_one_split": partial(decode, BF16, 32, 8, 128, max_splits=1),
        "rotary_decode_bf16_merge": partial(rotary_decode, BF16, programs_per_sm=64, min_tiles_per_split=1),
        "rotary_decode_bf16_reduce": partial(rotary_decode, BF16, merge=False, programs_per_sm=64),
        "rotary_decode_bf16_qk_norm_one_split": partial(rotary_decode, BF16, qk_norm=True, max_splits=1),
        "rotary_decode_bf16_merge_maxnreg_96": partial(
            rotary_decode, BF16, programs_per_sm=64, min_tiles_per_split=1, maxnreg=96
        ),
        "rotary_decode_fp8_kv_bf16_merge": partial(
            rotary_decode, BF16, kv_fp8=True, fma=False, programs_per_sm=64, min_tiles_per_split=1
        ),
        "decode_f16_d64_gqa3_splits": partial(decode, F16, 12, 4, 64, programs_per_sm=64, min_tiles_per_split=1),
        "prefill_bf16_d128_gqa4": partial(prefill, BF16, 32, 8, 128),
        "prefill_f16_d64_gqa3": partial(prefill, F16, 12, 4, 64),
        "prefill_bf16_d128_gqa4_split_key_range": partial(prefill, BF16, 32, 8, 128, tokens=8, context=70_000),
        "rms_norm": partial(elementwise.rms_norm, x, w, 1e-6),
        "add_rms_norm": partial(elementwise.add_rms_norm, x, x, w, 1e-6),
        "rotary_embedding": partial(
            elementwise.rotary_embedding,
            torch.zeros(4, dtype=torch.long),
            torch.zeros(4, 32, 128, dtype=BF16),
            kv,
            torch.zeros(16, 128),
        ),
        "silu_and_mul": partial(elementwise.silu_and_mul, torch.zeros(4, 2 * 14336, dtype=BF16)),
        # the one-row GEMV at Llama-3-8B's shapes: q|k|v after the norm, o, down after SiLU (bf16 and FP8)
        "gemv_bf16_norm": partial(
            gemv.gemv, x[:1], torch.zeros(6144, 4096, dtype=BF16), prologue="norm", norm_weight=w, residual=x[:1]
        ),
        "gemv_bf16_plain": partial(gemv.gemv, x[:1], torch.zeros(4096, 4096, dtype=BF16)),
        "gemv_bf16_silu": partial(
            gemv.gemv, torch.zeros(1, 2 * 14336, dtype=BF16), torch.zeros(4096, 14336, dtype=BF16), prologue="silu"
        ),
        "gemv_fp8_norm": partial(
            gemv.gemv,
            x[:1],
            torch.zeros(6144, 4096, dtype=FP8),
            None,
            torch.ones(6144),
            prologue="norm",
            norm_weight=w,
            residual=x[:1],
        ),
        "write_kv": partial(elementwise.write_kv, kv, kv, cache, cache, torch.zeros(4, dtype=torch.long)),
        "rotary_write_kv": partial(elementwise.rotary_write_kv, *fused_args),
        "rotary_write_kv_qk_norm": partial(elementwise.rotary_write_kv, *fused_args, q_norm=norm_w, k_norm=norm_w),
        # FP8 KV caches (sm_90 converts e4m3 natively; Triton refuses float8e4nv below sm_89)
        "decode_fp8_kv_bf16_d128_gqa4_splits": partial(
            decode, BF16, 32, 8, 128, kv_fp8=True, programs_per_sm=64, min_tiles_per_split=1
        ),
        "decode_fp8_kv_bf16_d128_gqa4_one_split": partial(decode, BF16, 32, 8, 128, kv_fp8=True, max_splits=1),
        "decode_fp8_kv_bf16_d128_gqa4_tl_dot": partial(decode, BF16, 32, 8, 128, kv_fp8=True, fma=False),
        "decode_fp8_kv_f16_d64_gqa3_splits": partial(
            decode, F16, 12, 4, 64, kv_fp8=True, programs_per_sm=64, min_tiles_per_split=1
        ),
        "decode_fp8_kv_f32_d128_gqa4": partial(decode, F32, 32, 8, 128, kv_fp8=True),
        "prefill_fp8_kv_bf16_d128_gqa4": partial(prefill, BF16, 32, 8, 128, kv_fp8=True),
        "prefill_fp8_kv_bf16_d256_gqa2": partial(prefill, BF16, 16, 8, 256, kv_fp8=True),
        "prefill_fp8_kv_f32_d64_gqa4": partial(prefill, F32, 32, 8, 64, kv_fp8=True),
        "prefill_fp8_kv_bf16_d128_gqa4_split_key_range": partial(
            prefill, BF16, 32, 8, 128, tokens=8, context=70_000, kv_fp8=True
        ),
        "write_kv_fp8": partial(
            elementwise.write_kv, kv, kv, fp8_cache, fp8_cache, torch.zeros(4, dtype=torch.long), fp8_scale, fp8_scale
        ),
        "rotary_write_kv_fp8": partial(elementwise.rotary_write_kv, *fp8_args, **fp8_scales),
        "rotary_write_kv_fp8_qk_norm": partial(
            elementwise.rotary_write_kv, *fp8_args, q_norm=norm_w, k_norm=norm_w, **fp8_scales
        ),
        # the cuDNN route's merge of its two calls at Llama-3-8B's heads (cuDNN's [1, H, S, D] outputs as rows)
        "cudnn_merge_bf16_d128": partial(
            cudnn_prompt.merge,
            torch.zeros(1, 32, 64, 128, dtype=BF16)[0].permute(1, 0, 2),
            torch.zeros(1, 32, 64),
            torch.zeros(1, 32, 64, 128, dtype=BF16)[0].permute(1, 0, 2),
            torch.zeros(1, 32, 64),
            50,
        ),
    }


def compile_for_hopper() -> dict[str, str | None]:
    """Compiles every kernel to an sm_90 cubin on a machine without a GPU (Triton ships ptxas).

    A stand-in driver names the target and every `kernel[grid](...)` becomes a warmup, which
    compiles and does not launch; the tensors stay on CPU. Relies on Triton internals (3.6):
    if they moved, the whole check reports that instead of a kernel error.
    """
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class HopperWithoutGPU:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(HopperWithoutGPU())
    JITFunction.__getitem__ = lambda self, grid: partial(self.run, grid=grid, warmup=True)
    results: dict[str, str | None] = {}
    for name, compile_variant in _hopper_compile_variants().items():
        try:
            compile_variant()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    return results


def _run_self(*argv: str, interpret: bool) -> dict[str, str | None]:
    """This file as a script in a fresh process; its last stdout line is a JSON result map."""
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, __file__, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"subprocess {argv[:1]} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def test_kernels_compile_for_hopper_without_a_gpu() -> None:
    failures = {name: err for name, err in _run_self("--compile-sm90", interpret=False).items() if err}
    assert not failures, "\n".join(f"{name}:\n{err}" for name, err in failures.items())


# ---------------------------------------------------------------- CPU: interpreter subprocess


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str | None]:
    return _run_self(*CASES, interpret=True)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference_under_interpreter(name: str, interpreter_results) -> None:
    error = interpreter_results.get(name, "case did not run")
    assert error is None, error


@pytest.mark.parametrize("sms", [132, 78, 8])
def test_decode_splits_stay_within_a_wave_of_programs(sms: int) -> None:
    """decode_splits never launches more than programs_per_sm programs an SM (the programs past a wave run
    after it), and still splits a long context over the whole wave: at 4 x 50K on an H100, 16 splits."""
    pytest.importorskip("triton")
    from engine.kernels.triton.attention import DecodeConfig, decode_splits

    cfg = DecodeConfig(block_n=64, min_tiles_per_split=1)
    for batch, hk, context in [(1, 8, 50_000), (4, 8, 50_000), (3, 8, 50_000), (64, 8, 512), (1, 8, 512), (7, 5, 9000)]:
        splits = decode_splits(batch, hk, context, sms, cfg)
        tiles = -(-context // cfg.block_n)
        assert 1 <= splits <= min(cfg.max_splits, tiles)
        if splits > 1:
            assert batch * hk * splits <= cfg.programs_per_sm * sms, (batch, hk, context, splits)
        # one more split would still fit the wave only where a cap (max_splits, the context's tiles) stops it
        more_fits = batch * hk * (splits + 1) <= cfg.programs_per_sm * sms
        assert not more_fits or splits in (cfg.max_splits, tiles), (batch, hk, context, splits)
    if sms == 132:
        assert decode_splits(4, 8, 50_000, sms, cfg) == 16
        assert decode_splits(1, 8, 50_000, sms, cfg) == 66


def test_merge_chunk_is_a_power_of_two_up_to_16() -> None:
    pytest.importorskip("triton")
    from engine.kernels.triton.attention import merge_chunk

    assert [merge_chunk(s) for s in (1, 2, 3, 8, 9, 16, 17, 66, 128)] == [1, 2, 4, 8, 16, 16, 16, 16, 16]


def test_triton_not_claimed_on_cpu_without_interpreter() -> None:
    pytest.importorskip("triton")
    from engine.kernels.registry import backend_available

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter")
    assert not backend_available("triton", "cpu")


def test_bench_kernels_refuses_to_run_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from experiments import bench_kernels

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_kernels.main(["--quick"])


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference_on_gpu(name: str) -> None:
    CASES[name]("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("prologue", ["none", "norm", "silu"])
def test_gemv_at_llama_8b_shapes_gpu(prologue: str, fp8: bool) -> None:
    """The one-row GEMV at Llama-3-8B's sizes: q|k|v (norm), o (none), down (silu), gate|up (norm)."""
    shapes = {"none": [(4096, 4096)], "norm": [(6144, 4096), (28672, 4096)], "silu": [(4096, 14336)]}[prologue]
    for i, (n, k) in enumerate(shapes):
        check_linear("cuda", 500 + i, BF16, n, k, prologue, residual=prologue == "norm", fp8=fp8)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_decode_long_context_matches_reference_gpu(batch: int) -> None:
    gen = torch.Generator().manual_seed(100 + batch)
    lens = [65536 - 7] if batch == 1 else torch.randint(50_000, 60_000, (batch,), generator=gen).tolist()
    check_decode("cuda", seed=200 + batch, dtype=BF16, lens=lens, hq=32, hk=8, d=128, bs=16, q_scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lens, kv_fp8, merge",
    [
        ([512], False, True),
        ([65536 - 7], False, True),
        ([65536 - 7], False, False),
        ([50_000, 30_001, 17, 4097], False, True),
        ([50_000, 30_001, 17, 4097], True, True),
        ([512 + 3 * i for i in range(64)], False, True),
    ],
)
def test_rotary_decode_at_llama_8b_shapes_gpu(lens: list[int], kv_fp8: bool, merge: bool) -> None:
    """The fused decode op at the 8B shape's heads, on the GPU's tiles and splits (64 splits at 65K keys)."""
    check_rotary_decode("cuda", seed=300 + len(lens), dtype=BF16, lens=lens, hq=32, hk=8, d=128, bs=16,
                        kv_fp8=kv_fp8, merge=merge)  # fmt: skip


@pytest.mark.gpu
def test_rotary_decode_replays_in_a_cuda_graph_gpu(monkeypatch) -> None:
    """The fused decode launch captured once and replayed on new rows, five times: its split counters must be
    back at zero after every replay, or a later replay's merge would run early, late or never."""
    from engine.kernels.triton import attention

    triton_ops, torch_ops = _ops()
    gen = _rng("cuda", 402)
    hq, hk, d, bs, rows = 32, 8, 128, 16, 3
    kv = paged_kv([3000, 3000, 3000], hk, d, bs, BF16, gen)
    qkv = _randn((rows, (hq + 2 * hk) * d), gen, BF16)
    q, k, v = (t.view(rows, -1, d) for t in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    cos_sin = _cos_sin(4096, d, "cuda")
    seq_lens = kv.seq_lens.clone()
    positions, slots = torch.zeros(rows, dtype=torch.long, device="cuda"), torch.zeros_like(seq_lens, dtype=torch.long)

    def set_rows(lens: list[int]) -> None:
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        positions.copy_(seq_lens - 1)
        blocks = kv.block_table.gather(1, (positions // bs)[:, None]).squeeze(1).long()
        slots.copy_(blocks * bs + positions % bs)

    def run(kc, vc, ops=attention):
        return ops.rotary_decode_attention(
            positions, q, k, v, cos_sin, kc, vc, slots, seq_lens, kv.block_table, d**-0.5
        )

    monkeypatch.setattr(attention, "MERGE_IN_KERNEL", True)
    set_rows([3000, 40, 1500])
    run(kv.k_cache, kv.v_cache)  # compile, and the counters' buffer exists before the capture
    assert attention.split_counters(q.device, rows * hk) is not None, "the merge did not run in the kernel"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(kv.k_cache, kv.v_cache)
    for lens in ([2999, 5, 1501], [17, 3000, 2], [1024, 1025, 1023], [3000, 3000, 3000], [1, 2, 3]):
        set_rows(lens)
        qkv.copy_(_randn(qkv.shape, gen, BF16))
        want_k, want_v = kv.k_cache.clone(), kv.v_cache.clone()
        graph.replay()
        want = run(want_k, want_v, torch_ops)
        _assert_close(out, want, BF16, f"rotary_decode_attention in a CUDA graph, lens {lens}")
        _assert_close(kv.k_cache, want_k, BF16, f"the k cache after a replay, lens {lens}")
        assert torch.equal(kv.v_cache, want_v), f"the v cache after a replay, lens {lens}"
    assert not attention._COUNTERS[q.device].any(), "a split counter was left non-zero"


@pytest.mark.gpu
def test_prefill_long_prefix_matches_reference_gpu() -> None:
    check_prefill(
        "cuda", seed=300, dtype=BF16, reqs=[(16384, 2048), (0, 1000), (5000, 1)], hq=32, hk=8, d=128, bs=16, q_scale=2.0
    )


@pytest.mark.gpu
@pytest.mark.parametrize("kv_fp8", [False, True])
def test_decode_replays_in_a_cuda_graph_gpu(kv_fp8: bool) -> None:
    """No host sync in the decode launch: it captures into a CUDA graph and replays correctly."""
    triton_ops, torch_ops = _ops()
    gen = _rng("cuda", 400)
    kv = paged_kv([3000, 17, 900], 8, 128, 16, BF16, gen, kv_fp8)
    q = _randn((3, 32, 128), gen, BF16)
    args = (kv.k_cache, kv.v_cache, kv.seq_lens, kv.block_table, 0.088)
    triton_ops.decode_attention(q, *args, **kv.scales)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_ops.decode_attention(q, *args, **kv.scales)
    q.copy_(_randn((3, 32, 128), gen, BF16))
    kv.seq_lens.copy_(torch.tensor([2999, 5, 901], dtype=torch.int32))
    graph.replay()
    want = torch_ops.decode_attention(q, *args, **kv.scales)
    _assert_close(out, want, BF16, "decode_attention in a CUDA graph")


@pytest.mark.gpu
def test_rotary_write_kv_replays_in_a_cuda_graph_gpu() -> None:
    """No host sync or varying allocation in the fused launch: captured once, replayed on new inputs."""
    triton_ops, torch_ops = _ops()
    gen = _rng("cuda", 401)
    hq, hk, d, tokens = 32, 8, 128, 4
    qkv = _randn((tokens, (hq + 2 * hk) * d), gen, BF16)
    q, k, v = (t.view(tokens, h, d) for t, h in zip(qkv.split([hq * d, hk * d, hk * d], dim=-1), (hq, hk, hk)))
    cos_sin = _cos_sin(4096, d, "cuda")
    positions = torch.zeros(tokens, dtype=torch.long, device="cuda")
    slots = torch.full((tokens,), -1, dtype=torch.long, device="cuda")
    k_cache = torch.zeros(16, 16, hk, d, dtype=BF16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    norm = (1.0 + 0.2 * _randn((d,), gen, F32)).to(BF16)
    args = (positions, q, k, v, cos_sin, k_cache, v_cache, slots)
    triton_ops.rotary_write_kv(*args, q_norm=norm, k_norm=norm)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_ops.rotary_write_kv(*args, q_norm=norm, k_norm=norm)
    qkv.copy_(_randn(qkv.shape, gen, BF16))
    positions.copy_(torch.tensor([5, 4095, 0, 77]))
    slots.copy_(torch.tensor([3, 200, -1, 17]))
    graph.replay()
    want_k, want_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    want = torch_ops.rotary_write_kv(positions, q, k, v, cos_sin, want_k, want_v, slots, q_norm=norm, k_norm=norm)
    _assert_close(out, want, BF16, "rotary_write_kv q in a CUDA graph")
    _assert_close(k_cache, want_k, BF16, "rotary_write_kv k cache in a CUDA graph")
    assert torch.equal(v_cache, want_v)


@pytest.mark.gpu
def test_bench_kernels_quick_runs_gpu(capsys) -> None:
    from experiments import bench_kernels

    bench_kernels.main(["--quick"])
    assert "decode attention" in capsys.readouterr().out


if __name__ == "__main__":
    # the subprocesses:  TRITON_INTERPRET=1 python tests/test_kernels_triton.py [case ...]
    #                    python tests/test_kernels_triton.py --compile-sm90
    torch.set_num_threads(1)
    if sys.argv[1:2] == ["--compile-sm90"]:
        print(json.dumps(compile_for_hopper()))
    elif os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run the cases with TRITON_INTERPRET=1 (the pytest side does)")
    else:
        print(json.dumps(run_cases("cpu", sys.argv[1:] or list(CASES))))
