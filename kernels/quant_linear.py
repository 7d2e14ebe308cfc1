"""Linear layers at a chosen precision: "bf16" (dense), "fp8" (W8A8), "nvfp4" (W4A4).

Weights are quantized once, at construction; activations at every forward. On CPU the layers run
the torch references (kernels/fp8.py, kernels/nvfp4.py); on CUDA the Triton/library kernels that
tests/gpu/test_quant_kernels_gpu.py checks against those references:
  fp8   -> fused Triton per-token quantizer + a rowwise-scaled FP8 GEMM (FP8_GEMM picks cuBLAS via
           torch._scaled_mm or the Triton GEMM with the scale epilogue; see docs/bench/quant.md);
  nvfp4 -> capability >= 10: packed codes on the block-scaled tensor cores (tl.dot_scaled);
           below: exact emulation, bf16 GEMM of scale-folded operands (kernels/triton_nvfp4.py).
Quantized layers keep their buffers' dtypes: a model-wide .to(dtype) moves them between devices
and nothing else (casting e4m3 codes or fp32 scales would silently change the numerics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.config import PRECISIONS
from pdserve.kernels import fp8, nvfp4


# Chosen by benchmarks/bench_quant.py on an H100 (docs/bench/quant.md): cuBLAS rowwise FP8 beat the
# Triton GEMM once that promotes its partial sums to fp32 (1240-1300 vs 940-1070 TFLOP/s); for the
# NVFP4 emulation the Triton bf16 GEMM with 1/(g_x g_w) in its epilogue beat cuBLAS + a scaling pass.
FP8_GEMM = "scaled_mm"  # or "triton"
NVFP4_HOPPER_GEMM = "triton"  # or "cublas"
# Hopper's fp8 "fast accumulation" (partial sums kept at reduced precision, about 2e-3 relative
# error over K = 4096 as measured here) is faster but breaks the fp32-accumulation contract; off by
# default, an explicit opt-in for throughput runs.
FP8_FAST_ACCUM = False
# Fp8Linear feeds qkv/gate_up from RMSNorm and down from SiLU*up with the quantizer fused into those
# producers (byte-equal to the unfused pair); False: the producers write bf16 and the quantizer runs apart.
FUSE_PRODUCERS = True


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, precision: str, dtype: torch.dtype) -> nn.Module:
    """weight [out, in], bias [out] or None. `dtype` is the compute dtype of "bf16" (float32 on CPU
    keeps the exact path) and the dtype the bias is kept in."""
    if precision == "bf16":
        return DenseLinear(weight, bias, dtype)
    if precision == "fp8":
        return Fp8Linear(weight, bias, dtype)
    if precision == "nvfp4":
        return Nvfp4Linear(nvfp4.quantize_nvfp4(weight), bias, dtype)
    raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _is_blackwell(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10


def _fusable(x: torch.Tensor, ops) -> bool:
    return (FUSE_PRODUCERS and getattr(ops, "name", None) == "triton" and x.dim() == 2 and x.stride(-1) == 1
            and x.dtype in (torch.bfloat16, torch.float16))


class DenseLinear(nn.Module):
    """Unquantized linear at `dtype`; output in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class QuantizedLinear(nn.Module):
    """Base of the quantized layers: device moves only (see the module docstring)."""

    def _apply(self, fn, recurse=True):
        anchor = next(iter(self._buffers.values()))
        device = fn(torch.empty(0, device=anchor.device)).device
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(device)
        self.on_device_change()
        return self

    def on_device_change(self) -> None:
        pass

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Fp8Linear(QuantizedLinear):
    """W8A8 e4m3: per-output-channel weight scales, per-token activation scales."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        w8, s_w = fp8.quantize_fp8_rows(weight.detach())
        self.register_buffer("w8", w8.contiguous())
        self.register_buffer("s_w", s_w.contiguous())  # [out, 1]
        self.register_buffer("s_w_row", s_w.reshape(1, -1).contiguous())  # [1, out] for _scaled_mm
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _flatten(x)
        if x2.is_cuda:
            y = self._forward_cuda(x2, x.dtype)
        else:
            y = self.forward_quantized(*fp8.quantize_fp8_rows(x2), x.dtype)
        return y.reshape(*x.shape[:-1], -1)

    # The fused entry points of engine/model.py (rms_norm_linear, silu_mul_linear): they stand in for the
    # Triton ops' rms_norm / silu_and_mul plus this layer's quantizer, whose arithmetic the fused kernels
    # repeat, so they apply only with those ops (on CUDA, or interpreted); None = not applicable here.

    def rms_norm_forward(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                         ops) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(self(rms_norm(x + residual)), x + residual), the norm writing e4m3 codes instead of bf16:
        removes a write and a read of every activation row."""
        if not _fusable(x, ops) or (residual is not None and residual.stride(-1) != 1):
            return None
        from pdserve.kernels import triton_fp8
        if x.shape[1] > triton_fp8.RMS_NORM_QUANT_MAX:
            return None
        if residual is None:
            return self.forward_quantized(*triton_fp8.rms_norm_quant_fp8(x, weight, eps), x.dtype), x
        x8, s_x, residual = triton_fp8.rms_norm_quant_fp8(x, weight, eps, residual)
        return self.forward_quantized(x8, s_x, x.dtype), residual

    def silu_mul_forward(self, gate_up: torch.Tensor, ops) -> torch.Tensor | None:
        """self(silu(gate) * up), SiLU*up writing e4m3 codes instead of bf16 (as rms_norm_forward)."""
        if not _fusable(gate_up, ops):
            return None
        from pdserve.kernels import triton_fp8
        return self.forward_quantized(*triton_fp8.silu_mul_quant_fp8(gate_up), gate_up.dtype)

    def _forward_cuda(self, x2: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        from pdserve.kernels import triton_fp8
        x8, s_x = triton_fp8.quantize_fp8_rows(x2)
        return self.forward_quantized(x8, s_x, out_dtype)

    def forward_quantized(self, x8: torch.Tensor, s_x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The GEMM on activations already quantized per token (x8 [M, in] e4m3, s_x [M, 1] fp32),
        e.g. by a producer with the quantizer fused in (kernels/triton_fp8.rms_norm_quant_fp8)."""
        if not x8.is_cuda:
            return self.add_bias(fp8.fp8_gemm_reference(x8, s_x, self.w8, self.s_w, out_dtype))
        from pdserve.kernels import triton_fp8
        n, k = self.w8.shape
        # cuBLAS rowwise scaling wants 16-aligned K and N and a bf16 output
        if FP8_GEMM == "scaled_mm" and k % 16 == 0 and n % 16 == 0 and out_dtype == torch.bfloat16:
            y = torch._scaled_mm(x8, self.w8.t(), scale_a=s_x, scale_b=self.s_w_row, out_dtype=out_dtype,
                                 use_fast_accum=FP8_FAST_ACCUM)
        else:
            y = triton_fp8.scaled_gemm(x8, self.w8, s_x, self.s_w, out_dtype)
        return self.add_bias(y)


class Nvfp4Linear(QuantizedLinear):
    """W4A4 NVFP4 (16-element blocks, e4m3 block scales, fp32 global scale)."""

    def __init__(self, qw: nvfp4.NVFP4Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("packed", qw.packed.contiguous())
        self.register_buffer("block_scale", qw.block_scale.contiguous())
        self.register_buffer("global_scale", qw.global_scale.reshape(()).float())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.on_device_change()

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> "Nvfp4Linear":
        """A pre-quantized checkpoint in this format (encode convention: g = 2688/amax). ModelOpt
        checkpoints store the decode factor `weight_scale_2` = 1/g: pass 1/weight_scale_2."""
        return cls(nvfp4.NVFP4Tensor(packed, block_scale.to(torch.float8_e4m3fn), global_scale.float()), bias, dtype)

    @property
    def qweight(self) -> nvfp4.NVFP4Tensor:
        return nvfp4.NVFP4Tensor(self.packed, self.block_scale, self.global_scale)

    def on_device_change(self) -> None:
        # T[q]*s_b is exact in bf16 (<= 6 significant bits): the Hopper GEMM operand, built once.
        # CPU keeps it in fp32 for the reference matmul. Blackwell reads the packed codes instead.
        dev = self.packed.device
        if dev.type == "cuda" and _is_blackwell(dev):
            self.folded = None
        else:
            folded = nvfp4.scaled_values(self.qweight)
            self.folded = folded.to(torch.bfloat16) if dev.type == "cuda" else folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _flatten(x)
        if x2.is_cuda:
            y = self._forward_cuda(x2, x.dtype)
        else:
            qx = nvfp4.quantize_nvfp4(x2)
            y = ((nvfp4.scaled_values(qx) @ self.folded.t()) * nvfp4.gemm_alpha(qx, self.qweight)).to(x.dtype)
        return self.add_bias(y).reshape(*x.shape[:-1], -1)

    def _forward_cuda(self, x2: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        from pdserve.kernels import triton_nvfp4
        k = x2.shape[-1]
        if self.folded is None and k % triton_nvfp4.BLACKWELL_TILE["BLOCK_K"] == 0:
            return triton_nvfp4.blackwell_gemm(triton_nvfp4.quantize_nvfp4(x2), self.qweight, out_dtype)
        if self.folded is None:  # Blackwell with an odd K: emulate
            self.folded = nvfp4.scaled_values(self.qweight).to(torch.bfloat16)
        x_folded, g_x = triton_nvfp4.quantize_nvfp4_folded(x2)
        gemm = triton_nvfp4.hopper_gemm_triton if NVFP4_HOPPER_GEMM == "triton" else triton_nvfp4.hopper_gemm_cublas
        return gemm(x_folded, g_x, self.folded, self.global_scale, out_dtype)
