"""The KV cache layout both sides agree on.

kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], contiguous, so one
block (all layers, K and V) is one byte range: block b starts at base + b * block_bytes.
Prefill and decode may differ in num_blocks and dtype, never in the per-token geometry.
"""
from dataclasses import dataclass

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
