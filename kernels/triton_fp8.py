"""FP8 W8A8 on the GPU: the fused per-token activation quantizer (Triton) and the GEMM with the
scale epilogue. Reference: kernels/fp8.py.

e4m3 rounding: on the GPU the hardware cast (cvt.rn.satfinite, sm_89+) rounds to nearest even, as
the reference does; Triton's interpreter (CPU CI) rounds ties away from zero, so there e4m3_rne rounds
in fp32 arithmetic first and the cast is exact. The fused SiLU*up quantizer is bound by instructions,
not bytes (docs/bench/prefill.md), which is why the GPU does not run the emulation too.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from pdserve.kernels.fused import launch_options, wait_for_predecessor

# 1.5 * 2**23: adding and subtracting it rounds an fp32 in [-2**22, 2**22] to an integer, ties to even.
RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def exp2_int(e):
    """2**e as fp32 for an int32 tensor e in the normal range (built from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_rne(v):
    """Round fp32 magnitudes v in [0, 448] to the nearest e4m3 value, ties to even (fp32 result)."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    quantum_exp = tl.maximum(e, -6) - 3  # 3 mantissa bits; below 2**-6 the spacing stays 2**-9
    y = v * exp2_int(-quantum_exp)
    r = (y + RINT_MAGIC) - RINT_MAGIC
    return r * exp2_int(quantum_exp)


HW_E4M3 = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


# A divisor below 2**-60 (rows whose amax is below ~4e-16) is lifted by 2**100 with its dividends:
# exact power-of-two scalings that keep the residual of quotient_rn's correction out of fp32's
# subnormals, where the correction would stop being exact.
TINY_DIVISOR = tl.constexpr(8.673617379884035e-19)  # 2**-60
LIFT = tl.constexpr(1.2676506002282294e30)  # 2**100


@triton.jit
def divisor(s):
    """What fp8_codes divides by, prepared once per row (or channel): (s * k, div_rn(1, s * k), k)."""
    k = tl.where(s < TINY_DIVISOR, LIFT, 1.0)
    sk = s * k
    return sk, tl.math.div_rn(1.0, sk), k


@triton.jit
def quotient_rn(x, sk, r, k):
    """div_rn(x, s) for (sk, r, k) = divisor(s), without a division per element: q = x r is within an ulp
    of x / s, and one residual correction (exact in an fma) makes it the correctly rounded quotient
    (Markstein's theorem, r = RN(1/s)) unless the residual is subnormal. That only happens for quotients
    below 2^-24, which come out below 2^-11 and quantize to 0 all the same (tests/gpu/test_quant_kernels_gpu.py
    checks both on every bf16 value). div_rn expands per element into a reciprocal, a range check and a
    slow-path branch: 44 registers a thread in the SiLU*up quantizer against 32. On the GPU only: the
    interpreter's fma rounds twice."""
    xk = x * k
    if HW_E4M3:
        q = xk * r
        return tl.fma(tl.fma(-q, sk, xk), r, q)
    else:
        return tl.math.div_rn(xk, sk)


@triton.jit
def fp8_codes(x, sk, r, k):
    """e4m3 codes of fp32 x at scale s, (sk, r, k) = divisor(s): e4m3_rne(clamp(x/s)), no -0 (see
    kernels/fp8.py)."""
    a = tl.minimum(tl.abs(quotient_rn(x, sk, r, k)), 448.0)
    if HW_E4M3:
        # the cast rounds like e4m3_rne; a magnitude <= 2^-10 rounds to zero, which must not come out -0
        m = tl.where(a <= 0.0009765625, 0.0, a)
    else:
        m = e4m3_rne(a)
    return tl.where((x < 0) & (m > 0), -m, m).to(tl.float8e4nv)


@triton.jit
def row_scale(amax):
    s = tl.math.div_rn(amax, 448.0)
    return tl.where(s > 0, s, 1.0)


@triton.jit
def store_fp8_row(x, mask, offs, c_row, scale_ptr, row):
    """Quantize one row held in registers (fp32, masked lanes 0) and store codes and scale."""
    s = row_scale(tl.max(tl.abs(x), axis=0))
    tl.store(scale_ptr + row, s)
    sk, r, k = divisor(s)
    tl.store(c_row + offs, fp8_codes(x, sk, r, k), mask=mask)


@triton.jit
def quantize_rows_kernel(x_ptr, codes_ptr, scale_ptr, K, stride_x, stride_c,
                         BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr):
    """One program per row: amax, s = amax/448 (1 if 0), codes = e4m3(clamp(x/s)). When the row
    fits one tile (ONE_PASS) it is read once; otherwise the second read is served from L2."""
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    c_row = codes_ptr + row * stride_c
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        store_fp8_row(x, mask, offs, c_row, scale_ptr, row)
    else:
        acc = tl.zeros((BLOCK_K,), tl.float32)
        for kt in range(K_TILES):
            k0 = kt * BLOCK_K
            mask = (k0 + offs) < K
            xk = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(xk))
        s = row_scale(tl.max(acc, axis=0))
        tl.store(scale_ptr + row, s)
        sk, r, k = divisor(s)
        for kt in range(K_TILES):
            k0 = kt * BLOCK_K
            mask = (k0 + offs) < K
            xk = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(c_row + k0 + offs, fp8_codes(xk, sk, r, k), mask=mask)


# Rows up to this many elements are quantized from registers in one read. Wider rows take two
# passes of 2048: measured on an H100 (docs/bench/quant.md), 14336-wide rows held in registers by
# 16 warps ran at 1.1 TB/s (one CTA per SM), the two-pass loop at 1.9 TB/s.
FP8_ONE_PASS_MAX = 8192


def row_launch(k: int) -> dict:
    one_pass = k <= FP8_ONE_PASS_MAX
    block_k = triton.next_power_of_2(k) if one_pass else 2048
    num_warps = 8 if block_k >= 4096 else 4
    return dict(BLOCK_K=block_k, K_TILES=triton.cdiv(k, block_k), ONE_PASS=one_pass, num_warps=num_warps)


def _outputs(m, k, device, codes, scale):
    if codes is None:
        codes = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=device)
    if scale is None:
        scale = torch.empty((m, 1), dtype=torch.float32, device=device)
    return codes, scale


def quantize_fp8_rows(x: torch.Tensor, codes: torch.Tensor | None = None,
                      scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU twin of kernels.fp8.quantize_fp8_rows for 2-D x [M, K] (finite input assumed: the check
    would cost a sync per call; the reference rejects NaN/inf). Optional outputs: codes [M, K]
    e4m3, scale [M, 1] fp32."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    codes, scale = _outputs(m, k, x.device, codes, scale)
    if m:
        quantize_rows_kernel[(m,)](x, codes, scale, k, x.stride(0), codes.stride(0), **row_launch(k),
                                   **launch_options(x.device))
    return codes, scale


# ---------------------------------------------------------------- quantizers fused into their producer
# The activation quantizer costs a read and a write of the activation; fusing it into the kernel
# that produces the activation (RMSNorm before qkv and gate_up, SiLU*up before down) removes the
# producer's bf16 write and the quantizer's read. The producer's arithmetic is kernels/fused.py's
# (same expressions, same block and warp count, so the same rounding), then fp8_codes.

@triton.jit
def rms_norm_quant_kernel(x_ptr, res_ptr, w_ptr, new_res_ptr, codes_ptr, scale_ptr, K, stride_x, stride_res,
                          stride_new_res, stride_c, eps, BLOCK_K: tl.constexpr, RESIDUAL: tl.constexpr,
                          PDL: tl.constexpr):
    """kernels/fused.py _rms_norm_kernel line for line (residual add rounded to x's dtype and written
    out, normalized row rounded to x's dtype, times the weight rounded again), then the row's fp8."""
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    # The widest store picks the layout the whole row lives in, so also the order of the sum of squares.
    # 16-byte fp8 stores would hold 16 elements per thread where fused.rms_norm's bf16 ones hold 8 (rows
    # over 4096): a different summation order, a different rstd. Vectors of 8 keep fused.rms_norm's order
    # (tests/gpu/test_fp8_fused.py compiles both for sm_90 and compares).
    offs = tl.max_contiguous(tl.arange(0, BLOCK_K), 8)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * stride_new_res + offs, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / K + eps)
    normed = (h * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
    store_fp8_row(out, mask, offs, codes_ptr + row * stride_c, scale_ptr, row)


@triton.jit
def gate_up(x_row, offs, mask, INTER):
    return tl.load(x_row + offs, mask=mask, other=0.0), tl.load(x_row + INTER + offs, mask=mask, other=0.0)


@triton.jit
def silu_mul_f32(gate, up):
    gate = gate.to(tl.float32)
    return gate / (1.0 + tl.exp(-gate)) * up.to(tl.float32)


@triton.jit
def rounded(x, dtype):
    """x rounded to dtype (the activation's), as fp32."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def silu_mul_quant_kernel(x_ptr, codes_ptr, scale_ptr, M, INTER, stride_x, stride_c,
                          BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, ONE_PASS: tl.constexpr,
                          PROGRAMS: tl.constexpr, PDL: tl.constexpr):
    """Rows row = program, program + PROGRAMS, ... ONE_PASS holds a row in registers and loads the next
    one while it reduces, quantizes and stores this one. Otherwise two passes per row: amax, then
    recompute and store; the second read must come from L2, so PROGRAMS bounds the rows in flight
    (every row at once would be 2048 x 57 KB, more than an H100's 50 MB of L2)."""
    wait_for_predecessor(PDL)
    offs = tl.arange(0, BLOCK_K)
    first = tl.program_id(0).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    if ONE_PASS:
        mask = offs < INTER
        gate, up = gate_up(x_ptr + first * stride_x, offs, mask & (first < M), INTER)
        for row in range(first, M, PROGRAMS):
            nxt = row + PROGRAMS
            gate_next, up_next = gate_up(x_ptr + nxt * stride_x, offs, mask & (nxt < M), INTER)
            store_fp8_row(rounded(silu_mul_f32(gate, up), dtype), mask, offs, codes_ptr + row * stride_c,
                          scale_ptr, row)
            gate, up = gate_next, up_next
    else:
        for row in range(first, M, PROGRAMS):
            x_row = x_ptr + row * stride_x
            c_row = codes_ptr + row * stride_c
            acc = tl.zeros((BLOCK_K,), tl.float32)
            for kt in range(K_TILES):
                mask = (kt * BLOCK_K + offs) < INTER
                gate, up = gate_up(x_row + kt * BLOCK_K, offs, mask, INTER)
                acc = tl.maximum(acc, tl.abs(silu_mul_f32(gate, up)))
            # rounding is monotonic: the largest rounded magnitude is the rounded largest one
            s = row_scale(rounded(tl.max(acc, axis=0), dtype))
            tl.store(scale_ptr + row, s)
            sk, r, k = divisor(s)
            for kt in range(K_TILES):
                mask = (kt * BLOCK_K + offs) < INTER
                gate, up = gate_up(x_row + kt * BLOCK_K, offs, mask, INTER)
                h = rounded(silu_mul_f32(gate, up), dtype)
                tl.store(c_row + kt * BLOCK_K + offs, fp8_codes(h, sk, r, k), mask=mask)


# widest row rms_norm_quant_fp8 takes: the row is held in registers by one program
RMS_NORM_QUANT_MAX = 16384


def rms_norm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
                       codes=None, scale=None, new_residual=None):
    """fp8 rows of kernels.fused.rms_norm(x, weight, eps, residual), byte-equal to that followed by
    quantize_fp8_rows. Returns (codes, scale), or with a residual (codes, scale, new_residual) where
    new_residual = x + residual rounded to x.dtype (the next norm's residual, as fused.rms_norm's)."""
    m, k = x.shape
    assert x.stride(-1) == 1 and k <= RMS_NORM_QUANT_MAX, "one row per program, held in registers"
    codes, scale = _outputs(m, k, x.device, codes, scale)
    if residual is None:
        res = new_res = x  # not read or written
    else:
        assert residual.shape == x.shape and residual.stride(-1) == 1
        res, new_res = residual, torch.empty_like(x) if new_residual is None else new_residual
    block = triton.next_power_of_2(k)
    if m:
        rms_norm_quant_kernel[(m,)](x, res, weight, new_res, codes, scale, k, x.stride(0), res.stride(0),
                                    new_res.stride(0), codes.stride(0), eps, BLOCK_K=block,
                                    RESIDUAL=residual is not None, num_warps=min(max(block // 256, 1), 16),
                                    **launch_options(x.device))
    return (codes, scale) if residual is None else (codes, scale, new_res)


def silu_mul_launch(inter: int, device: torch.device) -> dict:
    """silu_mul_quant_kernel's launch. Rows up to SILU_ONE_PASS_MAX wide: one pass, the row in registers,
    at most 32 warps per SM (one program of 32 warps for Llama's 14336) so that the next row's loads can
    be in flight. Wider rows: two passes, at most SILU_ROWS_PER_SM rows in flight per SM.
    benchmarks/bench_prefill.py measures the candidates."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
    if inter <= SILU_ONE_PASS_MAX:
        block = triton.next_power_of_2(inter)
        warps = min(max(block // 512, 4), 32)
        return dict(BLOCK_K=block, K_TILES=1, ONE_PASS=True, num_warps=warps, PROGRAMS=sms * (32 // warps))
    return dict(BLOCK_K=2048, K_TILES=triton.cdiv(inter, 2048), ONE_PASS=False, num_warps=SILU_NUM_WARPS,
                PROGRAMS=sms * SILU_ROWS_PER_SM)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# H100, Llama's 14336-wide rows (docs/bench/prefill.md, CUDA-graph timing): one pass with the next row's
# loads in flight, one program of 32 warps per SM, 65 us at 2048 tokens and 230 at 8192, as fast as bf16's
# SiLU*up (67 and 249), which writes twice the bytes. Two passes (amax, then recompute from L2) took 89 and
# 318; one pass without the prefetch 89 and 330 (the SM's loads stalled while it reduced and stored).
# At 16384, 32 warps hold 16 elements of gate and of up per thread, twice (the prefetch): 64 registers.
SILU_ONE_PASS_MAX = 16384
# Two passes, wider rows: 4 rows per SM, 4 warps (89 and 318 us on Llama's rows; 8 rows per SM missed L2)
SILU_ROWS_PER_SM = 4
SILU_NUM_WARPS = 4


def silu_mul_quant_fp8(x: torch.Tensor, codes=None, scale=None, launch: dict | None = None):
    """fp8 rows of silu(x[:, :I]) * x[:, I:] (rounded to x.dtype first, as the unfused pair does).
    launch: silu_mul_quant_kernel's launch keywords (benchmarks); default silu_mul_launch(I)."""
    m, width = x.shape
    inter = width // 2
    assert x.stride(-1) == 1
    codes, scale = _outputs(m, inter, x.device, codes, scale)
    if m:
        launch = dict(launch or silu_mul_launch(inter, x.device))
        launch["PROGRAMS"] = min(launch["PROGRAMS"], m)
        silu_mul_quant_kernel[(launch["PROGRAMS"],)](x, codes, scale, m, inter, x.stride(0), codes.stride(0), **launch,
                                                     **launch_options(x.device))
    return codes, scale


@triton.jit
def scaled_gemm_kernel(a_ptr, b_ptr, c_ptr, row_scale_ptr, col_scale_ptr, M, N, K,
                       stride_am, stride_bn, stride_cm, stride_rs, stride_cs,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       K_TILES: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                       IMPRECISE_K: tl.constexpr):
    """C[M, N] = (A[M, K] @ B[N, K]^T) * row_scale[m] * col_scale[n], fp32 accumulate.

    IMPRECISE_K (8-bit inputs): Hopper's fp8 tensor cores keep fewer accumulator bits than fp32
    (measured here: relative error 2e-3 over K = 4096 when left to accumulate throughout, Triton's
    sm_90 default); adding the MMA partial sum into the fp32 accumulator every IMPRECISE_K
    elements restores fp32 accumulation.
    The K loop count is a constexpr (a model has a handful of K values, so few compilations):
    Triton's interpreter cannot loop to a run-time bound with numpy 2.
    A and B are K-contiguous (fp8 or bf16). A scale with stride 0 is one scalar (the NVFP4
    1/(g_x g_w) factor), read from device memory so no host sync is needed.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row tiles share each B column tile while it is in L2
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_a = tl.minimum(offs_m, M - 1).to(tl.int64)  # clamped rows: in bounds, never stored
    rows_b = tl.minimum(offs_n, N - 1).to(tl.int64)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rows_b[:, None] * stride_bn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kt in range(K_TILES):
        k0 = kt * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[None, :], other=0.0)
        acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=IMPRECISE_K)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    rs = tl.load(row_scale_ptr + tl.minimum(offs_m, M - 1) * stride_rs)
    cs = tl.load(col_scale_ptr + tl.minimum(offs_n, N - 1) * stride_cs)
    out = acc * (rs[:, None] * cs[None, :])
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def scaled_gemm_tma_kernel(a_desc, b_desc, c_ptr, row_scale_ptr, col_scale_ptr, M, N,
                           stride_cm, stride_rs, stride_cs,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           K_TILES: tl.constexpr, GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr,
                           IMPRECISE_K: tl.constexpr):
    """scaled_gemm_kernel with operand tiles fetched by the tensor-memory accelerator (host
    descriptors; out-of-range rows and the ragged K tail arrive as zeros)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kt in tl.range(0, K_TILES, num_stages=NUM_STAGES):
        a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
        b = b_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])
        acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=IMPRECISE_K)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.load(row_scale_ptr + tl.minimum(offs_m, M - 1) * stride_rs)
    cs = tl.load(col_scale_ptr + tl.minimum(offs_n, N - 1) * stride_cs)
    out = acc * (rs[:, None] * cs[None, :])
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in tensors)


def scaled_gemm(a: torch.Tensor, b: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                out_dtype: torch.dtype, config: dict | None = None, out: torch.Tensor | None = None,
                use_tma: bool | None = None) -> torch.Tensor:
    """(a @ b^T) * row_scale * col_scale^T. a [M, K], b [N, K]; scales hold M (N) values or one.
    use_tma: None = when the layout allows it."""
    m, k = a.shape
    n = b.shape[0]
    assert a.stride(-1) == 1 and b.stride(-1) == 1 and b.shape[1] == k
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    cfg = dict(config or default_gemm_config(a.dtype, m))
    block_m, block_n, block_k = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    rs = row_scale.reshape(-1)
    cs = col_scale.reshape(-1)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    imprecise_k = cfg.pop("IMPRECISE_K", FP8_PROMOTE_EVERY)
    imprecise_k = imprecise_k if a.dtype.itemsize == 1 else None
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, K_TILES=triton.cdiv(k, block_k), GROUP_M=8,
                  IMPRECISE_K=None if imprecise_k is None else min(imprecise_k, block_k))
    if use_tma is None:
        use_tma = tma_ok(a, b)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        a_desc = TensorDescriptor.from_tensor(a, [block_m, block_k])
        b_desc = TensorDescriptor.from_tensor(b, [block_n, block_k])
        stages = cfg.pop("num_stages")
        scaled_gemm_tma_kernel[grid](a_desc, b_desc, out, rs, cs, m, n, out.stride(0),
                                     0 if rs.numel() == 1 else 1, 0 if cs.numel() == 1 else 1,
                                     NUM_STAGES=stages, **common, **cfg)
    else:
        scaled_gemm_kernel[grid](a, b, out, rs, cs, m, n, k, a.stride(0), b.stride(0), out.stride(0),
                                 0 if rs.numel() == 1 else 1, 0 if cs.numel() == 1 else 1,
                                 EVEN_K=(k % block_k == 0), **common, **cfg)
    return out


# fp8 MMA partial sums go into the fp32 accumulator after this many K elements (<= BLOCK_K)
FP8_PROMOTE_EVERY = 128


def default_gemm_config(dtype: torch.dtype, m: int) -> dict:
    """Tile shapes for Hopper (128x256 tiles, wgmma with 2 consumer warpgroups); 8-bit inputs take
    twice the K per stage for the same shared memory."""
    block_k = 128 if dtype.itemsize == 1 else 64
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=block_k, num_warps=8, num_stages=3)


def fp8_linear_scaled_mm(x8, s_x, w8, s_w, out_dtype, fast_accum=False):
    """cuBLAS rowwise-scaled FP8 GEMM (torch._scaled_mm): w8 [N, K], s_x [M, 1], s_w [N, 1]."""
    return torch._scaled_mm(x8, w8.t(), scale_a=s_x, scale_b=s_w.reshape(1, -1).contiguous(), out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def fp8_linear_triton(x8, s_x, w8, s_w, out_dtype):
    return scaled_gemm(x8, w8, s_x, s_w, out_dtype)
