"""Attention over the paged KV cache: the batch metadata and the torch (CPU) backend.

KV cache layout, shared by every backend and by kv_transfer: one tensor
    kv_cache[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
block-major, so one block of every layer is a single contiguous byte range (one transfer
descriptor per block). Layer l's view is kv_cache[:, l]; index 0 of the next dim is K, 1 is V.

A backend implements `write_kv(kv_layer, k, v, meta)` and `attend(q, kv_layer, meta, scale)`
(`writes_like_fused_kv` lets the Triton ops write the cache in their RoPE kernel: engine.model).
The query tokens of sequence i are the last q_len_i positions of its context (causal), so one
call serves decode (q_len 1), whole prompts, prompt chunks and prompts behind a cached prefix.
Padding (CUDA-graph batches padded to a bucket): a negative slot writes nothing and a sequence
with seq_len 0 attends over nothing. The Triton backend is in engine/gpu_attention.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.kernels.reference import CONTEXT_ALIGN


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B+1] cumulative query lengths over the flattened batch
    seq_lens: torch.Tensor  # [B] context length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded
    slot_mapping: torch.Tensor  # [T] int64 cache slot of each new token (block * block_size + offset)
    max_query_len: int
    max_seq_len: int  # an upper bound is enough for the Triton backend (a captured graph uses its largest)
    # host copies: the torch backend loops over sequences without device syncs (None inside a graph)
    q_lens_list: list | None
    seq_lens_list: list | None
    block_tables_list: list | None
    block_size: int

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1

    # Where each sequence's context starts in one flat copy of all contexts, and the copy's length: the fp8
    # pool's prefill attention quantizes the contexts into such a copy (kernels/attention_fp8.py). Built
    # on first use, so the steps of every other pool do not pay for it.
    @functools.cached_property
    def context_start_loc(self) -> torch.Tensor:
        return torch.tensor(context_offsets(self.seq_lens_list)[0], dtype=torch.int32, device=self.seq_lens.device)

    @functools.cached_property
    def total_context(self) -> int:
        return context_offsets(self.seq_lens_list)[1]

    # The torch backend's decode groups (length_groups): (row indices, their longest context), built once a step,
    # not once a layer.
    @functools.cached_property
    def decode_groups(self) -> list[tuple[torch.Tensor, int]]:
        return [(torch.tensor(idx, device=self.seq_lens.device), max(self.seq_lens_list[j] for j in idx))
                for idx in length_groups(self.seq_lens_list)]


def slot(table: list[int], position: int, block_size: int) -> int:
    """Cache slot of a sequence's token at `position`, given its block table."""
    return table[position // block_size] * block_size + position % block_size


def context_offsets(seq_lens: list[int]) -> tuple[list[int], int]:
    """Start of each sequence's context in the flat copy (aligned), and the copy's length."""
    starts, total = [], 0
    for n in seq_lens:
        starts.append(total)
        total += -(-n // CONTEXT_ALIGN) * CONTEXT_ALIGN
    return starts, total


def build_metadata(q_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
                   device: torch.device) -> AttentionMetadata:
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    slots = [slot(table, p, block_size) for n, ctx, table in zip(q_lens, seq_lens, block_tables)
             for p in range(ctx - n, ctx)]
    width = max(len(t) for t in block_tables)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    return AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        q_lens_list=list(q_lens),
        seq_lens_list=list(seq_lens),
        block_tables_list=[list(t) for t in block_tables],
        block_size=block_size,
    )


def uses_fp8_attention(fp8_min_tokens: int | None, meta: AttentionMetadata) -> bool:
    """The fp8 pool's rule (config engine.fp8_attention_min_tokens): a step whose longest prompt chunk has
    at least fp8_min_tokens tokens (and more than one) runs both attention matmuls on e4m3 operands.
    None: never (every other pool). Every backend applies the same rule, so CPU and GPU numerics agree."""
    return fp8_min_tokens is not None and meta.max_query_len >= max(fp8_min_tokens, 2)


class TorchAttention:
    """Reference backend: gathers each sequence's blocks and calls SDPA. Runs anywhere. Steps that
    uses_fp8_attention() picks run kernels.reference.prefill_attention_fp8 instead."""

    name = "torch"

    def __init__(self, fp8_min_tokens: int | None = None):
        self.fp8_min_tokens = fp8_min_tokens

    def write_kv(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        block, offset = meta.slot_mapping // meta.block_size, meta.slot_mapping % meta.block_size
        kv_layer[block, 0, offset] = k.to(kv_layer.dtype)
        kv_layer[block, 1, offset] = v.to(kv_layer.dtype)

    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if uses_fp8_attention(self.fp8_min_tokens, meta):
            from pdserve.kernels import reference
            return reference.prefill_attention_fp8(q, kv_layer, meta.query_start_loc, meta.seq_lens,
                                                   meta.block_tables, scale)
        if meta.decode_only and len(meta.q_lens_list) > 1:
            return self._decode_batch(q, kv_layer, meta, scale)
        out = torch.empty_like(q)
        start = 0
        for n, ctx, table in zip(meta.q_lens_list, meta.seq_lens_list, meta.block_tables_list):
            k, v = _gather(kv_layer, table, ctx, meta.block_size)
            qi = q[start:start + n].transpose(0, 1)  # [H, n, D]
            if n == ctx:
                o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
            elif n == 1:
                o = F.scaled_dot_product_attention(qi, k, v, scale=scale, enable_gqa=True)
            else:
                mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
                o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start:start + n] = o.transpose(0, 1)
            start += n
        return out

    def _decode_batch(self, q, kv_layer, meta, scale):
        # one padded SDPA per group of similar context lengths instead of B small ones: a batch padded to its longest
        # context costs B x max, not the sum (benchmarks/replay_steps.py --ragged: 1.35-1.45x at batch 8, 50 vs 750)
        groups = meta.decode_groups
        if len(groups) == 1:
            return _padded_decode(q, kv_layer, meta.block_tables, meta.seq_lens, meta.max_seq_len, meta.block_size,
                                  scale)
        out = torch.empty_like(q)
        for i, longest in groups:
            out[i] = _padded_decode(q[i], kv_layer, meta.block_tables[i], meta.seq_lens[i], longest, meta.block_size,
                                    scale)
        return out


def length_groups(lens: list[int], max_waste: float = 0.25, max_groups: int = 4) -> list[list[int]]:
    """Indices of `lens` in groups of similar lengths (ascending), each padded to its longest wasting at most
    `max_waste` of its real length, in at most `max_groups` groups (each is one more SDPA call a layer)."""
    order = sorted(range(len(lens)), key=lens.__getitem__)
    groups: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for j in order:  # ascending: the one added is the group's longest
        if cur and len(groups) < max_groups - 1 and (len(cur) + 1) * lens[j] > (1 + max_waste) * (total + lens[j]):
            groups.append(cur)
            cur, total = [], 0
        cur.append(j)
        total += lens[j]
    groups.append(cur)
    return groups


def _padded_decode(q, kv_layer, block_tables, seq_lens, longest: int, block_size: int, scale: float):
    """One SDPA for decode sequences q [B, H, D], their KV gathered and padded to `longest` (masked)."""
    nblk = -(-longest // block_size)
    tables = block_tables[:, :nblk].long()
    kv = kv_layer[tables]  # [B, nblk, 2, bs, Hkv, D]
    k = kv[:, :, 0].flatten(1, 2)[:, :longest].transpose(1, 2)  # [B, Hkv, L, D]
    v = kv[:, :, 1].flatten(1, 2)[:, :longest].transpose(1, 2)
    pos = torch.arange(longest, device=q.device)
    mask = (pos[None, :] < seq_lens[:, None].to(pos.device))[:, None, None, :]  # [B,1,1,L]
    o = F.scaled_dot_product_attention(q[:, :, None, :].to(k.dtype), k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=True)
    return o[:, :, 0, :].to(q.dtype)


def _gather(kv_layer: torch.Tensor, table: list[int], ctx: int, block_size: int):
    nblk = -(-ctx // block_size)
    blocks = kv_layer[table[:nblk]]  # [nblk, 2, bs, Hkv, D]
    k = blocks[:, 0].flatten(0, 1)[:ctx].transpose(0, 1)  # [Hkv, ctx, D]
    v = blocks[:, 1].flatten(0, 1)[:ctx].transpose(0, 1)
    return k, v
