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
    slot_mapping: torch.Tensor            # [T] int64, slot of each token's k/v (-1: none)
    num_decode: int                       # the first num_decode tokens are one-token requests
    decode_seq_lens: torch.Tensor         # [num_decode] int32
    decode_block_table: torch.Tensor      # [num_decode, W] int32
    prefill_query_start_loc: torch.Tensor  # [R_p + 1] int32
    prefill_seq_lens: torch.Tensor        # [R_p] int32
    prefill_block_table: torch.Tensor     # [R_p, W] int32
    num_prefill_tokens: int = 0


@dataclass
class KVCache:
    """Per-layer paged K and V: [num_layers, num_blocks, block_size, num_kv_heads, head_dim] each."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


@dataclass
class ForwardContext:
    ops: object                 # engine.kernels.KernelSet
    kv: KVCache
    meta: AttentionMetadata
    cos_sin: torch.Tensor       # [max_positions, head_dim] float32 (rotary: cos | sin)

    def attention(self, layer: int, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, scale: float, q_norm: torch.Tensor | None = None,
                  k_norm: torch.Tensor | None = None, norm_eps: float = 1e-6) -> torch.Tensor:
        """A layer's attention from its q/k/v projections; returns [T, Hq, D].

        One fused op rotates q and k (after the per-head RMSNorms `q_norm`/`k_norm` [D], Qwen3's,
        when given) and stores k and v at this step's slots of layer `layer`'s cache; then the
        decode and prefill kernels attend over the cache. q, k, v may be strided views.
        """
        m, ops = self.meta, self.ops
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        q = ops.rotary_write_kv(positions, q, k, v, self.cos_sin, kc, vc, m.slot_mapping,
                                q_norm=q_norm, k_norm=k_norm, eps=norm_eps)
        nd = m.num_decode
        if m.num_prefill_tokens == 0:
            return ops.decode_attention(q, kc, vc, m.decode_seq_lens, m.decode_block_table, scale)
        pre = ops.prefill_attention(q[nd:], kc, vc, m.prefill_query_start_loc, m.prefill_seq_lens,
                                    m.prefill_block_table, scale)
        if nd == 0:
            return pre
        dec = ops.decode_attention(q[:nd], kc, vc, m.decode_seq_lens, m.decode_block_table, scale)
        return torch.cat([dec, pre], dim=0)
