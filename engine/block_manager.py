"""The KV block pool: plain Python over integers, no torch.

Invariants:
- a block is either referenced (refcount > 0) or in `free` (refcount == 0), never both;
- a free block may still hold a cached prefix (its hash in `hash_to_block`); it is evicted, in
  least-recently-freed order, only when a new block is needed;
- blocks shared between sequences are full blocks with a hash (prefix caching); a sequence's
  partial last block is always its own.
"""
from __future__ import annotations

from collections import OrderedDict

import msgpack
import xxhash

from pdserve.errors import NoFreeBlocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refcount = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.block_hash: list = [None] * num_blocks
        self.hash_to_block: dict = {}
        self.events: list[tuple[str, int]] = []  # ("stored" | "removed", hash), drained by the worker

    # -- capacity ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation -------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise NoFreeBlocks(f"need {n} blocks, {len(self.free)} free")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            self._evict_hash(b)
            self.refcount[b] = 1
            out.append(b)
        return out

    def ensure(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow `block_table` in place to hold `num_tokens`; False (and no change) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        block_table.extend(self.allocate(need))
        return True

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            rc = self.refcount[b]
            if rc <= 0:
                raise AssertionError(f"block {b} released while free")
            self.refcount[b] = rc - 1
            if rc == 1:
                self.free[b] = None  # most recently freed: evicted last

    # -- prefix caching ---------------------------------------------------------------------------
    def lookup(self, hashes: list) -> list[int]:
        """Blocks holding the longest cached prefix of `hashes` (not yet referenced by the caller)."""
        out = []
        if not self.enable_prefix_caching:
            return out
        for h in hashes:
            b = self.hash_to_block.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def acquire(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refcount[b] == 0:
                del self.free[b]
            self.refcount[b] += 1

    def cache(self, block: int, h) -> None:
        """Record that full block `block` holds the tokens whose chained hash is `h`."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None:
            return
        if h in self.hash_to_block:  # same content computed twice (a race between two requests): keep one
            return
        self.block_hash[block] = h
        self.hash_to_block[h] = block
        self.events.append(("stored", h))

    def _evict_hash(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            self.block_hash[b] = None
            del self.hash_to_block[h]
            self.events.append(("removed", h))

    def cached_hashes(self) -> list:
        return list(self.hash_to_block)

    def drain_events(self) -> list[tuple[str, int]]:
        ev, self.events = self.events, []
        return ev

    def check_no_leaks(self) -> None:
        """Every block free (used by tests and after drains)."""
        held = [b for b, rc in enumerate(self.refcount) if rc]
        if held or len(self.free) != self.num_blocks:
            raise AssertionError(f"blocks still referenced: {held[:16]} ({len(held)} total)")


def block_hashes(token_ids: list[int], block_size: int, extra=None) -> list[int]:
    """The block-hash specification, shared by workers (prefix cache, KV events) and the router (index).

    A prompt is cut into full blocks of `block_size` tokens; a trailing partial block has no hash.
    Block i's hash is

        h_i = xxh3_64( msgpack([h_{i-1}, [token ids of block i], extra]) )      with h_{-1} = 0

    - xxh3_64 from the `xxhash` package (a fast, well-known, seedless 64-bit hash), as an unsigned int;
    - msgpack (the `msgpack` package, default options) so the byte string is defined in any language;
    - `extra` namespaces the cache: a tenant, a LoRA adapter, or the model and its KV precision, so
      blocks computed differently never match; None when unused.
    Chaining makes h_i identify the whole prefix up to block i, so equal hashes mean equal KV.
    """
    out = []
    parent = 0
    for i in range(len(token_ids) // block_size):
        blob = msgpack.packb([parent, token_ids[i * block_size:(i + 1) * block_size], extra])
        parent = xxhash.xxh3_64_intdigest(blob)
        out.append(parent)
    return out
