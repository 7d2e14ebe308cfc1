"""The transfer ticket: what a prefill agent hands to a decode agent, in msgpack (never pickle).

It is self-contained: the reader needs nothing else to start the READs and to notify the
exporter. Descriptors are one (address, wire_block_bytes) per block, addresses packed as
little-endian uint64 so a long block list stays compact.

The cache layout both sides agree on (KVLayout) travels in the ticket:
kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], contiguous, so one
block (all layers, K and V) is one byte range: block b starts at base + b * block_bytes.
Prefill and decode may differ in num_blocks and dtype, never in the per-token geometry.
"""
import struct
from dataclasses import dataclass

import msgpack
import torch

from .errors import KVTransferError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_GEOMETRY = ("num_layers", "block_size", "num_kv_heads", "head_dim")


@dataclass(frozen=True)
class KVLayout:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # a key of DTYPES

    @classmethod
    def of(cls, kv_cache: torch.Tensor) -> "KVLayout":
        if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
            raise KVTransferError(
                "kv_cache must be [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], "
                f"got shape {tuple(kv_cache.shape)}"
            )
        if not kv_cache.is_contiguous():
            raise KVTransferError("kv_cache must be contiguous: a block has to be one byte range")
        if kv_cache.dtype not in _DTYPE_NAMES:
            raise KVTransferError(f"kv_cache dtype {kv_cache.dtype} unsupported; use one of {sorted(DTYPES)}")
        n, layers, _, block_size, heads, head_dim = kv_cache.shape
        return cls(n, layers, block_size, heads, head_dim, _DTYPE_NAMES[kv_cache.dtype])

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def block_shape(self) -> tuple:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        numel = 1
        for size in self.block_shape:
            numel *= size
        return numel * self.torch_dtype.itemsize

    def check_compatible(self, source: "KVLayout") -> None:
        """Refuses a source whose per-token geometry differs from this (destination) layout."""
        diffs = [
            f"{field} {getattr(source, field)} (source) != {getattr(self, field)} (destination)"
            for field in _GEOMETRY
            if getattr(source, field) != getattr(self, field)
        ]
        if diffs:
            raise KVTransferError("KV layouts are incompatible: " + "; ".join(diffs))

    def to_msg(self) -> dict:
        return {
            "num_blocks": self.num_blocks,
            "num_layers": self.num_layers,
            "block_size": self.block_size,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
        }

    @classmethod
    def from_msg(cls, msg) -> "KVLayout":
        if not isinstance(msg, dict):
            raise KVTransferError("layout must be a map")
        ints = {}
        for field in ("num_blocks",) + _GEOMETRY:
            value = msg.get(field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise KVTransferError(f"layout.{field} must be a positive int, got {value!r}")
            ints[field] = value
        dtype = msg.get("dtype")
        if dtype not in DTYPES:
            raise KVTransferError(f"layout.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return cls(dtype=dtype, **ints)


TICKET_VERSION = 1
WIRE_FORMATS = ("raw", "fp8")  # raw: the source cache's own dtype; fp8: fp8_wire blocks
MEM_TYPES = ("DRAM", "VRAM")


@dataclass(frozen=True)
class TransferTicket:
    agent: str  # the exporting NIXL agent's name
    nixl_md: bytes  # its NIXL agent metadata (loaded once per reader, reloaded if it changes)
    request_id: str
    token: bytes  # the notification the reader sends when its READ completes
    layout: KVLayout  # the source cache
    wire: str  # one of WIRE_FORMATS
    mem: str  # one of MEM_TYPES
    device_id: int
    wire_block_bytes: int
    addrs: tuple  # remote address of each wire block, in request order
    num_tokens: int
    expires_at: float  # wall clock (time.time()) at which the exporter may reuse the blocks
    lease_seconds: float

    @property
    def num_blocks(self) -> int:
        return len(self.addrs)

    @property
    def wire_bytes(self) -> int:
        return self.num_blocks * self.wire_block_bytes

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "v": TICKET_VERSION,
                "agent": self.agent,
                "nixl_md": self.nixl_md,
                "request_id": self.request_id,
                "token": self.token,
                "layout": self.layout.to_msg(),
                "wire": self.wire,
                "mem": self.mem,
                "device_id": self.device_id,
                "wire_block_bytes": self.wire_block_bytes,
                "addrs": struct.pack(f"<{len(self.addrs)}Q", *self.addrs),
                "num_tokens": self.num_tokens,
                "expires_at": self.expires_at,
                "lease_seconds": self.lease_seconds,
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data) -> "TransferTicket":
        """Parses and validates; every malformed ticket raises KVTransferError."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise KVTransferError(f"bad ticket: expected bytes, got {type(data).__name__}")
        try:
            msg = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise KVTransferError(f"bad ticket: not msgpack ({exc})") from None
        if not isinstance(msg, dict):
            raise KVTransferError("bad ticket: not a map")
        if msg.get("v") != TICKET_VERSION:
            raise KVTransferError(f"bad ticket: version {msg.get('v')!r}, this reader speaks {TICKET_VERSION}")
        try:
            return cls._from_msg(msg)
        except KVTransferError as exc:
            raise KVTransferError(f"bad ticket: {exc}") from None

    @classmethod
    def _from_msg(cls, msg: dict) -> "TransferTicket":
        def field(name, kinds):
            value = msg.get(name)
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise KVTransferError(f"field {name!r} missing or of the wrong type ({value!r:.60})")
            return value

        layout = KVLayout.from_msg(msg.get("layout"))
        wire = field("wire", str)
        if wire not in WIRE_FORMATS:
            raise KVTransferError(f"wire format {wire!r} unknown")
        mem = field("mem", str)
        if mem not in MEM_TYPES:
            raise KVTransferError(f"memory type {mem!r} unknown")
        packed = field("addrs", bytes)
        if not packed or len(packed) % 8:
            raise KVTransferError("addrs must be a non-empty packed uint64 list")
        addrs = struct.unpack(f"<{len(packed) // 8}Q", packed)
        wire_block_bytes = field("wire_block_bytes", int)
        num_tokens = field("num_tokens", int)
        n = len(addrs)
        if wire_block_bytes <= 0:
            raise KVTransferError("wire_block_bytes must be positive")
        if not (n - 1) * layout.block_size < num_tokens <= n * layout.block_size:
            raise KVTransferError(
                f"num_tokens {num_tokens} does not fill {n} block(s) of {layout.block_size} "
                "(only the last block may be partial)"
            )
        token = field("token", bytes)
        if not token:
            raise KVTransferError("empty notification token")
        return cls(
            agent=field("agent", str),
            nixl_md=field("nixl_md", bytes),
            request_id=field("request_id", str),
            token=token,
            layout=layout,
            wire=wire,
            mem=mem,
            device_id=field("device_id", int),
            wire_block_bytes=wire_block_bytes,
            addrs=addrs,
            num_tokens=num_tokens,
            expires_at=float(field("expires_at", (int, float))),
            lease_seconds=float(field("lease_seconds", (int, float))),
        )
