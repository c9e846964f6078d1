"""The triton backend against the torch reference (engine/kernels/torch_ops.py), op by op.

On CPU the kernels can only run under the Triton interpreter, which `@triton.jit` picks when
TRITON_INTERPRET=1 is already set as the kernels are decorated; in a whole-suite run
triton_ops may have been imported before this file. So the CPU tests run every case of CASES
once, in a fresh interpreter subprocess (this file run as a script), and each pytest item
reports one case. On CUDA (@pytest.mark.gpu) the same cases run in-process with the GPU tile
configurations, plus long-context checks at real sizes in bf16.

Every case draws fresh inputs from its own seed: ragged seq_lens that are not multiples of
the block size, block tables that are random permutations padded with -1, GQA groups of
1/3/4, head dims 64/128. Cache slots that hold no live token are poisoned with NaN before
the triton kernel runs (the reference reads the clean caches), so a kernel that reads past a
request's context fails loudly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

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
    torch.testing.assert_close(got.float(), want.float(), atol=atol * max(peak, 1e-3), rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- elementwise cases


def check_rms_norm(device: str, seed: int, dtype: torch.dtype, tokens: int, hidden: int) -> None:
    triton_ops, torch_ops = _ops()
    gen = _rng(device, seed)
    x = _randn((tokens, hidden + 5), gen, dtype, 3.0)[:, :hidden]  # row stride != hidden
    w = _randn((hidden,), gen, dtype)
    _assert_close(triton_ops.rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6), dtype, "rms_norm")


def check_add_rms_norm(device: str, seed: int, dtype: torch.dtype, residual_dtype: torch.dtype,
                       tokens: int, hidden: int) -> None:
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
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
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


def check_write_kv(device: str, seed: int, src_dtype: torch.dtype, cache_dtype: torch.dtype,
                   tokens: int, hk: int, d: int, bs: int) -> None:
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


# ---------------------------------------------------------------- paged attention cases


@dataclass
class PagedKV:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor   # [R, W] int32, -1 past each request's blocks
    seq_lens: torch.Tensor      # [R] int32

    def poisoned(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the caches with NaN in every slot that holds no live token."""
        bs = self.k_cache.shape[1]
        live = torch.zeros(self.k_cache.shape[:2], dtype=torch.bool, device=self.k_cache.device)
        offsets = torch.arange(bs, device=live.device)
        for r, length in enumerate(self.seq_lens.tolist()):
            blocks = self.block_table[r, :-(-length // bs)].long()
            live.view(-1)[(blocks[:, None] * bs + offsets).flatten()[:length]] = True
        k, v = self.k_cache.clone(), self.v_cache.clone()
        k[~live], v[~live] = float("nan"), float("nan")
        return k, v


def paged_kv(lens: list[int], hk: int, d: int, bs: int, dtype: torch.dtype, gen: torch.Generator) -> PagedKV:
    """Random caches holding `lens` tokens; each request's blocks are scattered over the pool."""
    device = gen.device
    nblk = [-(-n // bs) for n in lens]
    num_blocks = sum(nblk) + 3
    order = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    table = torch.full((len(lens), max(nblk) + 2), -1, dtype=torch.int32, device=device)
    used = 0
    for r, n in enumerate(nblk):
        table[r, :n] = order[used:used + n]
        used += n
    k = _randn((num_blocks, bs, hk, d), gen, dtype)
    v = _randn((num_blocks, bs, hk, d), gen, dtype)
    return PagedKV(k, v, table, torch.tensor(lens, dtype=torch.int32, device=device))


def _attention_cfg(kind: str, cfg: dict | None):
    if cfg is None:
        return None
    from engine.kernels.triton import attention
    return (attention.DecodeConfig if kind == "decode" else attention.PrefillConfig)(**cfg)


def check_decode(device: str, seed: int, dtype: torch.dtype, lens: list[int], hq: int, hk: int, d: int,
                 bs: int, cfg: dict | None = None, q_scale: float = 1.0) -> None:
    triton_ops, torch_ops = _ops()
    from engine.kernels.triton import attention
    gen = _rng(device, seed)
    kv = paged_kv(lens, hk, d, bs, dtype, gen)
    q = _randn((len(lens), hq, d), gen, dtype, q_scale)
    scale = d ** -0.5
    want = torch_ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.seq_lens, kv.block_table, scale)
    k_bad, v_bad = kv.poisoned()
    if cfg is None:
        got = triton_ops.decode_attention(q, k_bad, v_bad, kv.seq_lens, kv.block_table, scale)
    else:
        got = attention.decode_attention(q, k_bad, v_bad, kv.seq_lens, kv.block_table, scale,
                                         _attention_cfg("decode", cfg))
    _assert_close(got, want, dtype, f"decode_attention lens={lens[:4]}")


def check_prefill(device: str, seed: int, dtype: torch.dtype, reqs: list[tuple[int, int]], hq: int, hk: int,
                  d: int, bs: int, cfg: dict | None = None, q_scale: float = 1.0) -> None:
    """`reqs`: (cached prefix, new query tokens) per request."""
    triton_ops, torch_ops = _ops()
    from engine.kernels.triton import attention
    gen = _rng(device, seed)
    kv = paged_kv([p + n for p, n in reqs], hk, d, bs, dtype, gen)
    qlens = torch.tensor([0] + [n for _, n in reqs], device=device)
    query_start_loc = qlens.cumsum(0).to(torch.int32)
    q = _randn((int(query_start_loc[-1]), hq, d), gen, dtype, q_scale)
    scale = d ** -0.5
    args = (kv.seq_lens, kv.block_table, scale)
    want = torch_ops.prefill_attention(q, kv.k_cache, kv.v_cache, query_start_loc, *args)
    k_bad, v_bad = kv.poisoned()
    if cfg is None:
        got = triton_ops.prefill_attention(q, k_bad, v_bad, query_start_loc, *args)
    else:
        got = attention.prefill_attention(q, k_bad, v_bad, query_start_loc, *args, _attention_cfg("prefill", cfg))
    _assert_close(got, want, dtype, f"prefill_attention reqs={reqs[:3]}")


def check_registry(device: str) -> None:
    from engine.kernels.registry import OPS, KernelSet
    kernels = KernelSet(device, prefer=("triton", "torch"))
    expected = {op: "torch" if op in ("apply_penalties", "top_k_top_p_min_p") else "triton" for op in OPS}
    assert kernels.chosen == expected, kernels.chosen


# Small enough for the interpreter (two slow cores): every case is a few dozen programs.
CASES: dict[str, Callable[[str], None]] = {
    "registry_picks_triton": check_registry,
    "rms_norm_f32": partial(check_rms_norm, seed=1, dtype=F32, tokens=7, hidden=96),
    "rms_norm_bf16": partial(check_rms_norm, seed=2, dtype=BF16, tokens=3, hidden=512),
    "add_rms_norm_bf16": partial(check_add_rms_norm, seed=3, dtype=BF16, residual_dtype=BF16, tokens=5, hidden=256),
    "add_rms_norm_f16_f32_residual": partial(check_add_rms_norm, seed=4, dtype=F16, residual_dtype=F32,
                                             tokens=4, hidden=80),
    "rotary_f32_gqa4_d64": partial(check_rotary, seed=5, dtype=F32, tokens=6, hq=8, hk=2, d=64),
    "rotary_bf16_gqa3_d128": partial(check_rotary, seed=6, dtype=BF16, tokens=3, hq=6, hk=2, d=128),
    "silu_and_mul_f32": partial(check_silu_and_mul, seed=7, dtype=F32, tokens=5, f=200),
    "silu_and_mul_bf16_two_column_tiles": partial(check_silu_and_mul, seed=8, dtype=BF16, tokens=2, f=1100),
    "write_kv_f32": partial(check_write_kv, seed=9, src_dtype=F32, cache_dtype=F32, tokens=20, hk=2, d=64, bs=16),
    "write_kv_f32_into_bf16": partial(check_write_kv, seed=10, src_dtype=F32, cache_dtype=BF16,
                                      tokens=13, hk=3, d=128, bs=8),
    # decode: seq_len 1, lengths off the block grid, several splits, tiles spanning and inside blocks
    "decode_f32_gqa4_d64": partial(check_decode, seed=11, dtype=F32, lens=[1, 37, 100], hq=8, hk=2, d=64, bs=16),
    "decode_bf16_gqa3_d128_bs8": partial(check_decode, seed=12, dtype=BF16, lens=[50, 3], hq=6, hk=2, d=128, bs=8),
    "decode_f16_mha_d64_bs32": partial(check_decode, seed=13, dtype=F16, lens=[77], hq=2, hk=2, d=64, bs=32),
    "decode_bf16_gpu_tiles_one_split": partial(check_decode, seed=14, dtype=BF16, lens=[130, 1, 64], hq=8, hk=2,
                                               d=128, bs=16, cfg=dict(block_n=64, max_splits=1)),
    "decode_f32_gpu_tiles_splits": partial(check_decode, seed=15, dtype=F32, lens=[300, 20], hq=4, hk=1, d=64,
                                           bs=16, cfg=dict(block_n=64, min_tiles_per_split=1), q_scale=3.0),
    # prefill: cached prefixes, chunks crossing tiles, one-token chunks, an empty request
    "prefill_f32_gqa4_d64": partial(check_prefill, seed=16, dtype=F32, reqs=[(0, 40), (83, 17), (5, 1)],
                                    hq=8, hk=2, d=64, bs=16),
    "prefill_bf16_gqa3_d128_bs8": partial(check_prefill, seed=17, dtype=BF16, reqs=[(30, 33), (0, 7)],
                                          hq=6, hk=2, d=128, bs=8),
    "prefill_f16_mha_d64_bs32_empty_request": partial(check_prefill, seed=18, dtype=F16,
                                                      reqs=[(100, 20), (10, 0), (0, 3)], hq=2, hk=2, d=64, bs=32),
    "prefill_bf16_gpu_tiles": partial(check_prefill, seed=19, dtype=BF16, reqs=[(150, 70), (0, 90)], hq=8, hk=2,
                                      d=128, bs=16, cfg=dict(block_m=128, block_n=64), q_scale=2.0),
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
    from engine.kernels.triton import attention, elementwise
    cuda = torch.device("cuda")

    def decode(dtype, hq, hk, d, **cfg):
        kc = torch.zeros(8, 16, hk, d, dtype=dtype)
        seq_lens, table = torch.full((2,), 100, dtype=torch.int32), torch.zeros(2, 8, dtype=torch.int32)
        config = attention.DecodeConfig(**{**vars(attention.decode_config(cuda, d, dtype)), **cfg})
        attention.decode_attention(torch.zeros(2, hq, d, dtype=dtype), kc, kc, seq_lens, table, 0.1, config)

    def prefill(dtype, hq, hk, d):
        kc = torch.zeros(8, 16, hk, d, dtype=dtype)
        seq_lens, table = torch.full((2,), 100, dtype=torch.int32), torch.zeros(2, 8, dtype=torch.int32)
        qsl = torch.tensor([0, 60, 100], dtype=torch.int32)
        attention.prefill_attention(torch.zeros(100, hq, d, dtype=dtype), kc, kc, qsl, seq_lens, table, 0.1,
                                    attention.prefill_config(cuda, d, dtype))

    x, w = torch.zeros(4, 4096, dtype=BF16), torch.zeros(4096, dtype=BF16)
    kv, cache = torch.zeros(4, 8, 128, dtype=BF16), torch.zeros(2, 16, 8, 128, dtype=BF16)
    return {
        "decode_bf16_d128_gqa4_splits": partial(decode, BF16, 32, 8, 128, programs_per_sm=64, min_tiles_per_split=1),
        "decode_bf16_d128_gqa4_one_split": partial(decode, BF16, 32, 8, 128, max_splits=1),
        "decode_f16_d64_gqa3_splits": partial(decode, F16, 12, 4, 64, programs_per_sm=64, min_tiles_per_split=1),
        "prefill_bf16_d128_gqa4": partial(prefill, BF16, 32, 8, 128),
        "prefill_f16_d64_gqa3": partial(prefill, F16, 12, 4, 64),
        "rms_norm": partial(elementwise.rms_norm, x, w, 1e-6),
        "add_rms_norm": partial(elementwise.add_rms_norm, x, x, w, 1e-6),
        "rotary_embedding": partial(elementwise.rotary_embedding, torch.zeros(4, dtype=torch.long),
                                    torch.zeros(4, 32, 128, dtype=BF16), kv, torch.zeros(16, 128)),
        "silu_and_mul": partial(elementwise.silu_and_mul, torch.zeros(4, 2 * 14336, dtype=BF16)),
        "write_kv": partial(elementwise.write_kv, kv, kv, cache, cache, torch.zeros(4, dtype=torch.long)),
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
    proc = subprocess.run([sys.executable, __file__, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)
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
@pytest.mark.parametrize("batch", [1, 8])
def test_decode_long_context_matches_reference_gpu(batch: int) -> None:
    gen = torch.Generator().manual_seed(100 + batch)
    lens = [65536 - 7] if batch == 1 else torch.randint(50_000, 60_000, (batch,), generator=gen).tolist()
    check_decode("cuda", seed=200 + batch, dtype=BF16, lens=lens, hq=32, hk=8, d=128, bs=16, q_scale=2.0)


@pytest.mark.gpu
def test_prefill_long_prefix_matches_reference_gpu() -> None:
    check_prefill("cuda", seed=300, dtype=BF16, reqs=[(16384, 2048), (0, 1000), (5000, 1)],
                  hq=32, hk=8, d=128, bs=16, q_scale=2.0)


@pytest.mark.gpu
def test_decode_replays_in_a_cuda_graph_gpu() -> None:
    """No host sync in the decode launch: it captures into a CUDA graph and replays correctly."""
    triton_ops, torch_ops = _ops()
    gen = _rng("cuda", 400)
    kv = paged_kv([3000, 17, 900], 8, 128, 16, BF16, gen)
    q = _randn((3, 32, 128), gen, BF16)
    triton_ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.seq_lens, kv.block_table, 0.088)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.seq_lens, kv.block_table, 0.088)
    q.copy_(_randn((3, 32, 128), gen, BF16))
    kv.seq_lens.copy_(torch.tensor([2999, 5, 901], dtype=torch.int32))
    graph.replay()
    want = torch_ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.seq_lens, kv.block_table, 0.088)
    _assert_close(out, want, BF16, "decode_attention in a CUDA graph")


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
