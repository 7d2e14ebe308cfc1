"""NVFP4 on the GPU (Triton). Reference: kernels/nvfp4.py; same arithmetic, same order.

Hopper (sm_90) has no FP4 tensor cores, so W4A4 is emulated EXACTLY: a code value times its e4m3
block scale has at most 6 significant bits (2 from E2M1, 4 from e4m3) and fits bf16 exactly, and
the product of two such values (<= 12 bits) is exact in the fp32 accumulator. So
  y = 1/(g_x g_w) * (X' @ W'^T),   X' = T[q_x] * s_x,  W' = T[q_w] * s_w   (both bf16, exact)
is the reference GEMM up to fp32 summation order. W' is built once at load; X' is written by the
activation quantizer directly (no packed round trip); 1/(g_x g_w) stays a device scalar.

Blackwell (sm_100+) runs the packed codes natively: tl.dot_scaled(..., "e2m1", ...) with e4m3
scales lowers to tcgen05.mma ... kind::mxf4nvf4.block_scale.scale_vec::4X (16-element blocks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.nvfp4 import BLOCK, NVFP4Tensor
from pdserve.kernels.triton_fp8 import e4m3_rne, scaled_gemm

FP32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def amax_kernel(x_ptr, amax_bits_ptr, numel, BLOCK_SIZE: tl.constexpr):
    """Tensor-wide amax: per-program max, then an int32 atomic max on the fp32 bits (for
    non-negative floats the bit patterns order like the values). amax_bits must start at 0."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    m = tl.max(tl.abs(x), axis=0)
    tl.atomic_max(amax_bits_ptr, m.to(tl.int32, bitcast=True))


@triton.jit
def e2m1_rne(v):
    """Magnitudes v in [0, 6] -> (code 0..7 as int32, grid value as fp32), ties to even.
    Thresholds as in kernels.nvfp4.e2m1_code."""
    c = ((v > 0.25).to(tl.int32) + (v >= 0.75).to(tl.int32) + (v > 1.25).to(tl.int32)
         + (v >= 1.75).to(tl.int32))
    val = c.to(tl.float32) * 0.5
    c4 = (v > 2.5).to(tl.int32) + (v >= 3.5).to(tl.int32)
    c6 = (v > 5.0).to(tl.int32)
    return c + c4 + c6, val + c4.to(tl.float32) + 2.0 * c6.to(tl.float32)


@triton.jit
def quantize_kernel(x_ptr, amax_bits_ptr, packed_ptr, scale_ptr, folded_ptr, g_ptr, M, K, stride_x,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    EMIT_PACKED: tl.constexpr, EMIT_FOLDED: tl.constexpr):
    """Quantize a [BLOCK_M, BLOCK_K] tile, addressed as [BLOCK_M, blocks, 16] so each block's amax
    and scale stay in the layout of its elements. EMIT_PACKED writes codes (2 per byte) and e4m3
    block scales; EMIT_FOLDED writes T[q]*s_b as bf16 (exact), the operand of the Hopper GEMM."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    amax = tl.load(amax_bits_ptr).to(tl.float32, bitcast=True)
    g = tl.minimum(tl.math.div_rn(2688.0, amax), FP32_MAX)
    g = tl.where(amax > 0, g, 1.0)
    if pid_m == 0 and pid_k == 0:
        tl.store(g_ptr, g)

    NB: tl.constexpr = BLOCK_K // 16
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    blocks = pid_k * NB + tl.arange(0, NB)
    cols = blocks[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
    mask = (rows[:, None, None] < M) & (cols < K)
    x = tl.load(x_ptr + rows64[:, None, None] * stride_x + cols, mask=mask, other=0.0).to(tl.float32)

    amax_b = tl.max(tl.abs(x), axis=2)
    s = e4m3_rne(tl.minimum(tl.math.div_rn(amax_b, 6.0) * g, 448.0))
    s3 = s[:, :, None]
    ratio = tl.math.div_rn(x * g, tl.where(s3 > 0, s3, 1.0))
    mag = tl.minimum(tl.abs(ratio), 6.0)
    mag = tl.where(s3 > 0, mag, 0.0)
    code, val = e2m1_rne(mag)
    neg = (x < 0) & (code != 0)

    if EMIT_FOLDED:
        folded = tl.where(neg, -val, val) * s3
        tl.store(folded_ptr + rows64[:, None, None] * K + cols, folded.to(tl.bfloat16), mask=mask)
    if EMIT_PACKED:
        code = tl.where(neg, code | 8, code)
        lo, hi = tl.split(tl.reshape(code, (BLOCK_M, BLOCK_K // 2, 2)))
        byte = (lo | (hi << 4)).to(tl.uint8)
        pcols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        pmask = (rows[:, None] < M) & (pcols[None, :] < K // 2)
        tl.store(packed_ptr + rows64[:, None] * (K // 2) + pcols[None, :], byte, mask=pmask)
        smask = (rows[:, None] < M) & (blocks[None, :] < K // 16)
        tl.store(scale_ptr + rows64[:, None] * (K // 16) + blocks[None, :], s.to(tl.float8e4nv), mask=smask)


# activation-quantizer tile: the best of five in benchmarks/bench_quant.py on an H100 (within 5%
# of each other; docs/bench/quant.md)
QUANT_TILE = dict(BLOCK_M=32, BLOCK_K=128, num_warps=8)


def _quantize(x: torch.Tensor, emit_packed: bool, emit_folded: bool, out: dict | None = None,
              tile: dict | None = None):
    m, k = x.shape
    assert k % BLOCK == 0, "NVFP4 needs K % 16 == 0"
    if x.stride(-1) != 1:
        x = x.contiguous()
    dev = x.device
    amax_bits = torch.zeros(1, dtype=torch.int32, device=dev)
    numel = x.numel()
    amax_block = 8192  # fewer programs, fewer same-address atomics
    amax_kernel[(triton.cdiv(numel, amax_block),)](x, amax_bits, numel, BLOCK_SIZE=amax_block, num_warps=8)
    out = out or {}
    g = out.get("g", torch.empty((), dtype=torch.float32, device=dev))
    if emit_packed:
        packed = out.get("packed", torch.empty((m, k // 2), dtype=torch.uint8, device=dev))
        scale = out.get("scale", torch.empty((m, k // 16), dtype=torch.float8_e4m3fn, device=dev))
    else:
        packed = scale = g
    folded = out.get("folded", torch.empty((m, k), dtype=torch.bfloat16, device=dev)) if emit_folded else g
    tile = dict(tile or QUANT_TILE)
    block_m, block_k = tile.pop("BLOCK_M"), tile.pop("BLOCK_K")
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    quantize_kernel[grid](x, amax_bits, packed, scale, folded, g, m, k, x.stride(0),
                          BLOCK_M=block_m, BLOCK_K=block_k, EMIT_PACKED=emit_packed, EMIT_FOLDED=emit_folded,
                          **tile)
    return packed, scale, folded, g


def quantize_nvfp4(x: torch.Tensor, out: dict | None = None) -> NVFP4Tensor:
    """GPU twin of kernels.nvfp4.quantize_nvfp4 for 2-D x (finite input assumed, no host sync).
    `out` may hold preallocated "packed", "scale", "g" tensors."""
    packed, scale, _, g = _quantize(x, emit_packed=True, emit_folded=False, out=out)
    return NVFP4Tensor(packed, scale, g)


def quantize_nvfp4_folded(x: torch.Tensor, out: dict | None = None,
                          tile: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (T[q]*s_b as bf16 [M, K], g fp32 scalar): the Hopper GEMM operand.
    `out` may hold preallocated "folded", "g" tensors."""
    _, _, folded, g = _quantize(x, emit_packed=False, emit_folded=True, out=out, tile=tile)
    return folded, g


def fold_weight(qw: NVFP4Tensor) -> torch.Tensor:
    """W' = T[q_w]*s_w as bf16 [N, K], exact; built once at load."""
    from pdserve.kernels.nvfp4 import scaled_values
    return scaled_values(qw).to(torch.bfloat16)


def hopper_gemm_cublas(x_folded, g_x, w_folded, g_w, out_dtype):
    """cuBLAS bf16 GEMM of the folded operands, then the exact fp32 factor 1/(g_x g_w).
    The bf16 output is rounded once before the scaling (relative error <= 2**-8)."""
    y = torch.matmul(x_folded, w_folded.t())
    alpha = 1.0 / (g_x * g_w)
    return (y * alpha).to(out_dtype)


def hopper_gemm_triton(x_folded, g_x, w_folded, g_w, out_dtype, out=None):
    """Triton bf16 GEMM with 1/(g_x g_w) applied to the fp32 accumulator (one rounding)."""
    alpha = (1.0 / (g_x * g_w)).reshape(1)
    return scaled_gemm(x_folded, w_folded, alpha, alpha.new_ones(1), out_dtype, out=out)


# ---------------------------------------------------------------- Blackwell (sm_100+) native path

@triton.jit
def blackwell_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, alpha_ptr, M, N, K,
                          stride_cm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          K_TILES: tl.constexpr, NUM_STAGES: tl.constexpr):
    """C = alpha * sum_b s_a s_b <q_a, q_b>_b on the block-scaled tensor cores.

    a [M, K//2] / b [N, K//2] packed E2M1 (low nibble first), scales [M, K//16] / [N, K//16] e4m3
    in plain row-major layout; K % BLOCK_K == 0 (the caller checks).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_a = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_b = tl.minimum(offs_n, N - 1).to(tl.int64)
    kp = tl.arange(0, BLOCK_K // 2)
    ks = tl.arange(0, BLOCK_K // 16)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kt in tl.range(0, K_TILES, num_stages=NUM_STAGES):
        k0 = kt * BLOCK_K
        a = tl.load(a_ptr + rows_a[:, None] * (K // 2) + (k0 // 2 + kp)[None, :])
        b = tl.load(b_ptr + rows_b[:, None] * (K // 2) + (k0 // 2 + kp)[None, :])
        sa = tl.load(a_scale_ptr + rows_a[:, None] * (K // 16) + (k0 // 16 + ks)[None, :])
        sb = tl.load(b_scale_ptr + rows_b[:, None] * (K // 16) + (k0 // 16 + ks)[None, :])
        acc = tl.dot_scaled(a, sa, "e2m1", b.T, sb, "e2m1", acc)
    out = acc * tl.load(alpha_ptr)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


BLACKWELL_TILE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, NUM_STAGES=3)


def blackwell_gemm(qx: NVFP4Tensor, qw: NVFP4Tensor, out_dtype: torch.dtype, out=None) -> torch.Tensor:
    m, n, k = qx.packed.shape[0], qw.packed.shape[0], qx.packed.shape[1] * 2
    assert k % BLACKWELL_TILE["BLOCK_K"] == 0
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=qx.packed.device)
    alpha = (1.0 / (qx.global_scale * qw.global_scale)).reshape(1)
    grid = (triton.cdiv(m, BLACKWELL_TILE["BLOCK_M"]), triton.cdiv(n, BLACKWELL_TILE["BLOCK_N"]))
    blackwell_gemm_kernel[grid](qx.packed, qx.block_scale, qw.packed, qw.block_scale, out, alpha, m, n, k,
                                out.stride(0), K_TILES=k // BLACKWELL_TILE["BLOCK_K"], num_warps=4,
                                **BLACKWELL_TILE)
    return out


def compile_blackwell_gemm(capability: int = 100, k: int = 4096):
    """Compile blackwell_gemm_kernel for sm_<capability> without a device; returns the kernel
    (its .asm holds 'ptx', 'cubin'). Used to show the block-scaled MMA is in the machine code."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {"a_ptr": "*u8", "a_scale_ptr": "*fp8e4nv", "b_ptr": "*u8", "b_scale_ptr": "*fp8e4nv",
           "c_ptr": "*bf16", "alpha_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_cm": "i32"}
    consts = dict(BLACKWELL_TILE, K_TILES=k // BLACKWELL_TILE["BLOCK_K"])
    sig.update({name: "constexpr" for name in consts})
    src = ASTSource(fn=blackwell_gemm_kernel, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32))
