"""NVFP4 reference: byte-exact hand-worked cases (kernels/nvfp4.py docstring has the contract)."""
import math

import pytest
import torch

from pdserve.kernels.nvfp4 import (E2M1_VALUES, dequantize_nvfp4, nvfp4_gemm_reference, nvfp4_matmul, quantize_nvfp4,
                           unpack_nibbles)


def e4m3_byte(t: torch.Tensor) -> list[int]:
    return t.view(torch.uint8).flatten().tolist()


def test_ties_round_to_even_and_signs():
    # One block with amax 6: g = 2688/6 = 448, s = e4m3(6/6*448) = 448, so x*g/s == x exactly and
    # every listed value is itself the scaled value the rounding sees.
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0,
                      -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0])
    q = quantize_nvfp4(x)
    # ties: 0.25->0 (code 0), 0.75->1 (2), 1.25->1 (2), 1.75->2 (4), 2.5->2 (4), 3.5->4 (6), 5->4 (6);
    # 6 -> code 7; negatives set bit 3, except -0.25 which rounds to zero and encodes as +0.
    codes = [0, 2, 2, 4, 4, 6, 6, 7, 0, 0xA, 0xA, 0xC, 0xC, 0xE, 0xE, 0xF]
    assert unpack_nibbles(q.packed).tolist() == codes
    assert q.packed.tolist() == [0x20, 0x42, 0x64, 0x76, 0xA0, 0xCA, 0xEC, 0xFE]
    assert e4m3_byte(q.block_scale) == [0x7E]  # 448 = 1.75 * 2**8: exponent 15, mantissa 6
    assert q.global_scale.dtype == torch.float32 and q.global_scale.item() == 448.0
    assert dequantize_nvfp4(q).tolist() == [0, 1, 1, 2, 2, 4, 4, 6, 0, -1, -1, -2, -2, -4, -4, -6]


def test_non_ties_round_to_nearest():
    x = torch.tensor([6.0, 0.3, 0.7, 0.8, 1.3, 1.7, 2.4, 2.6, 3.4, 3.6, 4.9, 5.1, 0.2, 0.26, 1.0, 4.0])
    q = quantize_nvfp4(x)
    assert dequantize_nvfp4(q).tolist() == [6, 0.5, 0.5, 1, 1.5, 1.5, 2, 3, 3, 4, 4, 6, 0, 0.5, 1, 4]


def test_nibble_order_low_first():
    x = torch.zeros(16)
    x[0], x[1] = 6.0, 1.0  # codes 7 then 2
    x[15] = -3.0  # code 0xD in the high nibble of byte 7
    q = quantize_nvfp4(x)
    assert q.packed[0].item() == 0x27
    assert q.packed[7].item() == 0xD0


def test_global_scale_is_encode_convention():
    # amax 12: g = 2688/12 = 224 (not 1/224); s = e4m3(12/6*224) = 448; 3 -> 3*224/448 = 1.5 (code 3).
    x = torch.zeros(16)
    x[0], x[1] = 12.0, 3.0
    q = quantize_nvfp4(x)
    assert q.global_scale.item() == 224.0
    assert q.packed[0].item() == 0x37
    out = dequantize_nvfp4(q)
    assert out[0].item() == 12.0 and out[1].item() == 3.0  # decode divides by g


def test_beyond_largest_code_saturates_and_scale_ties_to_even():
    # g = 2688/10.5 = 256 exactly. Block 1: amax 102/256, so amax/6*g = 17, an e4m3 tie between
    # 16 and 18 that rounds to the even 16; then x*g/s = 6.375 > 6 saturates to code 7.
    x = torch.zeros(32)
    x[0] = 10.5
    x[16] = 102 / 256
    x[17] = -102 / 256
    x[18] = 5.5 * 16 / 256  # 5.5 -> 6 (above the 5 tie)
    q = quantize_nvfp4(x)
    assert q.global_scale.item() == 256.0
    assert q.block_scale.float().tolist() == [448.0, 16.0]
    assert q.packed[8].item() == 0xF7 and q.packed[9].item() == 0x07
    assert dequantize_nvfp4(q)[16].item() == 6 * 16 / 256  # clipped: 0.375, not 0.3984


def test_all_zero_block_and_tensor():
    x = torch.zeros(2, 32)
    x[0, 16:] = torch.linspace(-1, 1, 16)
    q = quantize_nvfp4(x)
    assert q.block_scale.float()[0, 0].item() == 0.0 and q.packed[0, :8].eq(0).all()
    assert q.packed[1].eq(0).all() and q.block_scale.view(torch.uint8)[1].eq(0).all()
    z = quantize_nvfp4(torch.zeros(4, 16))
    assert z.global_scale.item() == 1.0  # amax = 0: g = 1, no 0/0
    assert z.packed.eq(0).all() and z.block_scale.view(torch.uint8).eq(0).all()
    assert dequantize_nvfp4(z).eq(0).all()


def test_negative_zero_encodes_as_positive_zero():
    x = torch.zeros(16)
    x[0] = 6.0
    x[1] = -0.0
    x[2] = -0.1  # rounds to zero: also +0
    q = quantize_nvfp4(x)
    assert unpack_nibbles(q.packed)[:3].tolist() == [7, 0, 0]
    assert not torch.signbit(dequantize_nvfp4(q)[1])


def test_tiny_amax_caps_global_scale():
    # amax 1e-40 (fp32 subnormal): 2688/amax overflows, g is capped at the largest fp32.
    # s = e4m3(1e-40/6*FLT_MAX = 5.67e-3) = 3*2**-9 (subnormal); 1e-40*FLT_MAX/s = 5.8 -> code 7.
    x = torch.zeros(16)
    x[0] = 1e-40
    q = quantize_nvfp4(x)
    assert q.global_scale.item() == torch.finfo(torch.float32).max
    assert q.block_scale.float().item() == 3 * 2.0 ** -9
    assert q.packed[0].item() == 0x07
    assert torch.isfinite(dequantize_nvfp4(q)).all()


def test_tiny_normal_and_huge_amax_are_scale_invariant():
    torch.manual_seed(1)
    x = torch.randn(4, 64)
    base = quantize_nvfp4(x)
    for factor in (2.0 ** -100, 2.0 ** 100):  # powers of two: g scales exactly by 1/factor
        q = quantize_nvfp4(x * factor)
        assert torch.equal(q.packed, base.packed)
        assert torch.equal(q.block_scale.view(torch.uint8), base.block_scale.view(torch.uint8))
        assert q.global_scale.item() == base.global_scale.item() / factor
    huge = quantize_nvfp4(torch.full((16,), 3e38))
    assert huge.packed.tolist() == [0x77] * 8
    assert math.isclose(dequantize_nvfp4(huge)[0].item(), 3e38, rel_tol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_rejected(bad):
    x = torch.ones(32)
    x[5] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nvfp4(x)


def test_k_must_be_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4(torch.ones(2, 24))


def test_shapes_dtypes_and_batch_dims():
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16)
    q = quantize_nvfp4(x)
    assert q.packed.shape == (3, 5, 24) and q.packed.dtype == torch.uint8
    assert q.block_scale.shape == (3, 5, 3) and q.block_scale.dtype == torch.float8_e4m3fn
    assert q.global_scale.shape == () and q.global_scale.dtype == torch.float32
    out = dequantize_nvfp4(q)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert set(unpack_nibbles(q.packed).unique().tolist()) <= set(range(16)) - {8}


def test_round_trip_error_bounded_by_half_step():
    torch.manual_seed(2)
    x = torch.randn(64, 128) * torch.rand(64, 1) * 10
    q = quantize_nvfp4(x)
    out = dequantize_nvfp4(q)
    # per element, |x - x'| <= half the E2M1 step at that magnitude (1 near 6, 0.25 near 0) * s/g,
    # plus the clipping of at most one e4m3 rounding (<= 1/16 of the block's amax)
    s = (q.block_scale.float() / q.global_scale).repeat_interleave(16, dim=-1)
    step = torch.where(x.abs() * q.global_scale / s.clamp_min(1e-30) > 4, 1.0, 0.5)
    amax_b = x.abs().reshape(64, -1, 16).amax(-1).repeat_interleave(16, dim=-1)
    assert ((x - out).abs() <= step * s + amax_b / 16 + 1e-6).all()
    assert (out - x).norm() / x.norm() < 0.15


def test_gemm_reference_hand_case():
    # all 6s: q = 7, s = 448, g = 448 on both sides: y = 1/448**2 * 448*448 * 16*36 = 576
    q = quantize_nvfp4(torch.full((1, 16), 6.0))
    assert nvfp4_gemm_reference(q, q).item() == 576.0


def test_gemm_forms_agree_with_dequantized_matmul():
    torch.manual_seed(3)
    qx = quantize_nvfp4(torch.randn(9, 96))
    qw = quantize_nvfp4(torch.randn(7, 96) * 0.02)
    ref = nvfp4_gemm_reference(qx, qw)
    deq = (dequantize_nvfp4(qx).double() @ dequantize_nvfp4(qw).double().T)
    assert ref.dtype == torch.float32
    assert ((ref.double() - deq).norm() / deq.norm()).item() < 1e-6
    assert ((nvfp4_matmul(qx, qw) - ref).norm() / ref.norm()).item() < 1e-6


def test_code_table():
    assert E2M1_VALUES.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
