"""Kernel timings on one CUDA GPU: the triton backend against the torch reference.

    python -m experiments.bench_kernels            # decode 1/8/64 x 4K/16K/50K, prefill 2K/32K, elementwise
    python -m experiments.bench_kernels --quick    # a few rows of each, for a smoke check

Times are medians of triton.testing.do_bench (which clears L2 between runs), in microseconds.
Decode attention (Llama-3-8B-like heads: Hq 32, Hk 8, D 128, block size 16, bf16, every
request at the same context, blocks scattered over the pool) reports the achieved bandwidth
as the K/V bytes a request's context holds divided by the time; besides the paged reference
it times torch SDPA over a contiguous copy of the same K/V (the best case a dense kernel gets,
gather excluded). Prefill reports TFLOP/s counting only the causal half (4 * D * Hq flops per
visible query-key pair). Elementwise ops report GB/s of the bytes they must move. The
reference is skipped where it would materialise more than --ref-gib of float32 K/V.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

HQ, HK, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16


def bench_us(fn) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def paged_cache(lens: list[int], gen: torch.Generator):
    """Random bf16 K/V caches holding `lens` tokens, each request's blocks scattered over the pool."""
    nblk = [-(-n // BS) for n in lens]
    order = torch.randperm(sum(nblk), generator=gen, device="cuda").to(torch.int32)
    table = torch.full((len(lens), max(nblk)), -1, dtype=torch.int32, device="cuda")
    used = 0
    for r, n in enumerate(nblk):
        table[r, :n] = order[used : used + n]
        used += n
    shape = (sum(nblk), BS, HK, D)
    k = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE)
    v = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE)
    return k, v, table, torch.tensor(lens, dtype=torch.int32, device="cuda")


def contiguous_kv(cache: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
    """[B, Hk, ctx, D]: the paged context gathered for SDPA."""
    b = table.shape[0]
    return cache[table.long()].reshape(b, -1, HK, D)[:, :ctx].transpose(1, 2).contiguous()


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def bench_decode(batches, contexts, ref_gib: float) -> None:
    from engine.kernels import torch_ops, triton_ops
    from engine.kernels.triton.attention import decode_config, decode_splits, num_sms

    print(f"\ndecode attention  Hq {HQ}  Hk {HK}  D {D}  block {BS}  bf16   (us; GB/s of K/V read)")
    print(
        f"{'batch':>5} {'context':>7} {'splits':>6} {'triton':>9} {'GB/s':>7} {'torch-ref':>10} {'GB/s':>7}"
        f" {'sdpa-dense':>10} {'GB/s':>7}"
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    scale = D**-0.5
    for b in batches:
        for ctx in contexts:
            k, v, table, lens = paged_cache([ctx] * b, gen)
            q = torch.randn((b, HQ, D), generator=gen, device="cuda", dtype=DTYPE)
            kv_bytes = 2 * b * ctx * HK * D * k.element_size()
            splits = decode_splits(b, HK, table.shape[1] * BS, num_sms(q.device), decode_config(q.device, D, DTYPE))
            t_tri = bench_us(lambda: triton_ops.decode_attention(q, k, v, lens, table, scale))
            t_ref = None
            if 2 * b * table.shape[1] * BS * HK * D * 4 <= ref_gib * 2**30:
                t_ref = bench_us(lambda: torch_ops.decode_attention(q, k, v, lens, table, scale))
            kd, vd = contiguous_kv(k, table, ctx), contiguous_kv(v, table, ctx)
            q4 = q[:, :, None, :]
            t_sdpa = bench_us(lambda: F.scaled_dot_product_attention(q4, kd, vd, scale=scale, enable_gqa=True))
            gbs = [None if t is None else kv_bytes / t / 1e3 for t in (t_tri, t_ref, t_sdpa)]
            print(
                f"{b:>5} {ctx:>7} {splits:>6} {t_tri:>9.1f} {gbs[0]:>7.0f} {fmt(t_ref, '10.1f')} "
                f"{fmt(gbs[1], '7.0f')} {t_sdpa:>10.1f} {gbs[2]:>7.0f}"
            )
            del k, v, kd, vd
            torch.cuda.empty_cache()


def bench_prefill(cases: list[tuple[int, int]], ref_gib: float) -> None:
    from engine.kernels import torch_ops, triton_ops

    print(f"\nprefill attention  Hq {HQ}  Hk {HK}  D {D}  block {BS}  bf16, one request   (us; TFLOP/s)")
    print(
        f"{'prefix':>7} {'chunk':>6} {'triton':>10} {'TFLOP/s':>8} {'torch-ref':>10} {'TFLOP/s':>8}"
        f" {'sdpa-causal':>11} {'TFLOP/s':>8}"
    )
    gen = torch.Generator(device="cuda").manual_seed(1)
    scale = D**-0.5
    for prefix, chunk in cases:
        length = prefix + chunk
        k, v, table, lens = paged_cache([length], gen)
        q = torch.randn((chunk, HQ, D), generator=gen, device="cuda", dtype=DTYPE)
        qsl = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
        pairs = chunk * prefix + chunk * (chunk + 1) / 2
        flops = 4 * D * HQ * pairs
        t_tri = bench_us(lambda: triton_ops.prefill_attention(q, k, v, qsl, lens, table, scale))
        t_ref = None
        if chunk * length * HQ * 4 <= ref_gib * 2**30:  # the reference's float32 scores, were it the math path
            try:
                t_ref = bench_us(lambda: torch_ops.prefill_attention(q, k, v, qsl, lens, table, scale))
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
        t_sdpa = None
        if prefix == 0:  # dense causal flash attention over the same tokens
            kd, vd = contiguous_kv(k, table, length), contiguous_kv(v, table, length)
            q4 = q.transpose(0, 1)[None]
            t_sdpa = bench_us(
                lambda: F.scaled_dot_product_attention(q4, kd, vd, is_causal=True, scale=scale, enable_gqa=True)
            )
        tf = [None if t is None else flops / t / 1e6 for t in (t_tri, t_ref, t_sdpa)]
        print(
            f"{prefix:>7} {chunk:>6} {t_tri:>10.1f} {tf[0]:>8.1f} {fmt(t_ref, '10.1f')} {fmt(tf[1], '8.1f')}"
            f" {fmt(t_sdpa, '11.1f')} {fmt(tf[2], '8.1f')}"
        )
        del k, v
        torch.cuda.empty_cache()


def elementwise_cases(tokens: int):
    """(name, args, bytes moved) for each elementwise op at `tokens` tokens of a Llama-3-8B layer."""
    hidden, ffn, e = 4096, 14336, 2
    dev = dict(device="cuda", dtype=DTYPE)
    x, r, w = torch.randn(tokens, hidden, **dev), torch.randn(tokens, hidden, **dev), torch.randn(hidden, **dev)
    q, k = torch.randn(tokens, HQ, D, **dev), torch.randn(tokens, HK, D, **dev)
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    cos_sin = torch.randn(8192, D, device="cuda")
    gate_up = torch.randn(tokens, 2 * ffn, **dev)
    kc = torch.zeros(tokens // BS + 1, BS, HK, D, **dev)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(kc.shape[0] * BS, device="cuda")[:tokens]
    kv = torch.randn(tokens, HK, D, **dev)
    # the model's fused step: q, k, v strided views of the qkv projection's output
    qkv = torch.randn(tokens, (HQ + 2 * HK) * D, **dev)
    fq, fk, fv = (t.view(tokens, h, D) for t, h in zip(qkv.split([HQ * D, HK * D, HK * D], dim=-1), (HQ, HK, HK)))
    return [
        ("rms_norm", (x, w, 1e-6), 2 * tokens * hidden * e),
        ("add_rms_norm", (x, r, w, 1e-6), 4 * tokens * hidden * e),
        ("rotary_embedding", (pos, q, k, cos_sin), 2 * tokens * (HQ + HK) * D * e + tokens * D * 4),
        ("silu_and_mul", (gate_up,), 3 * tokens * ffn * e),
        ("write_kv", (kv, kv, kc, vc, slots), 4 * tokens * HK * D * e),
        # reads q, k, v and a cos/sin row; writes the rotated q and k, v into the cache
        (
            "rotary_write_kv",
            (pos, fq, fk, fv, cos_sin, kc, vc, slots),
            2 * tokens * (HQ + 2 * HK) * D * e + tokens * D * 4,
        ),
    ]


def bench_elementwise(token_counts) -> None:
    from engine.kernels import torch_ops, triton_ops

    print("\nelementwise ops  (hidden 4096, ffn 14336, Hq 32, Hk 8, D 128, bf16)   (us; GB/s)")
    print(f"{'op':>17} {'tokens':>6} {'triton':>9} {'GB/s':>7} {'torch':>9} {'GB/s':>7}")
    for tokens in token_counts:
        for name, args, nbytes in elementwise_cases(tokens):
            t_tri = bench_us(lambda: getattr(triton_ops, name)(*args))
            t_ref = bench_us(lambda: getattr(torch_ops, name)(*args))
            print(
                f"{name:>17} {tokens:>6} {t_tri:>9.1f} {nbytes / t_tri / 1e3:>7.0f} {t_ref:>9.1f}"
                f" {nbytes / t_ref / 1e3:>7.0f}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few rows of each table")
    parser.add_argument(
        "--ref-gib",
        type=float,
        default=8.0,
        help="skip the torch reference where its float32 K/V would exceed this (GiB)",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(
            "bench_kernels needs a CUDA GPU (torch.cuda.is_available() is False here); "
            "the CPU correctness checks are `pytest tests/test_kernels_triton.py`"
        )
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    if args.quick:
        bench_decode([1, 8], [4096, 16384], args.ref_gib)
        bench_prefill([(0, 2048), (16384, 2048)], args.ref_gib)
        bench_elementwise([64])
    else:
        bench_decode([1, 8, 64], [4096, 16384, 50000], args.ref_gib)
        bench_prefill([(0, 2048), (0, 32768), (16384, 2048)], args.ref_gib)
        bench_elementwise([1, 64, 4096])


if __name__ == "__main__":
    main()
