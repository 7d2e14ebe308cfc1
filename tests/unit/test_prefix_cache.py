"""Prefix caching in the engine and the block-hash spec shared with the router."""
from __future__ import annotations

import msgpack
import xxhash

from pdserve.engine.block_manager import block_hashes
from pdserve.engine.sequence import SamplingParams

SYSTEM = ("You are a meticulous assistant for a public library. You answer questions about books, opening "
          "hours, membership and events. Be concise, cite the catalogue when you can, and never invent titles. ")


def test_block_hash_spec_is_the_documented_one():
    ids = list(range(100, 140))
    h = block_hashes(ids, 16, None)
    assert len(h) == 2  # the trailing 8 tokens make no full block
    h0 = xxhash.xxh3_64_intdigest(msgpack.packb([0, ids[:16], None]))
    h1 = xxhash.xxh3_64_intdigest(msgpack.packb([h0, ids[16:32], None]))
    assert h == [h0, h1]
    assert block_hashes(ids, 16, "tenant-a") != h  # namespaces never share blocks
    assert block_hashes([7] + ids[1:], 16, None)[1] != h[1]  # chained: block 1 depends on block 0


def test_cached_prefix_computes_only_the_rest_and_changes_nothing():
    from pdserve.engine.engine import LLMEngine

    e = LLMEngine(dtype="float32", enable_prefix_caching=True, progress=False)
    a = e.tokenize(SYSTEM + "Question: when do you open on Sundays?", chat=True)
    b = e.tokenize(SYSTEM + "Question: how do I renew a loan?", chat=True)
    sp = SamplingParams(max_tokens=24, logprobs=2)
    e.block_manager.enable_prefix_caching = False
    uncached = e.generate([(b, sp)])[0]
    e.block_manager.enable_prefix_caching = True
    e.generate([(a, sp)])  # fills the cache with the shared prefix
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    expect_cached = shared // 16 * 16
    before = e.num_computed_tokens_total
    cached = e.generate([(b, sp)])[0]
    computed = e.num_computed_tokens_total - before
    assert cached["usage"]["cached_tokens"] == expect_cached > 0
    # prompt tokens past the cached blocks plus one forward per generated token but the last
    assert computed == len(b) - expect_cached + len(cached["token_ids"]) - 1
    assert cached["token_ids"] == uncached["token_ids"]
    e.block_manager.check_no_leaks()


def test_eviction_under_pressure_keeps_serving():
    from pdserve.engine.engine import LLMEngine
    from pdserve.config import EngineConfig

    e = LLMEngine(dtype="float32", config=EngineConfig(num_blocks=12), enable_prefix_caching=True, progress=False)
    prompts = [e.tokenize(f"{SYSTEM} Topic number {i}: tell me something.") for i in range(6)]
    for p in prompts:  # each ~45 tokens: together more than the pool holds
        e.generate([(p, SamplingParams(max_tokens=8))])
    events = e.block_manager.drain_events()
    assert any(k == "removed" for k, _ in events) and any(k == "stored" for k, _ in events)
    e.block_manager.check_no_leaks()
