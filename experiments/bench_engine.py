"""Engine speed on one GPU: decode per token, prefill, beside transformers and the weight-read floor.

    python -m experiments.bench_engine          # llama-3.2-1b and llama-3.1-8b shapes (the Llama-3-8B shape with
                                                # its 128K-context rotary scaling, so 32K prompts fit), bf16
    python -m experiments.bench_engine --models llama-3.2-1b --quick

Every figure is measured in this run on this card. Random weights of the real
shapes (load_format=dummy). Rows:

  decode bN     median wall seconds between the ends of consecutive engine steps with N requests decoding
                (each step = one token per request), prompts of --context tokens; CUDA graphs unless --eager,
                overlapped decode (engine/overlap.py) unless --no-overlap; "no overlap": the strict loop, same run
  prefill N     seconds from adding one N-token prompt to its first token (chunked at --chunk tokens)
  hf            transformers on the same weights (sdpa attention, its own KV cache): per-token decode
                from generate() at batch 1 and N, and one forward pass for prefill
  floor         weight bytes / measured device copy bandwidth (read+write bytes of a 2 GiB copy / time)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import numpy as np
import torch


def copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written (median of 20)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    a.random_(0, 255)
    times = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n / statistics.median(times[5:])


def engine_for(shape: str, args, graphs: tuple[int, ...]):
    from engine.config import EngineConfig
    from engine.core import EngineCore

    cfg = EngineConfig(model=shape, load_format="dummy", dtype="bfloat16", num_gpu_blocks=args.blocks,
                       max_model_len=args.max_len, max_num_seqs=max(args.batch, 1),
                       max_num_batched_tokens=args.chunk, chunk_size=args.chunk, enforce_eager=args.eager,
                       cuda_graph_batch_sizes=graphs, enable_prefix_caching=False,
                       overlap_decode=False if args.no_overlap else None)
    return EngineCore(cfg)


def decode_step_seconds(core, batch: int, context: int, steps: int) -> float:
    from engine import SamplingParams

    rng = np.random.default_rng(batch)
    base = 10_000_000 + batch * 1000
    for i in range(batch):
        core.add_request(base + i, rng.integers(0, core.model_config.vocab_size, context),
                         SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True))
    times = []
    last = time.perf_counter()
    while core.has_unfinished():
        core.step()
        now = time.perf_counter()
        row = core.profile[-1]
        if row["num_tokens"] == batch and row["num_reqs"] == batch:  # a pure decode step of the whole batch
            times.append(now - last)  # wall time from the previous step's end: plan, run, commit, all of it
        last = now
    return statistics.median(times[3:])


def replay_seconds(core, batch: int) -> float | None:
    """GPU time of one decode graph replay of this batch size (events around the replay, median of 30)."""
    graphs = core.runner.graphs
    if graphs is None or graphs.last_key is None or graphs.last_key[0] != batch:
        return None
    graph = graphs.graphs[graphs.last_key]  # the graph the last decode steps replayed
    times = []
    for _ in range(33):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times[3:])


def prefill_seconds(core, length: int) -> float:
    from engine import SamplingParams

    rng = np.random.default_rng(length)
    core.add_request(20_000_000 + length, rng.integers(0, core.model_config.vocab_size, length),
                     SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    start = time.perf_counter()
    while core.has_unfinished():
        core.step()
    return time.perf_counter() - start


def hf_model(core):
    from engine.models.hf_reference import transformers_model

    return transformers_model(core.model, dtype=torch.bfloat16, device="cuda")


@torch.inference_mode()
def hf_decode_per_token(model, batch: int, context: int, new: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(2)
    short, long = timed(1), timed(new)
    return (long - short) / (new - 1)


@torch.inference_mode()
def hf_prefill(model, length: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
    model(ids[:, :128], logits_to_keep=1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model(ids, logits_to_keep=1)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_model(shape: str, args, bandwidth: float) -> list[dict]:
    graphs = tuple(sorted({1, args.batch}))
    core = engine_for(shape, args, graphs)
    weight_bytes = sum(p.numel() * p.element_size() for p in core.model.parameters())
    floor = weight_bytes / bandwidth
    rows = [{"model": shape, "what": "weight-read floor", "engine_s": floor, "hf_s": None, "floor_s": floor,
             "kernels": core.ops.chosen["decode_attention"]}]
    for batch in (1, args.batch):
        if core.runner.overlap:  # the strict loop too, same engine, same run
            core.runner.overlap = False
            rows.append({"model": shape, "what": f"decode b{batch} ctx{args.context} no overlap",
                         "engine_s": decode_step_seconds(core, batch, args.context, args.steps), "floor_s": floor})
            core.runner.overlap = True
        rows.append({"model": shape, "what": f"decode b{batch} ctx{args.context} (s/step)",
                     "engine_s": decode_step_seconds(core, batch, args.context, args.steps), "floor_s": floor})
        replay = replay_seconds(core, batch)
        if replay is not None:
            rows.append({"model": shape, "what": f"  of which graph replay (GPU)", "engine_s": replay,
                         "floor_s": floor})
    for length in args.prefill:
        prefill_seconds(core, 256)  # warm-up of the prefill kernels
        rows.append({"model": shape, "what": f"prefill {length} (s)", "engine_s": prefill_seconds(core, length)})
    if not args.no_hf:
        model = hf_model(core)
        hf_decode: dict[int, float] = {}
        for row in rows[1:]:
            what = row["what"]
            if what.startswith(" "):
                continue
            if what.startswith("decode"):
                batch = int(what.split()[1][1:])
                if batch not in hf_decode:
                    hf_decode[batch] = hf_decode_per_token(model, batch, args.context, args.hf_steps)
                row["hf_s"] = hf_decode[batch]
            else:
                row["hf_s"] = hf_prefill(model, int(what.split()[1]))
        del model
    del core
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def profile_cpu(args) -> None:
    import cProfile
    import pstats

    core = engine_for(args.models[0], args, (1,))
    decode_step_seconds(core, 1, args.context, 16)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    decode_step_seconds(core, 1, args.context, args.steps)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--hf-steps", type=int, default=32)
    parser.add_argument("--prefill", type=int, nargs="+", default=[2048, 32768])
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--blocks", type=int, default=8192)
    parser.add_argument("--max-len", type=int, default=None)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-overlap", action="store_true", help="the strict step/commit loop only")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--profile-cpu", action="store_true",
                        help="profile the host side of batch-1 decode steps (cProfile) and exit")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_engine needs a CUDA device (run it on the GPU machine)")
    if args.quick:
        args.steps, args.hf_steps, args.prefill = 16, 8, [2048]
    if args.max_len is None:
        args.max_len = max(max(args.prefill) + 64, args.context + args.steps + 64)
    if args.profile_cpu:
        return profile_cpu(args)
    bandwidth = copy_bandwidth("cuda")
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s (read+write)")
    rows = []
    for shape in args.models:
        rows += bench_model(shape, args, bandwidth)
    header = f"{'model':>14} {'what':>32} | {'engine ms':>10} {'hf ms':>9} {'hf/engine':>9} {'engine/floor':>12}"
    print(header)
    print("-" * len(header))
    prev = ""
    for r in rows:
        hf = r.get("hf_s")
        floor = r.get("floor_s") if r["what"].startswith("decode b1 ") or (
            r["what"].startswith(" ") and prev.startswith("decode b1 ")) else None
        prev = r["what"] if not r["what"].startswith(" ") else prev
        print(f"{r['model']:>14} {r['what']:>32} | {r['engine_s'] * 1e3:>10.3f} "
              f"{(hf or float('nan')) * 1e3:>9.3f} {(hf / r['engine_s']) if hf else float('nan'):>9.1f} "
              f"{(r['engine_s'] / floor) if floor else float('nan'):>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
