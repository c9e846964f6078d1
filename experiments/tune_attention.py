"""Sweeps the Triton attention kernels' tile configurations at the agentic shapes on one CUDA GPU.

    python -m experiments.tune_attention                 # prefill and decode sweeps, a table each
    python -m experiments.tune_attention --only prefill  # or decode
    python -m experiments.tune_attention --quick         # two shapes, three configs each
    python -m experiments.tune_attention --only prefill --gather   # the gathered (TMA) prefill kernel's tiles
    python -m experiments.tune_attention --only decode-fp8         # the same decode sweep on FP8 caches
    python -m experiments.tune_attention --only decode-fused       # rotary + KV write + merge in the decode kernel
    python -m experiments.tune_attention --only decode-fused-fp8   # the same on FP8 caches
    python -m experiments.tune_attention --only prefill-torch      # torch's own fused attention kernels, prefill shapes
    python -m experiments.tune_attention --only prompt-cudnn       # whole prompts: the cuDNN route against Triton
    python -m experiments.tune_attention --only cudnn-merge        # the route's merge against a blocked candidate

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
import inspect
import itertools
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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


def prefill_configs(quick: bool, small: bool = False, gather: bool = False):
    from engine.kernels.triton.attention import PrefillConfig

    if gather:  # contiguous copies read by tensor descriptors (TMA), with and without warp specialization
        out = [PrefillConfig(gather=True, block_m=64, block_n=64, num_warps=4, num_stages=st) for st in (2, 3)]
        for bn, w, st, ws in itertools.product((64, 128), (4, 8), (2, 3, 4), (False, True)):
            if not (quick and (w == 4 or st == 4)):
                out.append(PrefillConfig(gather=True, block_n=bn, num_warps=w, num_stages=st, warp_specialize=ws))
        return out
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


def prefill_case(prefix: int, chunk: int, gen: torch.Generator, scale: float):
    """One request's chunk over its cached prefix: (k, v, table, lens) of its paged cache, q [chunk, Hq, D],
    its query_start_loc, its attention FLOPs (causal) and the torch reference's output in float32."""
    from engine.kernels import torch_ops

    k, v, table, lens = paged_cache([prefix + chunk], gen)
    q = torch.randn((chunk, HQ, D), generator=gen, device="cuda", dtype=DTYPE)
    qsl = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
    flops = 4 * D * HQ * (chunk * prefix + chunk * (chunk + 1) / 2)
    want = torch_ops.prefill_attention(q, k, v, qsl, lens, table, scale).float()
    return k, v, table, lens, q, qsl, flops, want


def sweep_prefill(shapes, quick: bool, mm: float, small: bool = False, gather: bool = False) -> None:
    from engine.kernels.triton import attention

    base = attention.prefill_config(torch.device("cuda"), D, DTYPE)
    configs = prefill_configs(quick, small, gather)
    if base not in configs:
        configs.insert(0, base)
    nosplit = dataclasses.replace(base, max_splits=1)
    print(f"\nprefill attention sweep  Hq {HQ} Hk {HK} D {D} block {BS} bf16; matmul {mm:.0f} TFLOP/s")
    gen = torch.Generator(device="cuda").manual_seed(1)
    scale = D**-0.5
    best_overall: dict[str, list[float]] = {}
    for prefix, chunk in shapes:
        length = prefix + chunk
        k, v, table, lens, q, qsl, flops, want = prefill_case(prefix, chunk, gen, scale)
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


def _prefill_torch_candidates(q, k, v, kd, vd, lens, table, scale, zero_to):
    """(name, fn, fn on K/V repeated to Hq heads or None) for one request's chunk q [chunk, Hq, D] over its
    `length` keys, causal from the bottom right (query i sees keys j <= length - chunk + i); each fn returns
    [chunk, Hq, D]. kd, vd: [1, Hk, length, D] contiguous copies (contiguous_kv); the packed ones are [length,
    Hk, D]. The engine's Triton kernel reads the paged cache (its default gathers its own copy)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    from engine.kernels.triton import attention

    chunk, length = q.shape[0], kd.shape[2]
    prefix, group = length - chunk, HQ // HK
    reps = {}

    def rep(name, t):  # t with each K/V head repeated for its query heads (dim 1 in both layouts), made once
        if name not in reps:
            reps[name] = t.repeat_interleave(group, dim=1)
        return reps[name]

    kp, vp = (t[0].transpose(0, 1).contiguous() for t in (kd, vd))
    cu_q = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    q4 = q.transpose(0, 1)[None]
    unpack = lambda o: o[0].transpose(0, 1)  # noqa: E731 - [1, Hq, chunk, D] -> [chunk, Hq, D]
    flash = torch.ops.aten._flash_attention_forward
    flash_args = {a.name for a in flash.default._schema.arguments}

    def varlen(key, value, cu_k=cu_k, max_k=length, **kw):  # FlashAttention-2's causal mask is bottom-right
        return flash(q, key, value, cu_q, cu_k, chunk, max_k, 0.0, True, False, scale=scale, **kw)[0]

    out = [
        ("triton", lambda: attention.prefill_attention(q, k, v, cu_q, lens, table, scale), None),
        ("flash-varlen", lambda: varlen(kp, vp), lambda: varlen(rep("kp", kp), rep("vp", vp))),
    ]
    cudnn_varlen = getattr(torch.ops.aten, "_cudnn_attention_forward", None)
    if cudnn_varlen is not None:  # cuDNN on the packed (ragged) layout; is_causal's alignment is what this checks

        def ragged(key, value):
            return cudnn_varlen(q, key, value, None, cu_q, cu_k, chunk, length, False, 0.0, True, False, scale=scale)[0]

        out.append(("cudnn-varlen", lambda: ragged(kp, vp), lambda: ragged(rep("kp", kp), rep("vp", vp))))
    if "seqused_k" in flash_args:  # the engine's gathered copy as it is: one request's rows padded to the table
        try:
            gk, gv, _ = attention.gathered_context(k, v, lens, table, max(zero_to, BS))
            rows = gk.shape[0] * BS
            cu_pad = torch.tensor([0, rows], dtype=torch.int32, device="cuda")
            gk, gv = gk.view(rows, HK, D), gv.view(rows, HK, D)
            out.append(("flash-seqused", lambda: varlen(gk, gv, cu_pad, rows, seqused_k=lens), None))
        except Exception as exc:  # noqa: BLE001
            print(f"  flash-seqused: gathered_context: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None:
        params = inspect.signature(varlen_attn).parameters
        kw = {"scale": scale, **({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})}
        gqa = {"enable_gqa": True} if "enable_gqa" in params else {}
        out.append(
            (
                "varlen_attn",
                lambda: varlen_attn(q, kp, vp, cu_q, cu_k, chunk, length, **kw, **gqa),
                lambda: varlen_attn(q, rep("kp", kp), rep("vp", vp), cu_q, cu_k, chunk, length, **kw),
            )
        )

    def sdpa(backend, key, value, **kw):
        if backend is None:
            return unpack(F.scaled_dot_product_attention(q4, key, value, scale=scale, **kw))
        with sdpa_kernel(backend):
            return unpack(F.scaled_dot_product_attention(q4, key, value, scale=scale, **kw))

    if prefix == 0:  # equal lengths: the top-left causal mask is the bottom-right one
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            name = "sdpa-" + backend.name.split("_")[0].lower()
            gqa_fn = partial(sdpa, backend, kd, vd, is_causal=True, enable_gqa=True)
            out.append((name, gqa_fn, lambda b=backend: sdpa(b, rep("kd", kd), rep("vd", vd), is_causal=True)))
    else:  # CausalBias picks flash (is_causal=True) or efficient (custom_mask_type) itself, whatever sdpa_kernel says
        bias = causal_lower_right(chunk, length)
        out.append(
            (
                "sdpa-lower-right",
                partial(sdpa, None, kd, vd, attn_mask=bias, enable_gqa=True),
                lambda: sdpa(None, rep("kd", kd), rep("vd", vd), attn_mask=bias),
            )
        )
    fa = torch.ops.aten._scaled_dot_product_flash_attention
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
    if prefix > 0:  # cuDNN twice: the prefix unmasked, the chunk's own keys causal (square), merged by their LSE

        def cudnn_split(key, value):
            head, tail = (key[:, :, :prefix], value[:, :, :prefix]), (key[:, :, prefix:], value[:, :, prefix:])
            a, lse_a = cudnn(q4, *head, None, True, 0.0, False, False, scale=scale)[:2]
            b, lse_b = cudnn(q4, *tail, None, True, 0.0, True, False, scale=scale)[:2]
            lse_a, lse_b = lse_a.view(1, HQ, chunk, 1), lse_b.view(1, HQ, chunk, 1)
            top = torch.maximum(lse_a, lse_b)
            wa, wb = (lse_a - top).exp(), (lse_b - top).exp()
            return unpack(((a.float() * wa + b.float() * wb) / (wa + wb)).to(q.dtype))

        out.append(("cudnn-split", lambda: cudnn_split(kd, vd), lambda: cudnn_split(rep("kd", kd), rep("vd", vd))))
    eff = torch.ops.aten._efficient_attention_forward
    out += [
        (
            "aten-flash",
            lambda: unpack(fa(q4, kd, vd, 0.0, True, False, scale=scale)[0]),
            lambda: unpack(fa(q4, rep("kd", kd), rep("vd", vd), 0.0, True, False, scale=scale)[0]),
        ),
        (  # cuDNN's is_causal may be top-left only: WRONG past prefix 0 then
            "aten-cudnn",
            lambda: unpack(cudnn(q4, kd, vd, None, False, 0.0, True, False, scale=scale)[0]),
            lambda: unpack(cudnn(q4, rep("kd", kd), rep("vd", vd), None, False, 0.0, True, False, scale=scale)[0]),
        ),
        (  # [B, M, H, D] layout; custom_mask_type 2: causal from the bottom right
            "aten-efficient",
            lambda: eff(
                q[None], kd.transpose(1, 2), vd.transpose(1, 2), None, None, None, None, None, 0.0, 2, scale=scale
            )[0][0],
            lambda: eff(
                q[None],
                rep("kd", kd).transpose(1, 2),
                rep("vd", vd).transpose(1, 2),
                None,
                None,
                None,
                None,
                None,
                0.0,
                2,
                scale=scale,
            )[0][0],
        ),
    ]
    return out


def _try_candidate(name: str, fn, want: torch.Tensor) -> tuple[float, float] | None:
    """(median us, max abs error / max abs value) of fn's [chunk, Hq, D], us nan (not timed) where the error is
    not under 2e-2; None where fn raised (printed to stderr)."""
    try:
        got = fn()
        err = float((got.float() - want).abs().max() / want.abs().max())
        del got
        return (bench_us(fn) if err < 2e-2 else float("nan")), err
    except Exception as exc:  # noqa: BLE001 - a kernel the card or this torch lacks is a row, not a failure
        print(f"  {name}: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
        torch.cuda.empty_cache()
        return None


def sweep_prefill_torch(shapes, mm: float) -> None:
    """The engine's Triton prefill kernel (default config) against torch's fused attention kernels on one
    request's chunk. `copy` is the engine's gathered copy of the context (gathered_context): the torch kernels
    read contiguous K/V, so add it to theirs; triton's default makes its own copy, inside its time."""
    from engine.kernels.triton import attention

    base = attention.prefill_config(torch.device("cuda"), D, DTYPE)
    zero_to = base.block_n if base.gather else 0
    print(
        f"\nprefill attention, torch kernels against triton ({label(base, type(base)())})  Hq {HQ} Hk {HK} D {D}"
        f" block {BS} bf16; matmul {mm:.0f} TFLOP/s; per kernel: us, TFLOP/s, fraction of mm, relative error"
    )
    gen = torch.Generator(device="cuda").manual_seed(1)
    scale = D**-0.5
    speedups: dict[str, dict[tuple[int, int], str]] = {}
    for prefix, chunk in shapes:
        length = prefix + chunk
        k, v, table, lens, q, qsl, flops, want = prefill_case(prefix, chunk, gen, scale)
        tf = lambda t: flops / t / 1e6  # noqa: E731
        try:
            copy = bench_us(lambda: attention.gathered_context(k, v, lens, table, zero_to))
        except Exception as exc:  # noqa: BLE001
            print(f"  gathered_context: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
            copy = bench_us(lambda: (contiguous_kv(k, table, length), contiguous_kv(v, table, length)))
        kd, vd = contiguous_kv(k, table, length), contiguous_kv(v, table, length)
        cells, results = [], {}
        candidates = _prefill_torch_candidates(q, k, v, kd, vd, lens, table, scale, zero_to)
        for name, fn, fn_rep in candidates:
            got = _try_candidate(name, fn, want)
            if got is None and fn_rep is not None:
                name += "-rep"
                got = _try_candidate(name, fn_rep, want)
            t, err = got or (float("nan"), None)
            results[name] = t
            if err is None:
                cells.append(f"{name} failed")
            elif not err < 2e-2:
                cells.append(f"{name} WRONG err {err:.1e}")
            else:
                cells.append(f"{name} {t:.1f} us {tf(t):.0f} TF {tf(t) / mm:.2f} err {err:.0e}")
        print(f"prefix {prefix:>6} chunk {chunk:>6}: copy {copy:.1f} us | " + " | ".join(cells), flush=True)
        for name, t in results.items():
            if name != "triton":
                plus = t + copy  # every candidate but triton reads a contiguous copy
                speedups.setdefault(name, {})[prefix, chunk] = (
                    f"{results['triton'] / t:5.2f} {results['triton'] / plus:5.2f}"
                )
        if prefix == 0:  # what a length cuDNN has not planned for costs (an engine sees a new length each turn)
            cudnn, q4 = torch.ops.aten._scaled_dot_product_cudnn_attention, q.transpose(0, 1)[None]
            for n in (chunk - 1, chunk - 9):
                walls = []
                for _ in range(2):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    try:
                        cudnn(q4[:, :, :n], kd[:, :, :n], vd[:, :, :n], None, False, 0.0, True, False, scale=scale)
                    except Exception as exc:  # noqa: BLE001
                        print(f"  cuDNN at {n}: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
                        break
                    torch.cuda.synchronize()
                    walls.append((time.perf_counter() - start) * 1e3)
                if len(walls) == 2:
                    print(f"  cuDNN at a new length {n}: first call {walls[0]:.1f} ms, the next {walls[1]:.1f} ms")
        del candidates, fn, fn_rep  # their closures hold the copies and the repeated K/V
        del k, v, kd, vd, q, want
        torch.cuda.empty_cache()
    print("\ntriton us / candidate us (> 1: the candidate is faster), without and with the copy, by shape:")
    print(f"  {'':<22}" + "".join(f"  {f'{p}+{c}':>11}" for p, c in shapes))
    for name, cols in speedups.items():
        print(f"  {name:<22}" + "".join(f"  {cols.get(shape, '-'):>11}" for shape in shapes))


def sweep_prompt_cudnn(lengths, mm: float) -> None:
    """The engine's prefill op on one whole prompt (no cached prefix) with the cuDNN route
    (engine.kernels.cudnn_prompt) and without it (Triton's kernel): time each, and what the first call at a
    length costs (cuDNN plans a graph per padded length; Triton compiles nothing new)."""
    from engine.kernels import cudnn_prompt
    from engine.kernels.triton import attention

    print(
        f"\nwhole prompts: the cuDNN route (padded to {cudnn_prompt.PAD}) against Triton's kernel  Hq {HQ} Hk {HK}"
        f" D {D} block {BS} bf16; matmul {mm:.0f} TFLOP/s"
    )
    gen = torch.Generator(device="cuda").manual_seed(3)
    scale = D**-0.5
    for n in lengths:
        k, v, table, lens, q, qsl, flops, want = prefill_case(0, n, gen, scale)
        tf = lambda t: flops / t / 1e6  # noqa: E731
        cells = []
        for name, on in (("cudnn", True), ("triton", False)):
            cudnn_prompt.ENABLED = on
            run = lambda: attention.prefill_attention(q, k, v, qsl, lens, table, scale, cached_prefix=0)  # noqa: E731
            torch.cuda.synchronize()
            start = time.perf_counter()
            got = run()
            torch.cuda.synchronize()
            first = (time.perf_counter() - start) * 1e3
            err = float((got.float() - want).abs().max() / want.abs().max())
            t = bench_us(run)
            cells.append(f"{name} {t:8.1f} us {tf(t):4.0f} TF err {err:.0e}, first call {first:7.1f} ms")
        cudnn_prompt.ENABLED = True
        print(f"prompt {n:>6}: " + " | ".join(cells), flush=True)
        del k, v, q, want
        torch.cuda.empty_cache()


@triton.jit
def _merge_blocked_kernel(
    a_ptr, b_ptr, la_ptr, lb_ptr, o_ptr, a_st0, a_st1, b_st0, b_st1, o_st0, o_st1, S, T,
    D: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """A candidate for cudnn_prompt's merge (its _merge_kernel takes one (token, head) row of D values a
    program): BLOCK_T rows of one head a program, which are contiguous in cuDNN's [1, H, S, D] outputs, so a
    program reads two [BLOCK_T, D] blocks and writes one."""
    h = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    live = t < T
    la = tl.load(la_ptr + h * S + t, mask=live, other=0.0)
    lb = tl.load(lb_ptr + h * S + t, mask=live, other=0.0)
    top = tl.maximum(la, lb)
    wa = tl.exp(la - top)
    wb = tl.exp(lb - top)
    rows = live[:, None]
    a = tl.load(a_ptr + t[:, None] * a_st0 + h * a_st1 + d[None, :], mask=rows, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + t[:, None] * b_st0 + h * b_st1 + d[None, :], mask=rows, other=0.0).to(tl.float32)
    out = (a * wa[:, None] + b * wb[:, None]) / (wa + wb)[:, None]
    tl.store(o_ptr + t[:, None] * o_st0 + h * o_st1 + d[None, :], out.to(o_ptr.dtype.element_ty), mask=rows)


def merge_blocked(a, lse_a, b, lse_b, tokens: int, block_t: int = 32) -> torch.Tensor:
    """cudnn_prompt.merge's contract on _merge_blocked_kernel."""
    rows, h, d = a.shape
    out = torch.empty((tokens, h, d), dtype=a.dtype, device=a.device)
    la, lb = (x.reshape(h, rows).contiguous() for x in (lse_a, lse_b))
    _merge_blocked_kernel[(triton.cdiv(tokens, block_t), h)](
        a, b, la, lb, out, *a.stride()[:2], *b.stride()[:2], *out.stride()[:2], rows, tokens, D=d,
        BLOCK_T=block_t, num_warps=4,
    )  # fmt: skip
    return out


def sweep_cudnn_merge(token_counts, bw: float) -> None:
    """The cuDNN route's merge of its two calls (engine.kernels.cudnn_prompt.merge, a program a row) at
    Llama-3-8B's heads, on partials laid out as cuDNN returns them, against the blocked candidate at a few
    block sizes; GB/s count the two reads and one write (log-sum-exps aside). An H100 profile of a 50K prefill
    in 16K chunks (docs/perf.md, 2026-12-07, fifth session) had the engine's merge at 0.37 ms a 16K chunk, about
    a third of the copy bandwidth."""
    from engine.kernels import cudnn_prompt

    print(f"\nthe cuDNN route's merge, Hq {HQ} D {D} bf16; copy bandwidth {bw:.0f} GB/s (read+write)")
    for tokens in token_counts:
        rows = cudnn_prompt.padded(tokens)
        a, b = (torch.randn(1, HQ, rows, D, device="cuda", dtype=DTYPE)[0].permute(1, 0, 2) for _ in range(2))
        la, lb = (torch.randn(1, HQ, rows, device="cuda") for _ in range(2))
        want = cudnn_prompt.merge(a, la, b, lb, tokens)
        gbs = lambda us: 3 * tokens * HQ * D * 2 / us / 1e3  # noqa: E731
        t_engine = bench_us(lambda: cudnn_prompt.merge(a, la, b, lb, tokens))
        cells = [f"engine {t_engine:7.1f} us {gbs(t_engine):5.0f} GB/s"]
        for bt in (8, 16, 32, 64):
            err = float((merge_blocked(a, la, b, lb, tokens, bt).float() - want.float()).abs().max())
            t = bench_us(lambda bt=bt: merge_blocked(a, la, b, lb, tokens, bt))
            cells.append(f"block {bt} {t:7.1f} us {gbs(t):5.0f} GB/s ({t_engine / t:.2f}x, |diff| {err:.0e})")
        print(f"tokens {tokens:>6}: " + " | ".join(cells), flush=True)
        del a, b, la, lb, want
        torch.cuda.empty_cache()


def decode_configs(quick: bool):
    """The tl.dot kernel's tiles and the CUDA-core kernel's (fma=True)."""
    from engine.kernels.triton.attention import DecodeConfig

    dot = DecodeConfig(block_n=64, min_tiles_per_split=1)
    dots = [
        dataclasses.replace(dot, block_n=bn, programs_per_sm=pps, num_stages=st, num_warps=w)
        for bn, pps, st, w in itertools.product((16, 32, 64), (4, 8), (1, 2, 3), (2, 4))
        if not quick or (st == 2 and w == 4)
    ]
    fmas = [
        DecodeConfig(fma=True, block_n=bn, num_warps=w, programs_per_sm=pps, num_stages=st, min_tiles_per_split=mt)
        for bn, w, pps, st, mt in itertools.product((16, 32), (1, 2, 4), (8, 16), (1, 2, 3), (1, 4))
        if (not quick or (st == 1 and w == 1)) and (mt == 4 or (st == 1 and w == 1))
    ]
    return dots + fmas


def sweep_decode(shapes, quick: bool, bw: float, fp8: bool = False) -> None:
    """Every configuration on a bf16 cache, or (fp8) on the same cache quantized to FP8 (scales per slot and KV
    head), each against the bf16 cache's default in the same run; GB/s counts the bytes the cache holds."""
    from engine.kernels import torch_ops
    from engine.kernels.triton import attention

    base16 = attention.decode_config(torch.device("cuda"), D, DTYPE)
    configs = decode_configs(quick)
    kind = "FP8" if fp8 else "bf16"
    print(f"\ndecode attention sweep, {kind} cache; copy bandwidth {bw:.0f} GB/s (read+write)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    scale = D**-0.5
    for b, ctx in shapes:
        keys = b * -(-ctx // BS) * BS  # what decode_attention's default sees: batch x the table's width
        base = attention.decode_config(torch.device("cuda"), D, DTYPE, kv_fp8=fp8, keys=keys)
        k, v, table, lens = paged_cache([ctx] * b, gen)
        q = torch.randn((b, HQ, D), generator=gen, device="cuda", dtype=DTYPE)
        t16 = bench_us(lambda: attention.decode_attention(q, k, v, lens, table, scale, base16))
        sc = {}
        if fp8:
            (k, sc["k_scale"]), (v, sc["v_scale"]) = torch_ops.quantize_fp8(k), torch_ops.quantize_fp8(v)
        want = torch_ops.decode_attention(q, k, v, lens, table, scale, **sc).float()
        times = {}
        for cfg in configs if base in configs else [base, *configs]:
            name = ("default " if cfg == base else "") + ("fma " if cfg.fma else "dot ") + label(cfg, base16)
            run = partial(attention.decode_attention, q, k, v, lens, table, scale, cfg, **sc)
            try:
                got = run().float()
                if not float((got - want).abs().max() / want.abs().max()) < 2e-2:
                    print(f"  WRONG RESULTS: {name}")
                    continue
                times[name] = bench_us(run)
            except Exception as exc:
                print(f"  {name}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        kv_bytes = 2 * b * ctx * HK * D * k.element_size()
        gbs = lambda t: kv_bytes / t / 1e3  # noqa: E731
        best = min(times, key=times.get)
        default = next((t for n, t in times.items() if n.startswith("default")), float("nan"))
        print(
            f"batch {b:>3} ctx {ctx:>6}: bf16 default {t16:8.1f} us; {kind} default {default:8.1f} us"
            f" ({default / t16:.2f}x); best {best}: {times[best]:8.1f} us {gbs(times[best]):6.0f} GB/s"
            f" = {times[best] / t16:.2f}x bf16 default"
        )
        for n, t in sorted(times.items(), key=lambda kv: kv[1])[:6]:
            print(f"      {t:8.1f} us {gbs(t):6.0f} GB/s {t / t16:5.2f}x  {n}")
        del k, v
        torch.cuda.empty_cache()


def _compiled(fn) -> list:
    """The kernels Triton has compiled for `fn` so far (every device), in compile order."""
    kernels = []
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        kernels += list(cache.values()) if isinstance(cache, dict) else []
    return kernels


def _registers(kernel) -> str:
    try:
        kernel._init_handles()
        return f"{kernel.n_regs} regs, {kernel.n_spills} B spilled"
    except Exception as exc:  # noqa: BLE001 - a report, not a check
        return f"registers unknown ({type(exc).__name__})"


def sweep_decode_fused(shapes, bw: float, fp8: bool = False) -> None:
    """A decode step's attention from its projections (8B heads) four ways, in CUDA graphs: rotary_write_kv then
    decode_attention with the reduce kernel (the default) or the in-kernel merge, and rotary_decode_attention
    (the rotary and the KV write in the decode kernel) with either; then the fused kernel's tiles beside the
    default. Prints each new split kernel's registers and spills (ptxas), which decide its occupancy."""
    import triton.testing

    from engine.kernels import torch_ops
    from engine.kernels.triton import attention, elementwise
    from engine.models.decoder import rope_cos_sin
    from engine.models.shapes import shape_config

    kind = "FP8" if fp8 else "bf16"
    print(f"\nfused decode attention, {kind} cache; copy bandwidth {bw:.0f} GB/s (read+write); us a call, CUDA graphs")
    gen = torch.Generator(device="cuda").manual_seed(0)
    scale = D**-0.5
    seen = len(_compiled(attention._decode_split_kernel))
    for b, ctx in shapes:
        k_cache, v_cache, table, lens = paged_cache([ctx] * b, gen)
        sc = {}
        if fp8:
            (k_cache, sc["k_scale"]), (v_cache, sc["v_scale"]) = (
                torch_ops.quantize_fp8(k_cache),
                torch_ops.quantize_fp8(v_cache),
            )
        qkv = torch.randn((b, (HQ + 2 * HK) * D), generator=gen, device="cuda", dtype=DTYPE)
        q, k, v = (t.view(b, -1, D) for t in qkv.split([HQ * D, HK * D, HK * D], dim=-1))
        positions = (lens - 1).long()
        slots = (table.gather(1, (positions // BS)[:, None]).squeeze(1).long() * BS + positions % BS).long()
        cos_sin = rope_cos_sin(shape_config("llama-3.1-8b"), ctx + 1).cuda()
        keys = b * table.shape[1] * BS
        base = attention.decode_config(torch.device("cuda"), D, DTYPE, kv_fp8=fp8, group=HQ // HK, keys=keys)
        args = (positions, q, k, v, cos_sin, k_cache, v_cache, slots, lens, table, scale)

        def composed(cfg=base):
            qr = elementwise.rotary_write_kv(positions, q, k, v, cos_sin, k_cache, v_cache, slots, **sc)
            return attention.decode_attention(qr, k_cache, v_cache, lens, table, scale, cfg, **sc)

        def fused(cfg=base):
            return attention.rotary_decode_attention(*args, **sc, cfg=cfg)

        variants = [("composed, reduce", composed, False), ("composed, merge", composed, True)]
        variants += [("fused, reduce", fused, False), ("fused, merge", fused, True)]
        tiles = [
            dataclasses.replace(base, programs_per_sm=pps, num_stages=st, num_warps=w)
            for pps, st, w in itertools.product((2, 4, 8), (1, 2, 3), (4,))
            if (pps, st, w) != (base.programs_per_sm, base.num_stages, base.num_warps)
        ]
        tiles += [dataclasses.replace(base, maxnreg=96)]  # 5 programs of 4 warps an SM fit (ptxas may spill)
        variants += [
            (f"fused, {m}, {label(c, base)}", partial(fused, c), m == "merge")
            for c in tiles
            if not base.fma
            for m in ("reduce", "merge")
        ]
        times = {}
        saved = attention.MERGE_IN_KERNEL
        try:
            for name, fn, merge in variants:
                attention.MERGE_IN_KERNEL = merge
                try:
                    fn()
                    torch.cuda.synchronize()
                    times[name] = 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
                except Exception as exc:  # noqa: BLE001 - a sweep row, not a check
                    print(f"  {name}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
                    continue
                new = _compiled(attention._decode_split_kernel)[seen:]
                seen += len(new)
                for kernel in new:
                    print(f"    split kernel compiled for '{name}': {_registers(kernel)}")
        finally:
            attention.MERGE_IN_KERNEL = saved
        kv_bytes = 2 * b * ctx * HK * D * k_cache.element_size()
        ref = times.get("composed, reduce", float("nan"))
        splits = attention.decode_splits(b, HK, table.shape[1] * BS, attention.num_sms(q.device), base)
        print(f"batch {b:>3} ctx {ctx:>6} (splits {splits}):")
        for name, t in sorted(times.items(), key=lambda kv: kv[1])[:12]:
            print(f"      {t:8.1f} us {kv_bytes / t / 1e3:6.0f} GB/s {t / ref:5.2f}x  {name}")
        for name in ("composed, reduce", "composed, merge", "fused, reduce", "fused, merge"):
            if name in times:
                print(f"      {times[name]:8.1f} us {name}")
        del k_cache, v_cache
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only",
        choices=(
            "prefill", "prefill-torch", "prompt-cudnn", "cudnn-merge", "decode", "decode-fp8", "decode-fused",
            "decode-fused-fp8",
        ),
    )  # fmt: skip
    parser.add_argument("--gather", action="store_true", help="prefill: sweep the gathered (TMA) kernel's tiles")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--small", action="store_true", help="prefill: 128-row tiles, 2-3 stages only")
    parser.add_argument(
        "--shapes", nargs="+", default=None, metavar="BxC", help="decode: batch x context rows (default: DECODE_SHAPES)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_attention needs a CUDA GPU")
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.only in (None, "prefill"):
        shapes = PREFILL_SHAPES[:1] + PREFILL_SHAPES[4:5] if args.quick else PREFILL_SHAPES
        sweep_prefill(shapes, args.quick, matmul_tflops(), args.small, args.gather)
    if args.only == "prompt-cudnn":  # lengths past the first: new padded lengths, then one that shares a plan
        sweep_prompt_cudnn([16384, 4096, 9000, 33001, 50000, 50001, 50999, 16384 + 1], matmul_tflops())
    if args.only == "cudnn-merge":  # a 16K chunk, a 32K prompt's second chunk, a 50K prompt's third
        sweep_cudnn_merge([16384, 16385, 32768, 4096], copy_gbs())
    if args.only == "prefill-torch":
        shapes = [(0, 16384), (55000, 1300)] if args.quick else PREFILL_SHAPES
        sweep_prefill_torch(shapes, matmul_tflops())
    if args.shapes:
        shapes = [tuple(int(n) for n in spec.lower().split("x")) for spec in args.shapes]
    else:
        shapes = sorted(DECODE_SHAPES, key=lambda bc: -bc[0] * bc[1])  # the agentic shapes first
        shapes = shapes[:3] if args.quick else shapes
    if args.only in (None, "decode"):
        sweep_decode(shapes, args.quick, copy_gbs())
    if args.only in (None, "decode-fp8"):
        sweep_decode(shapes, args.quick, copy_gbs(), fp8=True)
    if args.only == "decode-fused":
        sweep_decode_fused(shapes, copy_gbs())
    if args.only == "decode-fused-fp8":
        sweep_decode_fused(shapes, copy_gbs(), fp8=True)


if __name__ == "__main__":
    main()
