"""Prefill attention with both matmuls on the FP8 tensor cores: the fp8 prefill pool's attention.

At long prompts attention is the part of an fp8 prefill that the FP8 GEMMs leave in BF16: at 8192 tokens
of Llama-3-8B it is ~13% of the FLOPs but ~28% of the fp8 forward's time (docs/bench/prefill.md). The
numerics are kernels.reference.prefill_attention_fp8's; the KV cache keeps its own dtype (it is what the
decode side receives), only the operands of the two matmuls are quantized.

Three kernels per layer, the first two cheap passes over the context (~8% of the attention at 8192 tokens):
  _tile_amax_kernel  per-channel maxima of |K| and |V| over each tile of tokens, gathered from the paged
      cache;
  _quantize_context_kernel  reduces those to per (sequence, kv head) channel scales and writes e4m3 codes,
      contiguous per sequence: K as rows [ctx, Hkv, D], V transposed to [Hkv, D, ctx]. Hopper's FP8 MMA
      reads both operands from shared memory K-major, and for P @ V the reduction runs over tokens.
  _prefill_fp8_kernel  flash attention over those buffers. Channel scales keep the inner loop as short
      as the BF16 kernel's: K's ride on q (quantized per token-head on load), V's are applied once to
      the output. P is scaled by 2^8 through the exponent (free) so it uses e4m3's range. The P @ V
      partial sums go into the fp32 accumulator once per tile (max_num_imprecise_acc): Hopper's FP8 MMA
      accumulates with fewer bits than fp32 across tiles. Within a tile it still does, for QK^T too: on
      an H100 the bf16 output is 3.9e-3 from the reference (P's e4m3 rounding moves with the scores), so
      fp32 outputs run the same e4m3 operands on the bf16 tensor cores instead (EXACT_SUMS).
Speed on an H100 (docs/bench/prefill.md): 542 TFLOP/s at 8192 tokens against 387 for the bf16 kernel; at 512
tokens its three launches cost more host time than it saves, hence engine.fp8_attention_min_tokens.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pdserve.kernels.fused import launch_options, wait_for_predecessor
from pdserve.kernels.reference import CONTEXT_ALIGN, FP8_KV_EPS, LOG2E
from pdserve.kernels.triton_fp8 import divisor, e4m3_rne, fp8_codes


@triton.jit
def _context_tile(kv_ptr, bt_ptr, seq, kv_head, t_block, seq_len, which, s_blk, s_kv, s_pos, s_head, s_bt,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr):
    """One tile [BLOCK_T, D] of a sequence's K (which=0) or V (which=1) from the paged cache, fp32; zeros
    past the sequence."""
    offs = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = offs < seq_len
    page = tl.load(bt_ptr + seq * s_bt + offs // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    row = page * s_blk + which * s_kv + (offs % BLOCK_SIZE) * s_pos + kv_head * s_head
    x = tl.load(kv_ptr + row[:, None] + tl.arange(0, HEAD_DIM)[None, :], mask=mask[:, None], other=0.0)
    return x.to(tl.float32), offs


@triton.jit
def _quant_rows(x, eps):
    """Per-row e4m3 codes and scales of an fp32 tile [R, D] (s = max(amax, eps) / 448)."""
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), eps), 448.0)
    sk, r, k = divisor(s[:, None])
    return fp8_codes(x, sk, r, k), s


@triton.jit
def _tile_amax_kernel(kv_ptr, bt_ptr, seq_lens_ptr, part_ptr, s_blk, s_kv, s_pos, s_head, s_bt, num_kv_heads,
                      num_tiles, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                      PDL: tl.constexpr):
    """Per-channel maxima of |K| and |V| over one tile of tokens: part[seq, kv_head, tile, which, :]."""
    wait_for_predecessor(PDL)
    t_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    if t_block * BLOCK_T >= seq_len:
        return
    base = ((seq * num_kv_heads + kv_head) * num_tiles + t_block) * 2 * HEAD_DIM
    for which in tl.static_range(2):
        x, offs = _context_tile(kv_ptr, bt_ptr, seq, kv_head, t_block, seq_len, which, s_blk, s_kv, s_pos, s_head,
                                s_bt, HEAD_DIM, BLOCK_SIZE, BLOCK_T)
        tl.store(part_ptr + base + which * HEAD_DIM + tl.arange(0, HEAD_DIM), tl.max(tl.abs(x), axis=0))


@triton.jit
def _channel_scale_from_parts(part_ptr, which, seq, kv_head, seq_len, num_kv_heads, num_tiles, eps,
                              HEAD_DIM: tl.constexpr, AMAX_T: tl.constexpr, TILES: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    amax = tl.zeros([HEAD_DIM], tl.float32)
    used = tl.cdiv(seq_len, AMAX_T)
    for t0 in range(0, used, TILES):
        tiles = t0 + tl.arange(0, TILES)
        rows = (seq * num_kv_heads + kv_head) * num_tiles + tiles
        part = tl.load(part_ptr + (rows * 2 + which)[:, None] * HEAD_DIM + dims[None, :], mask=(tiles < used)[:, None],
                       other=0.0)
        amax = tl.maximum(amax, tl.max(part, axis=0))
    return tl.math.div_rn(tl.maximum(amax, eps), 448.0)


@triton.jit
def _quantize_context_kernel(kv_ptr, bt_ptr, seq_lens_ptr, ctx_start_ptr, part_ptr, scale_ptr, k8_ptr, vt_ptr,
                             s_blk, s_kv, s_pos, s_head, s_bt, s_k8t, s_vth, s_vtd, batch, num_kv_heads, num_tiles,
                             eps, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                             AMAX_T: tl.constexpr, TILES: tl.constexpr, ALIGN: tl.constexpr, PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    t_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    aligned_len = tl.cdiv(seq_len, ALIGN) * ALIGN  # the gap up to it gets zero codes (see quantize_context)
    if t_block * BLOCK_T >= aligned_len:
        return
    ctx_start = tl.load(ctx_start_ptr + seq).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    for which in tl.static_range(2):
        scale = _channel_scale_from_parts(part_ptr, which, seq, kv_head, seq_len, num_kv_heads, num_tiles, eps,
                                          HEAD_DIM, AMAX_T, TILES)
        if t_block == 0:
            tl.store(scale_ptr + ((which * batch + seq) * num_kv_heads + kv_head) * HEAD_DIM + dims, scale)
        x, offs = _context_tile(kv_ptr, bt_ptr, seq, kv_head, t_block, seq_len, which, s_blk, s_kv, s_pos, s_head,
                                s_bt, HEAD_DIM, BLOCK_SIZE, BLOCK_T)
        sk, r, k = divisor(scale[None, :])
        codes = fp8_codes(x, sk, r, k)
        dst = ctx_start + offs
        keep = (offs < aligned_len)[:, None]
        if which == 0:
            tl.store(k8_ptr + dst[:, None] * s_k8t + kv_head * HEAD_DIM + dims[None, :], codes, mask=keep)
        else:
            tl.store(vt_ptr + kv_head * s_vth + dims[None, :] * s_vtd + dst[:, None], codes, mask=keep)


@triton.jit
def _fp8_tiles(acc, m, l, q8, q_scale, k8_ptr, vt_ptr, k_desc, v_desc, ctx_start, kv_head, pos, seq_len,
               n_start, n_end, s_k8t, s_vth, s_vtd,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, TMA: tl.constexpr,
               ACC_EVERY: tl.constexpr, QK_ACC_EVERY: tl.constexpr, EXACT_SUMS: tl.constexpr,
               INTERPRETED: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        tok = ctx_start + offs
        n_mask = offs < seq_len
        if TMA:  # rows past the sequence are the next one's or TMA's zero fill; the mask below drops them
            k8 = k_desc.load([(ctx_start + n0).to(tl.int32), kv_head * HEAD_DIM])
        elif CAUSAL_MASK:
            k8 = tl.load(k8_ptr + tok[:, None] * s_k8t + kv_head * HEAD_DIM + dims[None, :], mask=n_mask[:, None],
                         other=0.0)
        else:
            k8 = tl.load(k8_ptr + tok[:, None] * s_k8t + kv_head * HEAD_DIM + dims[None, :])
        if EXACT_SUMS:
            d = tl.dot(q8, tl.trans(k8.to(tl.bfloat16)))
        elif QK_ACC_EVERY > 0:
            d = tl.dot(q8, tl.trans(k8), max_num_imprecise_acc=QK_ACC_EVERY)
        else:
            d = tl.dot(q8, tl.trans(k8))
        if CAUSAL_MASK:
            d = tl.where((offs[None, :] <= pos[:, None]) & n_mask[None, :], d, float("-inf"))
        # S = d * q_scale (log2 units; q_scale > 0, so the row maximum can be taken on d). An integer running
        # maximum: P only ever moves by exact powers of two, which e4m3 rounding commutes with (normal
        # range), so the kernel's P8 is the reference's
        m_new = tl.maximum(m, tl.ceil(tl.max(d, axis=1) * q_scale))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(d * q_scale[:, None] - (m_new - 8.0)[:, None])  # one FMA; P in (0, 256]
        l = l * alpha + tl.sum(p, axis=1)
        if INTERPRETED:  # the interpreter's cast truncates where rounding carries into the exponent
            p = e4m3_rne(p)
        p8 = p.to(tl.float8e4nv)  # on the GPU: cvt.rn.satfinite, round to nearest even
        if TMA:
            vt = v_desc.load([kv_head * HEAD_DIM, (ctx_start + n0).to(tl.int32)])
        elif CAUSAL_MASK:
            vt = tl.load(vt_ptr + kv_head * s_vth + dims[:, None] * s_vtd + tok[None, :], mask=n_mask[None, :],
                         other=0.0)
        else:
            vt = tl.load(vt_ptr + kv_head * s_vth + dims[:, None] * s_vtd + tok[None, :])
        if EXACT_SUMS:
            acc = tl.dot(p8.to(tl.bfloat16), tl.trans(vt.to(tl.bfloat16)), acc * alpha[:, None])
        elif ACC_EVERY > 0:
            acc = tl.dot(p8, tl.trans(vt), acc * alpha[:, None], max_num_imprecise_acc=ACC_EVERY)
        else:
            acc = tl.dot(p8, tl.trans(vt), acc * alpha[:, None])
        m = m_new
    return acc, m, l


@triton.jit
def _prefill_fp8_kernel(q_ptr, qsl_ptr, seq_lens_ptr, ctx_start_ptr, scale_ptr, k8_ptr, vt_ptr, k_desc, v_desc,
                        out_ptr, s_qt, s_qh, s_k8t, s_vth, s_vtd, s_ot, s_oh, batch, num_kv_heads, qk_scale, eps,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        TMA: tl.constexpr, ACC_EVERY: tl.constexpr, QK_ACC_EVERY: tl.constexpr,
                        EXACT_SUMS: tl.constexpr, INTERPRETED: tl.constexpr, PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    # the longest-running query tiles (last, most keys under the causal mask) start first; not in Triton's
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
    # K's channel scales ride on q: q.k = (q * c_K).(k / c_K)
    scale_row = (seq * num_kv_heads + kv_head) * HEAD_DIM + dims
    q = q.to(tl.float32) * tl.load(scale_ptr + scale_row)[None, :]
    q8, s_q = _quant_rows(q, eps)
    if EXACT_SUMS:
        q8 = q8.to(tl.bfloat16)
    q_scale = s_q * qk_scale  # the softmax scale and log2(e) ride on the per-row scale

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first_pos = seq_len - q_len + m_block * BLOCK_M
    unmasked_end = (first_pos // BLOCK_N) * BLOCK_N  # keys every row of the tile sees
    kv_end = tl.minimum(first_pos + BLOCK_M, seq_len)
    acc, m, l = _fp8_tiles(acc, m, l, q8, q_scale, k8_ptr, vt_ptr, k_desc, v_desc, ctx_start, kv_head, pos, seq_len,
                           0, unmasked_end, s_k8t, s_vth, s_vtd, HEAD_DIM, BLOCK_N, False, TMA, ACC_EVERY,
                           QK_ACC_EVERY, EXACT_SUMS, INTERPRETED)
    acc, m, l = _fp8_tiles(acc, m, l, q8, q_scale, k8_ptr, vt_ptr, k_desc, v_desc, ctx_start, kv_head, pos, seq_len,
                           unmasked_end, kv_end, s_k8t, s_vth, s_vtd, HEAD_DIM, BLOCK_N, True, TMA, ACC_EVERY,
                           QK_ACC_EVERY, EXACT_SUMS, INTERPRETED)
    c_v = tl.load(scale_ptr + batch * num_kv_heads * HEAD_DIM + scale_row)
    out = acc * c_v[None, :] / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(out_ptr + tokens[:, None] * s_ot + q_head * s_oh + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# benchmarks/bench_prefill.py measures candidates on the GPU; this is its choice on an H100 (128-row tiles on
# 8 warps need 255 registers a thread and were 20% slower; TMA loads 1.8-2.5x faster than pointer loads)
PREFILL_FP8_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, TMA=True, ACC_EVERY=128,
                          QK_ACC_EVERY=0)
# H100: 128/64 took 24 us at 2048 tokens and 81 at 8192; 256/128 took 39 and 140 (bigger tiles spill)
AMAX_BLOCK_T = 128
QUANTIZE_BLOCK_T = 64


def quantize_context(kv_layer: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                     context_start_loc: torch.Tensor, total_context: int, max_seq_len: int):
    """Every sequence's context K/V as e4m3 at per-channel scales (see the module docstring). Returns
    (k8 [total, Hkv, D], v8t [Hkv, D, total], scales [2, B, Hkv, D]: K's and V's channel scales)."""
    num_kv_heads, head_dim, block_size = kv_layer.shape[3], kv_layer.shape[4], kv_layer.shape[2]
    dev = kv_layer.device
    batch = seq_lens.shape[0]
    # total_context counts each sequence's context rounded up to ALIGN tokens (engine.attention.context_offsets:
    # TMA reads from 16-byte aligned offsets). Tiles that run past a sequence read the gap under the mask: it
    # gets zero codes, since a NaN code there would survive as 0 * NaN in P @ V.
    k8 = torch.empty((max(total_context, 16), num_kv_heads, head_dim), dtype=torch.float8_e4m3fn, device=dev)
    vt = torch.empty((num_kv_heads, head_dim, max(total_context, 16)), dtype=torch.float8_e4m3fn, device=dev)
    scales = torch.empty((2, batch, num_kv_heads, head_dim), dtype=torch.float32, device=dev)
    amax_t, quant_t = (16, 16) if _interpreted() else (AMAX_BLOCK_T, QUANTIZE_BLOCK_T)
    num_tiles = triton.cdiv(max(max_seq_len, 1), amax_t)
    parts = torch.empty((batch, num_kv_heads, num_tiles, 2, head_dim), dtype=torch.float32, device=dev)
    strides = (kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3), block_tables.stride(0))
    if total_context:
        _tile_amax_kernel[(num_tiles, batch, num_kv_heads)](
            kv_layer, block_tables, seq_lens, parts, *strides, num_kv_heads, num_tiles, HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size, BLOCK_T=amax_t, num_warps=4, **launch_options(dev))
        _quantize_context_kernel[(triton.cdiv(max_seq_len, quant_t), batch, num_kv_heads)](
            kv_layer, block_tables, seq_lens, context_start_loc, parts, scales, k8, vt, *strides,
            num_kv_heads * head_dim, vt.stride(0), vt.stride(1), batch, num_kv_heads, num_tiles, FP8_KV_EPS,
            HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_T=quant_t, AMAX_T=amax_t,
            TILES=min(64, triton.next_power_of_2(num_tiles)), ALIGN=CONTEXT_ALIGN, num_warps=4, **launch_options(dev))
    return k8, vt, scales


def prefill_attention_fp8(q: torch.Tensor, kv_layer: torch.Tensor, query_start_loc: torch.Tensor,
                          seq_lens: torch.Tensor, block_tables: torch.Tensor, context_start_loc: torch.Tensor,
                          total_context: int, scale: float, max_query_len: int, max_seq_len: int, *,
                          config: dict | None = None) -> torch.Tensor:
    """GPU twin of kernels.reference.prefill_attention_fp8 (its arguments plus the context offsets:
    context_start_loc [B] int32 = exclusive cumulative seq_lens, total_context = sum of seq_lens, a host
    int). config: tile and variant (PREFILL_FP8_CONFIG's keys), for benchmarks."""
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
    k8, vt, scales = quantize_context(kv_layer, seq_lens, block_tables, context_start_loc, total_context, max_seq_len)
    if _interpreted():
        # the interpreter's bf16 dot is not faithful (it multiplies bit patterns); its fp8 dot is exact
        cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, TMA=False, ACC_EVERY=0, QK_ACC_EVERY=0,
                   EXACT_SUMS=False)
    else:
        cfg = dict(PREFILL_FP8_CONFIG)
        # An fp32 output is held to 1e-3 of the reference. Hopper's fp8 MMA sums with fewer bits than fp32
        # (even 32 products at a time), and the scores' error moves P's e4m3 rounding: 2-4e-3 on random
        # inputs. e4m3 values are exact in bf16, whose MMA sums in fp32: the same operands at bf16's rate.
        cfg["EXACT_SUMS"] = q.dtype == torch.float32
    cfg.update(config or {})
    if cfg["TMA"]:
        from triton.tools.tensor_descriptor import TensorDescriptor
        k_desc = TensorDescriptor.from_tensor(k8.view(k8.shape[0], -1), [cfg["BLOCK_N"], head_dim])
        v_desc = TensorDescriptor.from_tensor(vt.view(-1, vt.shape[2]), [head_dim, cfg["BLOCK_N"]])
    else:
        k_desc = v_desc = k8  # never read
    grid = (triton.cdiv(max_query_len, cfg["BLOCK_M"]), batch, num_q_heads)
    _prefill_fp8_kernel[grid](
        q, query_start_loc, seq_lens, context_start_loc, scales, k8, vt, k_desc, v_desc, out,
        q.stride(0), q.stride(1), k8.stride(0), vt.stride(0), vt.stride(1), out.stride(0), out.stride(1),
        batch, num_kv_heads, scale * LOG2E, FP8_KV_EPS, GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim,
        INTERPRETED=_interpreted(), **cfg, **launch_options(q.device))
    return out
