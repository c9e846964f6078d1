"""Engine speed on one GPU, each figure beside its floor or roofline on the same card, and beside transformers.

    python -m experiments.bench_engine          # llama-3.2-1b and llama-3.1-8b shapes (the Llama-3-8B shape with
                                                # its 128K-context rotary scaling, so long prompts fit), bf16
    python -m experiments.bench_engine --models llama-3.1-8b --decode 1x512 1x50000 4x50000 64x512 \
        --prefill 2048 32768 50000 --turn 55000+1300
    python -m experiments.bench_engine --models llama-3.2-1b --quick
    python -m experiments.bench_engine --tp 4 --models llama-3.1-70b --decode 1x512 1x8192 --prefill 2048 --turn

Every figure is measured in this run on this card. Random weights of the real
shapes (load_format=dummy). Rows:

  decode BxC    median wall seconds between the ends of consecutive engine steps with B requests decoding
                at a C-token context (each step = one token per request); CUDA graphs unless --eager,
                overlapped decode (engine/overlap.py) unless --no-overlap; "no overlap": the strict loop,
                same run, for batch 1
  prefill N     seconds from adding one N-token prompt to its first token (the engine's chunking, or
                --chunk tokens a chunk); each prefill and turn row first runs once untimed on other tokens
                (Triton's compiles and cuDNN's plans for its lengths happen there, not in the figure)
  turn P+N      seconds from adding a prompt of N new tokens on a P-token prefix already cached (an
                agent's later turn) to its first token
  hf            transformers on the same weights (sdpa attention, its own KV cache): per-token decode
                from generate() at batch 1 and B (short contexts only), one forward pass for prefill
                (not with --tp)
  twin          the simulator's roofline cost model (sim/cost.py) for the same step at this card's
                measured rates, the model's conf/model entry at the same tensor-parallel size (its
                collectives over the hardware entry's NVLink bandwidth): engine/twin is the twin's error

--tp N runs the engine over N GPUs (tensor_parallel_size; ranks load only their shards, no CUDA graphs, no
overlapped decode yet). Its bounds are one rank's (each GPU reads its weights and its KV heads, computes its
share of the FLOPs) plus, for decode, the step's collectives as measured in this run (2L+1 all-reduces of
the hidden states, one all-gather of the logits, each timed alone between steps: "of which collectives").

Floors and rooflines (the "bound" column, measured on this card in this run):

  decode        bytes a step must read over the copy bandwidth (read+write bytes of a 1 GiB copy / time):
                every weight but the input embedding table (a gather of B rows; a tied table is read
                whole by the LM head and counts once) plus the K/V of every request's context; with
                --tp, one rank's and the measured collectives
  prefill/turn  FLOPs over the bf16 matmul rate (an 8192^3 torch.mm): 2 x the non-embedding weights a
                token (LM head on the sampled row only) plus causal attention, 4 x head_dim x Hq
                per visible query-key pair a layer
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import statistics
import time
from dataclasses import dataclass

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


def matmul_rate(device) -> float:
    """FLOP/s of a bf16 8192^3 matrix product (median of 20 after 5 warm-ups)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n**3 / statistics.median(times[5:])


def engine_for(shape: str, args, graphs: tuple[int, ...], blocks: int, max_len: int, variant: str = "bf16"):
    from engine.config import EngineConfig
    from engine.core import EngineCore

    chunking = {} if args.chunk is None else dict(max_num_batched_tokens=args.chunk, chunk_size=args.chunk)
    if args.idle_chunk is not None:
        chunking["idle_chunk_size"] = args.idle_chunk
    quantization, kv_cache_dtype = VARIANTS[variant]
    cfg = EngineConfig.from_dict(
        dict(
            model=shape,
            load_format="dummy",
            dtype="bfloat16",
            num_gpu_blocks=blocks,
            max_model_len=max_len,
            max_num_seqs=max(max(b for b, _ in args.decode), 1),
            enforce_eager=args.eager,
            cuda_graph_batch_sizes=graphs,
            enable_prefix_caching=True,
            overlap_decode=False if args.no_overlap or args.tp > 1 else None,
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
            tensor_parallel_size=args.tp,
            **chunking,
        )
    )
    return EngineCore(cfg)


# --variants: (quantization, kv_cache_dtype) of the engine; each variant is a fresh engine of the same shape
VARIANTS = {
    "bf16": ("none", "auto"),
    "fp8w": ("fp8", "auto"),
    "fp8kv": ("none", "fp8_e4m3"),
    "fp8": ("fp8", "fp8_e4m3"),
    # the same engines without the fused one-row GEMV (engine/kernels/triton/gemv.py): the norms and SiLU
    # as their own kernels, cuBLAS / engine.quant's GEMV for the products; the baseline of the fusion
    "bf16-unfused": ("none", "auto"),
    "fp8w-unfused": ("fp8", "auto"),
    # the decode attention with its splits merged in its kernel (attention.MERGE_IN_KERNEL, off by default),
    # besides the rotary and the KV write (triton_ops.FUSED_DECODE_ATTENTION, on by default)
    "bf16-attn": ("none", "auto"),
    "fp8w-attn": ("fp8", "auto"),
    # the rotary and the KV write in the decode kernel, its splits merged by the reduce kernel: the default
    "bf16-rot": ("none", "auto"),
    "fp8w-rot": ("fp8", "auto"),
    # the baseline of that fusion: rotary_write_kv, decode_attention and its reduce as three kernels
    "bf16-composed": ("none", "auto"),
    "fp8w-composed": ("fp8", "auto"),
    "fp8kv-composed": ("none", "fp8_e4m3"),
    # whole prompts (a first chunk) on Triton's prefill kernel, not cuDNN (engine.kernels.cudnn_prompt): its baseline
    "bf16-triton": ("none", "auto"),
    "fp8kv-triton": ("none", "fp8_e4m3"),
}


@dataclass(frozen=True)
class Bytes:
    """What a model's step reads and computes, from its configuration and parameters."""

    weights_read: int  # bytes a decode step reads of the weights (input embedding table excluded)
    kv_per_token: int  # K and V bytes of one context token, all layers
    linear_flops: int  # FLOPs a token spends in the layers' matrices (2 x weights)
    head_flops: int  # FLOPs of the LM head for one sampled row
    attn_flops_pair: int  # FLOPs per visible query-key pair, all layers

    @classmethod
    def of(cls, core) -> "Bytes":
        """One GPU's: with tensor parallelism, rank 0's shard (its heads, FFN and vocabulary slices)."""
        model, c = core.model, core.model.config
        params = {id(p): p for p in model.parameters()}  # a tied table counts once
        total = sum(p.numel() * p.element_size() for p in params.values())
        embed = model.model.embed_tokens.weight
        tied = c.tie_word_embeddings
        weights_read = total - (0 if tied else embed.numel() * embed.element_size())
        linear = sum(
            m.weight.numel()
            for m in model.model.layers.modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Linear"
        )
        if core.config.kv_cache_dtype == "fp8_e4m3":  # one byte an element and a float32 scale per token and head
            kv = 2 * c.num_layers * c.num_kv_heads * (c.head_dim + 4)
        else:
            kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * embed.element_size()
        vocab = embed.shape[0]  # the rank's rows of the vocabulary-parallel table and LM head
        return cls(weights_read, kv, 2 * linear, 2 * vocab * c.hidden_size, 4 * c.head_dim * c.num_heads * c.num_layers)

    def decode_floor(self, batch: int, context: int, bandwidth: float) -> float:
        return (self.weights_read + batch * context * self.kv_per_token) / bandwidth

    def prefill_roofline(self, prefix: int, new: int, rate: float) -> float:
        pairs = new * prefix + new * (new + 1) // 2
        return (new * self.linear_flops + self.head_flops + pairs * self.attn_flops_pair) / rate


_IDS = itertools.count(10_000_000)


def twin_cost(shape: str, args, bandwidth: float, rate: float, variant: str):
    """The roofline twin of `shape` (its conf/model entry, experiments.calibrate.ENGINE_SHAPES) at this
    card's measured rates, --tp GPUs and the variant's dtypes; None for a shape without an entry."""
    from experiments.calibrate import ENGINE_SHAPES
    from sim.cost import RooflineCost
    from sim.specs import load_hardware_spec, load_model_spec

    names = {engine: conf for conf, engine in ENGINE_SHAPES.items()}
    if shape not in names:
        return None
    try:
        conf = load_model_spec(names[shape])
    except ValueError as exc:  # an install without the conf/ tree: TANDEM_CONF_DIR names it
        print(f"no twin column: {exc}")
        return None
    quantization, kv_cache_dtype = VARIANTS[variant]
    spec = dataclasses.replace(
        conf,
        tensor_parallel_size=args.tp,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
    )
    base = "h200" if "H200" in torch.cuda.get_device_name() else "h100_sxm"
    hw = dataclasses.replace(
        load_hardware_spec(base), peak_flops=rate, peak_flops_fp8=None, mem_bandwidth=bandwidth, step_overhead_s=0.0
    )
    return RooflineCost(spec, hw)


def twin_seconds(twin, cached: list[int], new: list[int]) -> float | None:
    from sim.cost import PlanFeatures

    return None if twin is None else twin.step_seconds(PlanFeatures.of_requests(cached, new))


def collective_seconds(core, batch: int) -> float:
    """A decode step's collectives with --tp, timed alone on the ranks: 2L+1 all-reduces of [batch, hidden]
    and the all-gather of [batch, vocab / N] logits (0 without tensor parallelism)."""
    if core.tp is None:
        return 0.0
    c = core.model.config
    vocab_part = core.model.model.embed_tokens.weight.shape[0]
    all_reduce, all_gather = core.tp.time_collectives(batch, c.hidden_size, vocab_part, core.dtype, core.device)
    return (2 * c.num_layers + 1) * all_reduce + all_gather


def decode_step_seconds(core, batch: int, context: int, steps: int) -> float:
    from engine import SamplingParams

    rng = np.random.default_rng(batch * 100_003 + context)
    for _ in range(batch):
        core.add_request(
            next(_IDS),
            rng.integers(0, core.model_config.vocab_size, context),
            SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True),
        )
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


def first_token_seconds(core, prompt: np.ndarray) -> float:
    """Seconds from adding `prompt` to its first token (the engine runs nothing else)."""
    from engine import SamplingParams

    core.add_request(next(_IDS), prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    start = time.perf_counter()
    while core.has_unfinished():
        core.step()
    return time.perf_counter() - start


def prefill_seconds(core, length: int, seed: int = 0) -> float:
    rng = np.random.default_rng([length, seed])
    return first_token_seconds(core, rng.integers(0, core.model_config.vocab_size, length))


def turn_prompts(core, prefix: int, new: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first turn's prompt and the later turn's (that prompt and `new` tokens more)."""
    rng = np.random.default_rng([prefix, new, seed])
    first = rng.integers(0, core.model_config.vocab_size, prefix)
    return first, np.concatenate([first, rng.integers(0, core.model_config.vocab_size, new)])


def turn_seconds(core, prefix: int, new: int) -> float:
    """A later turn: `new` tokens on a `prefix`-token prompt that a finished request left cached."""
    first, later = turn_prompts(core, prefix, new)
    first_token_seconds(core, first)
    return first_token_seconds(core, later)


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


def parse_decode(spec: str) -> tuple[int, int]:
    batch, context = spec.lower().split("x")
    return int(batch), int(context)


def parse_turn(spec: str) -> tuple[int, int]:
    prefix, new = spec.split("+")
    return int(prefix), int(new)


def bench_model(shape: str, args, bandwidth: float, rate: float, variant: str = "bf16") -> list[dict]:
    block = 16
    need = max(
        [b * (c + args.steps + 16) + 1024 for b, c in args.decode]
        + [n + 1024 for n in args.prefill]
        + [2 * (p + n) + 1024 for p, n in args.turn]
    )
    blocks = args.blocks or -(-need // block) + 64
    max_len = args.max_len or max(
        [c + args.steps + 64 for _, c in args.decode]
        + [n + 64 for n in args.prefill]
        + [p + n + 64 for p, n in args.turn]
    )
    graphs = tuple(sorted({b for b, _ in args.decode}))
    core = engine_for(shape, args, graphs, blocks, max_len, variant)
    nb = Bytes.of(core)
    twin = twin_cost(shape, args, bandwidth, rate, variant)
    rows = []
    name = shape if args.tp == 1 else f"{shape}-tp{args.tp}"  # print_ratios keys on the first word
    label = name if variant == "bf16" else f"{name} {variant}"

    def add(what: str, engine_s: float, bound_s: float | None = None, **extra) -> None:
        rows.append(
            {
                "model": label,
                "variant": variant,
                "what": what,
                "engine_s": engine_s,
                "bound_s": bound_s,
                "hf_s": None,
                **extra,
            }
        )

    for batch, context in args.decode:
        floor = nb.decode_floor(batch, context + args.steps // 2, bandwidth)
        collectives = collective_seconds(core, batch)
        floor += collectives
        twin_s = twin_seconds(twin, [context + args.steps // 2] * batch, [1] * batch)
        if batch == 1 and core.runner.overlap:  # the strict loop too, same engine, same run
            core.runner.overlap = False
            add(
                f"decode b{batch} ctx{context} no overlap",
                decode_step_seconds(core, batch, context, args.steps),
                floor,
                batch=batch,
                context=context,
            )
            core.runner.overlap = True
        add(
            f"decode b{batch} ctx{context} (s/step)",
            decode_step_seconds(core, batch, context, args.steps),
            floor,
            batch=batch,
            context=context,
            twin_s=twin_s,
        )
        if core.tp is not None:
            cost = twin.collective_seconds(batch, batch) if twin is not None else None
            add(f"  of which collectives b{batch}", collectives, cost, batch=batch, context=context, twin_s=cost)
        replay = replay_seconds(core, batch)
        if replay is not None:
            add(f"  of which graph replay b{batch} c{context}", replay, floor)
    first_token_seconds(core, np.arange(256) % core.model_config.vocab_size)  # warm-up of the prefill kernels
    for length in args.prefill:
        prefill_seconds(core, length, seed=2)  # untimed, other tokens: this length's compiles and cuDNN plans
        add(
            f"prefill {length} (s)",
            prefill_seconds(core, length),
            nb.prefill_roofline(0, length, rate),
            prefix=0,
            new=length,
            twin_s=twin_seconds(twin, [0], [length]),
        )
    for prefix, new in args.turn:
        first, later = turn_prompts(core, prefix, new, seed=2)  # untimed warm-up, as for prefill
        first_token_seconds(core, first)
        first_token_seconds(core, later)
        add(
            f"turn {new} on {prefix} cached (s)",
            turn_seconds(core, prefix, new),
            nb.prefill_roofline(prefix, new, rate),
            prefix=prefix,
            new=new,
            twin_s=twin_seconds(twin, [prefix], [new]),
        )
    if args.profile_gpu:
        # fresh prompts (seed 1): the timed rows' prompts are in the prefix cache now
        for length in args.prefill:
            profile_gpu(core, f"{label}: prefill {length}", lambda: prefill_seconds(core, length, seed=1))
        for prefix, new in args.turn:
            first, later = turn_prompts(core, prefix, new, seed=1)
            first_token_seconds(core, first)  # the first turn, cached before the profiled later turn
            profile_gpu(core, f"{label}: turn {new} on {prefix} cached", lambda: first_token_seconds(core, later))
    if not args.no_hf and variant == "bf16" and args.tp == 1:
        model = hf_model(core)
        hf_decode: dict[int, float] = {}
        for row in rows:
            if row["what"].startswith("decode") and row["context"] <= args.hf_max_context:
                if row["batch"] not in hf_decode:
                    hf_decode[row["batch"]] = hf_decode_per_token(model, row["batch"], row["context"], args.hf_steps)
                row["hf_s"] = hf_decode[row["batch"]]
            elif row["what"].startswith("prefill"):
                row["hf_s"] = hf_prefill(model, row["new"])
        del model
    del core
    gc.collect()
    torch.cuda.empty_cache()
    return rows


# kernel name -> what it is, first match wins (Triton kernels by their function names, cuBLAS/CUTLASS by theirs)
KERNEL_KINDS = (
    (
        "attention",
        (
            "attention",
            "attn",
            "flash",
            "fmha",
            "_prefill_kernel",
            "_prefill_gather",  # Triton's prefill attention over a gathered context
            "_decode_split",
            "_decode_reduce",
            "_decode_fma",
            "_merge_splits",
            "_merge_kernel",  # engine.kernels.cudnn_prompt's merge of its two calls
        ),
    ),
    ("kv copy", ("_dequant_blocks",)),  # a context's K/V copied (dequantized) out of the paged cache
    ("matmul", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "sm90_", "sm80_", "matmul", "_scaled_mm")),
    ("norm", ("norm",)),
    ("rotary/kv write", ("rotary", "write_kv")),
    ("activation", ("silu", "act")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def kernel_times(prof) -> dict[str, list[float]]:
    """Milliseconds of every CUDA kernel call a torch.profiler session saw, by kernel name."""
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            kernels.setdefault(ev.name, []).append(ev.device_time / 1e3)
    return kernels


def profile_gpu(core, what: str, run) -> None:
    """GPU time of one call of `run` by kernel (torch.profiler), grouped by kind: where a row's time goes."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = run()
        torch.cuda.synchronize()
    kernels = kernel_times(prof)
    total = sum(sum(v) for v in kernels.values())
    kinds: dict[str, float] = {}
    for name, times in kernels.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + sum(times)
    print(
        f"\nprofile of {what}: wall {wall * 1e3:.1f} ms, GPU kernels {total:.1f} ms "
        f"({total / (wall * 1e3):.0%} of the wall time)"
    )
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:>16} {ms:10.2f} ms {ms / total:6.1%}")
    for name, times in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:12]:
        print(f"    {sum(times):9.2f} ms {len(times):6d}x  {name[:110]}")


def profile_cpu(args) -> None:
    import cProfile
    import pstats

    core = engine_for(args.models[0], args, (1,), args.blocks or 4096, args.context + args.steps + 64)
    decode_step_seconds(core, 1, args.context, 16)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    decode_step_seconds(core, 1, args.context, args.steps)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument(
        "--decode",
        type=parse_decode,
        nargs="+",
        default=None,
        metavar="BxC",
        help="decode rows, batch x context (default: 1x512 1x50000 4x50000 64x512)",
    )
    parser.add_argument("--context", type=int, default=512, help="the context of --profile-cpu's steps")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--hf-steps", type=int, default=32)
    parser.add_argument("--hf-max-context", type=int, default=4096, help="transformers decode rows only up to here")
    parser.add_argument("--prefill", type=int, nargs="+", default=[2048, 32768, 50000])
    parser.add_argument(
        "--turn",
        type=parse_turn,
        nargs="*",
        default=None,
        metavar="P+N",
        help="later-turn rows: N new tokens on P cached (default: 55000+1300)",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="chunk_size and max_num_batched_tokens (default: the engine's own chunking)",
    )
    parser.add_argument(
        "--idle-chunk",
        type=int,
        default=None,
        help="the scheduler's idle_chunk_size: a prompt's chunk when no decode waits (default: the engine's)",
    )
    parser.add_argument("--blocks", type=int, default=None, help="KV blocks (default: what the rows need)")
    parser.add_argument("--max-len", type=int, default=None)
    parser.add_argument(
        "--tp", type=int, default=1, metavar="N", help="tensor_parallel_size: the engine over N GPUs (default 1)"
    )
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-overlap", action="store_true", help="the strict step/commit loop only")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["bf16"],
        choices=list(VARIANTS),
        help="engines to measure, each fresh: bf16, fp8w (FP8 weights), fp8kv (FP8 KV cache), fp8 (both); "
        "bf16-unfused, fp8w-unfused: without the fused one-row GEMV (its baseline); "
        "bf16-attn, fp8w-attn: with the fused decode attention (rotary + KV write + merge in the kernel); "
        "bf16-rot, fp8w-rot: the same with the splits merged by the reduce kernel; "
        "bf16-triton, fp8kv-triton: whole prompts on Triton's prefill kernel instead of cuDNN (its baseline)",
    )
    parser.add_argument(
        "--profile-gpu",
        action="store_true",
        help="also print where each prefill and turn row's GPU time goes, by kernel (torch.profiler)",
    )
    parser.add_argument(
        "--profile-cpu", action="store_true", help="profile the host side of batch-1 decode steps (cProfile) and exit"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_engine needs a CUDA device (run it on the GPU machine)")
    if args.quick:
        args.steps, args.hf_steps, args.prefill = 16, 8, [2048]
        args.decode = args.decode or [(1, 512), (8, 512)]
        args.turn = [] if args.turn is None else args.turn
    args.decode = args.decode or [(1, 512), (1, 50000), (4, 50000), (64, 512)]
    args.turn = [(55000, 1300)] if args.turn is None else args.turn
    if args.tp > torch.cuda.device_count():
        raise SystemExit(f"--tp {args.tp} needs {args.tp} GPUs; this machine has {torch.cuda.device_count()}")
    if args.profile_cpu:
        return profile_cpu(args)
    bandwidth, rate = copy_bandwidth("cuda"), matmul_rate("cuda")
    print(
        f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
        f"{bandwidth / 1e12:.2f} TB/s (read+write), bf16 matmul {rate / 1e12:.0f} TFLOP/s"
    )
    rows = []
    for shape in args.models:
        for variant in args.variants:
            fused = True if variant.endswith(("-attn", "-rot")) else False if variant.endswith("-composed") else None
            merge = variant.endswith("-attn") if fused else None
            with fusions(not variant.endswith("-unfused"), fused, merge, not variant.endswith("-triton")):
                rows += bench_model(shape, args, bandwidth, rate, variant)
    print_table(rows)
    print_ratios(rows)
    print_twin(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"card": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth, "matmul_rate": rate, "rows": rows},
                f,
                indent=1,
            )


@contextlib.contextmanager
def fusions(gemv: bool, attention: bool | None, merge: bool | None = None, cudnn: bool = True):
    """The triton backend's fusions while an engine is built and run: the one-row GEMV on or off (the -unfused
    variants turn it off), the decode attention with the rotary and the KV write in its kernel on or off (the
    -composed variants turn it off, -attn and -rot on) and its split merge in the kernel (-attn); None: the default.
    `cudnn`: whole prompts on cuDNN (engine.kernels.cudnn_prompt; the -triton variants turn it off)."""
    from engine.kernels import cudnn_prompt, triton_ops
    from engine.kernels.triton import attention as triton_attention

    before = triton_ops.FUSED_GEMV, triton_ops.FUSED_DECODE_ATTENTION, triton_attention.MERGE_IN_KERNEL
    cudnn_before, cudnn_prompt.ENABLED = cudnn_prompt.ENABLED, cudnn
    triton_ops.FUSED_GEMV = gemv
    if attention is not None:
        triton_ops.FUSED_DECODE_ATTENTION = attention
    if merge is not None:
        triton_attention.MERGE_IN_KERNEL = merge
    try:
        yield
    finally:
        triton_ops.FUSED_GEMV, triton_ops.FUSED_DECODE_ATTENTION, triton_attention.MERGE_IN_KERNEL = before
        cudnn_prompt.ENABLED = cudnn_before


def print_ratios(rows: list[dict]) -> None:
    """Each FP8 variant's row over the bf16 row of the same shape and figure (same run, same card)."""
    base = {(r["model"], r["what"]): r["engine_s"] for r in rows if r.get("variant", "bf16") == "bf16"}
    lines = []
    for r in rows:
        shape = r["model"].split(" ")[0]
        if r.get("variant", "bf16") != "bf16" and (shape, r["what"]) in base:
            lines.append(f"{r['model']:>20} {r['what']:>34} | {r['engine_s'] / base[(shape, r['what'])]:8.3f}")
    if lines:
        print(f"\n{'variant':>20} {'what':>34} | {'x bf16':>8}")
        print("\n".join(lines))


def print_twin(rows: list[dict]) -> None:
    """Each row beside the roofline twin's prediction of the same step: the twin's error."""
    lines = [
        f"{r['model']:>24} {r['what']:>34} | {r['engine_s'] * 1e3:>10.3f} {r['twin_s'] * 1e3:>9.3f} "
        f"{r['engine_s'] / r['twin_s'] - 1:>+10.1%}"
        for r in rows
        if r.get("twin_s")
    ]
    if lines:
        print(f"\n{'model':>24} {'what':>34} | {'engine ms':>10} {'twin ms':>9} {'twin error':>10}")
        print("\n".join(lines))


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'model':>20} {'what':>34} | {'engine ms':>10} {'bound ms':>9} {'engine/bound':>12} |"
        f" {'hf ms':>9} {'hf/engine':>9}"
    )
    print(header)
    print("-" * len(header))
    nan = float("nan")
    for r in rows:
        hf, bound = r.get("hf_s"), r.get("bound_s")
        print(
            f"{r['model']:>20} {r['what']:>34} | {r['engine_s'] * 1e3:>10.3f} {(bound or nan) * 1e3:>9.3f} "
            f"{(r['engine_s'] / bound) if bound else nan:>12.2f} | {(hf or nan) * 1e3:>9.3f} "
            f"{(hf / r['engine_s']) if hf else nan:>9.2f}"
        )


if __name__ == "__main__":
    main()
