"""decode_attention_fma (engine/kernels/triton/decode_fma.py) against the torch reference, FP8 and 16-bit caches.

The kernel reads FP8 (float8_e4m3fn) paged caches with one float32 scale per slot and KV head, or bf16, f16
and f32 caches without scales, and must give torch_ops.decode_attention(..., k_scale=, v_scale=) on the same
caches (scales None for the unscaled ones) to q's dtype's tolerance.

On CPU the kernel only runs under the Triton interpreter, which `@triton.jit` picks when TRITON_INTERPRET=1
is set before the kernels are decorated; in a whole-suite run they may have been imported already. So, as in
tests/test_kernels_triton.py, every case of CASES runs once in a fresh interpreter subprocess (this file run
as a script) and each pytest item reports one case. The cases, for FP8 caches and again for 16-bit ones
(bf16, f16; q in the cache's dtype), plus f32 caches: ragged batches, contexts ending mid-block and on a
block edge, a context of one token, one and several splits (and splits past a short request's context),
G = 1, 2, 3, 4, 8 (and 16 for bf16), D = 64, 96, 128, block sizes 8, 16, 32 (tiles inside one block and
across blocks), one and two warps, 1 to 3 tiles an unrolled iteration, q in float32, bf16 and f16. Slots
that hold no live token are poisoned (FP8 NaN bytes and NaN scales, or NaN values) in the kernel's copy,
so a read past a context shows.

A second subprocess compiles the default tiles (G 4, D 128, bf16 q) over an FP8 and a bf16 cache for sm_90
without a GPU and checks ptxas reports no spills for either (the register budget the module docstring
describes). On CUDA (@pytest.mark.gpu) the cases run in-process, plus B 4, context 5000, Llama-3-8B's heads
(Hq 32, Hk 8, D 128) in bf16 over an FP8 and a bf16 cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from functools import partial
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 300

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FP8 = torch.float8_e4m3fn

# |kernel - reference| <= atol * max|reference| + rtol * |reference| (as tests/test_kernels_triton.py): both
# read the same cache values (and scales), so only the float32 summation order and q's dtype's rounding differ
TOL = {F32: (1e-4, 1e-4), F16: (4e-3, 4e-3), BF16: (2e-2, 2e-2)}


def _rng(device: str, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def paged_kv(
    lens: list[int], hk: int, d: int, bs: int, gen: torch.Generator, cache: torch.dtype = FP8
) -> dict[str, torch.Tensor | None]:
    """Caches holding `lens` tokens (keys' heads of magnitudes over two decades, so that an FP8 cache's
    per-slot scales matter), each request's blocks scattered over the pool, the table padded with -1. FP8:
    torch_ops.quantize_fp8's values and scales; else the values in `cache`'s dtype and no scales (None)."""
    from engine.kernels.torch_ops import quantize_fp8

    device = gen.device
    nblk = [-(-n // bs) for n in lens]
    num_blocks = sum(nblk) + 3
    order = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    table = torch.full((len(lens), max(nblk) + 2), -1, dtype=torch.int32, device=device)
    used = 0
    for r, n in enumerate(nblk):
        table[r, :n] = order[used : used + n]
        used += n
    k = torch.randn((num_blocks, bs, hk, d), generator=gen, device=device)
    v = torch.randn((num_blocks, bs, hk, d), generator=gen, device=device)
    spread = 10.0 ** (2 * torch.rand((num_blocks, bs, hk, 1), generator=gen, device=device) - 1)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    if cache == FP8:
        (kc, ks), (vc, vs) = quantize_fp8(k * spread), quantize_fp8(v)
    else:
        kc, vc, ks, vs = (k * spread).to(cache), v.to(cache), None, None
    return {"k_cache": kc, "v_cache": vc, "k_scale": ks, "v_scale": vs, "seq_lens": seq_lens, "block_table": table}


def poisoned(kv: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """A copy with NaN in every slot that holds no live token: FP8 NaN (0x7f) bytes and NaN scales for an FP8
    cache, NaN values for the others."""
    bs = kv["k_cache"].shape[1]
    live = torch.zeros(kv["k_cache"].shape[:2], dtype=torch.bool, device=kv["k_cache"].device)
    offsets = torch.arange(bs, device=live.device)
    for r, length in enumerate(kv["seq_lens"].tolist()):
        blocks = kv["block_table"][r, : -(-length // bs)].long()
        live.view(-1)[(blocks[:, None] * bs + offsets).flatten()[:length]] = True
    out = dict(kv)
    for name in ("k_cache", "v_cache"):
        if kv[name].dtype == FP8:
            raw = kv[name].view(torch.uint8).clone()
            raw[~live] = 0x7F
            out[name] = raw.view(FP8)
        else:
            out[name] = kv[name].clone()
            out[name][~live] = float("nan")
    for name in ("k_scale", "v_scale"):
        if kv[name] is not None:
            out[name] = kv[name].clone()
            out[name][~live] = float("nan")
    return out


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape)
    assert not got.isnan().any(), f"{what}: NaN in the kernel's output"
    atol, rtol = TOL[dtype]
    peak = float(want.float().abs().max())
    torch.testing.assert_close(
        got.float(), want.float(), atol=atol * max(peak, 1e-3), rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def _splits(device: str, batch: int, hk: int, max_context: int, **tiles) -> int:
    """The split count the launcher picks (the same decode_splits call, from host-known sizes)."""
    from engine.kernels.triton.attention import DecodeConfig, decode_splits, num_sms

    cfg = DecodeConfig(
        block_n=tiles.get("block_n", 16),
        programs_per_sm=tiles.get("programs_per_sm", 8),
        min_tiles_per_split=1 if device != "cuda" else tiles.get("min_tiles_per_split", 4),
        max_splits=tiles.get("max_splits", 128),
    )
    return decode_splits(batch, hk, max_context, num_sms(torch.device(device)), cfg)


def check_decode(
    device: str,
    seed: int,
    dtype: torch.dtype,
    lens: list[int],
    hq: int,
    hk: int,
    d: int,
    bs: int,
    splits: str | None = None,
    q_scale: float = 1.0,
    cache: torch.dtype = FP8,
    **tiles,
) -> None:
    """The kernel on the poisoned caches against the reference on the clean ones; q in `dtype`, the caches in
    `cache` (FP8 with scales, or bf16, f16, f32 without). `splits` ("one" or "several"): the split count the
    case is meant to exercise (checked on CPU, whose tiles are fixed)."""
    from engine.kernels import torch_ops
    from engine.kernels.triton.decode_fma import decode_attention_fma

    gen = _rng(device, seed)
    kv = paged_kv(lens, hk, d, bs, gen, cache)
    q = (torch.randn((len(lens), hq, d), generator=gen, device=device) * q_scale).to(dtype)
    scale = d**-0.5
    if splits is not None and device == "cpu":
        n = _splits(device, len(lens), hk, kv["block_table"].shape[1] * bs, **tiles)
        assert (n == 1) == (splits == "one"), f"the case runs {n} splits, not {splits}"
    want = torch_ops.decode_attention(
        q, kv["k_cache"], kv["v_cache"], kv["seq_lens"], kv["block_table"], scale, kv["k_scale"], kv["v_scale"]
    )
    bad = poisoned(kv)
    got = decode_attention_fma(
        q,
        bad["k_cache"],
        bad["v_cache"],
        bad["seq_lens"],
        bad["block_table"],
        scale,
        k_scale=bad["k_scale"],
        v_scale=bad["v_scale"],
        **tiles,
    )
    _assert_close(got, want, dtype, f"decode_attention_fma {cache} cache lens={lens[:4]}")


def check_refusals(device: str) -> None:
    """FP8 caches without scales, 16-bit caches with them, scales that do not fit, caches of another dtype,
    tiles that are not powers of two: ValueError."""
    from engine.kernels.triton.decode_fma import decode_attention_fma as fma

    kv = paged_kv([5], 2, 64, 16, _rng(device, 0))
    q = torch.zeros((1, 4, 64), device=device)
    args = (kv["seq_lens"], kv["block_table"], 0.125)
    k8, v8 = kv["k_cache"], kv["v_cache"]
    scales = {"k_scale": kv["k_scale"], "v_scale": kv["v_scale"]}
    bf16, f64 = k8.to(BF16), k8.to(torch.float64)
    bad = [
        (partial(fma, q, k8, v8, *args), "FP8 without scales"),
        (partial(fma, q, k8, v8, *args, k_scale=kv["k_scale"]), "FP8 without v_scale"),
        (partial(fma, q, bf16, bf16, *args, **scales), "bf16 with scales"),
        (partial(fma, q, f64, f64, *args), "float64"),
        (partial(fma, q, k8, bf16, *args, **scales), "v_cache of another dtype"),
        (partial(fma, q, k8, v8, *args, **scales, block_n=24), "block_n not a power of two"),
        (partial(fma, q, bf16, bf16, *args, num_warps=3), "num_warps not a power of two"),
        (partial(fma, q, k8, v8, *args, **scales, num_stages=0), "no stages"),
        (partial(fma, q, k8, v8, *args, k_scale=kv["k_scale"][:, :8], v_scale=kv["v_scale"]), "scales' shape"),
    ]
    for call, what in bad:
        try:
            call()
        except ValueError:
            continue
        raise AssertionError(f"no ValueError for {what}")


# Small enough for the interpreter (two slow cores): a few dozen programs of a few tiles each. The FP8 cases
# (fp8kv_: FP8 caches, q in the dtype named next) and the same categories over 16-bit caches (bf16kv_,
# f16kv_: q in the cache's dtype) and f32 caches (f32kv_).
CASES: dict[str, Callable[[str], None]] = {
    "refusals": check_refusals,
    # ragged, a context of one token, mid-block ends, several splits (a split past the 1-token context)
    "fp8kv_f32_gqa4_d64_bs16": partial(
        check_decode, seed=1, dtype=F32, lens=[1, 37, 100], hq=8, hk=2, d=64, bs=16, splits="several"
    ),
    "fp8kv_bf16_gqa4_d128_bs16_block_edge": partial(
        check_decode, seed=2, dtype=BF16, lens=[50, 16, 3], hq=8, hk=2, d=128, bs=16, splits="several", q_scale=2.0
    ),
    "fp8kv_bf16_gqa2_d128_bs32": partial(
        check_decode, seed=3, dtype=BF16, lens=[77, 1, 64], hq=4, hk=2, d=128, bs=32, splits="several"
    ),
    "fp8kv_f32_gqa1_d64_bs32": partial(
        check_decode, seed=4, dtype=F32, lens=[33, 1], hq=3, hk=3, d=64, bs=32, splits="several"
    ),
    "fp8kv_bf16_gqa8_d128_bs16": partial(
        check_decode, seed=5, dtype=BF16, lens=[200], hq=8, hk=1, d=128, bs=16, splits="several", q_scale=3.0
    ),
    "fp8kv_f32_gqa8_d64_bs32": partial(
        check_decode, seed=6, dtype=F32, lens=[45, 130], hq=16, hk=2, d=64, bs=32, splits="several"
    ),
    "fp8kv_f32_gqa3_d96_padded": partial(check_decode, seed=7, dtype=F32, lens=[29, 50], hq=6, hk=2, d=96, bs=16),
    "fp8kv_f16_gqa4_d64_bs16": partial(check_decode, seed=8, dtype=F16, lens=[70, 18], hq=4, hk=1, d=64, bs=16),
    # one split: the partial (o, lse) and the reduce kernel skipped, `out` written by the split kernel
    "fp8kv_bf16_gqa4_d128_one_split": partial(
        check_decode, seed=9, dtype=BF16, lens=[70, 9], hq=8, hk=2, d=128, bs=16, splits="one", programs_per_sm=1
    ),
    # tiles across blocks (block ids gathered per key): block_n 32 over 16-slot blocks, 16 over 8-slot blocks
    "fp8kv_f32_gqa4_d64_block_n32_two_warps_bs16": partial(
        check_decode,
        seed=10,
        dtype=F32,
        lens=[100, 31, 1],
        hq=8,
        hk=2,
        d=64,
        bs=16,
        splits="several",
        block_n=32,
        num_warps=2,
    ),
    "fp8kv_bf16_gqa4_d128_bs8": partial(
        check_decode, seed=11, dtype=BF16, lens=[41, 8], hq=4, hk=1, d=128, bs=8, splits="several"
    ),
    # the unrolled loop over whole tiles: 1 and 3 tiles an iteration, splits of 5 whole tiles and a part
    "fp8kv_f32_gqa4_d64_one_tile_an_iteration": partial(
        check_decode, seed=12, dtype=F32, lens=[300, 5], hq=4, hk=1, d=64, bs=16, num_stages=1, programs_per_sm=1
    ),
    "fp8kv_bf16_gqa4_d128_three_tiles_an_iteration": partial(
        check_decode, seed=13, dtype=BF16, lens=[300, 5], hq=4, hk=1, d=128, bs=32, num_stages=3, programs_per_sm=1
    ),
    # the tuned latency-bound tiles (block_n 32, one warp: 16 keys a thread for FP8 at D 128)
    "fp8kv_bf16_gqa4_d128_block_n32_one_warp": partial(
        check_decode, seed=14, dtype=BF16, lens=[90, 17], hq=8, hk=2, d=128, bs=16, block_n=32, programs_per_sm=16
    ),
    # ---- 16-bit caches, no scales (q in the cache's dtype): the same categories
    "bf16kv_gqa4_d128_bs16_block_edge": partial(
        check_decode, seed=21, dtype=BF16, cache=BF16, lens=[50, 16, 3], hq=8, hk=2, d=128, bs=16, splits="several"
    ),
    "f16kv_gqa4_d64_bs16_ragged": partial(
        check_decode, seed=22, dtype=F16, cache=F16, lens=[1, 37, 100], hq=8, hk=2, d=64, bs=16, splits="several"
    ),
    "bf16kv_gqa2_d128_bs32": partial(
        check_decode, seed=23, dtype=BF16, cache=BF16, lens=[77, 1, 64], hq=4, hk=2, d=128, bs=32, splits="several"
    ),
    "f16kv_gqa1_d64_bs32": partial(
        check_decode, seed=24, dtype=F16, cache=F16, lens=[33, 1], hq=3, hk=3, d=64, bs=32, splits="several"
    ),
    "bf16kv_gqa8_d128_bs16": partial(
        check_decode,
        seed=25,
        dtype=BF16,
        cache=BF16,
        lens=[200],
        hq=8,
        hk=1,
        d=128,
        bs=16,
        splits="several",
        q_scale=3.0,
    ),
    "f16kv_gqa8_d64_bs32": partial(
        check_decode, seed=26, dtype=F16, cache=F16, lens=[45, 130], hq=16, hk=2, d=64, bs=32, splits="several"
    ),
    "bf16kv_gqa3_d96_padded": partial(
        check_decode, seed=27, dtype=BF16, cache=BF16, lens=[29, 50], hq=6, hk=2, d=96, bs=16
    ),
    # G 16: 4 elements (8 bytes) of D a thread, so that q and acc stay at 64 registers
    "bf16kv_gqa16_d64_bs16": partial(
        check_decode, seed=28, dtype=BF16, cache=BF16, lens=[40, 7], hq=16, hk=1, d=64, bs=16, splits="several"
    ),
    "bf16kv_gqa4_d128_one_split": partial(
        check_decode,
        seed=29,
        dtype=BF16,
        cache=BF16,
        lens=[70, 9],
        hq=8,
        hk=2,
        d=128,
        bs=16,
        splits="one",
        programs_per_sm=1,
    ),
    "f16kv_gqa4_d64_block_n32_two_warps_bs16": partial(
        check_decode,
        seed=30,
        dtype=F16,
        cache=F16,
        lens=[100, 31, 1],
        hq=8,
        hk=2,
        d=64,
        bs=16,
        splits="several",
        block_n=32,
        num_warps=2,
    ),
    "bf16kv_gqa4_d128_bs8": partial(
        check_decode, seed=31, dtype=BF16, cache=BF16, lens=[41, 8], hq=4, hk=1, d=128, bs=8, splits="several"
    ),
    "f16kv_gqa4_d64_one_tile_an_iteration": partial(
        check_decode,
        seed=32,
        dtype=F16,
        cache=F16,
        lens=[300, 5],
        hq=4,
        hk=1,
        d=64,
        bs=16,
        num_stages=1,
        programs_per_sm=1,
    ),
    "bf16kv_gqa4_d128_three_tiles_an_iteration": partial(
        check_decode,
        seed=33,
        dtype=BF16,
        cache=BF16,
        lens=[300, 5],
        hq=4,
        hk=1,
        d=128,
        bs=32,
        num_stages=3,
        programs_per_sm=1,
    ),
    "bf16kv_gqa4_d128_block_n32_one_warp": partial(
        check_decode,
        seed=34,
        dtype=BF16,
        cache=BF16,
        lens=[90, 17],
        hq=8,
        hk=2,
        d=128,
        bs=16,
        block_n=32,
        programs_per_sm=16,
    ),
    # ---- f32 caches (4 elements of D a thread), f32 q
    "f32kv_gqa4_d64_bs16": partial(
        check_decode, seed=35, dtype=F32, cache=F32, lens=[1, 37, 100], hq=8, hk=2, d=64, bs=16, splits="several"
    ),
    "f32kv_gqa4_d128_bs8": partial(
        check_decode, seed=36, dtype=F32, cache=F32, lens=[41, 8], hq=4, hk=1, d=128, bs=8, splits="several"
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


# the variants the Hopper check compiles: (cache dtype, tiles); {} is the defaults
HOPPER_VARIANTS: dict[str, tuple[torch.dtype, dict[str, int]]] = {"fp8": (FP8, {}), "bf16": (BF16, {})}


def compile_for_hopper(
    variants: dict[str, tuple[torch.dtype, dict[str, int]]] = HOPPER_VARIANTS,
) -> dict[str, dict[str, object]]:
    """Each variant's split kernel (G 4, D 128, bf16 q, the variant's cache dtype and tiles) compiled to sm_90
    without a GPU, and ptxas -v's report: variant -> {registers, spill_bytes, report}.

    A stand-in driver names the target and `kernel[grid](...)` becomes a warmup, which compiles and does not
    launch (Triton 3.6 internals, as tests/test_kernels_triton.py's Hopper check)."""
    import triton
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
    compiled = []

    def warmup(self, grid):
        def run(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            compiled.append((self.fn.__name__, kernel))
            return kernel

        return run

    JITFunction.__getitem__ = warmup
    from engine.kernels.triton.decode_fma import decode_attention_fma

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    results: dict[str, dict[str, object]] = {}
    for name, (cache_dtype, tiles) in variants.items():
        cache = torch.zeros(8, 16, 8, 128, dtype=cache_dtype)
        scales = {"k_scale": torch.ones(8, 16, 8), "v_scale": torch.ones(8, 16, 8)} if cache_dtype == FP8 else {}
        compiled.clear()
        decode_attention_fma(
            torch.zeros(2, 32, 128, dtype=BF16),
            cache,
            cache,
            torch.full((2,), 100, dtype=torch.int32),
            torch.zeros(2, 8, dtype=torch.int32),
            0.088,
            **scales,
            **tiles,
        )
        kernel = dict(compiled)["_decode_fma_kernel"]
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "kernel.ptx"
            ptx.write_text(kernel.asm["ptx"])
            report = subprocess.run(
                [str(ptxas), "-v", "-arch=sm_90a", str(ptx), "-o", os.devnull], capture_output=True, text=True
            ).stderr
        registers = re.search(r"Used (\d+) registers", report)
        results[name] = {
            "registers": int(registers.group(1)) if registers else None,
            "spill_bytes": [int(n) for n in re.findall(r"(\d+) bytes spill", report)],
            "report": report[-2000:],
        }
    return results


def _run_self(*argv: str, interpret: bool) -> dict:
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


# ---------------------------------------------------------------- CPU: interpreter subprocess


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str | None]:
    return _run_self(*CASES, interpret=True)


@pytest.mark.parametrize("name", list(CASES))
def test_fma_decode_matches_reference_under_interpreter(name: str, interpreter_results) -> None:
    error = interpreter_results.get(name, "case did not run")
    assert error is None, error


@pytest.fixture(scope="module")
def hopper_results() -> dict[str, dict[str, object]]:
    if not (Path(pytest.importorskip("triton").__file__).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("Triton's ptxas is not installed")
    return _run_self("--compile-sm90", interpret=False)


@pytest.mark.parametrize("variant", list(HOPPER_VARIANTS))
def test_fma_decode_compiles_for_hopper_without_spills(variant: str, hopper_results) -> None:
    result = hopper_results[variant]
    assert result["registers"] is not None, result["report"]
    assert result["spill_bytes"] and not any(result["spill_bytes"]), result["report"]


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_fma_decode_matches_reference_on_gpu(name: str) -> None:
    CASES[name]("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("cache", [FP8, BF16], ids=["fp8", "bf16"])
def test_fma_decode_llama3_8b_heads_long_context_gpu(cache: torch.dtype) -> None:
    """B 4 with contexts up to 5000 (ragged, ending mid-block), Hq 32, Hk 8, D 128, bf16 q, default tiles."""
    check_decode(
        "cuda",
        seed=100,
        dtype=BF16,
        cache=cache,
        lens=[5000, 4999, 4093, 5000],
        hq=32,
        hk=8,
        d=128,
        bs=16,
        q_scale=2.0,
    )


if __name__ == "__main__":
    # the subprocesses:  TRITON_INTERPRET=1 python tests/test_decode_fma.py [case ...]
    #                    python tests/test_decode_fma.py --compile-sm90
    torch.set_num_threads(1)
    if sys.argv[1:2] == ["--compile-sm90"]:
        print(json.dumps(compile_for_hopper()))
    elif os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run the cases with TRITON_INTERPRET=1 (the pytest side does)")
    else:
        print(json.dumps(run_cases("cpu", sys.argv[1:] or list(CASES))))
