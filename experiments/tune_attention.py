"""Sweeps the Triton attention kernels' tile configurations at the agentic shapes on one CUDA GPU.

    python -m experiments.tune_attention                 # prefill and decode sweeps, a table each
    python -m experiments.tune_attention --only prefill  # or decode
    python -m experiments.tune_attention --quick         # two shapes, three configs each

Heads of the Llama-3-8B shape (Hq 32, Hk 8, D 128), block size 16, bf16, blocks of each request
scattered over the pool. Prefill shapes are (cached prefix, new tokens) of one request: long causal
prompts in the chunks the scheduler cuts, and short turns over long cached prefixes (a coding
agent's later turns). Each row gives the median time (triton.testing.do_bench) of every
configuration and the best one's TFLOP/s against the card's measured bf16 matmul rate (an 8192^3
torch.mm), so `best/mm` is the fraction of the tensor-core roofline the kernel reaches. Decode rows
report GB/s of K/V read against the measured copy bandwidth. The chosen defaults live in
engine/kernels/triton/attention.py (prefill_config, decode_config); this script is how they were
picked.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

import torch
import torch.nn.functional as F

from experiments.bench_kernels import BS, DTYPE, HK, HQ, D, bench_us, contiguous_kv, paged_cache

PREFILL_SHAPES = [(0, 8192), (24576, 8192), (0, 16384), (32768, 16384), (55000, 1300), (16384, 512), (65536, 128)]
DECODE_SHAPES = [(1, 512), (1, 50000), (4, 50000), (64, 512), (8, 16384)]


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    return 2 * 8192**3 / bench_us(lambda: a @ b) / 1e6


def copy_gbs() -> float:
    x = torch.empty(2**30 // 2, device="cuda", dtype=DTYPE)
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / bench_us(lambda: y.copy_(x)) / 1e3


def prefill_configs(quick: bool, small: bool = False):
    from engine.kernels.triton.attention import PrefillConfig

    if quick:
        return [PrefillConfig(), PrefillConfig(block_n=128, num_stages=3), PrefillConfig(max_splits=1)]
    out = []
    for bm, bn, w, st in itertools.product(
        (128,) if small else (64, 128), (64, 128), (4, 8), (2, 3) if small else (2, 3, 4)
    ):
        if bm == 64 and w == 8 and bn == 128:
            continue
        out.append(PrefillConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=st))
    return out


def label(cfg, base) -> str:
    diff = {
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)
    }
    return ",".join(f"{k}={v}" for k, v in diff.items()) or "default"


def sweep_prefill(shapes, quick: bool, mm: float, small: bool = False) -> None:
    from engine.kernels import torch_ops
    from engine.kernels.triton import attention

    base = attention.prefill_config(torch.device("cuda"), D, DTYPE)
    configs = prefill_configs(quick, small)
    if base not in configs:
        configs.insert(0, base)
    nosplit = dataclasses.replace(base, max_splits=1)
    print(f"\nprefill attention sweep  Hq {HQ} Hk {HK} D {D} block {BS} bf16; matmul {mm:.0f} TFLOP/s")
    gen = torch.Generator(device="cuda").manual_seed(1)
    scale = D**-0.5
    best_overall: dict[str, list[float]] = {}
    for prefix, chunk in shapes:
        length = prefix + chunk
        k, v, table, lens = paged_cache([length], gen)
        q = torch.randn((chunk, HQ, D), generator=gen, device="cuda", dtype=DTYPE)
        qsl = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
        flops = 4 * D * HQ * (chunk * prefix + chunk * (chunk + 1) / 2)
        want = torch_ops.prefill_attention(q, k, v, qsl, lens, table, scale).float()
        times, errors = {}, {}
        for cfg in configs + [nosplit]:
            name = label(cfg, base) if cfg is not nosplit else "default,max_splits=1"
            try:
                got = attention.prefill_attention(q, k, v, qsl, lens, table, scale, cfg).float()
                errors[name] = float((got - want).abs().max() / want.abs().max())
                times[name] = bench_us(lambda: attention.prefill_attention(q, k, v, qsl, lens, table, scale, cfg))
            except Exception as exc:  # a configuration that does not fit (shared memory, registers)
                times[name] = float("nan")
                print(f"  {name}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        bad = {n: e for n, e in errors.items() if not e < 2e-2}
        if bad:
            print(f"  WRONG RESULTS (max abs error / max abs value): {bad}")
            times.update({n: float("nan") for n in bad})
        sdpa = None
        if prefix == 0:
            kd, vd = contiguous_kv(k, table, length), contiguous_kv(v, table, length)
            q4 = q.transpose(0, 1)[None]
            sdpa = bench_us(
                lambda: F.scaled_dot_product_attention(q4, kd, vd, is_causal=True, scale=scale, enable_gqa=True)
            )
            del kd, vd
        ok = {n: t for n, t in times.items() if t == t}
        best = min(ok, key=ok.get)
        splits = attention.prefill_splits(
            chunk, 1, HK, base.block_m // (HQ // HK), table.shape[1] * BS, attention.num_sms(q.device), base
        )
        tf = lambda t: flops / t / 1e6  # noqa: E731
        print(
            f"prefix {prefix:>6} chunk {chunk:>6}: default {times['default']:9.1f} us {tf(times['default']):6.1f}"
            f" TFLOP/s (splits {splits}), no split {times['default,max_splits=1']:9.1f} us; best {best}:"
            f" {ok[best]:9.1f} us {tf(ok[best]):6.1f} TFLOP/s = {tf(ok[best]) / mm:.2f} of mm"
            + (f"; sdpa {sdpa:9.1f} us {tf(sdpa):6.1f} TFLOP/s" if sdpa else "")
        )
        for n, t in sorted(ok.items(), key=lambda kv: kv[1])[:6]:
            print(f"      {t:9.1f} us {tf(t):6.1f} TFLOP/s  {n}")
        for n, t in ok.items():
            best_overall.setdefault(n, []).append(ok[best] / t)
        del k, v
        torch.cuda.empty_cache()
    print("\nconfigurations by geometric-mean speed relative to each shape's best (1.00 = best everywhere):")
    ranked = sorted(best_overall.items(), key=lambda kv: -float(torch.tensor(kv[1]).log().mean().exp()))
    for n, rel in ranked[:10]:
        print(f"  {float(torch.tensor(rel).log().mean().exp()):.3f}  min {min(rel):.3f}  {n}")


def sweep_decode(shapes, quick: bool, bw: float) -> None:
    from engine.kernels.triton import attention

    base = attention.decode_config(torch.device("cuda"), D, DTYPE)
    if quick:
        configs = [base, dataclasses.replace(base, num_stages=3)]
    else:
        configs = [
            dataclasses.replace(base, block_n=bn, programs_per_sm=pps, num_stages=st, num_warps=w)
            for bn, pps, st, w in itertools.product((32, 64, 128), (4, 8, 16), (2, 3, 4), (4,))
        ]
    print(f"\ndecode attention sweep; copy bandwidth {bw:.0f} GB/s (read+write)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    scale = D**-0.5
    for b, ctx in shapes:
        k, v, table, lens = paged_cache([ctx] * b, gen)
        q = torch.randn((b, HQ, D), generator=gen, device="cuda", dtype=DTYPE)
        kv_bytes = 2 * b * ctx * HK * D * k.element_size()
        want = attention.decode_attention(q, k, v, lens, table, scale, base).float()
        times = {}
        for cfg in configs:
            try:
                got = attention.decode_attention(q, k, v, lens, table, scale, cfg).float()
                if not float((got - want).abs().max() / want.abs().max()) < 2e-2:
                    print(f"  WRONG RESULTS: {label(cfg, base)}")
                    continue
                times[label(cfg, base)] = bench_us(lambda: attention.decode_attention(q, k, v, lens, table, scale, cfg))
            except Exception as exc:
                print(f"  {label(cfg, base)}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        best = min(times, key=times.get)
        gbs = lambda t: kv_bytes / t / 1e3  # noqa: E731
        print(
            f"batch {b:>3} ctx {ctx:>6}: default {times['default']:8.1f} us {gbs(times['default']):6.0f} GB/s;"
            f" best {best}: {times[best]:8.1f} us {gbs(times[best]):6.0f} GB/s"
        )
        for n, t in sorted(times.items(), key=lambda kv: kv[1])[:4]:
            print(f"      {t:8.1f} us {gbs(t):6.0f} GB/s  {n}")
        del k, v
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("prefill", "decode"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--small", action="store_true", help="prefill: 128-row tiles, 2-3 stages only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_attention needs a CUDA GPU")
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.only != "decode":
        shapes = PREFILL_SHAPES[:1] + PREFILL_SHAPES[4:5] if args.quick else PREFILL_SHAPES
        sweep_prefill(shapes, args.quick, matmul_tflops(), args.small)
    if args.only != "prefill":
        sweep_decode(DECODE_SHAPES[:2] if args.quick else DECODE_SHAPES, args.quick, copy_gbs())


if __name__ == "__main__":
    main()
