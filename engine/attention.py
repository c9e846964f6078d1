"""What a forward pass needs besides its tokens: kernels, the paged KV cache and attention metadata.

The runner orders each batch decodes first (requests with one query token),
then the rest, so attention splits into two contiguous ranges::

    tokens   [ d0 d1 d2 | p0 p0 p0 p0 p1 p1 ]     num_decode = 3
               decode     prefill (chunks, a cached prefix read from the cache)

    decode:  seq_lens [3], block_table [3, W]
    prefill: query_start_loc [0 4 6] (relative to the first prefill token),
             seq_lens [2], block_table [2, W]

Every tensor here lives on the model's device. For CUDA-graph replay the runner
keeps these tensors at fixed addresses and refills them in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, slot of each token's k/v (-1: none)
    num_decode: int  # the first num_decode tokens are one-token requests
    decode_seq_lens: torch.Tensor  # [num_decode] int32
    decode_block_table: torch.Tensor  # [num_decode, W] int32
    prefill_query_start_loc: torch.Tensor  # [R_p + 1] int32
    prefill_seq_lens: torch.Tensor  # [R_p] int32
    prefill_block_table: torch.Tensor  # [R_p, W] int32
    num_prefill_tokens: int = 0
    # a step that is one request's prefill chunk and nothing else: its cached prefix (seq_len minus its chunk),
    # known on the host, a hint to the prefill kernels (a long chunk may take cuDNN's attention, whose first
    # call at a shape plans it for 50-190 ms: no decode waits on that; engine.kernels.cudnn_prompt); None:
    # several requests, decodes beside it, or not known
    prefill_cached_prefix: int | None = None


KV_CACHE_ELEMENT_TYPES = {"fp8_e4m3": torch.float8_e4m3fn}  # EngineConfig.kv_cache_dtype ("auto": the model's dtype)


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type for EngineConfig.kv_cache_dtype `name`."""
    if name == "auto":
        return model_dtype
    if name not in KV_CACHE_ELEMENT_TYPES:
        raise ValueError(f"kv_cache_dtype must be auto or one of {sorted(KV_CACHE_ELEMENT_TYPES)}, got {name!r}")
    return KV_CACHE_ELEMENT_TYPES[name]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == torch.float8_e4m3fn


@dataclass
class KVCache:
    """Per-layer paged K and V: [num_layers, num_blocks, block_size, num_kv_heads, head_dim] each.

    An FP8 cache (float8_e4m3fn) carries float32 scales beside it, one per token slot and KV head:
    k_scale, v_scale [num_layers, num_blocks, block_size, num_kv_heads] (docs/fp8.md). A block's
    bytes are its slice along dim 1 of all four tensors, so a block copy moves its scales too.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
    ) -> KVCache:
        """Zeroed caches (and, for FP8, scales of 1) of that shape."""
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)

        def zeros(shape, dtype):
            if pin_memory:
                return torch.zeros(shape, dtype=dtype, pin_memory=True)
            return torch.zeros(shape, dtype=dtype, device=device)

        if not is_fp8(dtype):
            return cls(zeros(shape, dtype), zeros(shape, dtype))
        # FP8 zeros are all-zero bytes; allocated as uint8 (zeros/fill of float8 are not on every device)
        k, v = (zeros(shape, torch.uint8).view(dtype) for _ in range(2))
        k_scale, v_scale = (zeros(shape[:4], torch.float32).fill_(1.0) for _ in range(2))
        return cls(k, v, k_scale, v_scale)

    @property
    def fp8(self) -> bool:
        return self.k_scale is not None

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed [layer, block, ...]: k, v and, for FP8, their scales."""
        return [self.k, self.v] + ([self.k_scale, self.v_scale] if self.fp8 else [])

    def layer_scales(self, layer: int) -> dict[str, torch.Tensor]:
        """The kernel keyword arguments of layer `layer`'s scales: {} unless FP8."""
        if not self.fp8:
            return {}
        return {"k_scale": self.k_scale[layer], "v_scale": self.v_scale[layer]}


@dataclass
class ForwardContext:
    ops: object  # engine.kernels.KernelSet
    kv: KVCache
    meta: AttentionMetadata
    cos_sin: torch.Tensor  # [max_positions, head_dim] float32 (rotary: cos | sin)

    def attention(
        self,
        layer: int,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        q_norm: torch.Tensor | None = None,
        k_norm: torch.Tensor | None = None,
        norm_eps: float = 1e-6,
    ) -> torch.Tensor:
        """A layer's attention from its q/k/v projections; returns [T, Hq, D].

        One fused op rotates q and k (after the per-head RMSNorms `q_norm`/`k_norm` [D], Qwen3's,
        when given) and stores k and v at this step's slots of layer `layer`'s cache; then the
        decode and prefill kernels attend over the cache. A step of decode rows only runs all of it
        as one op, rotary_decode_attention (one kernel on the triton backend). q, k, v may be strided views. An FP8
        cache's scales go to every op (the write quantizes, attention dequantizes); others get none.
        """
        m, ops = self.meta, self.ops
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        sc = self.kv.layer_scales(layer)
        if m.num_prefill_tokens == 0:  # decode rows only: one op, one kernel where the backend fuses it
            return ops.rotary_decode_attention(
                positions, q, k, v, self.cos_sin, kc, vc, m.slot_mapping, m.decode_seq_lens, m.decode_block_table,
                scale, q_norm=q_norm, k_norm=k_norm, eps=norm_eps, **sc,
            )  # fmt: skip
        q = ops.rotary_write_kv(
            positions, q, k, v, self.cos_sin, kc, vc, m.slot_mapping, q_norm=q_norm, k_norm=k_norm, eps=norm_eps, **sc
        )
        nd = m.num_decode
        hint = {} if m.prefill_cached_prefix is None else {"cached_prefix": m.prefill_cached_prefix}
        pre = ops.prefill_attention(
            q[nd:], kc, vc, m.prefill_query_start_loc, m.prefill_seq_lens, m.prefill_block_table, scale, **sc, **hint
        )
        if nd == 0:
            return pre
        dec = ops.decode_attention(q[:nd], kc, vc, m.decode_seq_lens, m.decode_block_table, scale, **sc)
        return torch.cat([dec, pre], dim=0)
