"""The batch metadata every attention backend reads (engine/attention.py: torch; engine/gpu_attention.py: Triton).

Its own module so that both backends import it from below and neither imports the other.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

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
