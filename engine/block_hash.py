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
from __future__ import annotations

import msgpack
import xxhash


def block_hashes(token_ids: list[int], block_size: int, extra=None) -> list[int]:
    out = []
    parent = 0
    for i in range(len(token_ids) // block_size):
        blob = msgpack.packb([parent, token_ids[i * block_size:(i + 1) * block_size], extra])
        parent = xxhash.xxh3_64_intdigest(blob)
        out.append(parent)
    return out
