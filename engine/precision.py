"""Which GEMM precision a pool runs: the config's choice, with `auto` resolved per device."""
from __future__ import annotations

import torch

from pdserve.config import PRECISIONS


def resolve_precision(precision: str, role: str, device: torch.device) -> str:
    """auto: prefill in nvfp4 on Blackwell (cc >= 10), fp8 on Hopper/Ada (cc >= 8.9), bf16 elsewhere
    (CPU included); decode always bf16, where errors compound token after token."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} or auto, got {precision!r}")
        return precision
    if role != "prefill" or device.type != "cuda":
        return "bf16"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 10:
        return "nvfp4"
    if (major, minor) >= (8, 9):
        return "fp8"
    return "bf16"
