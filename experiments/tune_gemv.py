"""Sweeps the fused one-row decode GEMV (engine/kernels/triton/gemv.py) at a model's linear shapes on one
CUDA GPU, beside the kernels it replaces.

    python -m experiments.tune_gemv                            # Llama-3.1-8B, bf16 and FP8 weights
    python -m experiments.tune_gemv --model llama-3.2-1b --quick

A decoder layer's four products at batch 1, each with what runs in front of it:

    q|k|v    add_rms_norm (the input norm)         gate|up  add_rms_norm (the post-attention norm)
    o        nothing                               down     silu_and_mul

Columns, microseconds of GPU time a call:
    unfused  the Triton prologue kernel + the product (cuBLAS's F.linear for bf16, engine.quant's
             FP8 GEMV for FP8 weights): the path before the fusion, and still the composed one
    cublas   (bf16) the product alone, for the GEMV's own speed
    fused    gemv.gemv at its default tile (gemv_config)
    best     the best tile of the sweep, and its TB/s of weights read

Each figure comes from CUDA-graph replays (`calls` calls a graph, the median of the replays), as decode
runs them, so host launch cost is not counted but each kernel's ramp and tail are. The calls cycle
through copies of the weights that together exceed the card's L2, so no call finds its weights cached.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
import torch.nn.functional as F

L2_BYTES = 60 << 20  # above an H100's 50 MiB and an H200's L2


def graph_us(fn, calls: int, reps: int = 15) -> float:
    """Microseconds of GPU time a call of fn(i), i the call's index, from CUDA-graph replays."""
    fn(0)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(reps + 3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / calls)
    return statistics.median(times[3:])


def configs(quick: bool) -> list[dict]:
    if quick:
        return []
    out = []
    for bn, bk, w in itertools.product((4, 8, 16, 32), (256, 512, 1024, 2048), (4, 8)):
        if bn * bk // (32 * w) <= 128:  # running products a thread
            out.append({"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w})
    return out


def layer_shapes(model: str) -> list[tuple[str, int, int, str]]:
    """(name, n, k, prologue) of a decoder layer's four products, in order."""
    from engine.models.shapes import shape_config

    c = shape_config(model)
    h, d, i = c.hidden_size, c.head_dim, c.intermediate_size
    return [
        ("q|k|v", (c.num_heads + 2 * c.num_kv_heads) * d, h, "norm"),
        ("o", h, c.num_heads * d, "none"),
        ("gate|up", 2 * i, h, "norm"),
        ("down", h, i, "silu"),
    ]


def main(argv: list[str] | None = None) -> None:
    from engine import quant
    from engine.kernels.triton import elementwise, gemv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a shape of engine.models.shapes")
    parser.add_argument("--weights", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--quick", action="store_true", help="the default tiles only, no sweep")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_gemv needs a CUDA device")
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, model shape {args.model}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    bf16 = torch.bfloat16
    for kind in args.weights:
        totals = dict.fromkeys(("unfused", "cublas", "fused", "best"), 0.0)
        print(
            f"\n{kind} weights: {'product':>8} {'n x k':>12} {'unfused':>8} {'cublas':>7} {'fused':>7} {'best':>7} "
            f"{'TB/s':>5}  best tile"
        )
        for name, n, k, prologue in layer_shapes(args.model):
            w = torch.randn(n, k, device="cuda", dtype=bf16, generator=gen) * k**-0.5
            scale = None
            if kind == "fp8":
                w, scale = quant.quantize_fp8_per_channel(w)
            nbytes = w.numel() * w.element_size()
            copies = max(1, -(-L2_BYTES // nbytes))
            ws = [w] + [w.clone() for _ in range(copies - 1)]
            calls = max(20, copies)
            width = 2 * k if prologue == "silu" else k
            x = torch.randn(1, width, device="cuda", dtype=bf16, generator=gen)
            res = torch.randn(1, k, device="cuda", dtype=bf16, generator=gen)
            g = torch.ones(k, device="cuda", dtype=bf16)
            kw = dict(prologue=prologue, norm_weight=g, residual=res, eps=1e-5) if prologue == "norm" else {}
            if prologue == "silu":
                kw = dict(prologue="silu")

            def product(i: int, h: torch.Tensor) -> torch.Tensor:
                wi = ws[i % copies]
                return quant.fp8_gemv(h, wi, scale) if scale is not None else F.linear(h, wi)

            def unfused(i: int) -> torch.Tensor:
                h = x
                if prologue == "norm":
                    h, _ = elementwise.add_rms_norm(x, res, g, 1e-5)
                elif prologue == "silu":
                    h = elementwise.silu_and_mul(x)
                return product(i, h)

            def fused(i: int, cfg: dict | None = None):
                return gemv.gemv(x, ws[i % copies], None, scale, config=cfg, **kw)

            t_unfused = graph_us(unfused, calls)
            h_in = x if prologue == "none" else (elementwise.silu_and_mul(x) if prologue == "silu" else x)
            t_cublas = graph_us(lambda i: F.linear(h_in, ws[i % copies]), calls) if scale is None else float("nan")
            t_fused = graph_us(fused, calls)
            timed = [(t_fused, gemv.gemv_config(n, k, scale is not None))]
            for cfg in configs(args.quick):
                try:
                    timed.append((graph_us(lambda i, c=cfg: fused(i, c), calls), cfg))
                except Exception as exc:  # a tile the compiler refuses (registers, shared memory)
                    print(f"    {cfg}: {type(exc).__name__}: {str(exc)[:80]}")
            best_us, best = min(timed, key=lambda t: t[0])
            for key, value in (("unfused", t_unfused), ("cublas", t_cublas), ("fused", t_fused), ("best", best_us)):
                totals[key] += value
            print(
                f"{'':>13} {name:>8} {f'{n}x{k}':>12} {t_unfused:8.1f} {t_cublas:7.1f} {t_fused:7.1f} {best_us:7.1f} "
                f"{nbytes / best_us / 1e6:5.2f}  {best['BLOCK_N']}x{best['BLOCK_K']} w{best['num_warps']}"
            )
            if len(timed) > 1:
                ranked = sorted(timed, key=lambda t: t[0])[:4]
                print(
                    f"{'':>22} top: "
                    + "; ".join(f"{us:.1f} {c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']}" for us, c in ranked)
                )
            del ws
        print(
            f"{'':>13} {'a layer':>8} {'':>12} {totals['unfused']:8.1f} {totals['cublas']:7.1f} {totals['fused']:7.1f} "
            f"{totals['best']:7.1f}  fused/unfused {totals['fused'] / totals['unfused']:.3f}, "
            f"best/unfused {totals['best'] / totals['unfused']:.3f}"
        )


if __name__ == "__main__":
    main()
