"""rotary_write_kv, the fused step before attention: its reference, its jax form, and the model's use of it.

The triton kernel's cases are in test_kernels_triton.py (interpreter subprocess, sm_90 compile).
Here, on the CPU: the torch reference is exactly rms_norm -> rotary_embedding -> write_kv; the jax
backend's is exactly its own rotary followed by torch's write_kv; a decode step of the model calls
one op between the qkv projection and attention; and the model's logits are those of the former
unfused path, bit for bit, with the torch and jax backends.
"""

from __future__ import annotations

import pytest
import torch

from model_steps import RecordingOps, UnfusedRotaryWriteKV, prefill_then_decode, tiny_model

F32, BF16 = torch.float32, torch.bfloat16


def fused_inputs(
    seed: int,
    dtype: torch.dtype,
    tokens: int = 9,
    hq: int = 6,
    hk: int = 2,
    d: int = 32,
    bs: int = 4,
    norms: bool = False,
):
    """(positions, q, k, v, cos_sin, slots, q_norm, k_norm, empty cache): q/k/v views of one qkv tensor."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (2 * torch.randn(tokens, (hq + 2 * hk) * d, generator=gen)).to(dtype)
    q, k, v = (t.view(tokens, h, d) for t, h in zip(qkv.split([hq * d, hk * d, hk * d], dim=-1), (hq, hk, hk)))
    angles = torch.arange(64)[:, None] * torch.rand(d // 2, generator=gen)[None, :]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, 64, (tokens,), generator=gen)
    num_blocks = tokens // bs + 2
    slots = torch.randperm(num_blocks * bs, generator=gen)[:tokens]
    slots[::4] = -1
    qw, kw = ((1 + 0.2 * torch.randn(d, generator=gen)).to(dtype) for _ in range(2)) if norms else (None, None)
    cache = torch.full((num_blocks, bs, hk, d), float("nan"), dtype=dtype)
    return positions, q, k, v, cos_sin, slots, qw, kw, cache


@pytest.mark.parametrize("norms", [False, True])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_reference_is_rms_norm_then_rotary_then_write_kv(dtype, norms):
    from engine.kernels import torch_ops as R

    positions, q, k, v, cos_sin, slots, qw, kw, cache = fused_inputs(1, dtype, norms=norms)
    q_before = q.clone()
    kc, vc, kc2, vc2 = (cache.clone() for _ in range(4))
    got = R.rotary_write_kv(positions, q, k, v, cos_sin, kc, vc, slots, q_norm=qw, k_norm=kw, eps=1e-5)
    qn, kn = (R.rms_norm(q, qw, 1e-5), R.rms_norm(k, kw, 1e-5)) if norms else (q, k)
    want, k_rot = R.rotary_embedding(positions, qn, kn, cos_sin)
    R.write_kv(k_rot, v, kc2, vc2, slots)
    assert torch.equal(got, want) and got.shape == q.shape and got.dtype == dtype
    assert torch.equal(q, q_before)  # q is read, not rotated in place
    torch.testing.assert_close(kc, kc2, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(vc, vc2, atol=0, rtol=0, equal_nan=True)
    written = ~kc.isnan().all(-1).all(-1).flatten()
    assert int(written.sum()) == int((slots >= 0).sum())  # slots -1 are not written


def test_reference_takes_zero_tokens():
    from engine.kernels import torch_ops as R

    positions, q, k, v, cos_sin, slots, _, _, cache = fused_inputs(2, F32, tokens=0)
    kc, vc = cache.clone(), cache.clone()
    assert R.rotary_write_kv(positions, q, k, v, cos_sin, kc, vc, slots).shape == (0, 6, 32)
    assert kc.isnan().all() and vc.isnan().all()


@pytest.mark.parametrize("norms", [False, True])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_jax_is_its_rotary_then_torch_write_kv(dtype, norms):
    pytest.importorskip("jax")
    from engine.kernels import jax_ops as J
    from engine.kernels import torch_ops as R

    positions, q, k, v, cos_sin, slots, qw, kw, cache = fused_inputs(3, dtype, norms=norms)
    caches = [cache.clone() for _ in range(6)]
    got = J.rotary_write_kv(positions, q, k, v, cos_sin, caches[0], caches[1], slots, q_norm=qw, k_norm=kw)
    qn, kn = (J.rms_norm(q, qw, 1e-6), J.rms_norm(k, kw, 1e-6)) if norms else (q, k)
    want, k_rot = J.rotary_embedding(positions, qn, kn, cos_sin)
    R.write_kv(k_rot, v, caches[2], caches[3], slots)
    assert torch.equal(got, want)
    for a, b in ((caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
    ref = R.rotary_write_kv(positions, q, k, v, cos_sin, caches[4], caches[5], slots, q_norm=qw, k_norm=kw)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == F32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(caches[0], caches[4], equal_nan=True, **tol)
    torch.testing.assert_close(caches[1], caches[5], atol=0, rtol=0, equal_nan=True)


def test_registry_resolves_rotary_write_kv_per_backend():
    from engine.kernels.registry import OPS, KernelSet

    assert "rotary_write_kv" in OPS
    assert KernelSet("cpu", prefer=("torch",)).chosen["rotary_write_kv"] == "torch"
    pytest.importorskip("jax")
    assert KernelSet("cpu", prefer=("jax", "torch")).chosen["rotary_write_kv"] == "jax"


# ---------------------------------------------------------------- the model


ARCHS = {"llama": ("LlamaForCausalLM", {}), "qwen3": ("Qwen3ForCausalLM", {}), "qwen2": ("Qwen2ForCausalLM", {})}


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_a_decode_layer_calls_one_op_between_qkv_and_attention(family):
    """Per decode layer: qkv (its norm the prologue), rotary_decode_attention (the rotary, the KV write and the
    attention), o, gate_up (norm), down (SiLU); the first layer's norm has no residual yet, the final norm is
    its own op. A prefill step runs rotary_write_kv then prefill_attention."""
    from engine.kernels.registry import KernelSet

    arch, overrides = ARCHS[family]
    model = tiny_model(arch, **overrides)
    ops = RecordingOps(KernelSet("cpu", prefer=("torch",)))
    calls: dict[int, list[str]] = {}

    def on_step(i: int) -> None:
        calls[i - 1] = list(ops.calls)  # the previous step's
        ops.calls.clear()

    prefill_then_decode(model, ops, [5, 3], steps=2, on_step=on_step)
    layer = ["rotary_decode_attention", "linear/none", "linear/norm+residual", "linear/silu"]
    want = ["linear/norm"] + layer
    for _ in range(model.config.num_layers - 1):
        want += ["linear/norm+residual"] + layer
    assert calls[1] == want + ["add_rms_norm"]
    assert ops.calls == calls[1]
    assert "prefill_attention" in calls[0] and "rotary_write_kv" in calls[0] and "decode_attention" not in calls[0]
    assert "write_kv" not in calls[0] and "rotary_embedding" not in calls[0]


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("family", sorted(ARCHS))
def test_model_logits_equal_the_unfused_path(family, backend):
    """rms_norm (Qwen3's q/k norms), rotary_embedding and write_kv as separate ops: the same bits."""
    if backend == "jax":
        pytest.importorskip("jax")
    from engine.kernels.registry import KernelSet

    arch, overrides = ARCHS[family]
    model = tiny_model(arch, **overrides)
    ops = KernelSet("cpu", prefer=(backend, "torch"))
    assert ops.chosen["rotary_write_kv"] == backend
    fused, fused_tokens = prefill_then_decode(model, ops, [7, 12, 1], steps=3)
    unfused, unfused_tokens = prefill_then_decode(model, UnfusedRotaryWriteKV(ops), [7, 12, 1], steps=3)
    assert fused_tokens == unfused_tokens
    for a, b in zip(fused, unfused):
        assert torch.equal(a, b)


def test_reference_prefill_attention_in_pieces_equals_at_once(monkeypatch):
    """The torch reference computes long prefills in pieces of query rows (bounded memory): the same result
    up to the matmul's summation order (BLAS blocks by the number of rows)."""
    from engine.kernels import torch_ops

    g = torch.Generator().manual_seed(5)
    bs, hq, hk, d = 4, 4, 2, 16
    lens, qlens = [37, 9], [21, 9]  # a prefix ending mid-block, and a whole prompt
    nb = sum(-(-n // bs) for n in lens) + 1
    k_cache, v_cache = torch.randn(nb, bs, hk, d, generator=g), torch.randn(nb, bs, hk, d, generator=g)
    table = torch.tensor([list(range(0, 10)), list(range(10, 13)) + [0] * 7], dtype=torch.int32)
    q = torch.randn(sum(qlens), hq, d, generator=g)
    starts = torch.tensor([0, qlens[0], sum(qlens)], dtype=torch.int32)
    args = (q, k_cache, v_cache, starts, torch.tensor(lens, dtype=torch.int32), table, d**-0.5)
    whole = torch_ops.prefill_attention(*args)
    monkeypatch.setattr(torch_ops, "REFERENCE_SCORES", hq * 37 * 2)  # two query rows a piece
    pieces = torch_ops.prefill_attention(*args)
    torch.testing.assert_close(pieces, whole, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(torch_ops, "REFERENCE_SCORES", 1)  # one row a piece: a wrong mask offset shows
    torch.testing.assert_close(torch_ops.prefill_attention(*args), whole, atol=1e-6, rtol=1e-6)
