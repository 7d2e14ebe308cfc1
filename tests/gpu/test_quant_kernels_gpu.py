"""Quantization kernels against their CPU references.

The same checks run two ways:
  - on a CUDA GPU (marked gpu): every kernel at serving-like shapes, fresh random inputs, outputs
    poisoned before each run; quantizers must be byte-exact, GEMMs within a relative Frobenius
    error of 1e-3 (fp32 output) or 1e-2 (bf16 output);
  - on CPU under TRITON_INTERPRET=1 at small shapes, in a child process (the variable must be set
    before triton is imported and must not leak into other tests).
Plus: the Blackwell NVFP4 kernel compiled for sm_100 without the device, its PTX/SASS inspected.
"""
from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import pytest
import torch


from pdserve.testing import kernel_cases
from pdserve.testing.kernel_cases import poison_bytes, random_activations, rel_err, same_bytes
from pdserve.kernels import fp8, nvfp4  # noqa: E402

CUDA = torch.cuda.is_available()



# ------------------------------------------------------------------ checks shared by both modes

def check_fp8_quantizer(device, m, k, seed):
    from pdserve.kernels import triton_fp8
    x = random_activations(m, k, device, seed=seed)
    codes = poison_bytes(torch.empty(m, k, dtype=torch.float8_e4m3fn, device=device))
    scale = poison_bytes(torch.empty(m, 1, dtype=torch.float32, device=device))
    triton_fp8.quantize_fp8_rows(x, codes, scale)
    ref_codes, ref_scale = fp8.quantize_fp8_rows(x.cpu())
    assert same_bytes(scale, ref_scale), "fp8 scales differ"
    assert same_bytes(codes, ref_codes), "fp8 codes differ"


def check_nvfp4_quantizer(device, m, k, seed):
    from pdserve.kernels import triton_nvfp4
    x = random_activations(m, k, device, seed=seed)
    ref = nvfp4.quantize_nvfp4(x.cpu())
    out = {"packed": poison_bytes(torch.empty(m, k // 2, dtype=torch.uint8, device=device)),
           "scale": poison_bytes(torch.empty(m, k // 16, dtype=torch.float8_e4m3fn, device=device)),
           "g": poison_bytes(torch.empty((), dtype=torch.float32, device=device))}
    q = triton_nvfp4.quantize_nvfp4(x, out)
    assert same_bytes(q.global_scale, ref.global_scale), "global scale differs"
    assert same_bytes(q.block_scale, ref.block_scale), "block scales differ"
    assert same_bytes(q.packed, ref.packed), "packed codes differ"
    out = {"folded": poison_bytes(torch.empty(m, k, dtype=torch.bfloat16, device=device)),
           "g": poison_bytes(torch.empty((), dtype=torch.float32, device=device))}
    folded, g = triton_nvfp4.quantize_nvfp4_folded(x, out)
    assert same_bytes(g, ref.global_scale)
    assert same_bytes(folded, nvfp4.scaled_values(ref).to(torch.bfloat16)), "folded operand differs"
    assert torch.equal(nvfp4.scaled_values(ref).to(torch.bfloat16).float(), nvfp4.scaled_values(ref)), \
        "T[q]*s_b must be exact in bf16"


def check_fp8_gemm(device, m, n, k, out_dtype, seed, config=None, backend="triton"):
    from pdserve.kernels import triton_fp8
    x8, sx = fp8.quantize_fp8_rows(random_activations(m, k, "cpu", seed=seed))
    w8, sw = fp8.quantize_fp8_rows(random_activations(n, k, "cpu", seed=seed + 1) * 0.02)
    ref = fp8.fp8_gemm_reference(x8, sx, w8, sw, torch.float32)
    x8, sx, w8, sw = (t.to(device) for t in (x8, sx, w8, sw))
    if backend.startswith("triton"):
        out = poison_bytes(torch.empty(m, n, dtype=out_dtype, device=device))
        y = triton_fp8.scaled_gemm(x8, w8, sx, sw, out_dtype, config=config, out=out, use_tma=backend == "triton_tma")
    else:
        y = triton_fp8.fp8_linear_scaled_mm(x8, sx, w8, sw, out_dtype, fast_accum=backend == "scaled_mm_fast")
    tol = 1e-3 if out_dtype == torch.float32 else 1e-2
    err = rel_err(y, ref)
    assert err <= tol, f"fp8 gemm {backend} rel err {err:.2e} > {tol}"
    return err


def check_nvfp4_hopper_gemm(device, m, n, k, out_dtype, seed, config=None, backend="triton",
                            operand_dtype=torch.bfloat16):
    from pdserve.kernels import triton_fp8, triton_nvfp4
    qx = nvfp4.quantize_nvfp4(random_activations(m, k, "cpu", seed=seed))
    qw = nvfp4.quantize_nvfp4(random_activations(n, k, "cpu", seed=seed + 1) * 0.02)
    # the literal block-sum form needs M*N*K/16 floats; above ~50M use the matmul form, equal to it
    # up to fp32 summation order (tests/unit/test_nvfp4.py::test_gemm_forms_agree_with_dequantized_matmul)
    small = m * n * k // 16 <= 50_000_000
    ref = nvfp4.nvfp4_gemm_reference(qx, qw) if small else nvfp4.nvfp4_matmul(qx, qw)
    xf = nvfp4.scaled_values(qx).to(operand_dtype).to(device)
    wf = nvfp4.scaled_values(qw).to(operand_dtype).to(device)
    gx, gw = qx.global_scale.to(device), qw.global_scale.to(device)
    if backend.startswith("triton"):
        out = poison_bytes(torch.empty(m, n, dtype=out_dtype, device=device))
        alpha = (1.0 / (gx * gw)).reshape(1)
        y = triton_fp8.scaled_gemm(xf, wf, alpha, alpha.new_ones(1), out_dtype, config=config, out=out,
                                   use_tma=backend == "triton_tma")
    else:
        y = triton_nvfp4.hopper_gemm_cublas(xf, gx, wf, gw, out_dtype)
    tol = 1e-3 if out_dtype == torch.float32 else 1e-2
    err = rel_err(y, ref)
    assert err <= tol, f"nvfp4 gemm {backend} rel err {err:.2e} > {tol}"
    return err


def check_fused_producers(device, m, k, seed, inter=None):
    """RMSNorm+quant and SiLU*up+quant: byte-equal to the unfused pair on the same device (same
    producer arithmetic, then the exact quantizer), and close to the CPU reference composition.
    Only close there: the producers use approximate rsqrt/exp, and when that moves a row's amax
    element by one bf16 step (0.4-0.8%) the row's scale and so every code of the row moves."""
    from pdserve.kernels import fused, reference, triton_fp8
    x = random_activations(m, k, device, seed=seed)
    w = (1 + 0.1 * random_activations(1, k, device, seed=seed + 1)).reshape(-1)
    codes = poison_bytes(torch.empty(m, k, dtype=torch.float8_e4m3fn, device=device))
    scale = poison_bytes(torch.empty(m, 1, dtype=torch.float32, device=device))
    triton_fp8.rms_norm_quant_fp8(x, w, 1e-5, codes=codes, scale=scale)
    pair_codes, pair_scale = triton_fp8.quantize_fp8_rows(fused.rms_norm(x, w, 1e-5))
    assert same_bytes(codes, pair_codes) and same_bytes(scale, pair_scale), "rms_norm_quant != rms_norm + quant"
    ref_codes, ref_scale = fp8.quantize_fp8_rows(reference.rms_norm(x.cpu(), w.cpu(), 1e-5))
    assert rel_err(fp8.dequantize_fp8_rows(codes.cpu(), scale.cpu()),
                   fp8.dequantize_fp8_rows(ref_codes, ref_scale)) < 5e-2

    inter = inter or k
    gate_up = random_activations(m, 2 * inter, device, seed=seed + 2)
    codes = poison_bytes(torch.empty(m, inter, dtype=torch.float8_e4m3fn, device=device))
    scale = poison_bytes(torch.empty(m, 1, dtype=torch.float32, device=device))
    triton_fp8.silu_mul_quant_fp8(gate_up, codes, scale)
    pair_codes, pair_scale = triton_fp8.quantize_fp8_rows(fused.silu_and_mul(gate_up))
    assert same_bytes(codes, pair_codes) and same_bytes(scale, pair_scale), "silu_mul_quant != silu_mul + quant"
    ref_codes, ref_scale = fp8.quantize_fp8_rows(reference.silu_and_mul(gate_up.cpu()))
    assert rel_err(fp8.dequantize_fp8_rows(codes.cpu(), scale.cpu()),
                   fp8.dequantize_fp8_rows(ref_codes, ref_scale)) < 5e-2


# ------------------------------------------------------------------ interpreter (CPU CI)

SMALL_TILE_8BIT = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2)
SMALL_TILE_16BIT = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)
INTERP_CHECKS = {
    "fp8_quantizer": lambda: (check_fp8_quantizer("cpu", 37, 144, 1), check_fp8_quantizer("cpu", 3, 8208, 2)),
    "fp8_quantizer_two_pass": lambda: check_fp8_quantizer("cpu", 2, 16400, 3),
    "fp8_fused_producers": lambda: check_fused_producers("cpu", 5, 96, 4),
    "fp8_fused_producers_wide": lambda: check_fused_producers("cpu", 2, 96, 5, inter=8200),
    "nvfp4_quantizer": lambda: check_nvfp4_quantizer("cpu", 19, 160, 3),
    "fp8_gemm": lambda: check_fp8_gemm("cpu", 45, 70, 192, torch.float32, 4, SMALL_TILE_8BIT),
    "fp8_gemm_ragged_k": lambda: check_fp8_gemm("cpu", 33, 40, 80, torch.float32, 5, SMALL_TILE_8BIT),
    "fp8_gemm_tma": lambda: check_fp8_gemm("cpu", 45, 70, 208, torch.float32, 4, SMALL_TILE_8BIT, "triton_tma"),
    # fp16 operands: the interpreter's bf16 tl.dot is wrong (relative error ~1e10 on plain random
    # bf16 inputs, Triton 3.6), and T[q]*s_b (2**-10 .. 2688, <= 6 bits) is exact in fp16 as well
    "nvfp4_hopper_gemm": lambda: check_nvfp4_hopper_gemm("cpu", 45, 70, 96, torch.float32, 6, SMALL_TILE_16BIT,
                                                         operand_dtype=torch.float16),
    "nvfp4_hopper_gemm_tma": lambda: check_nvfp4_hopper_gemm("cpu", 45, 70, 96, torch.float32, 6, SMALL_TILE_16BIT,
                                                             backend="triton_tma", operand_dtype=torch.float16),
}


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    return kernel_cases.interpreted_json(__file__)


@pytest.mark.parametrize("name", list(INTERP_CHECKS))
def test_kernel_under_interpreter(interpreter_results, name):
    result = interpreter_results[name]
    if result.startswith("unsupported"):
        pytest.skip(f"Triton interpreter: {result}")
    assert result == "ok", result


def test_blackwell_kernel_not_run_under_interpreter():
    """Documented gap: Triton 3.6's interpreter has no dot_scaled (InterpreterBuilder lacks
    create_dot_scaled), so the Blackwell GEMM's logic is checked only on sm_100 hardware
    (test_blackwell_gemm_matches_reference) and by compilation (test_blackwell_compiles_for_sm100)."""
    pytest.skip("tl.dot_scaled is not implemented by the Triton interpreter")


# ------------------------------------------------------------------ Blackwell, compiled without the device

def test_blackwell_compiles_for_sm100():
    pytest.importorskip("triton")
    from pdserve.kernels import triton_nvfp4
    try:
        kernel = triton_nvfp4.compile_blackwell_gemm(100)
    except Exception as e:  # e.g. a Triton without a Blackwell-capable ptxas
        pytest.skip(f"cannot compile for sm_100 here: {type(e).__name__}: {e}")
    mma = [line for line in kernel.asm["ptx"].splitlines() if "tcgen05.mma" in line]
    # one 16-element block scale per operand: spelled scale_vec::4X by Triton 3.6's PTX, block16 by later ones
    assert mma and all("kind::mxf4nvf4.block_scale" in line and ("scale_vec::4X" in line or ".block16" in line)
                       for line in mma), mma[:2]
    sass = blackwell_sass(kernel.asm["cubin"])
    if sass is None:
        pytest.skip("no cuobjdump to disassemble the cubin")
    # tcgen05 block-scaled MMA: operands from shared-memory descriptors, scales from tensor memory
    assert any("UTCOMMA.4X" in line and "tmem" in line for line in sass.splitlines())


def blackwell_sass(cubin: bytes) -> str | None:
    import shutil
    import tempfile

    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


# ------------------------------------------------------------------ on the GPU

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SHAPES = [(1, 4096), (77, 4096), (512, 4112), (300, 14336), (3, 16400)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,k", SHAPES)
def test_fp8_quantizer_exact(m, k):
    check_fp8_quantizer("cuda", m, k, seed=m + k)


@functools.cache
def quotient_kernel():
    """A kernel writing kernels.triton_fp8.quotient_rn(x, *divisor(s)) (built once: each new jit function
    would be looked up in Triton's cache again)."""
    import triton
    import triton.language as tl

    from pdserve.kernels import triton_fp8

    @triton.jit
    def kernel(x_ptr, out_ptr, s, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        sk, r, k = triton_fp8.divisor(s)
        tl.store(out_ptr + offs, triton_fp8.quotient_rn(x, sk, r, k), mask=offs < n)

    return kernel


def quotients_on_gpu(x: torch.Tensor, s: float) -> torch.Tensor:
    """quotient_rn(x, *divisor(s)) for fp32 x, run on the GPU."""
    x = x.cuda()
    out = poison_bytes(torch.empty_like(x))
    quotient_kernel()[(-(-x.numel() // 1024),)](x, out, s, x.numel(), BLOCK=1024)
    return out.cpu()


@pytest.mark.gpu
@gpu
def test_fp8_quotient_is_div_rn():
    """The quantizers divide by a row's scale with one fma correction of x * (1/s) instead of a division
    per element. Every quotient an e4m3 code can depend on (|x / s| >= 2^-24; e4m3 rounds up to 2^-10 to
    zero) must be the correctly rounded x / s all the same; smaller ones, whose residual may be subnormal,
    must stay below 2^-11. Every finite bf16 x with |x| <= 448 s (what a row of that scale holds) and random
    fp32 x, over scales from fp32's subnormals (lifted by divisor) to bf16's largest amax / 448, around the
    lifting threshold 2^-60 too."""
    seed = kernel_cases.test_seed()
    g = torch.Generator().manual_seed(seed)
    bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf16 = bf16[torch.isfinite(bf16)]
    tiny = 2.0 ** -60
    scales = [1.0, 3.0, 1 / 3, 0.1, 2.0 ** -40, tiny, torch.nextafter(torch.tensor(tiny), torch.tensor(0.0)).item(),
              2.0 ** -61, 1e-30, 2.0 ** -126, 1e-40, 2.0 ** -149, 1e10, 3.3895e38 / 448]
    scales += (2.0 ** (torch.rand(16, generator=g, dtype=torch.float64) * 259 - 140)).tolist()
    for s in scales:
        s = torch.tensor(s, dtype=torch.float32)
        wide = bf16[bf16.abs().double() <= 448 * s.double()]
        mags = 2.0 ** (-40 * torch.rand(1 << 16, generator=g, dtype=torch.float64)) * 448 * s.double()
        narrow = (mags * torch.sign(torch.randn(1 << 16, generator=g, dtype=torch.float64))).float()
        x = torch.cat([wide, narrow])
        got, want = quotients_on_gpu(x, s.item()), x / s
        matters = want.abs() >= 2.0 ** -24
        bad = (matters & (got.view(torch.int32) != want.view(torch.int32))).nonzero().flatten()
        assert not len(bad), (f"scale {s.item():.6e} (seed {seed}): {len(bad)} of {len(x)} differ, e.g. x / s = "
                              f"{x[bad[0]].item():.9e} / s: {got[bad[0]].item():.9e}, not {want[bad[0]].item():.9e}")
        assert (got[~matters].abs() < 2.0 ** -11).all(), f"scale {s.item():.6e} (seed {seed})"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,k,inter", [(1, 4096, 4096), (77, 4096, 14336), (300, 8192, 14336)])
def test_fp8_fused_producers(m, k, inter):
    check_fused_producers("cuda", m, k, seed=m + k, inter=inter)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,k", SHAPES + [(2, 16400)])
def test_nvfp4_quantizer_exact(m, k):
    check_nvfp4_quantizer("cuda", m, k, seed=m + k)


GEMM_SHAPES = [(1, 4096, 4096), (77, 272, 4112), (512, 6144, 4096), (300, 1024, 14336)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "triton_tma"])
def test_fp8_gemm_triton(m, n, k, out_dtype, backend):
    check_fp8_gemm("cuda", m, n, k, out_dtype, seed=m, backend=backend)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("promote", [128, 32])
def test_fp8_gemm_triton_promotion_keeps_fp32_accuracy(promote):
    check_fp8_gemm("cuda", 512, 1024, 14336, torch.float32, seed=11, backend="triton_tma",
                   config=dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3, IMPRECISE_K=promote))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,n,k", [s for s in GEMM_SHAPES if s[2] % 16 == 0 and s[1] % 16 == 0])
@pytest.mark.parametrize("backend", ["scaled_mm", "scaled_mm_fast"])
def test_fp8_gemm_scaled_mm(m, n, k, backend):
    # torch's rowwise-scaled path has a bf16 output only; fast accumulation is an opt-in
    # (quant_linear.FP8_FAST_ACCUM) and must still meet the bf16-output tolerance
    check_fp8_gemm("cuda", m, n, k, torch.bfloat16, seed=m, backend=backend)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "triton_tma"])
def test_nvfp4_hopper_gemm_triton(m, n, k, out_dtype, backend):
    check_nvfp4_hopper_gemm("cuda", m, n, k, out_dtype, seed=m, backend=backend)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_nvfp4_hopper_gemm_cublas(m, n, k):
    check_nvfp4_hopper_gemm("cuda", m, n, k, torch.bfloat16, seed=m, backend="cublas")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
@pytest.mark.parametrize("m,n,k", [(5, 4096, 4096), (333, 1024, 14336)])
def test_linear_on_gpu_matches_cpu_reference(precision, m, n, k):
    from pdserve.kernels.quant_linear import make_linear
    w = random_activations(n, k, "cpu", dtype=torch.float32, seed=7) * 0.02
    x = random_activations(m, k, "cpu", seed=8)  # bf16, the serving dtype
    ref = make_linear(w, None, precision, torch.float32)(x.float())
    y = make_linear(w.cuda(), None, precision, torch.bfloat16)(x.cuda())
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert rel_err(y, ref) <= 1e-2


@pytest.mark.gpu
@gpu
def test_blackwell_gemm_matches_reference():
    if torch.cuda.get_device_capability()[0] < 10:
        pytest.skip("native NVFP4 needs compute capability >= 10; this GPU has none (not run on Blackwell)")
    from pdserve.kernels import triton_nvfp4
    qx = nvfp4.quantize_nvfp4(random_activations(300, 4096, "cpu", seed=9))
    qw = nvfp4.quantize_nvfp4(random_activations(512, 4096, "cpu", seed=10) * 0.02)
    ref = nvfp4.nvfp4_gemm_reference(qx, qw)
    out = poison_bytes(torch.empty(300, 512, dtype=torch.float32, device="cuda"))
    y = triton_nvfp4.blackwell_gemm(qx.to("cuda"), qw.to("cuda"), torch.float32, out=out)
    assert rel_err(y, ref) <= 1e-3


if __name__ == "__main__":  # child process of interpreter_results, TRITON_INTERPRET=1
    print(json.dumps(kernel_cases.run_checks(INTERP_CHECKS, "unsupported")))
