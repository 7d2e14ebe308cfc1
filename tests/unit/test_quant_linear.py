"""make_linear on CPU: each precision equals its torch reference."""
import pytest
import torch
import torch.nn.functional as F

from pdserve.kernels import fp8, nvfp4
from pdserve.kernels.quant_linear import Nvfp4Linear, make_linear


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.05
    b = torch.randn(48, generator=g)
    x = torch.randn(2, 5, 64, generator=g)
    return w, b, x


def test_bf16_name_is_plain_linear_at_given_dtype(layer):
    w, b, x = layer
    exact = make_linear(w, b, "bf16", torch.float32)
    assert torch.equal(exact(x), F.linear(x, w, b))
    low = make_linear(w, b, "bf16", torch.bfloat16)
    y = low(x)
    assert y.dtype == torch.float32 and low.weight.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).float())


def test_fp8_equals_reference(layer):
    w, b, x = layer
    y = make_linear(w, b, "fp8", torch.float32)(x)
    w8, sw = fp8.quantize_fp8_rows(w)
    x8, sx = fp8.quantize_fp8_rows(x.reshape(-1, 64))
    ref = fp8.fp8_gemm_reference(x8, sx, w8, sw, torch.float32) + b
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    assert torch.equal(y.reshape(-1, 48), ref)
    assert rel(y, F.linear(x, w, b)) < 0.05  # and it is still the same layer


def test_nvfp4_equals_reference(layer):
    w, b, x = layer
    y = make_linear(w, b, "nvfp4", torch.float32)(x)
    ref = nvfp4.nvfp4_gemm_reference(nvfp4.quantize_nvfp4(x.reshape(-1, 64)), nvfp4.quantize_nvfp4(w)) + b
    assert y.shape == (2, 5, 48)
    assert rel(y.reshape(-1, 48), ref) < 1e-6
    assert rel(y, F.linear(x, w, b)) < 0.25


def test_weights_quantized_once_and_activations_every_call(layer):
    w, b, x = layer
    lin = make_linear(w, None, "nvfp4", torch.float32)
    before = lin.packed.clone()
    w.mul_(2)  # the layer owns its quantized copy
    y1 = lin(x)
    assert torch.equal(lin.packed, before)
    assert torch.allclose(lin(x * 2), y1 * 2, rtol=1e-5)  # per-call global scale tracks the input


def test_bf16_input_gives_bf16_output(layer):
    w, b, x = layer
    for precision in ("fp8", "nvfp4"):
        y = make_linear(w, b, precision, torch.bfloat16)(x.bfloat16())
        assert y.dtype == torch.bfloat16
        assert rel(y.float(), F.linear(x, w, b)) < 0.25


def test_model_wide_dtype_cast_keeps_quantized_buffers(layer):
    w, b, x = layer
    model = torch.nn.Sequential(make_linear(w, b, "fp8", torch.float32), make_linear(w[:, :48], b, "nvfp4",
                                                                                      torch.float32))
    y = model(x)
    model.to(torch.bfloat16)
    assert model[0].w8.dtype == torch.float8_e4m3fn and model[0].s_w.dtype == torch.float32
    assert model[1].block_scale.dtype == torch.float8_e4m3fn and model[1].global_scale.dtype == torch.float32
    assert torch.equal(model(x), y)


def test_from_quantized_matches_quantizing_here(layer):
    w, b, x = layer
    q = nvfp4.quantize_nvfp4(w)
    loaded = Nvfp4Linear.from_quantized(q.packed, q.block_scale, q.global_scale, b, torch.float32)
    assert torch.equal(loaded(x), make_linear(w, b, "nvfp4", torch.float32)(x))


def test_unknown_precision_rejected(layer):
    w, b, _ = layer
    with pytest.raises(ValueError, match="unknown precision"):
        make_linear(w, b, "int4", torch.float32)
