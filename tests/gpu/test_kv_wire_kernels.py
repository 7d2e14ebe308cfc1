"""The FP8 KV wire's Triton pack and unpack (kernels/kv_wire.py) against the CPU reference
(kv_transfer/fp8_wire.py: pack_fp8_blocks of the gathered blocks, unpack_fp8_blocks + index_copy_).

Both must be byte-exact: staging rows (codes, padding, scales) and the whole destination cache, blocks
the unpack must not touch included. The cases run on CPU under TRITON_INTERPRET=1 at small shapes in
one subprocess (the kernels' interpreter branches: e4m3 and bf16 rounding by hand), and on a CUDA GPU
(gpu-marked) at larger shapes with the hardware casts, plus the dispatching fp8_wire functions.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from pdserve.testing import kernel_cases
from pdserve.testing.kernel_cases import poison_bytes, same_bytes

# (L, bs, H, D): odd sizes, raw code bytes not a multiple of 16 (padding), several row tiles per block
SMALL = (3, 4, 3, 7)
SMALL_2 = (1, 2, 5, 40)
LLAMA_LIKE = (4, 16, 8, 128)


def _shape(device, small):
    return small if device == "cpu" else LLAMA_LIKE


def _values(n, geometry, dtype, gen):
    """Cache blocks with the awkward cases in every block: token-heads of magnitudes 1e-6..1e4 (1e3 in fp16), half of
    them spanning 6 decades inside (subnormal codes), all-zero and all -0.0 token-heads, tiny negatives
    (codes -0), amaxes whose x / s rounds past 448 (clamped to code +-448)."""
    layers, bs, heads, dim = geometry
    x = torch.randn(n, layers, 2, bs, heads, dim, generator=gen)
    top = 3 if dtype == torch.float16 else 4  # finite in fp16 too
    x *= 10 ** (torch.rand(n, layers, 2, bs, heads, 1, generator=gen) * (top + 6) - 6)
    x[:, :, :, ::2] *= torch.logspace(-6, 0, dim)[torch.randperm(dim, generator=gen)]
    x[:, 0, 0, 0, 0] = 0.0
    x[:, -1, 1, -1, -1] = -0.0
    x[:, 0, 1, 0, -1] = -1e-30
    x[:, 0, 1, 0, -1, 0] = 1.0
    flat = x.view(-1, dim)
    over = _overshooting_amaxes(dtype, gen)
    pick = torch.randperm(flat.shape[0], generator=gen)[:min(len(over), flat.shape[0] // 3)]
    over = over[:len(pick), None]
    flat[pick] = over * (torch.rand(len(pick), dim, generator=gen) * 1.8 - 0.9)
    flat[pick, 0] = over[:, 0]
    flat[pick, -1] = -over[:, 0]
    return x.to(dtype)


def _overshooting_amaxes(dtype, gen):
    amax = (torch.rand(4000, generator=gen) * 100 + 1e-3).to(dtype).float()
    over = amax[amax / (amax / 448) > 448]
    assert over.numel() > 0
    return over


def _cache(num_blocks, geometry, dtype, device, gen, ids, num_tokens):
    """A cache whose blocks `ids` hold test values; every other block and the slots past num_tokens NaN."""
    cache = torch.full((num_blocks, geometry[0], 2, *geometry[1:]), float("nan"), dtype=dtype)
    vals = _values(len(ids), geometry, dtype, gen)
    vals[-1, :, :, num_tokens - (len(ids) - 1) * geometry[1]:] = float("nan")
    cache[torch.tensor(ids)] = vals
    return cache.to(device)


def _wire_rows(n, geometry, device, offset=64):
    """n wire rows inside a larger poisoned buffer, as a staging view (byte offset, row stride)."""
    row = _row_bytes(geometry)
    buf = poison_bytes(torch.empty(offset + n * row + 64, dtype=torch.uint8, device=device))
    return buf[offset:offset + n * row].view(n, row)


def _row_bytes(geometry):
    from pdserve.kv_transfer.fp8_wire import fp8_block_bytes

    return fp8_block_bytes((geometry[0], 2, *geometry[1:]))


def _reference_wire(cache, ids, num_tokens):
    from pdserve.kv_transfer.fp8_wire import pack_fp8_blocks

    cpu = cache.cpu()
    wire = poison_bytes(torch.empty(len(ids), _row_bytes(_geometry_of(cpu)), dtype=torch.uint8))
    pack_fp8_blocks(cpu[torch.tensor(ids)], num_tokens, wire)
    return wire


def _geometry_of(cache):
    _, layers, _, bs, heads, dim = cache.shape
    return layers, bs, heads, dim


def _ids(device, ids):
    return torch.tensor(ids, dtype=torch.long, device=device)


def case_pack(dtype, small, ids, num_blocks, tail, block_r=None):
    """Pack blocks `ids` (a partial last block of `tail` tokens) straight from the cache."""
    def run(device, _dtype, gen):
        from pdserve.kernels import kv_wire
        from pdserve.kv_transfer.fp8_wire import FP8_KV_EPS

        geometry = _shape(device, small)
        num_tokens = (len(ids) - 1) * geometry[1] + min(tail, geometry[1])
        cache = _cache(num_blocks, geometry, dtype, device, gen, ids, num_tokens)
        out = _wire_rows(len(ids), geometry, device)
        kv_wire.pack_fp8(cache, _ids(device, ids), num_tokens, out, FP8_KV_EPS, block_r=block_r)
        ref = _reference_wire(cache, ids, num_tokens)
        assert same_bytes(out, ref), _first_difference(out, ref, geometry)
        return "ok"
    return run


def _first_difference(out, ref, geometry):
    out, ref = out.cpu(), ref.cpu()
    bad = (out != ref).nonzero()
    layers, bs, heads, dim = geometry
    raw = layers * 2 * bs * heads * dim
    block, byte = bad[0].tolist()
    where = f"code of row {byte // dim}" if byte < raw else ("padding" if byte < -(-raw // 16) * 16 else "scale")
    return (f"{len(bad)} bytes differ, first block {block} byte {byte} ({where}): "
            f"{out[block, byte]} vs {ref[block, byte]}")


def case_unpack(src_dtype, dst_dtype, small, src_ids, dst_ids, num_dst_blocks, tail, block_r=None):
    """Pack on CPU with the reference, unpack with the kernel into a NaN-filled cache at dst_ids."""
    def run(device, _dtype, gen):
        from pdserve.kernels import kv_wire
        from pdserve.kv_transfer.fp8_wire import unpack_fp8_blocks

        geometry = _shape(device, small)
        num_tokens = (len(src_ids) - 1) * geometry[1] + min(tail, geometry[1])
        src = _cache(max(src_ids) + 1, geometry, src_dtype, "cpu", gen, src_ids, num_tokens)
        wire = _reference_wire(src, src_ids, num_tokens)
        dst = torch.full((num_dst_blocks, geometry[0], 2, *geometry[1:]), float("nan"), dtype=dst_dtype)
        ref = dst.clone()
        ref.index_copy_(0, torch.tensor(dst_ids), unpack_fp8_blocks(wire, tuple(dst.shape[1:]), dst_dtype))
        # the wire as a strided staging view, as the agent lands it
        staged = _wire_rows(len(src_ids), geometry, device)
        staged.copy_(wire)
        dst = dst.to(device)
        kv_wire.unpack_fp8(staged, dst, _ids(device, dst_ids), block_r=block_r)
        assert same_bytes(dst, ref), f"{(dst.cpu().view(torch.uint8) != ref.view(torch.uint8)).sum()} bytes differ"
        return "ok"
    return run


def case_unpack_every_code(dst_dtype):
    """Every finite e4m3 code (subnormals, -0, +-448) at random scales, zero scales included."""
    def run(device, _dtype, gen):
        from pdserve.kernels import kv_wire
        from pdserve.kv_transfer.fp8_wire import fp8_block_bytes, unpack_fp8_blocks

        geometry = (1, 4, 4, 16)  # 32 rows of 16: every code once per block
        shape = (geometry[0], 2, *geometry[1:])
        row_bytes, raw = fp8_block_bytes(shape), 32 * 16
        codes = torch.arange(256, dtype=torch.uint8)
        codes[[0x7F, 0xFF]] = 0  # the two NaN codes never come from finite KV
        wire = torch.empty(3, row_bytes, dtype=torch.uint8)
        for b in range(3):
            wire[b, :raw] = codes[torch.randperm(256, generator=gen)].repeat(2)
        scales = torch.exp(torch.randn(3, 32, generator=gen) * 10)
        scales[:, ::7] = 0
        wire[:, raw:] = scales.view(torch.uint8)
        dst = torch.full((5, *shape), float("nan"), dtype=dst_dtype)
        ref = dst.clone()
        ids = [4, 0, 2]
        ref.index_copy_(0, torch.tensor(ids), unpack_fp8_blocks(wire, shape, dst_dtype))
        dst = dst.to(device)
        kv_wire.unpack_fp8(wire.to(device), dst, _ids(device, ids))
        assert same_bytes(dst, ref), f"{(dst.cpu().view(torch.uint8) != ref.view(torch.uint8)).sum()} bytes differ"
        return "ok"
    return run


def case_round_trip_dispatch(dtype):
    """The fp8_wire functions the agent calls, against gather + pack and unpack + index_copy_ on CPU."""
    def run(device, _dtype, gen):
        from pdserve.kv_transfer.fp8_wire import pack_fp8_cache_blocks, unpack_fp8_blocks, unpack_fp8_into_cache

        geometry = _shape(device, SMALL)
        ids, dst_ids = [5, 1, 3], [0, 6, 2]
        num_tokens = 2 * geometry[1] + 1
        cache = _cache(7, geometry, dtype, device, gen, ids, num_tokens)
        out = _wire_rows(len(ids), geometry, device)
        pack_fp8_cache_blocks(cache, ids, num_tokens, out)
        ref = _reference_wire(cache, ids, num_tokens)
        assert same_bytes(out, ref), "pack differs"
        dst = torch.full_like(cache, float("nan"))
        ref_dst = dst.cpu()
        unpack_fp8_into_cache(out, dst, dst_ids)
        ref_dst.index_copy_(0, torch.tensor(dst_ids), unpack_fp8_blocks(ref, tuple(ref_dst.shape[1:]), dtype))
        assert same_bytes(dst, ref_dst), "unpack differs"
        return "ok"
    return run


BF16, F32, F16 = torch.bfloat16, torch.float32, torch.float16
CASES = {
    "pack_bf16_partial_last_block": case_pack(BF16, SMALL, [6, 0, 3], 8, tail=2),
    "pack_bf16_one_token": case_pack(BF16, SMALL, [4], 5, tail=1),
    "pack_bf16_full_blocks": case_pack(BF16, SMALL_2, [1, 3], 4, tail=99),
    "pack_f32_partial_last_block": case_pack(F32, SMALL, [2, 7, 5, 0], 9, tail=3),
    "pack_f32_wide_head_small_tiles": case_pack(F32, SMALL_2, [2, 0], 3, tail=1, block_r=2),
    "pack_f16": case_pack(F16, SMALL, [1, 0], 2, tail=3),
    "unpack_bf16_to_bf16": case_unpack(BF16, BF16, SMALL, [3, 0, 2], [5, 1, 7], 9, tail=2),
    "unpack_bf16_to_f32": case_unpack(BF16, F32, SMALL, [3, 0, 2], [5, 1, 7], 9, tail=2),
    "unpack_f32_to_bf16": case_unpack(F32, BF16, SMALL_2, [1, 0], [0, 3], 4, tail=1, block_r=4),
    "unpack_f32_to_f32": case_unpack(F32, F32, SMALL_2, [1, 0], [2, 1], 4, tail=2),
    "unpack_to_f16": case_unpack(BF16, F16, SMALL, [0], [2], 3, tail=4),
    "unpack_every_code_bf16": case_unpack_every_code(BF16),
    "unpack_every_code_f32": case_unpack_every_code(F32),
}
GPU_ONLY = {  # the dispatching functions take the Triton path only for CUDA tensors
    "dispatch_bf16": case_round_trip_dispatch(BF16),
    "dispatch_f32": case_round_trip_dispatch(F32),
}


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return kernel_cases.run_interpreted(__file__)


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreted(interpreted, name):
    seed, results = interpreted
    assert results[name] == "ok", f"{name}: {results[name]} (seed {seed})"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(CASES) + sorted(GPU_ONLY))
def test_gpu(name):
    seed = kernel_cases.test_seed()
    result = kernel_cases.run_cases({**CASES, **GPU_ONLY}, "cuda", None, [name], seed)[name]
    assert result == "ok", f"{name}: {result} (seed {seed})"


if __name__ == "__main__":  # child process of `interpreted`, TRITON_INTERPRET=1
    assert os.environ.get("TRITON_INTERPRET") == "1"
    kernel_cases.patch_interpreter_for_numpy2()
    print(json.dumps(kernel_cases.run_cases(CASES, "cpu", None, sorted(CASES), int(sys.argv[1]))))
