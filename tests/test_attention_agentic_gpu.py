"""Paged prefill attention at a coding agent's shapes, on the GPU, against the torch reference.

Long causal prompts, short turns over long cached prefixes (where the key range is split over
several programs and merged), ragged batches, prefixes that end mid-block and contexts past 64K.
The small versions of the same paths run on the CPU under the Triton interpreter
(tests/test_kernels_triton.py); these run with `make test-gpu`.
"""

from __future__ import annotations

import pytest
import torch

from test_kernels_triton import BF16, F16, check_prefill

AGENTIC = {
    "short_turn_long_prefix": [(70_001, 128)],  # ends mid-block, split key range
    "turn_on_100k": [(100_000 - 4096 + 3, 4093)],  # past 64K, 4K query
    "ragged_turns": [(50_000, 1300), (0, 700), (30_007, 1), (16_384, 8192)],
    "one_token_queries": [(65_536 + 9, 1), (12, 1), (40_000, 2)],
    "long_causal_prompt": [(0, 16_384)],
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(AGENTIC))
def test_prefill_agentic_shape_matches_reference(name: str) -> None:
    check_prefill("cuda", seed=400 + len(name), dtype=BF16, reqs=AGENTIC[name], hq=32, hk=8, d=128, bs=16, q_scale=2.0)
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("name", ["ragged_turns", "long_causal_prompt"])
def test_prefill_each_kernel_matches_reference(name: str, gather: bool) -> None:
    """The paged kernel and the gathered (tensor-descriptor) one, whichever the default picks, at GPU tiles;
    the gathered one also where its copy is larger than the default limit (ragged_turns: 840 MB)."""
    from unittest import mock

    from engine.kernels.triton import attention

    cfg = dict(block_m=128, block_n=128 if gather else 64, num_warps=8, num_stages=3 if gather else 2, gather=gather)
    with mock.patch.object(attention, "PREFILL_GATHER_BYTES", 4 << 30):
        check_prefill(
            "cuda",
            seed=500 + len(name),
            dtype=BF16,
            reqs=AGENTIC[name],
            hq=32,
            hk=8,
            d=128,
            bs=16,
            cfg=cfg,
            q_scale=2.0,
        )
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_prefill_copy_over_the_limit_reads_the_paged_cache() -> None:
    """ragged_turns' gathered copy (840 MB: four rows as wide as 51,300 tokens) is over PREFILL_GATHER_BYTES: the
    paged kernel runs instead (check_prefill checks which), and matches the reference."""
    cfg = dict(block_m=128, block_n=64, num_warps=8, num_stages=2, gather=True)  # tiles the paged kernel takes
    check_prefill("cuda", seed=7, dtype=BF16, reqs=AGENTIC["ragged_turns"], hq=32, hk=8, d=128, bs=16, cfg=cfg)
    torch.cuda.empty_cache()


def test_short_turn_over_long_prefix_splits_the_key_range() -> None:
    """The heuristic itself (host-side, no GPU): a 128-token turn on 70K cached splits; a long prompt does not."""
    from engine.kernels.triton.attention import PrefillConfig, prefill_splits

    cfg = PrefillConfig()
    bq = cfg.block_m // 4
    assert prefill_splits(128, 1, 8, bq, 70_144, 132, cfg) > 1
    assert prefill_splits(16_384, 1, 8, bq, 16_384, 132, cfg) == 1
    assert prefill_splits(128, 1, 8, bq, 70_144, 132, PrefillConfig(max_splits=1)) == 1
    # never more splits than the widest context gives min_split_keys keys each
    assert prefill_splits(1, 1, 8, bq, 2048, 132, cfg) <= 2048 // cfg.min_split_keys


@pytest.mark.gpu
@pytest.mark.parametrize(
    "prefix,tokens,dtype,hq,hk,d,kv_fp8",
    [
        (0, 4096, BF16, 32, 8, 128, False),  # MIN_TOKENS, a multiple of PAD
        (0, 16_384 + 7, BF16, 32, 8, 128, False),
        (16_384, 16_384, BF16, 32, 8, 128, False),  # a first turn's second chunk
        (49_152, 5000, BF16, 32, 8, 128, False),  # its last chunk, padded
        (0, 5000, F16, 12, 4, 64, False),
        (8192, 9000, BF16, 32, 8, 128, True),  # an FP8 cache: cuDNN reads the dequantized copy
    ],
)
def test_long_chunk_on_cudnn_matches_reference(prefix, tokens, dtype, hq, hk, d, kv_fp8) -> None:
    """One request's long chunk at the engine's sizes through engine.kernels.cudnn_prompt (cuDNN's fused
    attention, its length padded; with a prefix, two calls merged) against the torch reference; the route ran
    and did not fall back."""
    from unittest import mock

    from engine.kernels import cudnn_prompt

    if not cudnn_prompt.on(cudnn_prompt.sm(torch.device("cuda"))):
        pytest.skip(f"the route is not on for SM {cudnn_prompt.sm(torch.device('cuda'))} (CARDS: measured there)")
    with mock.patch.object(cudnn_prompt, "attend", wraps=cudnn_prompt.attend) as attend:
        check_prefill(
            "cuda", seed=tokens, dtype=dtype, reqs=[(prefix, tokens)], hq=hq, hk=hk, d=d, bs=16, q_scale=2.0,
            kv_fp8=kv_fp8, cached_prefix=prefix,
        )  # fmt: skip
    assert attend.call_count == (2 if prefix else 1) and not cudnn_prompt._broken, cudnn_prompt._broken
    torch.cuda.empty_cache()
