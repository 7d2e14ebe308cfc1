"""The Triton attention backend: the engine's AttentionMetadata fed to kernels/attention.py and the KV
write of kernels/fused.py (their torch twins in kernels/reference.py are the contract).

Every argument is a device tensor or a host int that only picks a launch shape, so a decode step can be
captured in a CUDA graph (engine/gpu_graphs.py) and replayed with new metadata in the same buffers.
"""
from __future__ import annotations

import torch

from pdserve.engine.attention import AttentionMetadata, uses_fp8_attention
from pdserve.kernels import attention, fused


class TritonAttention:
    name = "triton"
    graph_safe = True  # no host reads of the metadata's tensors, no host lists (graphs run decode only)
    writes_like_fused_kv = True  # write_kv is fused.write_kv: TritonOps may fuse it with RoPE (engine.model)

    def __init__(self, fp8_min_tokens: int | None = None):
        self.fp8_min_tokens = fp8_min_tokens  # see engine.attention.uses_fp8_attention

    def write_kv(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        fused.write_kv(kv_layer, k, v, meta.slot_mapping)

    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if uses_fp8_attention(self.fp8_min_tokens, meta):
            from pdserve.kernels.attention_fp8 import prefill_attention_fp8
            return prefill_attention_fp8(q, kv_layer, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                         meta.context_start_loc, meta.total_context, scale, meta.max_query_len,
                                         meta.max_seq_len)
        return attention.paged_attention(q, kv_layer, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
                                         meta.max_query_len, meta.max_seq_len)
