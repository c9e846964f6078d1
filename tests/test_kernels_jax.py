"""The jax kernel backend against the torch reference, on fresh random inputs.

CPU cases are small (the whole file runs in seconds); the `gpu` cases run the same
comparisons at model-like sizes in bf16 with `make test-gpu`.
"""

from __future__ import annotations

import importlib
import sys

import pytest

jax = pytest.importorskip("jax")

import torch  # noqa: E402

from engine.kernels import jax_ops as J  # noqa: E402
from engine.kernels import registry  # noqa: E402
from engine.kernels import torch_ops as R  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def _randn(gen: torch.Generator, *shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def _both(op: str, *args):
    """(jax result, torch reference result) of one operation on the same inputs."""
    return getattr(J, op)(*args), getattr(R, op)(*args)


def _cuda_jax() -> None:
    if not J._probe("cuda"):
        pytest.skip("jax has no GPU device here")


def paged_batch(
    gen: torch.Generator,
    seq_lens: list[int],
    block_size: int,
    hk: int,
    d: int,
    dtype: torch.dtype,
    device: str = "cpu",
    spare_blocks: int = 5,
    spare_cols: int = 2,
):
    """Random caches and a block table whose rows are random, non-contiguous block ids.

    Returns (k_cache, v_cache, block_table[R, W] int32 with -1 past each row's end).
    """
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    ids = torch.randperm(num_blocks, generator=gen)
    width = max(need) + spare_cols
    table = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    used = 0
    for r, n in enumerate(need):
        table[r, :n] = ids[used : used + n].to(torch.int32)
        used += n
    k_cache = _randn(gen, num_blocks, block_size, hk, d, dtype=dtype, device=device)
    v_cache = _randn(gen, num_blocks, block_size, hk, d, dtype=dtype, device=device)
    return k_cache, v_cache, table.to(device)


# ---------------------------------------------------------------- elementwise ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_rms_norm_and_add_rms_norm_match_reference(tokens, dtype):
    gen = torch.Generator().manual_seed(tokens)
    x, res = _randn(gen, tokens, 64, dtype=dtype), _randn(gen, tokens, 64, dtype=dtype)
    w = _randn(gen, 64, dtype=dtype)
    _close(J.rms_norm(x, w, 1e-6), R.rms_norm(x, w, 1e-6), dtype)
    (y, s), (y_ref, s_ref) = J.add_rms_norm(x, res, w, 1e-5), R.add_rms_norm(x, res, w, 1e-5)
    _close(y, y_ref, dtype)
    _close(s, s_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hk,d", [(1, 4, 4, 64), (7, 6, 2, 64), (19, 8, 2, 128)])
def test_rotary_embedding_matches_reference_on_non_contiguous_views(tokens, hq, hk, d, dtype):
    gen = torch.Generator().manual_seed(tokens * d)
    # q and k as views into one fused projection, as a model produces them
    qkv = _randn(gen, tokens, (hq + 2 * hk) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    positions = torch.randint(0, 100, (tokens,), generator=gen)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(100).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    (qr, kr), (q_ref, k_ref) = _both("rotary_embedding", positions, q, k, cos_sin)
    _close(qr, q_ref, dtype)
    _close(kr, k_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 13])
def test_silu_and_mul_matches_reference(tokens, dtype):
    x = _randn(torch.Generator().manual_seed(tokens), tokens, 2 * 96, dtype=dtype)
    _close(J.silu_and_mul(x), R.silu_and_mul(x), dtype)


# ---------------------------------------------------------------- attention


@pytest.fixture
def small_chunks(monkeypatch):
    """Attention loop steps of one or two blocks, so small contexts take several chunks."""
    monkeypatch.setattr(J, "_CHUNK_ELEMENTS", 1 << 15)


def _with_dtypes(cases: list[tuple]) -> list[tuple]:
    """Every case in float32, every other one in bf16 too (each shape is one XLA compile on CPU)."""
    return [(c, torch.float32) for c in cases] + [(c, torch.bfloat16) for c in cases[::2]]


def _case_id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return f"hq{value[0]}-hk{value[1]}-d{value[2]}-bs{value[3]}"


# (hq, hk, head_dim, block_size, query lens, seq lens): GQA ratios 1/3/4, cached
# prefixes, lengths off block boundaries, a request with no query token this step
PREFILL_CASES = [
    (4, 4, 64, 16, [5, 17, 1], [5, 40, 33]),
    (6, 2, 64, 8, [3, 0, 11], [19, 7, 11]),
    (8, 2, 128, 16, [9, 30], [70, 30]),
    (4, 1, 128, 4, [1, 1, 2], [1, 9, 14]),
]


@pytest.mark.parametrize("case,dtype", _with_dtypes(PREFILL_CASES), ids=_case_id)
def test_prefill_attention_matches_reference(case, dtype, small_chunks):
    hq, hk, d, bs, q_lens, seq_lens = case
    gen = torch.Generator().manual_seed(hq * d + bs)
    k_cache, v_cache, table = paged_batch(gen, seq_lens, bs, hk, d, dtype)
    q = _randn(gen, sum(q_lens), hq, d, dtype=dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    args = (q, k_cache, v_cache, qsl, lens, table, d**-0.5)
    _close(J.prefill_attention(*args), R.prefill_attention(*args), dtype)


# (hq, hk, head_dim, block_size, seq lens): seq_len 1 included
DECODE_CASES = [
    (4, 4, 64, 16, [1, 17, 32, 5]),
    (8, 2, 128, 16, [100, 1, 47]),
    (12, 4, 128, 4, [3, 9, 33, 2, 1]),
]


@pytest.mark.parametrize("case,dtype", _with_dtypes(DECODE_CASES), ids=_case_id)
def test_decode_attention_matches_reference(case, dtype, small_chunks):
    hq, hk, d, bs, seq_lens = case
    gen = torch.Generator().manual_seed(hq * d + bs + 1)
    k_cache, v_cache, table = paged_batch(gen, seq_lens, bs, hk, d, dtype)
    q = _randn(gen, len(seq_lens), hq, d, dtype=dtype)
    args = (q, k_cache, v_cache, torch.tensor(seq_lens, dtype=torch.int32), table, d**-0.5)
    _close(J.decode_attention(*args), R.decode_attention(*args), dtype)


# ---------------------------------------------------------------- sampling


def test_apply_penalties_matches_reference():
    gen = torch.Generator().manual_seed(3)
    s, v = 3, 50
    logits = _randn(gen, s, v) * 3
    seen = torch.rand(s, v, generator=gen) < 0.3
    counts = torch.randint(0, 4, (s, v), generator=gen) * seen
    rep = torch.tensor([1.0, 1.3, 0.8])
    pres, freq = torch.tensor([0.0, 0.5, -0.2]), torch.tensor([0.0, 0.1, 0.3])
    out, ref = _both("apply_penalties", logits, seen, counts, rep, pres, freq)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_top_k_top_p_min_p_keeps_exactly_the_reference_set():
    gen = torch.Generator().manual_seed(5)
    logits = _randn(gen, 5, 300) * 3
    top_k = torch.tensor([0, 5, 50, 1000, 17])
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.3, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.1, 0.2])
    out, ref = _both("top_k_top_p_min_p", logits, top_k, top_p, min_p)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.equal(out[~torch.isinf(ref)], ref[~torch.isinf(ref)])


# ---------------------------------------------------------------- plumbing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.bool])
def test_dlpack_shares_memory_on_cpu(dtype):
    t = torch.zeros(8, 16, dtype=dtype)
    view = J._to_jax(t)
    assert view.unsafe_buffer_pointer() == t.data_ptr()
    t[2, 3] = 1
    assert bool(view[2, 3] == 1)  # torch's write is seen through the jax view
    back = J._to_torch(view)
    assert back.data_ptr() == t.data_ptr()


def test_kv_cache_is_never_copied_into_jax():
    cache = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16)
    assert J._cache_to_jax(cache).unsafe_buffer_pointer() == cache.data_ptr()
    with pytest.raises(ValueError):
        J._cache_to_jax(cache.transpose(0, 1))


def test_ragged_sizes_in_one_bucket_compile_once():
    gen = torch.Generator().manual_seed(11)
    w = _randn(gen, 32)
    k_cache, v_cache, _ = paged_batch(gen, [40], 8, 2, 64, torch.float32, spare_blocks=8)
    before = J.compiled_shapes()
    if before is None:
        pytest.skip("this jax does not expose jit cache sizes")
    for tokens, width in [(9, 5), (12, 7), (16, 3)]:  # all bucket to 16 tokens, width 8
        J.rms_norm(_randn(gen, tokens, 32), w, 1e-6)
        table = torch.randint(0, k_cache.shape[0], (3, width), generator=gen, dtype=torch.int32)
        lens = torch.randint(1, width * 8 + 1, (3,), generator=gen, dtype=torch.int32)
        J.decode_attention(_randn(gen, 3, 4, 64), k_cache, v_cache, lens, table, 0.125)
    # one rms_norm and one decode specialisation (these shapes appear in no other test)
    assert J.compiled_shapes() - before == 2
    J.rms_norm(_randn(gen, 17, 32), w, 1e-6)  # the next bucket compiles again
    assert J.compiled_shapes() - before == 3


def test_bucket_is_the_next_power_of_two_above_a_floor():
    assert [J.bucket(n) for n in (0, 1, 8, 9, 16, 17, 1000)] == [8, 8, 8, 16, 16, 32, 1024]
    assert J.bucket(3, floor=1) == 4


def test_probe_says_cpu_and_write_kv_falls_back_to_torch():
    assert J._probe("cpu") and not J._probe("tpu")
    kernels = registry.KernelSet("cpu", prefer=("jax", "torch"))
    assert kernels.chosen["write_kv"] == "torch"
    assert all(kernels.chosen[op] == "jax" for op in registry.OPS if op != "write_kv")


def test_backend_is_unavailable_when_jax_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` now raises ImportError
    monkeypatch.delitem(sys.modules, "engine.kernels.jax_ops")
    with pytest.raises(ImportError):
        importlib.import_module("engine.kernels.jax_ops")
    assert registry.load_backend("jax") is False


# ---------------------------------------------------------------- CUDA, model-like sizes


@pytest.mark.gpu
def test_cuda_elementwise_ops_match_reference_in_bf16():
    _cuda_jax()
    gen, dt = torch.Generator().manual_seed(21), torch.bfloat16
    x, res = (_randn(gen, 1000, 4096, dtype=dt, device="cuda") for _ in range(2))
    w = _randn(gen, 4096, dtype=dt, device="cuda")
    _close(J.rms_norm(x, w, 1e-6), R.rms_norm(x, w, 1e-6), dt)
    for got, want in zip(J.add_rms_norm(x, res, w, 1e-6), R.add_rms_norm(x, res, w, 1e-6)):
        _close(got, want, dt)
    gate_up = _randn(gen, 1000, 2 * 11008, dtype=dt, device="cuda")
    _close(J.silu_and_mul(gate_up), R.silu_and_mul(gate_up), dt)
    q = _randn(gen, 1000, 32, 128, dtype=dt, device="cuda")
    k = _randn(gen, 1000, 8, 128, dtype=dt, device="cuda")
    positions = torch.randint(0, 4096, (1000,), generator=gen).cuda()
    cos_sin = _randn(gen, 4096, 128, device="cuda")
    for got, want in zip(*_both("rotary_embedding", positions, q, k, cos_sin)):
        _close(got, want, dt)


@pytest.mark.gpu
def test_cuda_prefill_attention_matches_reference_in_bf16():
    _cuda_jax()
    gen, dt = torch.Generator().manual_seed(22), torch.bfloat16
    q_lens, seq_lens = [700, 1, 130, 333], [1500, 64, 130, 1000]
    k_cache, v_cache, table = paged_batch(gen, seq_lens, 16, 8, 128, dt, device="cuda", spare_blocks=100)
    q = _randn(gen, sum(q_lens), 32, 128, dtype=dt, device="cuda")
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    _close(*_both("prefill_attention", q, k_cache, v_cache, qsl, lens, table, 128**-0.5), dt)


@pytest.mark.gpu
def test_cuda_decode_attention_matches_reference_in_bf16_without_copying_the_cache():
    _cuda_jax()
    gen, dt = torch.Generator().manual_seed(23), torch.bfloat16
    seq_lens = torch.randint(1, 2049, (61,), generator=gen).tolist()
    k_cache, v_cache, table = paged_batch(gen, seq_lens, 16, 8, 128, dt, device="cuda", spare_blocks=64)
    assert J._cache_to_jax(k_cache).unsafe_buffer_pointer() == k_cache.data_ptr()
    q = _randn(gen, len(seq_lens), 32, 128, dtype=dt, device="cuda")
    args = (q, k_cache, v_cache, torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), table, 128**-0.5)
    _close(J.decode_attention(*args), R.decode_attention(*args), dt)


@pytest.mark.gpu
def test_cuda_sampling_ops_match_reference():
    _cuda_jax()
    gen = torch.Generator().manual_seed(24)
    s, v = 37, 32000
    logits = (_randn(gen, s, v) * 3).cuda()
    seen = (torch.rand(s, v, generator=gen) < 0.01).cuda()
    counts = (torch.randint(0, 3, (s, v), generator=gen) * seen.cpu()).cuda()
    rep, pres, freq = (torch.rand(s, generator=gen).cuda() + 0.5 for _ in range(3))
    torch.testing.assert_close(
        J.apply_penalties(logits, seen, counts, rep, pres, freq),
        R.apply_penalties(logits, seen, counts, rep, pres, freq),
        atol=1e-5,
        rtol=1e-5,
    )
    top_k = torch.randint(0, 100, (s,), generator=gen).cuda()
    top_p = (torch.rand(s, generator=gen) * 0.9 + 0.1).cuda()
    min_p = (torch.rand(s, generator=gen) * 0.1).cuda()
    out, ref = _both("top_k_top_p_min_p", logits, top_k, top_p, min_p)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
