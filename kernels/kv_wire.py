"""The FP8 KV wire on the GPU: pack (cache blocks by id -> staging rows) and unpack (wire rows -> cache
blocks by id), each one kernel. The torch reference and the wire layout are kv_transfer/fp8_wire.py's
(pack_fp8_blocks, unpack_fp8_blocks); these kernels write the same bytes.

A block [L, 2, bs, H, D] is L*2*bs*H rows of D elements, and the wire block's codes are those rows in
the same order, so cache element (row, d) and code byte row*D + d share an index; row's scale is at
code_bytes + 4*row. Row r holds token (r // H) % bs of its block.

Exactness against the reference:
  - bf16 is widened by its bits (the interpreter's cast flushes bf16 subnormals); amax is exact;
  - s = div_rn(max(amax, eps), 448), as the reference's division by a tensor;
  - x / s is correctly rounded (triton_fp8.quotient_rn: exact wherever the code can be nonzero);
  - e4m3 round to nearest even of the clamped magnitude, the sign bit copied from x: torch's cast keeps
    the sign of a quotient that rounds to zero (-0.0 and tiny negatives become code 0x80);
  - dequantized: code * s in fp32, rounded once to the cache dtype (round to nearest even).
Scales move as four bytes each, so a staging row needs no alignment beyond a byte.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pdserve.kernels.triton_fp8 import HW_E4M3, divisor, e4m3_rne, quotient_rn

E4M3_MAX = tl.constexpr(448.0)
_PAD = 16  # the code bytes of a wire block are zero-padded to a multiple of this (fp8_wire._PAD)


@triton.jit
def _widen(raw, BF16_BITS: tl.constexpr):
    if BF16_BITS:  # raw holds bf16 bit patterns as int16; a bf16 is the high half of its fp32
        return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float32)


@triton.jit
def _codes(x, s):
    """uint8 e4m3 codes of fp32 x [R, D] at per-row scales s [R] (s > 0)."""
    sk, r, k = divisor(s)
    q = quotient_rn(x, sk[:, None], r[:, None], k[:, None])
    a = tl.minimum(tl.abs(q), E4M3_MAX)  # x / s may round a hair past 448; clamp before the cast
    if HW_E4M3:
        m = a.to(tl.float8e4nv)  # cvt.rn.satfinite: round to nearest even
    else:
        m = e4m3_rne(a).to(tl.float8e4nv)  # the interpreter's cast does not round to even
    sign = ((x.to(tl.uint32, bitcast=True) >> 31) << 7).to(tl.uint8)
    return m.to(tl.uint8, bitcast=True) | sign


@triton.jit
def _bf16_rne_bits(y):
    """bf16 bits (int16) of fp32 y, round to nearest even (for the interpreter, whose cast truncates)."""
    bits = y.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _pack_kernel(cache_ptr, ids_ptr, out_ptr, num_tokens, block_stride, out_stride, eps,
                 ROWS: tl.constexpr, RAW_CODE_BYTES: tl.constexpr, CODE_BYTES: tl.constexpr,
                 HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PAD: tl.constexpr, BF16_BITS: tl.constexpr):
    i = tl.program_id(0)
    tile = tl.program_id(1)
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < ROWS
    # slots past num_tokens may hold anything (NaN bits): never read, sent as code 0 / scale 0
    valid = row_ok & (i * BLOCK_SIZE + (rows // HEADS) % BLOCK_SIZE < num_tokens)
    in_row = (cols < HEAD_DIM)[None, :]
    offs = rows[:, None] * HEAD_DIM + cols[None, :]
    src = cache_ptr + tl.load(ids_ptr + i).to(tl.int64) * block_stride
    x = _widen(tl.load(src + offs, mask=valid[:, None] & in_row, other=0), BF16_BITS)
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), eps), 448.0)
    codes = tl.where(valid[:, None], _codes(x, s), 0).to(tl.uint8)
    row_out = out_ptr + i.to(tl.int64) * out_stride
    tl.store(row_out + offs, codes, mask=row_ok[:, None] & in_row)
    bits = tl.where(valid, s, 0.0).to(tl.uint32, bitcast=True)
    for b in tl.static_range(4):  # little-endian, as the reference's .view(torch.uint8)
        tl.store(row_out + CODE_BYTES + rows * 4 + b, ((bits >> (8 * b)) & 0xFF).to(tl.uint8), mask=row_ok)
    if tile == 0:
        p = RAW_CODE_BYTES + tl.arange(0, PAD)
        tl.store(row_out + p, tl.zeros((PAD,), tl.uint8), mask=p < CODE_BYTES)


@triton.jit
def _unpack_kernel(wire_ptr, ids_ptr, cache_ptr, wire_stride, block_stride,
                   ROWS: tl.constexpr, CODE_BYTES: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BF16_BITS: tl.constexpr):
    i = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < ROWS
    mask = row_ok[:, None] & (cols < HEAD_DIM)[None, :]
    offs = rows[:, None] * HEAD_DIM + cols[None, :]
    row_in = wire_ptr + i.to(tl.int64) * wire_stride
    codes = tl.load(row_in + offs, mask=mask, other=0)
    bits = tl.zeros((BLOCK_R,), tl.uint32)
    for b in tl.static_range(4):
        byte = tl.load(row_in + CODE_BYTES + rows * 4 + b, mask=row_ok, other=0)
        bits = bits | (byte.to(tl.uint32) << (8 * b))
    s = bits.to(tl.float32, bitcast=True)
    y = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * s[:, None]
    dst = cache_ptr + tl.load(ids_ptr + i).to(tl.int64) * block_stride
    if BF16_BITS:
        tl.store(dst + offs, _bf16_rne_bits(y), mask=mask)
    else:
        tl.store(dst + offs, y.to(cache_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------ launchers

def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _geometry(kv_cache: torch.Tensor):
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(f"kv_cache must be [num_blocks, L, 2, bs, H, D], got {tuple(kv_cache.shape)}")
    if kv_cache.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} unsupported")
    _, layers, _, block_size, heads, head_dim = kv_cache.shape
    inner = kv_cache.stride()[1:]
    want = (2 * block_size * heads * head_dim, block_size * heads * head_dim, heads * head_dim, head_dim, 1)
    if any(n > 1 and s != w for n, s, w in zip(kv_cache.shape[1:], inner, want)):
        raise ValueError("kv_cache blocks must be contiguous (one block is one byte range)")
    rows = layers * 2 * block_size * heads
    raw = rows * head_dim
    return rows, raw, (raw + _PAD - 1) // _PAD * _PAD, block_size, heads, head_dim


def _tiles(rows: int, head_dim: int, block_r: int | None):
    block_d = triton.next_power_of_2(head_dim)
    if block_r is None:
        # about 4K elements a program: 8 KB of bf16 in, 4 KB of codes out, per 4 warps
        block_r = max(1, 4096 // block_d) if not _interpreted() else 8
    block_r = min(triton.next_power_of_2(block_r), triton.next_power_of_2(rows))
    return block_r, block_d, triton.cdiv(rows, block_r)


def _bf16_bits(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (t.view(torch.int16), True) if t.dtype == torch.bfloat16 else (t, False)


def _check_wire(wire: torch.Tensor, n: int, row_bytes: int, ids: torch.Tensor, device) -> None:
    if wire.dtype != torch.uint8 or wire.dim() != 2 or wire.shape[0] != n or wire.shape[1] != row_bytes \
            or wire.stride(1) != 1:
        raise ValueError(f"wire must be uint8 [{n}, {row_bytes}] with contiguous rows, got "
                         f"{wire.dtype} {tuple(wire.shape)} strides {wire.stride()}")
    if wire.device != device or ids.device != device:
        raise ValueError("kv_cache, wire and block ids must be on one device")


def pack_fp8(kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int, out: torch.Tensor,
             eps: float, block_r: int | None = None, num_warps: int = 4) -> None:
    """fp8_wire.pack_fp8_blocks(kv_cache[block_ids], num_tokens, out) in one kernel, without the gather.

    block_ids: int tensor [n] on kv_cache's device, the request's blocks in order; num_tokens counts
    the request's valid tokens (only the last block may be partial)."""
    rows, raw, code_bytes, block_size, heads, head_dim = _geometry(kv_cache)
    n = block_ids.numel()
    _check_wire(out, n, code_bytes + 4 * rows, block_ids, kv_cache.device)
    if n == 0:
        return
    block_r, block_d, tiles = _tiles(rows, head_dim, block_r)
    src, bf16_bits = _bf16_bits(kv_cache)
    _pack_kernel[(n, tiles)](
        src, block_ids, out, num_tokens, kv_cache.stride(0), out.stride(0), eps,
        ROWS=rows, RAW_CODE_BYTES=raw, CODE_BYTES=code_bytes, HEADS=heads, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d, PAD=_PAD, BF16_BITS=bf16_bits, num_warps=num_warps)


def unpack_fp8(wire: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor,
               block_r: int | None = None, num_warps: int = 4) -> None:
    """kv_cache[block_ids] = fp8_wire.unpack_fp8_blocks(wire, block shape, kv_cache.dtype), in one kernel.

    block_ids: int tensor [n] on kv_cache's device, distinct; wire: uint8 [n, fp8_block_bytes]."""
    rows, _, code_bytes, _, _, head_dim = _geometry(kv_cache)
    n = block_ids.numel()
    _check_wire(wire, n, code_bytes + 4 * rows, block_ids, kv_cache.device)
    if n == 0:
        return
    block_r, block_d, tiles = _tiles(rows, head_dim, block_r)
    # only the interpreter needs bf16 rounded by hand; on the GPU the cast is cvt.rn.bf16.f32
    dst, bf16_bits = _bf16_bits(kv_cache) if _interpreted() else (kv_cache, False)
    _unpack_kernel[(n, tiles)](
        wire, block_ids, dst, wire.stride(0), kv_cache.stride(0),
        ROWS=rows, CODE_BYTES=code_bytes, HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d,
        BF16_BITS=bf16_bits, num_warps=num_warps)
