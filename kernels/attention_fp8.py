"""Prefill attention with both matmuls on the FP8 tensor cores (the fp8 prefill pool's attention).

At long prompts attention is the part of prefill that the FP8 GEMMs leave in BF16: at 8192 tokens of
Llama-3-8B it is ~13% of the FLOPs but a quarter of the BF16 forward's time, which caps an fp8 prefill
that keeps it in BF16 below 1.5x. The numerics are kernels.reference.prefill_attention_fp8's; the KV
cache keeps its own dtype (it is what the decode side receives), only the operands of the two matmuls
are quantized.

Two kernels per layer:
  _quantize_context_kernel  gathers each sequence's context K and V from the paged cache once and
      writes e4m3 codes + per token-head scales, contiguous per sequence: K as [ctx, Hkv, D] rows, V
      transposed to [Hkv, D, ctx] (the FP8 MMA wants both operands K-major, and for P @ V the reduction
      runs over tokens), plus the per (sequence, kv head) maximum V scale c. Quantizing tiles inside the
      attention loop instead would redo it for every query tile, on the CUDA cores, costing more than
      the FP8 MMA saves.
  _prefill_fp8_kernel  flash attention over those buffers: q quantized per token-head on load,
      S = (q8 k8^T) s_q s_k^T, online softmax in fp32, P * s_v * 448 / c cast to e4m3, acc += P8 v8;
      O = acc * c / 448 / l.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.reference import FP8_KV_EPS, LOG2E
from kernels.triton_fp8 import e4m3_rne, fp8_codes



@triton.jit
def _quant_rows(x, eps):
    """Per-row e4m3 codes and scales of an fp32 tile [R, D] (s = max(amax, eps) / 448)."""
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), eps), 448.0)
    return fp8_codes(x, s[:, None]), s


@triton.jit
def _quantize_context_kernel(kv_ptr, bt_ptr, seq_lens_ptr, ctx_start_ptr, k8_ptr, ks_ptr, vt_ptr, vs_ptr, vmax_ptr,
                             s_blk, s_kv, s_pos, s_head, s_bt, s_k8t, s_vth, s_vtd, num_kv_heads, eps,
                             HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr):
    t_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    if t_block * BLOCK_T >= seq_len:
        return
    ctx_start = tl.load(ctx_start_ptr + seq).to(tl.int64)
    offs = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, HEAD_DIM)
    mask = offs < seq_len
    page = tl.load(bt_ptr + seq * s_bt + offs // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    row = page * s_blk + (offs % BLOCK_SIZE) * s_pos + kv_head * s_head
    k = tl.load(kv_ptr + row[:, None] + dims[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    k8, ks = _quant_rows(k, eps)
    dst = ctx_start + offs
    tl.store(k8_ptr + dst[:, None] * s_k8t + kv_head * HEAD_DIM + dims[None, :], k8, mask=mask[:, None])
    tl.store(ks_ptr + dst * num_kv_heads + kv_head, ks, mask=mask)
    v = tl.load(kv_ptr + s_kv + row[:, None] + dims[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    v8, vs = _quant_rows(v, eps)
    tl.store(vt_ptr + kv_head * s_vth + dims[None, :] * s_vtd + dst[:, None], v8, mask=mask[:, None])
    tl.store(vs_ptr + dst * num_kv_heads + kv_head, vs, mask=mask)
    # scales are positive, so the fp32 maximum is the maximum of their bit patterns
    tl.atomic_max(vmax_ptr + seq * num_kv_heads + kv_head, tl.max(tl.where(mask, vs, 0.0), axis=0))


@triton.jit
def _fp8_tiles(acc, m, l, q8, q_scale, k8_ptr, ks_ptr, vt_ptr, vs_ptr, v_fold, ctx_start, kv_head, pos, seq_len,
               n_start, n_end, s_k8t, s_vth, s_vtd, num_kv_heads,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, INTERPRETED: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)

    for n0 in range(n_start, n_end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs < seq_len
        tok = ctx_start + offs
        k8 = tl.load(k8_ptr + tok[:, None] * s_k8t + kv_head * HEAD_DIM + dims[None, :], mask=n_mask[:, None],
                     other=0.0)
        ks = tl.load(ks_ptr + tok * num_kv_heads + kv_head, mask=n_mask, other=0.0)
        s = tl.dot(q8, tl.trans(k8)) * q_scale[:, None] * ks[None, :]
        if CAUSAL_MASK:
            visible = (offs[None, :] <= pos[:, None]) & n_mask[None, :]
            s = tl.where(visible, s, float("-inf"))
        # an integer running maximum (log2 units): P moves by exact powers of two when it grows, and e4m3
        # rounding commutes with those, so P8 is what the reference gets from the final maximum
        m_new = tl.maximum(m, tl.ceil(tl.max(s, axis=1)))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        vs = tl.load(vs_ptr + tok * num_kv_heads + kv_head, mask=n_mask, other=0.0)
        p8 = tl.minimum(p * (vs * v_fold)[None, :], 448.0)
        if INTERPRETED:  # the interpreter's cast truncates where rounding carries into the exponent
            p8 = e4m3_rne(p8)
        p8 = p8.to(tl.float8e4nv)  # on the GPU: cvt.rn.satfinite, round to nearest even
        vt = tl.load(vt_ptr + kv_head * s_vth + dims[:, None] * s_vtd + tok[None, :], mask=n_mask[None, :],
                     other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(vt))
        m = m_new
    return acc, m, l


@triton.jit
def _prefill_fp8_kernel(q_ptr, qsl_ptr, seq_lens_ptr, ctx_start_ptr, k8_ptr, ks_ptr, vt_ptr, vs_ptr, vmax_ptr,
                        out_ptr, s_qt, s_qh, s_k8t, s_vth, s_vtd, s_ot, s_oh, num_kv_heads, qk_scale, eps,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        INTERPRETED: tl.constexpr):
    # the longest-running (last, most keys under the causal mask) query tiles start first; not in Triton's
    # interpreter, whose num_programs is not a scalar
    m_block = tl.program_id(0) if INTERPRETED else tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    q_head = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = tl.load(ctx_start_ptr + seq).to(tl.int64)
    kv_head = q_head // GROUP
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    tokens = (q_start + offs_m).to(tl.int64)
    pos = seq_len - q_len + offs_m
    q = tl.load(q_ptr + tokens[:, None] * s_qt + q_head * s_qh + dims[None, :], mask=m_mask[:, None], other=0.0)
    q8, s_q = _quant_rows(q.to(tl.float32), eps)
    q_scale = s_q * qk_scale  # softmax scale and log2(e) ride on the per-row scale
    c = tl.load(vmax_ptr + seq * num_kv_heads + kv_head)
    v_fold = 448.0 / c

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first_pos = seq_len - q_len + m_block * BLOCK_M

    unmasked_end = (first_pos // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(first_pos + BLOCK_M, seq_len)
    acc, m, l = _fp8_tiles(acc, m, l, q8, q_scale, k8_ptr, ks_ptr, vt_ptr, vs_ptr, v_fold, ctx_start, kv_head, pos,
                           seq_len, 0, unmasked_end, s_k8t, s_vth, s_vtd, num_kv_heads, HEAD_DIM, BLOCK_N, False,
                           INTERPRETED)
    acc, m, l = _fp8_tiles(acc, m, l, q8, q_scale, k8_ptr, ks_ptr, vt_ptr, vs_ptr, v_fold, ctx_start, kv_head, pos,
                           seq_len, unmasked_end, kv_end, s_k8t, s_vth, s_vtd, num_kv_heads, HEAD_DIM, BLOCK_N,
                           True, INTERPRETED)
    out = acc * (c / 448.0) / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(out_ptr + tokens[:, None] * s_ot + q_head * s_oh + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# benchmarks/bench_prefill.py measures candidates on the GPU; these are its choice on an H100
PREFILL_FP8_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
QUANTIZE_BLOCK_T = 64


def quantize_context(kv_layer: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                     context_start_loc: torch.Tensor, total_context: int, max_seq_len: int):
    """Every sequence's context K/V as e4m3 (see the module docstring). Returns
    (k8 [total, Hkv, D], k_scale [total, Hkv], v8t [Hkv, D, total_pad], v_scale [total, Hkv], v_max [B, Hkv])."""
    num_kv_heads, head_dim, block_size = kv_layer.shape[3], kv_layer.shape[4], kv_layer.shape[2]
    dev = kv_layer.device
    batch = seq_lens.shape[0]
    padded = triton.cdiv(max(total_context, 1), 16) * 16  # 16-byte aligned rows of V^T
    k8 = torch.empty((total_context, num_kv_heads, head_dim), dtype=torch.float8_e4m3fn, device=dev)
    vt = torch.empty((num_kv_heads, head_dim, padded), dtype=torch.float8_e4m3fn, device=dev)
    ks = torch.empty((total_context, num_kv_heads), dtype=torch.float32, device=dev)
    vs = torch.empty_like(ks)
    vmax = torch.zeros((batch, num_kv_heads), dtype=torch.float32, device=dev)
    block_t = 16 if _interpreted() else QUANTIZE_BLOCK_T
    grid = (triton.cdiv(max_seq_len, block_t), batch, num_kv_heads)
    if total_context:
        _quantize_context_kernel[grid](
            kv_layer, block_tables, seq_lens, context_start_loc, k8, ks, vt, vs, vmax,
            kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3), block_tables.stride(0),
            num_kv_heads * head_dim, vt.stride(0), vt.stride(1), num_kv_heads, FP8_KV_EPS,
            HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_T=block_t, num_warps=4)
    return k8, ks, vt, vs, vmax


def prefill_attention_fp8(q: torch.Tensor, kv_layer: torch.Tensor, query_start_loc: torch.Tensor,
                          seq_lens: torch.Tensor, block_tables: torch.Tensor, context_start_loc: torch.Tensor,
                          total_context: int, scale: float, max_query_len: int, max_seq_len: int) -> torch.Tensor:
    """GPU twin of kernels.reference.prefill_attention_fp8 (same arguments plus the context offsets:
    context_start_loc [B+1] int32 = cumulative seq_lens, total_context = its last value, a host int)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = kv_layer.shape[3]
    if q.stride(-1) != 1 or kv_layer.stride(-1) != 1:
        raise ValueError("q and kv_layer need a contiguous head_dim")
    if num_q_heads % num_kv_heads or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"need Hq % Hkv == 0 and a power-of-two head_dim >= 16, got {q.shape} vs {kv_layer.shape}")
    out = torch.empty_like(q)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    k8, ks, vt, vs, vmax = quantize_context(kv_layer, seq_lens, block_tables, context_start_loc, total_context,
                                            max_seq_len)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1) if _interpreted() else PREFILL_FP8_CONFIG
    grid = (triton.cdiv(max_query_len, cfg["BLOCK_M"]), batch, num_q_heads)
    _prefill_fp8_kernel[grid](
        q, query_start_loc, seq_lens, context_start_loc, k8, ks, vt, vs, vmax, out,
        q.stride(0), q.stride(1), k8.stride(0), vt.stride(0), vt.stride(1), out.stride(0), out.stride(1),
        num_kv_heads, scale * LOG2E, FP8_KV_EPS, GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim,
        INTERPRETED=_interpreted(), **cfg)
    return out
