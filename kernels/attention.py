"""Triton paged attention: decode (one query token per sequence, optionally split over the context,
flash-decoding style) and varlen causal prefill over the paged cache (prefix blocks included). Both read
BF16/FP32 K/V, or FP8 e4m3 codes with per-token-per-head scales. The torch twins in kernels/reference.py
are the contract; the layout is described there.

Decode packs the `group` query heads that share a KV head into the rows of one tile, so each K/V byte
is read from memory once per step: decode is bandwidth-bound and that is the whole game. When the
batch has too few (sequence, kv head) pairs to fill the GPU, the context is split across programs and a
second small kernel merges the partial softmaxes by their log-sum-exp.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from pdserve.kernels.fused import launch_options, wait_for_predecessor

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(q_ptr, kv_ptr, scale_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                   counter_ptr, s_qt, s_qh, s_blk, s_kv, s_pos, s_head, s_sblk, s_skv, s_spos, s_bt, s_ot, s_oh,
                   qk_scale, num_splits,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FP8: tl.constexpr,
                   PRECISION: tl.constexpr, MERGE: tl.constexpr, PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_end = tl.load(qsl_ptr + seq + 1)
    if q_end == tl.load(qsl_ptr + seq):  # no query token this step: nothing to write
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    token = (q_end - 1).to(tl.int64)  # the sequence's one query token
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    q_heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    q = tl.load(q_ptr + token * s_qt + q_heads[:, None] * s_qh + dims[None, :], mask=row_mask[:, None], other=0.0)
    compute_dtype = q_ptr.dtype.element_ty

    # each sequence splits its own context evenly (in whole tiles), so one split count serves every
    # context length: a CUDA graph captured for a batch bucket stays balanced as sequences grow
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs < end
        page = tl.load(bt_ptr + seq * s_bt + offs // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        row = page * s_blk + (offs % BLOCK_SIZE) * s_pos + kv_head * s_head
        k = tl.load(kv_ptr + row[:, None] + dims[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(kv_ptr + s_kv + row[:, None] + dims[None, :], mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(compute_dtype)), input_precision=PRECISION)
        if FP8:
            scale_row = page * s_sblk + (offs % BLOCK_SIZE) * s_spos + kv_head
            k_scale = tl.load(scale_ptr + scale_row, mask=n_mask, other=0.0)
            v_scale = tl.load(scale_ptr + s_skv + scale_row, mask=n_mask, other=0.0)
            s = s * k_scale[None, :]
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if FP8:
            p = p * v_scale[None, :]  # fold V's per-token scale into the weights
        acc = acc * alpha[:, None] + tl.dot(p.to(compute_dtype), v.to(compute_dtype), input_precision=PRECISION)
        m = m_new

    safe_l = tl.where(l == 0.0, 1.0, l)  # empty split, or a padded sequence of length 0
    if SPLIT:
        num_q_heads = tl.num_programs(1) * GROUP
        part = (seq * num_q_heads + q_heads) * num_splits + split
        lse = tl.where(l == 0.0, float("-inf"), m + tl.log2(safe_l))
        tl.store(part_lse_ptr + part, lse, mask=row_mask)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc / safe_l[:, None],
                 mask=row_mask[:, None])
        if MERGE:
            # the last split of this (sequence, kv head) to finish merges them all: no second launch
            tl.debug_barrier()  # every thread's partial stores precede the release below
            counter = counter_ptr + seq * tl.num_programs(1) + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
                _merge_partials(part_lse_ptr, part_out_ptr, out_ptr, (seq * num_q_heads + q_heads) * num_splits,
                                token * s_ot + q_heads * s_oh, row_mask, num_splits, GROUP_PAD, HEAD_DIM)
                tl.atomic_xchg(counter, 0)  # ready for the next launch (graph replays reuse the counters)
    else:
        out = (acc / safe_l[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + token * s_ot + q_heads[:, None] * s_oh + dims[None, :], out, mask=row_mask[:, None])


@triton.jit
def _merge_partials(part_lse_ptr, part_out_ptr, out_ptr, part_base, out_offset, row_mask, num_splits,
                    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Combine the normalised partial outputs of num_splits context pieces by their log2-sum-exp."""
    dims = tl.arange(0, HEAD_DIM)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for split in range(0, num_splits):
        # .cg: read through to L2, where the other programs' partials are
        lse = tl.load(part_lse_ptr + part_base + split, mask=row_mask, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(part_out_ptr + (part_base + split)[:, None] * HEAD_DIM + dims[None, :],
                       mask=row_mask[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all empty so far: keep the weights at zero
        old_w, new_w = tl.exp2(m - ref), tl.exp2(lse - ref)
        acc = acc * old_w[:, None] + part * new_w[:, None]
        l = l * old_w + new_w
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(out_ptr + out_offset[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, qsl_ptr, out_ptr, s_ot, s_oh, num_splits,
                         HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    seq = tl.program_id(0)
    q_head = tl.program_id(1)
    q_end = tl.load(qsl_ptr + seq + 1)
    if q_end == tl.load(qsl_ptr + seq):
        return
    token = (q_end - 1).to(tl.int64)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    part = (seq * tl.num_programs(1) + q_head) * num_splits + splits
    lse = tl.load(part_lse_ptr + part, mask=splits < num_splits, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2(lse - top)
    partial = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=(splits < num_splits)[:, None],
                      other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(partial * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * s_ot + q_head * s_oh + dims, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill_tiles(acc, m, l, q, kv_ptr, scale_ptr, bt_row_ptr, kv_head, pos, seq_len, n_start, n_end, qk_scale,
                   s_blk, s_kv, s_pos, s_head, s_sblk, s_skv, s_spos,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                   FP8: tl.constexpr, PRECISION: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    compute_dtype = q.dtype
    for n0 in range(n_start, n_end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs < seq_len
        page = tl.load(bt_row_ptr + offs // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        row = page * s_blk + (offs % BLOCK_SIZE) * s_pos + kv_head * s_head
        k = tl.load(kv_ptr + row[:, None] + dims[None, :], mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(compute_dtype)), input_precision=PRECISION)
        if FP8:
            scale_row = page * s_sblk + (offs % BLOCK_SIZE) * s_spos + kv_head
            s = s * tl.load(scale_ptr + scale_row, mask=n_mask, other=0.0)[None, :]
        s = s * qk_scale
        if CAUSAL_MASK:
            visible = (offs[None, :] <= pos[:, None]) & n_mask[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(kv_ptr + s_kv + row[:, None] + dims[None, :], mask=n_mask[:, None], other=0.0)
        if FP8:
            p = p * tl.load(scale_ptr + s_skv + scale_row, mask=n_mask, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(compute_dtype), v.to(compute_dtype), input_precision=PRECISION)
        m = m_new
    return acc, m, l


@triton.jit
def _prefill_kernel(q_ptr, kv_ptr, scale_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, out_ptr,
                    s_qt, s_qh, s_blk, s_kv, s_pos, s_head, s_sblk, s_skv, s_spos, s_bt, s_ot, s_oh, qk_scale,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, FP8: tl.constexpr, PRECISION: tl.constexpr):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    q_head = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_head = q_head // GROUP
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    tokens = (q_start + offs_m).to(tl.int64)
    pos = seq_len - q_len + offs_m  # the queries are the last q_len positions of the context
    q = tl.load(q_ptr + tokens[:, None] * s_qt + q_head * s_qh + dims[None, :], mask=m_mask[:, None], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first_pos = seq_len - q_len + m_block * BLOCK_M
    # keys before the tile's first query are visible to all its rows: no mask on those tiles
    unmasked_end = (first_pos // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(first_pos + BLOCK_M, seq_len)
    bt_row_ptr = bt_ptr + seq * s_bt
    acc, m, l = _prefill_tiles(acc, m, l, q, kv_ptr, scale_ptr, bt_row_ptr, kv_head, pos, seq_len, 0, unmasked_end,
                               qk_scale, s_blk, s_kv, s_pos, s_head, s_sblk, s_skv, s_spos,
                               HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, FP8, PRECISION)
    acc, m, l = _prefill_tiles(acc, m, l, q, kv_ptr, scale_ptr, bt_row_ptr, kv_head, pos, seq_len, unmasked_end,
                               kv_end, qk_scale, s_blk, s_kv, s_pos, s_head, s_sblk, s_skv, s_spos,
                               HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, FP8, PRECISION)
    out = (acc / tl.where(l == 0.0, 1.0, l)[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tokens[:, None] * s_ot + q_head * s_oh + dims[None, :], out, mask=m_mask[:, None])


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, max_query_len: int, max_seq_len: int, *,
                    num_splits: Optional[int] = None) -> torch.Tensor:
    """See kernels.reference.paged_attention. Decode (max_query_len == 1) splits each context in
    `num_splits` even pieces (when None: from the batch size and max_seq_len); under a CUDA graph
    capture with the largest max_seq_len the graph will serve: every sequence is split by its own
    length, so shorter contexts stay balanced."""
    return _attention(q, kv_layer, None, query_start_loc, seq_lens, block_tables, scale, max_query_len,
                      max_seq_len, num_splits)


def paged_attention_fp8(q: torch.Tensor, kv_layer: torch.Tensor, kv_scales: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        scale: float, max_query_len: int, max_seq_len: int, *,
                        num_splits: Optional[int] = None) -> torch.Tensor:
    """See kernels.reference.paged_attention_fp8: kv_layer holds e4m3 codes, kv_scales their scales."""
    if kv_scales.stride(3) != 1:
        raise ValueError("kv_scales must be contiguous over heads")
    return _attention(q, kv_layer, kv_scales, query_start_loc, seq_lens, block_tables, scale, max_query_len,
                      max_seq_len, num_splits)


def _attention(q, kv_layer, kv_scales, query_start_loc, seq_lens, block_tables, scale, max_query_len, max_seq_len,
               num_splits):
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_layer.shape[3], kv_layer.shape[2]
    if q.stride(-1) != 1 or kv_layer.stride(-1) != 1:
        raise ValueError("q and kv_layer need a contiguous head_dim")
    if num_q_heads % num_kv_heads or head_dim & (head_dim - 1):
        raise ValueError(f"need Hq % Hkv == 0 and a power-of-two head_dim, got {q.shape} vs {kv_layer.shape}")
    out = torch.empty_like(q)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    fp8 = kv_scales is not None
    scales = kv_scales if fp8 else kv_layer  # never read when not FP8
    s_scale = kv_scales.stride()[:3] if fp8 else (0, 0, 0)
    group = num_q_heads // num_kv_heads
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    common = (kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3), *s_scale,
              block_tables.stride(0), out.stride(0), out.stride(1))
    qk_scale = scale * LOG2E
    if max_query_len == 1:
        cfg = _decode_config(head_dim)
        if num_splits is None:
            num_splits = _default_num_splits(batch * num_kv_heads, max_seq_len, cfg["BLOCK_N"], q.device)
        split = num_splits > 1
        counters = _split_counters(q.device, batch * num_kv_heads) if split and MERGE_IN_KERNEL else None
        if split:
            part_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        else:
            part_out = part_lse = out  # never touched
        _decode_kernel[(batch, num_kv_heads, num_splits)](
            q, kv_layer, scales, query_start_loc, seq_lens, block_tables, out, part_out, part_lse,
            counters if counters is not None else seq_lens,
            q.stride(0), q.stride(1), *common, qk_scale, num_splits,
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
            SPLIT=split, FP8=fp8, PRECISION=precision, MERGE=counters is not None, BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **launch_options(q.device))
        if split and counters is None:
            _merge_splits_kernel[(batch, num_q_heads)](
                part_out, part_lse, query_start_loc, out, out.stride(0), out.stride(1), num_splits,
                HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
                **launch_options(q.device))
        return out
    cfg = _prefill_config(head_dim, q.dtype)
    grid = (triton.cdiv(max_query_len, cfg["BLOCK_M"]), batch, num_q_heads)
    _prefill_kernel[grid](
        q, kv_layer, scales, query_start_loc, seq_lens, block_tables, out,
        q.stride(0), q.stride(1), *common, qk_scale,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, FP8=fp8, PRECISION=precision, **cfg)
    return out


# Optionally, split decode merges in the last split's program (a per-(sequence, kv head) arrival counter)
# instead of a second kernel; the counters live in one zeroed buffer per device, reset by whoever merges.
# Off by default: on an H100 (docs/bench/gpu.md, run 4) it made the 8B batch-1 step 0.38 ms SLOWER, the
# merging program walking the splits one dependent L2 round trip at a time (~10 us a layer) where the
# separate merge kernel costs ~2 us plus a launch.
MERGE_IN_KERNEL = False
_COUNTERS: dict = {}
_COUNTER_SLOTS = 1 << 16


def _split_counters(device: torch.device, needed: int) -> Optional[torch.Tensor]:
    """The device's arrival counters, or None (merge kernel instead) when too few or when first needed
    inside a CUDA-graph capture, where a new buffer would belong to the graph's pool."""
    if needed > _COUNTER_SLOTS:
        return None
    key = (device.type, device.index)
    if key not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _COUNTERS[key] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _decode_config(head_dim: int) -> dict:
    if _interpreted():  # small tiles so CPU tests cross tile and page boundaries at small shapes
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


# head_dim -> tile config; benchmarks/bench_gpu.py measures candidates on the GPU and fills this
PREFILL_CONFIGS: dict[int, dict] = {}


def _prefill_config(head_dim: int, dtype: torch.dtype) -> dict:
    if _interpreted():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if head_dim in PREFILL_CONFIGS:
        return PREFILL_CONFIGS[head_dim]
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if dtype.itemsize <= 2:
        # H100, head_dim 128 (benchmarks/bench_prefill.py, docs/bench/prefill.md): 379 TFLOP/s at 8192
        # tokens and 240 at 2048 against 333 and 216 with BLOCK_N=64
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)  # fp32 tiles twice the bytes


def _default_num_splits(programs: int, max_seq_len: int, block_n: int, device: torch.device) -> int:
    """Enough splits for about two programs per SM, never a split shorter than one tile."""
    target = 2 * _num_sms(device)
    return max(1, min(triton.cdiv(max(max_seq_len, 1), block_n), triton.cdiv(target, programs), 64))


@functools.lru_cache(maxsize=None)
def _num_sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter on CPU: a pretend small GPU, so tests see split and unsplit decode
    return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())
