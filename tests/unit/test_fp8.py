"""FP8 W8A8 reference: scales, codes, the GEMM (kernels/fp8.py)."""
import pytest
import torch

from pdserve.kernels.fp8 import dequantize_fp8_rows, fp8_gemm_reference, fp8_scale, quantize_fp8_rows


def test_scale_is_row_amax_over_448():
    x = torch.tensor([[448.0, -17.0, 17.0, 0.5], [-2.0, 1.0, 0.0, 0.0]])
    codes, s = quantize_fp8_rows(x)
    assert s.shape == (2, 1) and s.dtype == torch.float32
    assert s[:, 0].tolist() == [1.0, (torch.tensor(2.0) / 448).item()]  # fp32 division
    # row 0 has s = 1: codes are e4m3(x); 17 is a tie between 16 and 18 -> 16 (even mantissa)
    assert codes[0].float().tolist() == [448.0, -16.0, 16.0, 0.5]
    assert codes[1, 0].float().item() == -448.0


def test_zero_row_scale_is_one_and_codes_zero():
    codes, s = quantize_fp8_rows(torch.zeros(3, 32))
    assert s.eq(1.0).all()
    assert codes.view(torch.uint8).eq(0).all()
    assert fp8_scale(torch.tensor([0.0, 448.0])).tolist() == [1.0, 1.0]


def test_negative_zero_encodes_as_positive_zero():
    x = torch.tensor([[-0.0, 1.0, -1e-9, -1.0]])  # -1e-9 rounds to zero at s = 1/448
    codes, _ = quantize_fp8_rows(x)
    assert codes.view(torch.uint8)[0].tolist() == [0x00, 0x7E, 0x00, 0xFE]


def test_clamp_keeps_every_code_finite():
    # amax/448 is rounded, so amax/s can land a hair above 448; an unclamped cast would give NaN.
    torch.manual_seed(0)
    x = torch.randn(4096, 8) * torch.exp(torch.randn(4096, 1) * 8)
    codes, s = quantize_fp8_rows(x)
    assert torch.isfinite(codes.float()).all()
    top = codes.float().abs().amax(dim=-1)
    assert top.eq(448.0).all()  # the amax element always maps to the largest code


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rejected(bad):
    x = torch.ones(2, 16)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_fp8_rows(x)


def test_round_trip_relative_error():
    torch.manual_seed(1)
    x = torch.randn(32, 256)
    codes, s = quantize_fp8_rows(x)
    err = (dequantize_fp8_rows(codes, s) - x).norm() / x.norm()
    assert 1e-3 < err.item() < 0.04  # e4m3: 3 mantissa bits, about 2% rms


def test_gemm_reference_matches_dequantized_matmul():
    torch.manual_seed(2)
    x = torch.randn(10, 64)
    w = torch.randn(12, 64) * 0.05
    x8, sx = quantize_fp8_rows(x)
    w8, sw = quantize_fp8_rows(w)
    y = fp8_gemm_reference(x8, sx, w8, sw, torch.float32)
    ref = dequantize_fp8_rows(x8, sx).double() @ dequantize_fp8_rows(w8, sw).double().T
    assert y.shape == (10, 12)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6
    assert fp8_gemm_reference(x8, sx, w8, sw, torch.bfloat16).dtype == torch.bfloat16


def test_gemm_hand_case():
    # x = [1, 2], w = [[3, 4]]: s_x = 2/448, s_w = 4/448; codes 224, 448 and 3*112 = 336, 448, but
    # 336 is not e4m3 (spacing 32 in [256, 512)): a tie between 320 and 352, to the even 320.
    # y = (224*320 + 448*448) * (2/448) * (4/448) = 1*(320/112) + 2*4 = 10.857142...
    x8, sx = quantize_fp8_rows(torch.tensor([[1.0, 2.0]]))
    w8, sw = quantize_fp8_rows(torch.tensor([[3.0, 4.0]]))
    assert x8.float().tolist() == [[224.0, 448.0]] and w8.float().tolist() == [[320.0, 448.0]]
    assert fp8_gemm_reference(x8, sx, w8, sw, torch.float32).item() == pytest.approx(8 + 320 / 112, rel=1e-6)
