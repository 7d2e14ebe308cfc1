"""The KV connector between engines of one process (`pdserve eval`, tests): what a NIXL transfer delivers,
without the network copy.

The bytes that land are the agent's (tests/unit/test_eval.py checks them against two real KVTransferAgents):
the raw wire lands the sender's blocks cast to this cache's dtype; the fp8 wire goes through
fp8_wire.pack_fp8_blocks / unpack_fp8_blocks (per token and head e4m3 codes + fp32 scales, slots past the
prompt zeroed), as KVTransferAgent does at export and when it lands a READ.

Unlike a NIXL send, a save is a snapshot kept in a LocalWire until discarded, so one prefill can feed
several decode engines (eval compares configurations on the same prompt KV) and the sender's blocks are
free at once. The wire format is the loader's: each decode engine's connector says what crosses."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch

from pdserve.config import KV_WIRE_DTYPES

from .errors import KVTransferError
from .fp8_wire import fp8_block_bytes, pack_fp8_blocks, unpack_fp8_blocks


@dataclass(frozen=True)
class PromptKV:
    """KV blocks [n_blocks, layers, 2, block_size, kv_heads, head_dim] of the first `num_tokens` tokens."""
    blocks: torch.Tensor
    num_tokens: int


class LocalWire:
    """Saved prompt KV by handle, shared by the connectors of one process."""

    def __init__(self):
        self._kv: dict[bytes, PromptKV] = {}
        self._ids = itertools.count()

    def put(self, kv: PromptKV) -> bytes:
        handle = f"local:{next(self._ids)}".encode()
        self._kv[handle] = kv
        return handle

    def get(self, handle: bytes) -> PromptKV:
        try:
            return self._kv[handle]
        except KeyError:
            raise KVTransferError(f"no saved KV under handle {handle!r} (discarded?)") from None

    def discard(self, handle: bytes) -> None:
        self._kv.pop(handle, None)


def through_wire(kv: PromptKV, wire: str, dtype: torch.dtype) -> torch.Tensor:
    """The blocks as a cache of `dtype` holds them after crossing `wire`."""
    if wire == "bf16":  # the cache's own bytes; a cast only where the two caches' dtypes differ
        return kv.blocks.to(dtype)
    if wire == "fp8":
        shape = tuple(kv.blocks.shape[1:])
        packed = torch.empty(kv.blocks.shape[0], fp8_block_bytes(shape), dtype=torch.uint8, device=kv.blocks.device)
        if kv.blocks.shape[0]:
            pack_fp8_blocks(kv.blocks, kv.num_tokens, packed)
        return unpack_fp8_blocks(packed, shape, dtype)
    raise KVTransferError(f"wire must be one of {KV_WIRE_DTYPES}, got {wire!r}")


class LocalConnector:
    def __init__(self, kv_cache: torch.Tensor, wire: LocalWire, wire_dtype: str = "bf16"):
        self.kv_cache, self.wire, self.wire_dtype = kv_cache, wire, wire_dtype
        self._loaded: list[str] = []
        self._sent: list[str] = []

    @torch.inference_mode()  # the engine's cache may be an inference tensor
    def save(self, request_id: str, block_ids: Sequence[int], num_tokens: int) -> bytes:
        blocks = self.kv_cache[torch.tensor(list(block_ids), dtype=torch.long, device=self.kv_cache.device)]
        self._sent.append(request_id)  # a snapshot: the blocks are free again at the next poll
        return self.wire.put(PromptKV(blocks, num_tokens))

    @torch.inference_mode()
    def start_load(self, request_id: str, handle: bytes, block_ids: Sequence[int]) -> None:
        kv = self.wire.get(handle)
        if len(block_ids) != kv.blocks.shape[0]:
            raise KVTransferError(f"{kv.blocks.shape[0]} saved block(s), {len(block_ids)} local block id(s) given")
        if block_ids:
            index = torch.tensor(list(block_ids), dtype=torch.long, device=self.kv_cache.device)
            self.kv_cache.index_copy_(0, index, through_wire(kv, self.wire_dtype, self.kv_cache.dtype).to(
                self.kv_cache.device))
        self._loaded.append(request_id)

    def cancel(self, request_id: str) -> None:
        pass  # saves and loads complete inside the call: nothing is ever in flight

    def poll(self) -> tuple[list[str], list[tuple[str, str]], list[str]]:
        loaded, sent = self._loaded, self._sent
        self._loaded, self._sent = [], []
        return loaded, [], sent
