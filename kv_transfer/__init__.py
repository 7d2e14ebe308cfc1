"""KV blocks between prefill and decode workers over NIXL (UCX), optionally as FP8 e4m3 on the wire.

NIXL is required; nothing else is substituted when it is missing (see transport.py).
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
