"""KV blocks between prefill and decode workers over NIXL (UCX), optionally as FP8 e4m3 on the wire.

NIXL is required; nothing else is substituted when it is missing (see transport.py).

Usage (one agent per worker, names unique in the cluster; every call is non-blocking):

    # prefill worker
    agent = KVTransferAgent("prefill-0", runner.kv_cache, wire_dtype=cfg.kv_transfer.dtype,
                            lease_seconds=cfg.kv_transfer.lease_seconds,
                            on_release=lambda request_id, reason: block_manager.free(request_id))
    ticket = agent.export(request_id, seq.block_table, seq.num_tokens)   # bytes, msgpack
    ...  # hand the ticket to the decode worker (Ray call / gRPC); keep the blocks
    agent.poll()       # regularly, e.g. once per engine step: runs on_release for finished leases
    agent.cancel(request_id)   # on abort; on_release(request_id, "cancelled") follows from poll()

    # decode worker
    agent = KVTransferAgent("decode-0", runner.kv_cache)
    handle = agent.pull(ticket, local_block_ids)   # raises KVTransferError on a bad/expired ticket
    agent.check(handle)   # "PENDING" | "DONE" (KV is in the cache) | "ERROR" (handle.error says why)
    agent.abort(handle)   # on abort before DONE

    agent.stats()   # bytes and seconds, both roles; agent.close() at shutdown
"""
from .agent import KVTransferAgent, PullHandle, WIRE_DTYPES
from .errors import KVTransferBusy, KVTransferError
from .fp8_wire import FP8_KV_EPS, dequantize_kv, quantize_kv
from .layout import KVLayout

__all__ = [
    "KVTransferAgent",
    "PullHandle",
    "WIRE_DTYPES",
    "KVTransferError",
    "KVTransferBusy",
    "KVLayout",
    "quantize_kv",
    "dequantize_kv",
    "FP8_KV_EPS",
]
