"""The model's elementwise ops and unquantized projections on CUDA: Triton kernels from kernels/fused.py
with the signatures of engine.model.TorchOps (the model picks one set per device, once).

Math is fp32 inside each kernel and rounded once to the activation dtype, as kernels/reference.py states;
in float32 that agrees with the torch path to rounding, in bfloat16 it rounds at fewer points.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pdserve.kernels import fused


class TritonOps:
    name = "triton"

    def __init__(self, inv_freq: torch.Tensor, max_positions: int):
        # the angles exactly as the torch path forms them (fp32 position x fp32 inv_freq), tabulated once
        positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
        freqs = positions[:, None] * inv_freq[None, :]
        self.cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return positions  # the kernel looks its angles up in the table

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        return fused.rotary(q, k, positions, self.cos_sin)  # in place

    def rotary_write_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        kv_layer: torch.Tensor, slot_mapping: torch.Tensor):
        """rotary, then k and v into the cache as fused.write_kv does, in one launch (engine.model.rotary_write_kv)."""
        return fused.rotary_write_kv(q, k, v, positions, self.cos_sin, kv_layer, slot_mapping)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
        return fused.rms_norm(x, weight, eps, residual)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return fused.silu_and_mul(x)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return fused.linear(x, weight)


class TritonDenseLinear(nn.Module):
    """Unquantized projection through fused.linear: a weight-streaming Triton GEMV for one row (a batch-1
    decode step), the library GEMM otherwise, or whatever fused.LINEAR_PLANS says for the shape."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fused.linear(x, self.weight)
        return y if self.bias is None else y + self.bias
