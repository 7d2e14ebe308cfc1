"""KV blocks between prefill and decode workers over NIXL (UCX), optionally as FP8 e4m3 on the wire.

NIXL is required; nothing else is substituted when it is missing (see transport.py).

One KVTransferAgent per worker, over its KV cache (agent.py states the lease rules):

    ticket = prefill.export(request_id, block_ids, num_tokens)  # leases the blocks; msgpack bytes for the reader
    handle = decode.pull(ticket, local_block_ids)               # starts the READs into the reader's blocks
    decode.check(handle)  # never blocks: "PENDING" | "DONE" (KV in the cache) | "ERROR" (handle.error says why)
    prefill.poll()        # on_release(request_id, "done" | "expired" | "cancelled"): the blocks are free again
"""
from .agent import KVTransferAgent, PullHandle
from .errors import KVTransferBusy, KVTransferError
from .fp8_wire import FP8_KV_EPS, dequantize_kv, quantize_kv
from .ticket import KVLayout

__all__ = [
    "KVTransferAgent",
    "PullHandle",
    "KVTransferError",
    "KVTransferBusy",
    "KVLayout",
    "quantize_kv",
    "dequantize_kv",
    "FP8_KV_EPS",
]
