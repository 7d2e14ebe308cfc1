"""Triton kernels around attention: the paged KV write, RMSNorm fused with the residual add, RoPE and
SiLU-and-mul. Each launcher has the signature and semantics of its torch twin in kernels/reference.py
(the docstrings there are the contract). All are memory-bound: one program per token row, every input
read once and every output written once, math in fp32.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from pdserve.kernels.reference import FP8_KV_EPS, FP8_MAX

try:
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # a Triton without grid dependency control: PDL stays off
    gdc_wait = None

# Programmatic dependent launch (Hopper+): a decode step is a few hundred short kernels in a CUDA graph,
# and each launch costs about a microsecond of idle GPU between kernels. With PDL a kernel is launched
# while its predecessor drains and waits (gdc_wait, first thing, before touching memory) for it to finish.
# Every kernel launched this way must wait unconditionally: a chain stays ordered only if each link waits.
PDL = True


def pdl_enabled(device: torch.device) -> bool:
    return PDL and _pdl_capable(device.type, device.index)


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_type: str, index: int | None) -> bool:
    # cached: asking torch for the capability took 7-12 us of host time per launch on the lent H100's host,
    # where a whole Triton launch of a trivial kernel takes 15-19 us
    return (gdc_wait is not None and device_type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(index)[0] >= 9)


_ON = dict(PDL=True, launch_pdl=True)
_OFF = dict(PDL=False)


def launch_options(device: torch.device) -> dict:
    """Kernel-launch keywords plus the matching PDL constexpr (a shared dict: callers only unpack it)."""
    return _ON if pdl_enabled(device) else _OFF


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    if PDL:
        gdc_wait()


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, slot_ptr, kv_ptr, scale_ptr,
                     s_kt, s_kh, s_vt, s_vh,
                     s_blk, s_kv, s_pos, s_head,
                     s_sblk, s_skv, s_spos,
                     eps, fp8_max,
                     NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # batch padding
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < NUM_HEADS)[:, None]
    dst = kv_ptr + block * s_blk + offset * s_pos + heads[:, None] * s_head + dims[None, :]
    k = tl.load(k_ptr + token * s_kt + heads[:, None] * s_kh + dims[None, :], mask=mask)
    v = tl.load(v_ptr + token * s_vt + heads[:, None] * s_vh + dims[None, :], mask=mask)
    if FP8:
        scale_dst = scale_ptr + block * s_sblk + offset * s_spos + heads
        # correctly rounded divisions, as torch's: scales and codes match the reference bit for bit
        divisor = tl.full([HEADS_PAD], fp8_max, tl.float32)
        k_scale = tl.div_rn(tl.maximum(tl.max(tl.abs(k.to(tl.float32)), axis=1), eps), divisor)
        v_scale = tl.div_rn(tl.maximum(tl.max(tl.abs(v.to(tl.float32)), axis=1), eps), divisor)
        k_codes = tl.clamp(tl.div_rn(k.to(tl.float32), k_scale[:, None]), -fp8_max, fp8_max)
        v_codes = tl.clamp(tl.div_rn(v.to(tl.float32), v_scale[:, None]), -fp8_max, fp8_max)
        tl.store(dst, k_codes.to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + s_kv, v_codes.to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_dst, k_scale, mask=heads < NUM_HEADS)
        tl.store(scale_dst + s_skv, v_scale, mask=heads < NUM_HEADS)
    else:
        tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + s_kv, v.to(kv_ptr.dtype.element_ty), mask=mask)


def _launch_write_kv(kv_layer, kv_scales, k, v, slot_mapping):
    num_tokens, num_heads, head_dim = k.shape
    _check_last_dim_contiguous(kv_layer, k, v)
    fp8 = kv_scales is not None
    scales = kv_scales if fp8 else kv_layer  # never read when not FP8
    s_scale = kv_scales.stride() if fp8 else (0, 0, 0, 0)
    _write_kv_kernel[(num_tokens,)](
        k, v, slot_mapping, kv_layer, scales,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        s_scale[0], s_scale[1], s_scale[2],
        FP8_KV_EPS, FP8_MAX,
        NUM_HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim,
        BLOCK_SIZE=kv_layer.shape[2], FP8=fp8, num_warps=4)


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if k.shape[0]:
        _launch_write_kv(kv_layer, None, k, v, slot_mapping)


def write_kv_fp8(kv_layer: torch.Tensor, kv_scales: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    if kv_scales.stride(3) != 1:
        raise ValueError("kv_scales must be contiguous over heads")
    if k.shape[0]:
        _launch_write_kv(kv_layer, kv_scales, k, v, slot_mapping)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, s_x, s_res, s_out, s_new_res, n_cols, eps,
                     BLOCK: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0)
    if RESIDUAL:
        res = tl.load(res_ptr + row * s_res + cols, mask=mask, other=0.0)
        # round the sum to the activation dtype before normalising, as HF's `residual + hidden` does
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * s_new_res + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    normed = (h * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * s_out + cols, out, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    num_rows, hidden = x.shape
    _check_last_dim_contiguous(x, weight)
    out = torch.empty_like(x)
    new_residual = torch.empty_like(x) if residual is not None else None
    block = triton.next_power_of_2(hidden)
    if num_rows:
        _rms_norm_kernel[(num_rows,)](
            x, residual if residual is not None else x, weight, out,
            new_residual if residual is not None else out,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            new_residual.stride(0) if residual is not None else 0, hidden, eps,
            BLOCK=block, RESIDUAL=residual is not None, num_warps=min(max(block // 256, 1), 16),
            **launch_options(x.device))
    return out if residual is None else (out, new_residual)


@triton.jit
def _rotate(x_ptr, token, s_t, s_h, cos, sin, num_heads, HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    ptr = x_ptr + token * s_t + heads * s_h + dims
    x1 = tl.load(ptr, mask=mask).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cache_ptr, s_qt, s_qh, s_kt, s_kh, s_cache, num_q_heads, num_k_heads,
                   Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)[None, :]
    cos = tl.load(cache_ptr + pos * s_cache + dims)
    sin = tl.load(cache_ptr + pos * s_cache + HALF + dims)
    _rotate(q_ptr, token, s_qt, s_qh, cos, sin, num_q_heads, Q_HEADS_PAD, HALF)
    _rotate(k_ptr, token, s_kt, s_kh, cos, sin, num_k_heads, K_HEADS_PAD, HALF)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    num_tokens, num_q_heads, head_dim = q.shape
    _check_last_dim_contiguous(q, k, cos_sin_cache)
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin_cache.stride(0), num_q_heads, k.shape[1],
            Q_HEADS_PAD=triton.next_power_of_2(num_q_heads), K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
            HALF=head_dim // 2, num_warps=4)
    return q, k


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, s_x, s_out, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * s_x + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * s_x + inter + cols, mask=mask).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * s_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    num_rows, width = x.shape
    inter = width // 2
    _check_last_dim_contiguous(x)
    out = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(inter), 2048)
    if num_rows:
        _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4, **launch_options(x.device))
    return out


def _check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"last dim must be contiguous, got strides {t.stride()}")


@triton.jit
def _rotary_write_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cache_ptr, slot_ptr, kv_ptr,
                            s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_cache, s_blk, s_kv, s_pos, s_head,
                            num_q_heads, num_kv_heads, Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr,
                            HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)[None, :]
    cos = tl.load(cache_ptr + pos * s_cache + dims)
    sin = tl.load(cache_ptr + pos * s_cache + HALF + dims)
    _rotate(q_ptr, token, s_qt, s_qh, cos, sin, num_q_heads, Q_HEADS_PAD, HALF)
    heads = tl.arange(0, K_HEADS_PAD)[:, None]
    mask = heads < num_kv_heads
    k_src = k_ptr + token * s_kt + heads * s_kh + dims
    k1 = tl.load(k_src, mask=mask).to(tl.float32)
    k2 = tl.load(k_src + HALF, mask=mask).to(tl.float32)
    r1 = (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty)
    r2 = (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty)
    tl.store(k_src, r1, mask=mask)
    tl.store(k_src + HALF, r2, mask=mask)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # negative: batch padding
        dst = kv_ptr + (slot // BLOCK_SIZE) * s_blk + (slot % BLOCK_SIZE) * s_pos + heads * s_head + dims
        tl.store(dst, r1.to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, r2.to(kv_ptr.dtype.element_ty), mask=mask)
        v_src = v_ptr + token * s_vt + heads * s_vh + dims
        tl.store(dst + s_kv, tl.load(v_src, mask=mask).to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + s_kv + HALF, tl.load(v_src + HALF, mask=mask).to(kv_ptr.dtype.element_ty), mask=mask)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor):
    """rotary(q, k) and write_kv(kv_layer, k, v) in one launch (decode issues a few hundred tiny kernels
    per step, each costing a few microseconds whatever its size)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _check_last_dim_contiguous(q, k, v, kv_layer, cos_sin_cache)
    if num_tokens:
        _rotary_write_kv_kernel[(num_tokens,)](
            q, k, v, positions, cos_sin_cache, slot_mapping, kv_layer,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
            kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3), num_q_heads, k.shape[1],
            Q_HEADS_PAD=triton.next_power_of_2(num_q_heads), K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
            HALF=head_dim // 2, BLOCK_SIZE=kv_layer.shape[2], num_warps=4, **launch_options(q.device))
    return q, k


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, n_rows, s_w, K: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SILU_MUL: tl.constexpr, PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * s_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    # unrolled over K: the weight loads of later chunks issue before earlier sums finish, which is what
    # keeps enough bytes in flight to stream at memory speed
    for k0 in tl.static_range(0, K, BLOCK_K):
        k_mask = k0 + cols < K
        if SILU_MUL:
            gate = tl.load(x_ptr + k0 + cols, mask=k_mask, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + k0 + cols, mask=k_mask, other=0.0).to(tl.float32)
            # rounded to the activation dtype, as the unfused silu_and_mul output is
            x = (gate / (1.0 + tl.exp(-gate)) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            x = tl.load(x_ptr + k0 + cols, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + (k0 + cols)[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, out_ptr, n_rows_x, n_rows_w, s_x, s_w, s_out, K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU_MUL: tl.constexpr,
                        PRECISION: tl.constexpr, PDL: tl.constexpr):
    """out = x @ w^T for a few rows of x (a decode batch): one program streams BLOCK_N weight rows through
    all of K, software-pipelined, while the whole batch rides along in the MMA's M dimension."""
    wait_for_predecessor(PDL)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows_x
    col_mask = cols < n_rows_w
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * s_x
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * s_w
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + ks) < K
        x_mask = row_mask[:, None] & k_mask[None, :]
        if SILU_MUL:
            gate = tl.load(x_rows + (k0 + ks)[None, :], mask=x_mask, other=0.0).to(tl.float32)
            up = tl.load(x_rows + K + (k0 + ks)[None, :], mask=x_mask, other=0.0).to(tl.float32)
            x = (gate / (1.0 + tl.exp(-gate)) * up).to(x_ptr.dtype.element_ty)
        else:
            x = tl.load(x_rows + (k0 + ks)[None, :], mask=x_mask, other=0.0)
        w = tl.load(w_rows + (k0 + ks)[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * s_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _gemv(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool, config=(8, 512, 4)) -> torch.Tensor:
    """M == 1. config = (BLOCK_N, BLOCK_K, num_warps)."""
    n_rows, k = weight.shape
    _check_last_dim_contiguous(x, weight)
    block_n, block_k, warps = config
    out = torch.empty((1, n_rows), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n_rows, block_n),)](
        x, weight, out, n_rows, weight.stride(0), K=k, BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(k)),
        SILU_MUL=silu_mul, num_warps=warps, **launch_options(x.device))
    return out


def _skinny(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool, config=(32, 256, 4, 4)) -> torch.Tensor:
    """M <= 64. config = (BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    n_rows, k = weight.shape
    _check_last_dim_contiguous(x, weight)
    block_n, block_k, warps, stages = config
    out = torch.empty((x.shape[0], n_rows), dtype=x.dtype, device=x.device)
    _skinny_gemm_kernel[(triton.cdiv(n_rows, block_n),)](
        x, weight, out, x.shape[0], n_rows, x.stride(0), weight.stride(0), out.stride(0), K=k,
        BLOCK_M=max(16, triton.next_power_of_2(x.shape[0])), BLOCK_N=block_n, BLOCK_K=block_k, SILU_MUL=silu_mul,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
        **launch_options(x.device))
    return out


def _library(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool, config=None) -> torch.Tensor:
    return (silu_and_mul(x) if silu_mul else x) @ weight.T


LINEAR_KERNELS = {"gemv": _gemv, "skinny": _skinny, "library": _library}
# (batch bucket, N, K, silu) -> (kernel name, config); benchmarks/bench_gpu.py measures and fills this.
# Unlisted shapes: the GEMV at batch 1, the library GEMM otherwise.
LINEAR_PLANS: dict[tuple[int, int, int, bool], tuple[str, object]] = {}
BATCH_BUCKETS = (1, 8, 16, 32, 64)


def batch_bucket(rows: int) -> int:
    for bucket in BATCH_BUCKETS:
        if rows <= bucket:
            return bucket
    return rows


def _linear(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool) -> torch.Tensor:
    rows = x.shape[0]
    default = ("gemv", (8, 512, 4)) if rows == 1 else ("library", None)
    name, config = LINEAR_PLANS.get((batch_bucket(rows), *weight.shape, silu_mul), default)
    if name == "gemv" and rows != 1:
        name, config = "library", None
    return LINEAR_KERNELS[name](x, weight, silu_mul, config)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T: a Triton GEMV (M == 1) or skinny GEMM (small M) streaming the weight,
    or the library GEMM, per LINEAR_PLANS."""
    return _linear(x, weight, silu_mul=False)


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu_and_mul(x [M, 2K]) @ weight [N, K]^T; the Triton paths compute the activation while loading x."""
    return _linear(x, weight, silu_mul=True)
