"""FP8 W8A8 (e4m3): the torch reference (CPU, the truth the GPU kernels are checked against).

Contract (BRIEF.md, "Numeric contracts"):
  - weights: one scale per output channel (row of W [N, K]), s_w = amax(row)/448, at load;
  - activations: one scale per token (row of x [M, K]), s_x = amax(row)/448, at run time;
  - codes = e4m3_rne(clamp(x / s, -448, 448)), fp32 arithmetic (the clamp matters: rounding of
    amax/448 can push x/s a hair past 448, and an overflowing e4m3 cast gives NaN);
  - y = (x8 w8^T) * (s_x s_w^T), fp32 accumulate, then cast to the output dtype.
Signed zero: -0.0, and negative values that round to zero, encode as +0 (0x00); code 0x80 is
never produced (the same choice as kernels/nvfp4.py, and it keeps GPU and CPU bytes equal).
An all-zero row has amax 0: its scale is 1 (any positive value would do), so its codes are 0
and no 0/0 appears. NaN/inf input raises ValueError, as for NVFP4: e4m3fn has no inf and one NaN
would spread through the row's scale.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax/448 in fp32; 1 where that is 0 (all-zero rows, or amax so small it underflows)."""
    # a tensor divisor: CUDA turns division by a Python scalar into a reciprocal multiply
    s = amax.float() / torch.tensor(E4M3_MAX, dtype=torch.float32, device=amax.device)
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (float8_e4m3fn codes [..., K], fp32 scales [..., 1]), one scale per row."""
    xf = x.float()
    if not bool(torch.isfinite(xf).all()):
        raise ValueError("FP8 quantization input contains NaN or inf")
    s = fp8_scale(xf.abs().amax(dim=-1, keepdim=True))
    codes = torch.clamp(xf / s, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return positive_zero(codes), s


def positive_zero(codes: torch.Tensor) -> torch.Tensor:
    """Map the e4m3 code 0x80 (-0) to 0x00, so zero has one encoding."""
    bits = codes.view(torch.uint8)
    return torch.where(bits == 0x80, torch.zeros_like(bits), bits).view(torch.float8_e4m3fn)


def dequantize_fp8_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale


def fp8_gemm_reference(x8: torch.Tensor, s_x: torch.Tensor, w8: torch.Tensor, s_w: torch.Tensor,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """y = (x8 w8^T) * (s_x s_w^T) in fp32, cast to out_dtype. x8 [M, K], s_x [M, 1], w8 [N, K], s_w [N, 1].

    e4m3 x e4m3 products are exact in fp32, so this is the tensor-core result up to summation order.
    """
    acc = x8.float() @ w8.float().transpose(-1, -2)
    return (acc * (s_x * s_w.transpose(-1, -2))).to(out_dtype)
