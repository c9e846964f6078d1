"""Where a decode step's GPU time goes: torch.profiler over CUDA-graph replays, kernels grouped by name.

    python -m experiments.profile_decode [--model llama-3.1-8b] [--batch 1] [--context 512] \
        [--quantization fp8] [--kv-cache-dtype fp8_e4m3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main(argv=None) -> None:
    from torch.profiler import ProfilerActivity, profile

    from engine import SamplingParams
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from experiments.bench_engine import kernel_times

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--max-len", type=int, default=32832)
    p.add_argument("--quantization", default="none", choices=("none", "fp8"))
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8_e4m3"))
    args = p.parse_args(argv)
    blocks = max(8192, -(-args.batch * (args.context + 80) // 16) + 64)
    core = EngineCore(
        EngineConfig.from_dict(
            dict(
                model=args.model,
                load_format="dummy",
                dtype="bfloat16",
                num_gpu_blocks=blocks,
                max_model_len=max(args.max_len, args.context + 80),
                max_num_seqs=max(args.batch, 8),
                cuda_graph_batch_sizes=(args.batch,),
                enable_prefix_caching=False,
                quantization=args.quantization,
                kv_cache_dtype=args.kv_cache_dtype,
            )
        )
    )
    rng = np.random.default_rng(0)
    for i in range(args.batch):
        core.add_request(
            i,
            rng.integers(0, core.model_config.vocab_size, args.context),
            SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True),
        )
    for _ in range(8):
        core.step()
    graph = core.runner.graphs.graphs[core.runner.graphs.last_key]
    torch.cuda.synchronize()
    reps = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    rows: dict[str, tuple[float, int]] = {}  # kernel -> (us, calls) over all replays
    for name, times in kernel_times(prof).items():
        t, n = rows.get(name[:70], (0.0, 0))
        rows[name[:70]] = (t + sum(times) * 1e3, n + len(times))
    total = sum(t for t, _ in rows.values()) / reps
    print(
        f"{args.model} decode b{args.batch} ctx{args.context} (weights {args.quantization}, KV {args.kv_cache_dtype}): "
        f"{total / 1e3:.3f} ms of kernels per replay"
    )
    print(f"{'kernel':<70} {'us/replay':>10} {'calls':>6} {'share':>6}")
    for name, (t, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"{name:<70} {t / reps:>10.1f} {n // reps:>6} {t / reps / total:>6.1%}")


if __name__ == "__main__":
    main()
