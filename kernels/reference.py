"""Torch references of the GPU kernels: the CPU path of the engine and the oracle of every kernel test.

Each function has the same signature as its Triton twin in kernels/attention.py or kernels/fused.py.
They favour obvious correctness over speed: attention loops over sequences and materialises the
dequantised, head-expanded K/V of each one.

KV layout (one layer's view of the worker's cache):
    kv_layer: [num_blocks, 2, block_size, num_kv_heads, head_dim], index 0 of dim 1 is K, 1 is V.
    slot of position p of a sequence = block_table[p // block_size] * block_size + p % block_size.
    A negative slot means "no token here" (batch padding) and is skipped by every writer.
FP8 KV: float8_e4m3fn codes in kv_layer plus kv_scales [num_blocks, 2, block_size, num_kv_heads] fp32,
    per token and head s = max(amax, eps) / 448, value = code * s.
"""
from __future__ import annotations

from typing import Optional

import torch

FP8_MAX = 448.0
LOG2E = 1.4426950408889634
# the fp8 prefill attention's flat copy of the contexts starts each sequence at a multiple of this many
# tokens (TMA reads from 16-byte aligned offsets); engine.attention.context_offsets lays it out
CONTEXT_ALIGN = 16
FP8_KV_EPS = 1e-8  # keeps an all-zero head from dividing by zero; its codes are then all zero


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V ([T, Hkv, D]) at their slots of the paged cache, in place."""
    blocks, offsets, keep = _slots(kv_layer, slot_mapping)
    kv_layer[:, 0][blocks, offsets] = k[keep].to(kv_layer.dtype)
    kv_layer[:, 1][blocks, offsets] = v[keep].to(kv_layer.dtype)


def quantize_fp8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> (e4m3 codes [..., D], fp32 scales [...]): s = max(amax, eps) / 448 over the last dim."""
    xf = x.float()
    # a tensor divisor: CUDA turns division by a Python scalar into a reciprocal multiply, which would make
    # the scales' bytes depend on the device
    fp8_max = torch.tensor(FP8_MAX, dtype=torch.float32, device=x.device)
    scale = xf.abs().amax(dim=-1).clamp_min(FP8_KV_EPS) / fp8_max
    # clamp before the cast: an out-of-range torch cast to e4m3 gives NaN
    codes = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def write_kv_fp8(kv_layer: torch.Tensor, kv_scales: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Quantize the new tokens' K/V per token and head and store codes and scales, in place."""
    blocks, offsets, keep = _slots(kv_layer, slot_mapping)
    for index, x in ((0, k), (1, v)):
        codes, scale = quantize_fp8_per_head(x[keep])
        kv_layer[:, index][blocks, offsets] = codes
        kv_scales[:, index][blocks, offsets] = scale


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                    max_query_len: int, max_seq_len: int) -> torch.Tensor:
    """Causal attention of each sequence's query tokens (its last q_len positions) over its paged K/V."""
    return _attention(q, kv_layer, None, query_start_loc, seq_lens, block_tables, scale)


def paged_attention_fp8(q: torch.Tensor, kv_layer: torch.Tensor, kv_scales: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        scale: float, max_query_len: int, max_seq_len: int) -> torch.Tensor:
    """paged_attention over an FP8 cache: K/V dequantized with their per-token-per-head scales."""
    return _attention(q, kv_layer, kv_scales, query_start_loc, seq_lens, block_tables, scale)


def prefill_attention_fp8(q: torch.Tensor, kv_layer: torch.Tensor, query_start_loc: torch.Tensor,
                          seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """paged_attention with both matmuls on e4m3 operands: the fp8 prefill pool's attention (the cache
    keeps its own dtype; only the matmuls' operands are quantized). Per sequence and kv head:
      c_K, c_V = max(amax over the context, eps) / 448 per channel (head_dim element) of K and V;
      k8 = e4m3(K / c_K), v8 = e4m3(V / c_V);
      q8, s_q = per token-head e4m3 of q * c_K (s = max(amax, eps) / 448): K's channel scales ride on q,
        q.k = (q * c_K).(k / c_K), which keeps the kernel's inner loop free of per-key scales;
      S = (q8 k8^T) * s_q * scale * log2(e) in fp32 (log2 units), causal;
      m = ceil(rowmax S): an integer, like the kernel's running maximum, so the kernel's P differs from
        this one by exact powers of two only;
      P = 2^(S - m + 8): up to 256, inside e4m3's range (probabilities below 2^-9 would flush to zero
        without the 2^8); l = rowsum(P) in fp32; P8 = e4m3(P);
      O = (P8 v8) * c_V / l.
    """
    out = torch.empty_like(q)
    group = q.shape[1] // kv_layer.shape[3]
    for q_start, q_end, seq_len, blocks in _sequences(query_start_loc, seq_lens, block_tables, kv_layer.shape[2]):
        q_len = q_end - q_start
        k8, c_k = quantize_fp8_per_channel(_gather(kv_layer, None, blocks, 0, seq_len))  # [ctx, Hkv, D], [Hkv, D]
        v8, c_v = quantize_fp8_per_channel(_gather(kv_layer, None, blocks, 1, seq_len))
        k8, v8 = k8.float().repeat_interleave(group, dim=1), v8.float().repeat_interleave(group, dim=1)
        c_k, c_v = c_k.repeat_interleave(group, dim=0), c_v.repeat_interleave(group, dim=0)  # [Hq, D]
        q8, s_q = quantize_fp8_per_head(q[q_start:q_end].float() * c_k)  # [n, Hq, D], [n, Hq]
        q_scale = s_q.T * torch.tensor(scale * LOG2E, dtype=torch.float32, device=q.device)  # [Hq, n]
        scores = torch.einsum("qhd,khd->hqk", q8.float(), k8) * q_scale[:, :, None]
        query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        p = torch.exp2(scores - (scores.amax(dim=-1, keepdim=True).ceil() - 8))  # [Hq, n, ctx]
        p8 = p.to(torch.float8_e4m3fn).float()  # p <= 256: no clamp needed
        o = torch.einsum("hqk,khd->qhd", p8, v8) * c_v[None] / p.sum(dim=-1).T[:, :, None]
        out[q_start:q_end] = o.to(q.dtype)
    return out


def quantize_fp8_per_channel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H, D] -> (e4m3 codes [T, H, D], fp32 scales [H, D]): s = max(amax over T, eps) / 448."""
    xf = x.float()
    fp8_max = torch.tensor(FP8_MAX, dtype=torch.float32, device=x.device)
    scale = xf.abs().amax(dim=0).clamp_min(FP8_KV_EPS) / fp8_max
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """HF Llama RMSNorm; with a residual, first adds it (rounded to x.dtype, as HF does) and returns both."""
    new_residual = None
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        new_residual = x
    h = x.float()
    out = (weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)).to(x.dtype)
    return out if residual is None else (out, new_residual)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """NeoX / HF rotate_half RoPE of q [T, Hq, D] and k [T, Hkv, D] in place; returns (q, k)."""
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions.long()].float()
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for x in (q, k):
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x.copy_(rotated.to(x.dtype))
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> silu(x[:, :I]) * x[:, I:], computed in fp32 and rounded once."""
    inter = x.shape[-1] // 2
    gate, up = x[..., :inter].float(), x[..., inter:].float()
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor):
    """rotary(q, k) then write_kv(kv_layer, k, v): one pass for the decode step's new tokens."""
    rotary(q, k, positions, cos_sin_cache)
    write_kv(kv_layer, k, v, slot_mapping)
    return q, k


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T."""
    return x @ weight.T


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu_and_mul(x [M, 2K]) @ weight [N, K]^T: the MLP's down projection with its activation."""
    return silu_and_mul(x) @ weight.T


def rope_cos_sin_cache(max_positions: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos of each frequency in the first half, sin in the second."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(max_positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float()


def _slots(kv_layer: torch.Tensor, slot_mapping: torch.Tensor):
    block_size = kv_layer.shape[2]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    return slots // block_size, slots % block_size, keep


def _gather(kv_layer, kv_scales, blocks, index, seq_len):
    heads, dim = kv_layer.shape[3], kv_layer.shape[4]
    x = kv_layer[blocks, index].reshape(-1, heads, dim)[:seq_len].float()
    if kv_scales is not None:
        x = x * kv_scales[blocks, index].reshape(-1, heads)[:seq_len, :, None]
    return x


def _sequences(query_start_loc, seq_lens, block_tables, block_size):
    """(q_start, q_end, seq_len, its blocks) of every sequence with query tokens this step."""
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        if starts[i + 1] > starts[i]:
            yield starts[i], starts[i + 1], seq_len, block_tables[i, : -(-seq_len // block_size)].long()


def _attention(q, kv_layer, kv_scales, query_start_loc, seq_lens, block_tables, scale):
    out = torch.empty_like(q)
    group = q.shape[1] // kv_layer.shape[3]
    for q_start, q_end, seq_len, blocks in _sequences(query_start_loc, seq_lens, block_tables, kv_layer.shape[2]):
        q_len = q_end - q_start
        k = _gather(kv_layer, kv_scales, blocks, 0, seq_len).repeat_interleave(group, dim=1)
        v = _gather(kv_layer, kv_scales, blocks, 1, seq_len).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q_start:q_end].float(), k) * scale
        query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
