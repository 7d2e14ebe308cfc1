"""One prompt's KV from a prefill engine to a decode engine, in one process, for `pdserve eval`.

The bytes are what the NIXL path delivers (tests/test_eval.py checks it against two real
KVTransferAgents): "bf16" sends the cache's own dtype unchanged; "fp8" packs the blocks with
kv_transfer.fp8_wire.pack_fp8_blocks (per token and head e4m3 codes + fp32 scales, slots past the
prompt zeroed) and the decode side unpacks them into its cache, as KVTransferAgent._land does.
Only the network copy in between is skipped.

The prefill engine computes KV for all prompt tokens but the last (prefill_only), so the decode
engine recomputes the last prompt token in its own precision: the first output token always
comes from the decode precision. `refresh_tokens` recomputes the first prompt tokens (the attention
sinks) in that same step, as a decode worker does (kv_transfer/sinks.py decides how many).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.fp8_wire import fp8_block_bytes, pack_fp8_blocks, unpack_fp8_blocks

WIRES = ("bf16", "fp8")


@dataclass
class PromptKV:
    """KV blocks [n_blocks, layers, 2, block_size, kv_heads, head_dim] of the first `num_tokens`
    prompt tokens (a copy, owned by no engine)."""
    blocks: torch.Tensor
    num_tokens: int


def prefill(engine, token_ids: list[int], request_id: str = "eval-prefill") -> PromptKV:
    """KV of token_ids[:-1] computed by `engine` (at its precision); its blocks are freed again."""
    engine.add_request(request_id, token_ids, SamplingParams(max_tokens=1), prefill_only=True)
    try:
        while engine.has_unfinished():
            engine.step()
        seq = engine.requests[request_id]
        n = seq.num_computed_tokens
        if n != len(token_ids) - 1:
            raise RuntimeError(f"prefill computed {n} of {len(token_ids)} tokens; expected all but the last")
        table = seq.block_table[:engine.block_manager.blocks_for(n)]
        blocks = engine.runner.kv_cache[torch.tensor(table, dtype=torch.long, device=engine.runner.kv_cache.device)]
        return PromptKV(blocks.clone(), n)
    finally:
        engine.release(request_id)


def through_wire(kv: PromptKV, wire: str, dtype: torch.dtype) -> PromptKV:
    """The blocks as the decode side's cache (of `dtype`) holds them after the transfer."""
    if wire == "bf16":  # the cache's own bytes; a cast only if the two caches' dtypes differ
        return PromptKV(kv.blocks.to(dtype), kv.num_tokens)
    if wire == "fp8":
        n = kv.blocks.shape[0]
        shape = tuple(kv.blocks.shape[1:])
        out = torch.empty(n, fp8_block_bytes(shape), dtype=torch.uint8, device=kv.blocks.device)
        if n:
            pack_fp8_blocks(kv.blocks, kv.num_tokens, out)
        return PromptKV(unpack_fp8_blocks(out, shape, dtype), kv.num_tokens)
    raise ValueError(f"wire must be one of {WIRES}, got {wire!r}")


def load(engine, kv: PromptKV) -> list[int]:
    """Reserve blocks in `engine` and write the KV into them; the caller owns the blocks."""
    blocks = engine.reserve_blocks(kv.num_tokens)
    if blocks is None:
        raise RuntimeError(f"decode KV pool cannot hold {kv.num_tokens} prompt tokens")
    if blocks:
        cache = engine.runner.kv_cache
        cache.index_copy_(0, torch.tensor(blocks, dtype=torch.long, device=cache.device),
                          kv.blocks.to(cache.device, cache.dtype))
    return blocks


def score(engine, token_ids: list[int], kv: PromptKV, refresh_tokens: int = 0) -> torch.Tensor:
    """Teacher-forced logits of `engine` for token_ids after the transferred prefix: row i predicts
    token kv.num_tokens + i + 1 (row 0 is the decode engine's own pass over the last prompt token)."""
    blocks = load(engine, kv)
    try:
        return engine.score(token_ids, block_table=blocks, num_computed_tokens=kv.num_tokens,
                            refresh_tokens=refresh_tokens)
    finally:
        engine.free_blocks(blocks)


def generate(engine, prompts: list[list[int]], kvs: list[PromptKV], max_tokens: int,
             refresh_tokens: int = 0) -> list[list[int]]:
    """Greedy continuations (natural EOS stops) of every prompt on `engine`, from transferred KV,
    batched as a decode worker runs them."""
    ids = []
    try:
        for i, (prompt, kv) in enumerate(zip(prompts, kvs)):
            rid = f"eval-gen-{i}"
            blocks = load(engine, kv)
            try:
                engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens), block_table=blocks,
                                   num_computed_tokens=kv.num_tokens, refresh_tokens=refresh_tokens)
            except Exception:
                engine.free_blocks(blocks)
                raise
            ids.append(rid)
        out = {rid: [] for rid in ids}
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id in out:
                    out[o.request_id].extend(o.new_token_ids)
        return [out[rid] for rid in ids]
    finally:
        for rid in ids:
            engine.abort(rid)  # no-op for finished requests; frees the blocks of any left behind
