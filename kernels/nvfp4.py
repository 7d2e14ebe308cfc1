"""NVFP4: the torch reference (CPU, the truth every GPU kernel is checked against).

Format (BRIEF.md, "Numeric contracts"):
  - E2M1 codes: magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} in bits 0-2, sign in bit 3; two codes per
    byte, element 2i in the LOW nibble, 2i+1 in the high nibble.
  - 16-element blocks along the last axis K, one float8_e4m3fn scale per block, one fp32 global
    scale g per tensor with the ENCODE convention g = 448*6/amax (g = 1 when amax = 0), so the
    stored value is x*g and decoding divides by g.

Quantization, all arithmetic in fp32 and in this order (the order is part of the byte contract):
  g    = 2688 / amax                         (1 when amax == 0; capped at the largest finite fp32)
  s_b  = e4m3_rne(min((amax_b / 6) * g, 448))
  q    = e2m1_rne(clamp((x * g) / s_b, -6, 6)),   q = 0 where s_b == 0
  x'   = (T[q] * s_b) / g                    (dequantize)

Decisions the brief leaves open:
  - Signed zero: -0.0, and negative values that round to zero, encode as +0 (code 0). Code 8
    (-0) is never produced, so equal inputs up to the sign of zero give equal bytes; it decodes
    to 0 if met in foreign data.
  - NaN or +-inf anywhere in the input raises ValueError: one non-finite element would poison the
    tensor's global scale and so every block, and NVFP4 has no code for it.
  - Tiny amax (below about 7.9e-36) would make g overflow to inf; g is capped at the largest
    finite fp32 instead, which keeps every scale finite (such tensors lose resolution, never
    become NaN).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_NUMERATOR = E4M3_MAX * E2M1_MAX  # 2688
FP32_MAX = torch.finfo(torch.float32).max

# Code -> magnitude; index with the low 3 bits of a code.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)


@dataclass
class NVFP4Tensor:
    """An NVFP4-quantized tensor [..., K]: codes, block scales, global scale (encode convention)."""

    packed: torch.Tensor  # uint8 [..., K//2]
    block_scale: torch.Tensor  # float8_e4m3fn [..., K//16]
    global_scale: torch.Tensor  # fp32 scalar, g = 2688/amax

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.packed.shape[:-1], self.packed.shape[-1] * 2))

    def to(self, device) -> "NVFP4Tensor":
        return NVFP4Tensor(self.packed.to(device), self.block_scale.to(device), self.global_scale.to(device))


def check_finite(x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError("NVFP4 quantization input contains NaN or inf; the format cannot represent it")


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """g = 2688/amax in fp32, 1 for amax == 0, capped at the largest finite fp32."""
    amax = amax.float()
    g = torch.tensor(GLOBAL_NUMERATOR, dtype=torch.float32, device=amax.device) / amax
    g = torch.clamp(g, max=FP32_MAX)  # amax == 0 gives inf here too, replaced next
    return torch.where(amax > 0, g, torch.ones_like(g))


def e2m1_code(v: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even of magnitudes v in [0, 6] onto E2M1; returns codes 0..7 (uint8).

    Each grid midpoint is a threshold; at a tie the even code wins, so the threshold is strict
    (>) where the lower neighbour has the even code and inclusive (>=) where the upper one does:
    0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    """
    code = ((v > 0.25).to(torch.uint8) + (v >= 0.75).to(torch.uint8) + (v > 1.25).to(torch.uint8)
            + (v >= 1.75).to(torch.uint8) + (v > 2.5).to(torch.uint8) + (v >= 3.5).to(torch.uint8)
            + (v > 5.0).to(torch.uint8))
    return code


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> bytes [..., K//2], element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """bytes [..., K//2] -> uint8 codes [..., K]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def code_values(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> fp32 E2M1 values (sign applied)."""
    mag = E2M1_VALUES.to(codes.device)[(codes & 0x07).long()]
    return torch.where((codes & 0x08) != 0, -mag, mag)


def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> NVFP4Tensor:
    """Quantize float [..., K] (K a multiple of 16) to NVFP4. Raises ValueError on NaN/inf.

    `global_scale` overrides g (e.g. a checkpoint's); by default g = 2688/amax(x).
    """
    if x.shape[-1] % BLOCK != 0:
        raise ValueError(f"NVFP4 needs the last dimension to be a multiple of {BLOCK}, got {x.shape[-1]}")
    xf = x.float()
    check_finite(xf)
    g = global_scale_from_amax(xf.abs().amax()) if global_scale is None else global_scale.float().reshape(())
    blocks = xf.reshape(*xf.shape[:-1], -1, BLOCK)
    amax_b = blocks.abs().amax(dim=-1, keepdim=True)
    # divide by a tensor: CUDA turns division by a Python scalar into a reciprocal multiply, which
    # would make the reference's bytes depend on the device
    six = torch.tensor(E2M1_MAX, dtype=torch.float32, device=xf.device)
    scaled_amax = torch.clamp((amax_b / six) * g, max=E4M3_MAX)
    s_b = scaled_amax.to(torch.float8_e4m3fn)
    s_f = s_b.float()
    ratio = torch.clamp((blocks * g) / s_f, -E2M1_MAX, E2M1_MAX)
    ratio = torch.where(s_f > 0, ratio, torch.zeros_like(ratio))
    mag = e2m1_code(ratio.abs())
    codes = torch.where((ratio < 0) & (mag != 0), mag | 0x08, mag).reshape(xf.shape)
    return NVFP4Tensor(pack_nibbles(codes), s_b.squeeze(-1), g.clone())


def scaled_values(q: NVFP4Tensor) -> torch.Tensor:
    """T[q] * s_b in fp32 [..., K]: the dequantized tensor times g. Exact (<= 6 significant bits)."""
    codes = unpack_nibbles(q.packed)
    vals = code_values(codes).reshape(*codes.shape[:-1], -1, BLOCK)
    return (vals * q.block_scale.float().unsqueeze(-1)).reshape(codes.shape)


def dequantize_nvfp4(q: NVFP4Tensor) -> torch.Tensor:
    """x' = (T[q] * s_b) / g as fp32 [..., K]."""
    return scaled_values(q) / q.global_scale.float()


def gemm_alpha(qx: NVFP4Tensor, qw: NVFP4Tensor) -> torch.Tensor:
    """1/(g_x g_w), the fp32 epilogue factor of every NVFP4 GEMM (kernels compute it the same way)."""
    return 1.0 / (qx.global_scale.float() * qw.global_scale.float())


def nvfp4_gemm_reference(qx: NVFP4Tensor, qw: NVFP4Tensor) -> torch.Tensor:
    """y[m, n] = 1/(g_x g_w) * sum_b s_xb s_wb <q_x[m], q_w[n]>_b, fp32, written block by block.

    qx is [M, K], qw is [N, K]. Literal form of the contract; O(M*N*K/16) memory, for tests.
    """
    cx = code_values(unpack_nibbles(qx.packed))
    cw = code_values(unpack_nibbles(qw.packed))
    m, k = cx.shape
    n = cw.shape[0]
    dots = torch.einsum("mbi,nbi->mnb", cx.reshape(m, k // BLOCK, BLOCK), cw.reshape(n, k // BLOCK, BLOCK))
    scales = qx.block_scale.float()[:, None, :] * qw.block_scale.float()[None, :, :]
    return (dots * scales).sum(dim=-1) * gemm_alpha(qx, qw)


def nvfp4_matmul(qx: NVFP4Tensor, qw: NVFP4Tensor) -> torch.Tensor:
    """The same GEMM as one fp32 matmul of scale-folded operands (T[q]*s_b is exact, and so is the
    product of two such values in fp32): equal to nvfp4_gemm_reference up to fp32 summation order."""
    return (scaled_values(qx) @ scaled_values(qw).transpose(-1, -2)) * gemm_alpha(qx, qw)
