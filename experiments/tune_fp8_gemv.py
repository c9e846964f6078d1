"""Sweeps the FP8 decode GEMV's kernels and tiles at Llama-3.1-8B's linear shapes on one CUDA GPU.

    python -m experiments.tune_fp8_gemv            # rows 1, 4 and 16
    python -m experiments.tune_fp8_gemv --rows 1   # batch-1 decode only

Each figure is the GPU time of one call, measured as decode runs it: 20 calls captured in a CUDA
graph, the graph replayed (median of 20 replays), so host launch cost is not counted. Beside it,
cuBLAS's bf16 F.linear of the same shape the same way, and the GB/s of the FP8 weights read. The
chosen defaults live in engine.quant.gemv_config; this script is how they are picked.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate|up, down of Llama-3.1-8B


def graph_us(fn, calls: int = 20, reps: int = 20) -> float:
    """Microseconds of GPU time a call of fn(), from CUDA-graph replays of `calls` calls (tune_gemv.graph_us)."""
    from experiments.tune_gemv import graph_us as indexed

    return indexed(lambda i: fn(), calls, reps)


def configs(rows: int) -> list[dict]:
    out = []
    if rows <= 4:
        bm = max(1, 1 << (rows - 1).bit_length())
        for bn, bk, w, bits in itertools.product((4, 8, 16), (256, 512, 1024, 2048), (4, 8), (False, True)):
            if bm * bn * bk // (32 * w) <= 128:  # running products a thread
                out.append({"kind": "fma", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "BITS": bits})
    for bn, bk, w in itertools.product((16, 32, 64), (256, 512, 1024), (4, 8)):
        out.append({"kind": "dot", "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w})
    return out


def main(argv: list[str] | None = None) -> None:
    from engine.quant import fp8_gemv, gemv_config, quantize_fp8_per_channel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--fma-only", action="store_true", help="one row: only the CUDA-core kernel's tiles")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_fp8_gemv needs a CUDA device")
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for s in SHAPES}
    quantized = {s: quantize_fp8_per_channel(w) for s, w in weights.items()}
    for rows in args.rows:
        totals = {"bf16": 0.0, "default": 0.0, "best": 0.0}
        print(
            f"\nrows {rows}: {'n x k':>12} {'bf16 us':>8} {'default us':>10} {'best us':>8} "
            f"{'best GB/s':>9}  best config"
        )
        for (n, k), w in weights.items():
            q, s = quantized[(n, k)]
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            bf16 = graph_us(lambda: F.linear(x, w))
            default = graph_us(lambda: fp8_gemv(x, q, s))
            timed = []
            for cfg in configs(rows):
                if args.fma_only and cfg["kind"] != "fma":
                    continue
                try:
                    timed.append((graph_us(lambda: fp8_gemv(x, q, s, config=cfg)), cfg))
                except Exception as exc:  # a tile the compiler refuses (shared memory, registers)
                    print(f"    {cfg}: {type(exc).__name__}: {str(exc)[:80]}")
            best_us, best = min(timed, key=lambda t: t[0])
            totals["bf16"] += bf16
            totals["default"] += default
            totals["best"] += best_us
            print(
                f"{'':>8} {f'{n}x{k}':>12} {bf16:8.1f} {default:10.1f} {best_us:8.1f} "
                f"{n * k / best_us / 1e3:9.0f}  {best} (default {gemv_config(rows, n, k)})"
            )
            ranked = sorted(timed, key=lambda t: t[0])[:5]
            print(
                "          top 5: "
                + "; ".join(
                    f"{us:.1f} {c['kind']} {c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']}"
                    f"{' bits' if c.get('BITS') else ''}"
                    for us, c in ranked
                )
            )
        print(
            f"{'':>8} {'a layer':>12} {totals['bf16']:8.1f} {totals['default']:10.1f} {totals['best']:8.1f}   "
            f"default/bf16 {totals['default'] / totals['bf16']:.2f}, best/bf16 {totals['best'] / totals['bf16']:.2f}"
        )


if __name__ == "__main__":
    main()
