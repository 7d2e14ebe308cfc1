"""Triton kernels around attention: the paged KV write, RMSNorm fused with the residual add, RoPE and
SiLU-and-mul. Each launcher has the signature and semantics of its torch twin in kernels/reference.py
(the docstrings there are the contract). All are memory-bound: one program per token row, every input
read once and every output written once, math in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.reference import FP8_KV_EPS, FP8_MAX


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
        k_scale = tl.maximum(tl.max(tl.abs(k.to(tl.float32)), axis=1), eps) / fp8_max
        v_scale = tl.maximum(tl.max(tl.abs(v.to(tl.float32)), axis=1), eps) / fp8_max
        # correctly rounded division, as torch's: codes then match the reference bit for bit
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
                     BLOCK: tl.constexpr, RESIDUAL: tl.constexpr):
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
            BLOCK=block, RESIDUAL=residual is not None, num_warps=min(max(block // 256, 1), 16))
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
def _silu_and_mul_kernel(x_ptr, out_ptr, s_x, s_out, inter, BLOCK: tl.constexpr):
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
            x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4)
    return out


def _check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"last dim must be contiguous, got strides {t.stride()}")
