"""How many KV blocks fit: device memory x utilisation, minus weights, activations and a reserve.

    budget = total * gpu_memory_utilization - (memory others already use) - weights - peak activations
    blocks = budget // (2 * layers * kv_heads * block_size * (head_dim * dtype_bytes + scale_bytes))

The KV dtype is EngineConfig.kv_cache_dtype's ("auto": the model's). An FP8 cache stores one byte
an element plus a float32 scale per (token, KV head) for K and for V (scale_bytes = 4, else 0):
at head_dim 128, 132 bytes a head-token against bf16's 256, so 1.94x the blocks in the same memory.

Peak activations are measured by a profiling forward pass of the largest step the scheduler
can plan, as vLLM does: `max_num_batched_tokens` tokens in `chunk_size` prefill chunks, or, with
an `idle_chunk_size` above `chunk_size`, max(max_num_batched_tokens, idle_chunk_size) tokens in
chunks of that size (a step no decode waits in).
Triton's prefill attention may also copy a prefill's context to 16 bits (prefill_copy_bytes), which that
pass does not see (it has no cached context); its bound is added.
On the CPU the cache is `kv_cache_memory_gb` unless `num_gpu_blocks` is given.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.attention import AttentionMetadata, ForwardContext, KVCache, is_fp8, resolve_kv_cache_dtype
from engine.models.decoder import rope_cos_sin

_GRAPH_RESERVE = 512 << 20  # CUDA graphs and the sampler's buffers


def block_bytes(model, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block of `dtype` (the KV cache's element type), all layers, K and V, FP8 scales included."""
    c = model.config
    per_head = c.head_dim * torch.finfo(dtype).bits // 8 + (4 if is_fp8(dtype) else 0)
    return 2 * c.num_layers * c.num_kv_heads * block_size * per_head


@torch.inference_mode()
def profile_peak_activation_bytes(model, ops, cfg, device, dtype, max_model_len: int, idle_chunk_size: int = 0) -> int:
    """Runs one forward pass of the largest batch the scheduler can plan; returns its peak extra bytes.

    `dtype` is the model's; the pass's KV cache has cfg.kv_cache_dtype's type (so FP8's kernels run)."""
    c = model.config
    tokens, chunk = cfg.scheduler.max_num_batched_tokens, cfg.scheduler.chunk_size
    if idle_chunk_size > chunk:  # a step no decode waits in: larger chunks, a budget of at least one
        tokens, chunk = max(tokens, idle_chunk_size), idle_chunk_size
    chunk = min(chunk, tokens, max_model_len - 1)
    lens = [chunk] * (tokens // chunk) + ([tokens % chunk] if tokens % chunk else [])
    bs = cfg.scheduler.block_size
    blocks_per = [-(-n // bs) for n in lens]
    nblocks = sum(blocks_per)
    kv = KVCache.allocate(
        c.num_layers, nblocks, bs, c.num_kv_heads, c.head_dim, resolve_kv_cache_dtype(cfg.kv_cache_dtype, dtype), device
    )
    width = max(blocks_per)
    table = np.zeros((len(lens), width), dtype=np.int32)
    at = 0
    for i, n in enumerate(blocks_per):
        table[i, :n] = np.arange(at, at + n)
        at += n
    positions = np.concatenate([np.arange(n) for n in lens])
    slots = np.concatenate([table[i, np.arange(n) // bs] * bs + np.arange(n) % bs for i, n in enumerate(lens)])
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    to = lambda a, dt=torch.int32: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    meta = AttentionMetadata(  # prompts from position 0: the kernels a first chunk takes (cuDNN's for one)
        to(slots, torch.int64), 0, to([]), to(np.zeros((0, width))), to(qsl), to(lens), to(table), tokens,
        0 if len(lens) == 1 else None,
    )  # fmt: skip
    ctx = ForwardContext(ops, kv, meta, rope_cos_sin(c, max_model_len).to(device))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    ids = torch.randint(0, c.vocab_size, (tokens,), device=device)
    hidden = model(ids, to(positions), ctx)
    logits = model.compute_logits(hidden[: cfg.scheduler.max_num_seqs])
    torch.softmax(logits, dim=-1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del kv, ctx, hidden, logits
    torch.cuda.empty_cache()
    return int(peak)


def prefill_copy_bytes(model, ops, cfg, dtype, max_model_len: int, device=None, idle_chunk_size: int = 0) -> int:
    """The largest 16-bit copy of a prefill's context that Triton's prefill attention may make (a layer at a
    time, freed after it: gathered_context, dequantized_context), which the profiling pass, having no cached
    context, does not see: K and V of max_num_seqs contexts of max_model_len tokens, at most its limit (0
    where the default path copies nothing). Or, where more, what a long chunk on a cached prefix through
    cuDNN holds (engine.kernels.cudnn_prompt): its copy of one context and two outputs more than the
    profiled chunk without a prefix."""
    if ops.chosen.get("prefill_attention") != "triton":
        return 0
    from engine.kernels import cudnn_prompt
    from engine.kernels.triton.attention import _cuda_arch, prefill_copy_limit

    c = model.config
    kv_fp8 = is_fp8(resolve_kv_cache_dtype(cfg.kv_cache_dtype, dtype))
    limit = prefill_copy_limit(device or torch.device("cuda"), c.head_dim, dtype, kv_fp8)
    one = 2 * max_model_len * c.num_kv_heads * c.head_dim * dtype.itemsize
    copy = min(cfg.scheduler.max_num_seqs * one, limit)
    tokens = min(max(cfg.scheduler.max_num_batched_tokens, idle_chunk_size), max_model_len - 1)  # the longest chunk
    if not (
        cudnn_prompt.on(_cuda_arch())
        and tokens >= cudnn_prompt.MIN_TOKENS
        and c.head_dim in (64, 128)
        and dtype in (torch.bfloat16, torch.float16)
    ):
        return copy
    cudnn = min(one, cudnn_prompt.COPY_BYTES) + cudnn_prompt.extra_bytes(tokens, c.num_heads, c.head_dim, dtype)
    return max(copy, cudnn)


def size_kv_cache(model, ops, cfg, device, dtype, max_model_len: int, idle_chunk_size: int = 0) -> tuple[int, int]:
    """(device blocks, host blocks) for this engine (`idle_chunk_size`: the scheduler's, resolved).

    `dtype` is the model's; blocks are sized in cfg.kv_cache_dtype's bytes (FP8: with their scales)."""
    per_block = block_bytes(model, cfg.scheduler.block_size, resolve_kv_cache_dtype(cfg.kv_cache_dtype, dtype))
    host = int(cfg.swap_space_gb * (1 << 30) // per_block)
    if cfg.num_gpu_blocks is not None:
        return cfg.num_gpu_blocks, host
    if device.type != "cuda":
        return max(1, int(cfg.kv_cache_memory_gb * (1 << 30) // per_block)), host
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    ours = torch.cuda.memory_allocated(device)
    others = total - free - torch.cuda.memory_reserved(device)
    activations = profile_peak_activation_bytes(model, ops, cfg, device, dtype, max_model_len, idle_chunk_size)
    activations += prefill_copy_bytes(model, ops, cfg, dtype, max_model_len, device, idle_chunk_size)
    budget = total * cfg.gpu_memory_utilization - others - ours - activations - _GRAPH_RESERVE
    blocks = int(budget // per_block)
    if blocks < -(-max_model_len // cfg.scheduler.block_size) // 8 or blocks <= 0:
        raise ValueError(
            f"not enough device memory for the KV cache: {budget / 2**30:.2f} GiB left after "
            f"weights ({ours / 2**30:.2f} GiB) and activations ({activations / 2**30:.2f} GiB); "
            f"raise gpu_memory_utilization or lower max_num_batched_tokens (or idle_chunk_size)"
        )
    return blocks, host
