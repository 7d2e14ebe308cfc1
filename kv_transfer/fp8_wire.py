"""FP8 e4m3 wire format for KV blocks (BRIEF.md, "FP8 KV on the wire").

Per token and per head, over head_dim: s = max(amax, eps) / 448, codes = e4m3(clamp(x / s)),
K and V separately in every layer. Dequantize: x = float(code) * s.

A wire block is one contiguous byte range so a block stays one NIXL descriptor:
    [ codes: uint8 (L, 2, bs, H, D), zero-padded to 16 bytes | scales: fp32 (L, 2, bs, H) ]
Token slots past num_tokens in the request's last block are sent as code 0 / scale 0: their
cache contents are undefined (possibly NaN bits) and must not poison the decode cache.

Error bound of one round trip in fp32 (e4m3 keeps 3 mantissa bits; its subnormal step is 2^-9):
    |x - dequantize(quantize(x))| <= |x| / 16 + s / 1024

pack_fp8_cache_blocks / unpack_fp8_into_cache work on the cache by block id: on a CUDA cache with
Triton, one kernel each (kernels/kv_wire.py, the same bytes as the functions below); otherwise these
torch references with a gather / an index_copy_.
"""
import functools
import importlib.util

import torch

E4M3_MAX = 448.0
# Keeps s > 0 for an all-zero token-head. Equal to kernels.reference.FP8_KV_EPS (the FP8 KV
# cache) so wire codes and cache codes of the same KV are the same bytes.
FP8_KV_EPS = 1e-8
_PAD = 16


def quantize_kv(x: torch.Tensor, eps: float = FP8_KV_EPS):
    """x[..., bs, H, D] (any float dtype) -> (codes float8_e4m3fn[..., bs, H, D], scales fp32[..., bs, H])."""
    # amax in x's own dtype is exact (abs and max do not round); in-place fp32 steps save passes
    amax = x.abs().amax(dim=-1).float().clamp_min_(eps)
    # Divide by a tensor, not a Python number: CUDA turns division by a scalar into a multiply by
    # its reciprocal, which can differ from amax / 448 in the last bit and then from the CPU bytes.
    scales = amax.div_(amax.new_full((), E4M3_MAX))
    scaled = x.to(torch.float32, copy=True).div_(scales.unsqueeze(-1))
    # Clamp before the cast: x / s can round to just above 448, and an overflowing cast to e4m3
    # is NaN on some torch builds and devices.
    return scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scales


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
    """codes (float8_e4m3fn or its uint8 bits)[..., D], scales fp32[...] -> dtype[..., D]."""
    if codes.dtype == torch.uint8:
        codes = codes.view(torch.float8_e4m3fn)
    return codes.float().mul_(scales.unsqueeze(-1).float()).to(dtype)


def _code_bytes(block_shape) -> int:
    num_layers, two, block_size, heads, head_dim = block_shape
    raw = num_layers * two * block_size * heads * head_dim
    return (raw + _PAD - 1) // _PAD * _PAD


def _scale_bytes(block_shape) -> int:
    num_layers, two, block_size, heads, _ = block_shape
    return num_layers * two * block_size * heads * 4


def fp8_block_bytes(block_shape) -> int:
    """Bytes of one wire block for a cache block of shape (L, 2, bs, H, D)."""
    return _code_bytes(block_shape) + _scale_bytes(block_shape)


def pack_fp8_blocks(blocks: torch.Tensor, num_tokens: int, out: torch.Tensor) -> None:
    """Quantizes blocks[n, L, 2, bs, H, D] into out (uint8 [n, fp8_block_bytes]).

    num_tokens counts the valid tokens of the whole request (the last block may be partial).
    """
    n = blocks.shape[0]
    block_shape = tuple(blocks.shape[1:])
    block_size = block_shape[2]
    codes, scales = quantize_kv(blocks)
    valid_in_last = num_tokens - (n - 1) * block_size
    codes[-1, :, :, valid_in_last:] = 0
    scales[-1, :, :, valid_in_last:] = 0
    code_bytes = _code_bytes(block_shape)
    raw_code_bytes = codes[0].numel()
    out[:, :raw_code_bytes].copy_(codes.view(torch.uint8).reshape(n, -1))
    out[:, raw_code_bytes:code_bytes].zero_()
    out[:, code_bytes:].copy_(scales.reshape(n, -1).view(torch.uint8))


def unpack_fp8_blocks(wire: torch.Tensor, block_shape, dtype: torch.dtype) -> torch.Tensor:
    """wire (uint8 [n, fp8_block_bytes]) -> dequantized blocks dtype[n, L, 2, bs, H, D]."""
    n = wire.shape[0]
    code_bytes = _code_bytes(block_shape)
    raw_code_bytes = 1
    for size in block_shape:
        raw_code_bytes *= size
    codes = wire[:, :raw_code_bytes].reshape(n, *block_shape)
    # The scale bytes start at a 16-byte offset inside each row, but rows need not be
    # fp32-aligned views of the whole buffer; a copy keeps the reinterpretation legal.
    scales = wire[:, code_bytes:].contiguous().view(torch.float32).reshape(n, *block_shape[:-1])
    return dequantize_kv(codes, scales, dtype)


@functools.cache
def _triton_path(device_index: int) -> bool:
    # e4m3 conversions in hardware (cvt.rn.satfinite) need sm_89+; older GPUs keep the torch path
    return importlib.util.find_spec("triton") is not None and torch.cuda.get_device_capability(device_index) >= (8, 9)


def _uses_triton(kv_cache: torch.Tensor) -> bool:
    return kv_cache.is_cuda and _triton_path(kv_cache.device.index or 0)


def pack_fp8_cache_blocks(kv_cache: torch.Tensor, block_ids, num_tokens: int, out: torch.Tensor) -> None:
    """pack_fp8_blocks(kv_cache[block_ids], num_tokens, out), without the gather on CUDA.

    kv_cache [num_blocks, L, 2, bs, H, D]; block_ids (list or int tensor) the request's blocks in order."""
    ids = torch.as_tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    n, block_size = ids.numel(), kv_cache.shape[3]
    if not (n - 1) * block_size < num_tokens <= n * block_size:
        raise ValueError(f"num_tokens {num_tokens} does not fit {n} block(s) of {block_size}")
    if _uses_triton(kv_cache):
        from pdserve.kernels import kv_wire

        kv_wire.pack_fp8(kv_cache, ids, num_tokens, out, FP8_KV_EPS)
    else:
        pack_fp8_blocks(kv_cache[ids], num_tokens, out)


def unpack_fp8_into_cache(wire: torch.Tensor, kv_cache: torch.Tensor, block_ids) -> None:
    """kv_cache[block_ids] = unpack_fp8_blocks(wire, ...) in kv_cache's dtype; one pass on CUDA.

    block_ids must be distinct (as for index_copy_)."""
    ids = torch.as_tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    if _uses_triton(kv_cache):
        from pdserve.kernels import kv_wire

        kv_wire.unpack_fp8(wire, kv_cache, ids)
    else:
        kv_cache.index_copy_(0, ids, unpack_fp8_blocks(wire, tuple(kv_cache.shape[1:]), kv_cache.dtype))


def warm_up(kv_cache: torch.Tensor) -> None:
    """Compiles the Triton pack and unpack for this cache's geometry and dtype, so that a worker's first fp8
    request does not pay the JIT (measured on the H200: the first fp8 pull of a fresh agent took 1.1 s, the
    next 0.5 ms). Triton specializes integer arguments equal to 1 and divisible by 16, so pack is compiled for
    a token count of each kind. Runs on a one-block scratch cache: the real cache is not touched."""
    if not _uses_triton(kv_cache):
        return
    from pdserve.kernels import kv_wire

    block_shape = tuple(kv_cache.shape[1:])
    scratch = torch.zeros(1, *block_shape, dtype=kv_cache.dtype, device=kv_cache.device)
    wire = torch.empty(1, fp8_block_bytes(block_shape), dtype=torch.uint8, device=kv_cache.device)
    ids = torch.zeros(1, dtype=torch.long, device=kv_cache.device)
    for num_tokens in {1, block_shape[2], max(1, block_shape[2] - 1)}:
        kv_wire.pack_fp8(scratch, ids, num_tokens, wire, FP8_KV_EPS)
    kv_wire.unpack_fp8(wire, scratch, ids)
    torch.cuda.synchronize(kv_cache.device)
