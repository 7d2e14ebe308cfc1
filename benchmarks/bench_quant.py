"""Quantized prefill on one GPU: GEMM TF/s per path and prefill-forward tokens/s, bf16 vs fp8 vs nvfp4.

    python benchmarks/bench_quant.py --out DIR        (writes DIR/bench_quant.json and .md)

What it measures, in one run:
  1. the two ceilings: device-to-device copy bandwidth (bytes read + written) and torch's bf16
     matmul rate at 8192^3;
  2. each GEMM path on Llama-3-8B projection shapes (N, K) = qkv (6144, 4096), o (4096, 4096),
     gate_up (28672, 4096), down (4096, 14336) at M = 512, 2048, 8192 tokens:
       bf16           torch.matmul (cuBLAS)
       bf16_triton    the Triton GEMM of kernels/triton_fp8.py on bf16 (its quality vs cuBLAS)
       fp8_scaled_mm  fused Triton per-token quantizer + torch._scaled_mm rowwise (cuBLAS)
       fp8_triton     the same quantizer + the Triton GEMM with the scale epilogue (TMA)
       nvfp4_cublas   NVFP4 activation quantizer (amax pass + quantize pass, writes bf16 T[q]*s)
                      + cuBLAS bf16 GEMM + the 1/(g_x g_w) multiply
       nvfp4_triton   the same quantizer + Triton bf16 GEMM with 1/(g_x g_w) in the epilogue
     quantized paths include the activation quantization; weights are quantized beforehand;
  3. a prefill forward of a random-weight stack of Llama-3-8B decoder layers (hidden 4096, 32 query
     and 8 KV heads of 128, MLP 14336): RMSNorm, qkv projection, RoPE, causal SDPA attention (torch,
     flash backend, KV heads expanded to 32), o projection, residual, RMSNorm, gate_up, SiLU*up,
     down, residual; the four projections at the given precision, everything else bf16. Batch of
     one sequence, no KV-cache write, no embedding or LM head.
Timing: CUDA events around replays of a CUDA graph that holds ROT calls on ROT rotated input and
weight sets (so no call finds its operands in L2 and launch gaps are gone), warm-up first, median
of the replays. Prefill is also timed eagerly (launches from Python, as an engine without graphs).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pdserve.kernels import nvfp4  # noqa: E402
from pdserve.kernels import triton_fp8, triton_nvfp4  # noqa: E402
from pdserve.kernels.quant_linear import make_linear  # noqa: E402

GEMM_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TOKENS = (512, 2048, 8192)
ROT = 3


def graph_time_ms(fn_list, warmup=3, reps=10) -> float:
    """Median ms per call of a graph replaying every fn in fn_list once."""
    for fn in fn_list:  # compile and autotune outside the graph
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fn_list:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fn_list:
            fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(fn_list)


def call_ms(fn) -> float:
    """CUDA-event time of one call, launched from Python as the engine does (the host's part included)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def eager_time_ms(fn, warmup=2, reps=7) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(call_ms(fn) for _ in range(reps))


def ceilings() -> dict:
    n = 1 << 30  # 1 GiB per buffer
    src = torch.randn(n // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = graph_time_ms([lambda: dst.copy_(src)], reps=20)
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = graph_time_ms([lambda: a @ b], reps=20)
    return {"copy_TBps": 2 * n / copy_ms / 1e9, "bf16_matmul_8192_TFLOPs": 2 * 8192 ** 3 / mm_ms / 1e9}


def gemm_paths(m: int, n: int, k: int) -> dict:
    """Closures per path, each a list of ROT calls on rotated operands."""
    gen = torch.Generator(device="cuda").manual_seed(m + n + k)
    xs = [torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(ROT)]
    ws = [(torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16) for _ in range(ROT)]
    w8 = [triton_fp8.quantize_fp8_rows(w) for w in ws]  # same numerics as the reference (tested)
    w8 = [(c, s.reshape(1, -1).contiguous(), s) for c, s in w8]
    wq = [nvfp4.quantize_nvfp4(w) for w in ws]
    wf = [nvfp4.scaled_values(q).to(torch.bfloat16) for q in wq]
    x8 = [triton_fp8.quantize_fp8_rows(x) for x in xs]

    def _fp8_operands(i):
        c, s = triton_fp8.quantize_fp8_rows(xs[i])
        return c, w8[i][0].t(), s, w8[i][1]

    def fp8_scaled_mm(i):
        c, s = triton_fp8.quantize_fp8_rows(xs[i])
        return torch._scaled_mm(c, w8[i][0].t(), scale_a=s, scale_b=w8[i][1], out_dtype=torch.bfloat16)

    def fp8_triton(i):
        c, s = triton_fp8.quantize_fp8_rows(xs[i])
        return triton_fp8.scaled_gemm(c, w8[i][0], s, w8[i][2], torch.bfloat16)

    def nvfp4_cublas(i):
        f, g = triton_nvfp4.quantize_nvfp4_folded(xs[i])
        return triton_nvfp4.hopper_gemm_cublas(f, g, wf[i], wq[i].global_scale, torch.bfloat16)

    def nvfp4_triton(i):
        f, g = triton_nvfp4.quantize_nvfp4_folded(xs[i])
        return triton_nvfp4.hopper_gemm_triton(f, g, wf[i], wq[i].global_scale, torch.bfloat16)

    one = torch.ones(1, device="cuda")
    paths = {
        "bf16": lambda i: torch.matmul(xs[i], ws[i].t()),
        "bf16_triton": lambda i: triton_fp8.scaled_gemm(xs[i], ws[i], one, one, torch.bfloat16),
        "fp8_scaled_mm": fp8_scaled_mm,
        "fp8_triton": fp8_triton,
        "fp8_scaled_mm_fastacc": lambda i: torch._scaled_mm(*_fp8_operands(i), out_dtype=torch.bfloat16,
                                                            use_fast_accum=True),
        "fp8_gemm_only": lambda i: torch._scaled_mm(x8[i][0], w8[i][0].t(), scale_a=x8[i][1], scale_b=w8[i][1],
                                                    out_dtype=torch.bfloat16),
        "nvfp4_cublas": nvfp4_cublas,
        "nvfp4_triton": nvfp4_triton,
        "quant_fp8": lambda i: triton_fp8.quantize_fp8_rows(xs[i]),
        "quant_nvfp4": lambda i: triton_nvfp4.quantize_nvfp4_folded(xs[i]),
    }
    return {name: [(lambda f=f, i=i: f(i)) for i in range(ROT)] for name, f in paths.items()}


def fp8_gemm_errors() -> list[dict]:
    """Relative error of each fp8 GEMM variant against the fp64 product of the same codes."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    m, n, k = 512, 1024, 14336
    x8, sx = triton_fp8.quantize_fp8_rows(torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16))
    w8, sw = triton_fp8.quantize_fp8_rows(torch.randn(n, k, device="cuda", generator=gen).to(torch.bfloat16))
    ref = (x8.double() @ w8.double().T) * (sx.double() * sw.double().T)

    def err(y):
        return ((y.double() - ref).norm() / ref.norm()).item()

    rows = []
    for fast in (False, True):
        y = triton_fp8.fp8_linear_scaled_mm(x8, sx, w8, sw, torch.bfloat16, fast_accum=fast)
        rows.append({"what": "fp8 GEMM rel. error (bf16 out)", "M": m, "K": k, "N": n,
                     "setting": "scaled_mm fast-acc" if fast else "scaled_mm", "err": err(y)})
    for promote in (None, 128, 32):
        cfg = dict(triton_fp8.default_gemm_config(torch.float8_e4m3fn, m), IMPRECISE_K=promote)
        y = triton_fp8.scaled_gemm(x8, w8, sx, sw, torch.float32, config=cfg)
        rows.append({"what": "fp8 GEMM rel. error (fp32 out)", "M": m, "K": k, "N": n,
                     "setting": f"Triton, promote every {promote or 'never'}", "err": err(y)})
    return rows


def bench_variants(log) -> list[dict]:
    """Kernel settings worth choosing between, at the shapes where they matter most."""
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    tiles = [dict(BLOCK_M=16, BLOCK_K=128, num_warps=4), dict(BLOCK_M=16, BLOCK_K=128, num_warps=8),
             dict(BLOCK_M=8, BLOCK_K=128, num_warps=4), dict(BLOCK_M=32, BLOCK_K=128, num_warps=8),
             dict(BLOCK_M=32, BLOCK_K=256, num_warps=8)]
    for m, k in ((2048, 4096), (8192, 4096), (8192, 14336)):
        xs = [torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(ROT)]
        for tile in tiles:
            ms = graph_time_ms([lambda x=x, t=tile: triton_nvfp4.quantize_nvfp4_folded(x, tile=t) for x in xs])
            rows.append({"what": "nvfp4 quantizer", "M": m, "K": k, "setting": tile, "us": ms * 1e3,
                         "GBps": m * k * 6 / ms / 1e6})
        ms = graph_time_ms([lambda x=x: triton_fp8.quantize_fp8_rows(x) for x in xs])
        rows.append({"what": "fp8 quantizer", "M": m, "K": k, "setting": "default", "us": ms * 1e3,
                     "GBps": m * k * 3 / ms / 1e6})
        for n in (4096,):
            ws = [(torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16) for _ in range(ROT)]
            w8 = [triton_fp8.quantize_fp8_rows(w) for w in ws]
            x8 = [triton_fp8.quantize_fp8_rows(x) for x in xs]
            for promote in (None, 128, 32):  # None: Triton's sm_90 default, never promote (not fp32-exact)
                cfg = dict(triton_fp8.default_gemm_config(torch.float8_e4m3fn, m), IMPRECISE_K=promote)
                ms = graph_time_ms([lambda i=i, c=cfg: triton_fp8.scaled_gemm(x8[i][0], w8[i][0], x8[i][1], w8[i][1],
                                                                            torch.bfloat16, config=c)
                                    for i in range(ROT)])
                rows.append({"what": "fp8 Triton GEMM, promote every", "M": m, "K": k, "N": n, "setting": promote or "never",
                             "us": ms * 1e3, "TFLOPs": 2 * m * n * k / ms / 1e9})
        for row in rows[-(len(tiles) + 4):]:
            log(json.dumps(row))
        del xs
        torch.cuda.empty_cache()
    rows += fp8_gemm_errors()
    for row in rows[-5:]:
        log(json.dumps(row))
    best = {}
    for row in rows:
        if row["what"] == "nvfp4 quantizer":
            key = json.dumps(row["setting"], sort_keys=True)
            best[key] = best.get(key, 0.0) + math.log(row["us"])
    triton_nvfp4.QUANT_TILE = json.loads(min(best, key=best.get))
    log(json.dumps({"nvfp4 QUANT_TILE chosen": triton_nvfp4.QUANT_TILE}))
    return rows


def bench_gemms(log) -> list[dict]:
    rows = []
    for m in TOKENS:
        for name, (n, k) in GEMM_SHAPES.items():
            flops = 2 * m * n * k
            row = {"M": m, "shape": name, "N": n, "K": k}
            for path, fns in gemm_paths(m, n, k).items():
                try:
                    ms = graph_time_ms(fns)
                    row[path + "_us"] = ms * 1e3
                    if not path.startswith("quant"):
                        row[path + "_TFLOPs"] = flops / ms / 1e9
                except Exception as e:  # keep measuring the other paths; the error is reported
                    row[path + "_error"] = f"{type(e).__name__}: {e}"[:300]
            for path in ("bf16_triton", "fp8_scaled_mm", "fp8_scaled_mm_fastacc", "fp8_triton", "fp8_gemm_only",
                         "nvfp4_cublas", "nvfp4_triton"):
                if path + "_us" in row and "bf16_us" in row:
                    row[path + "_x"] = row["bf16_us"] / row[path + "_us"]
            rows.append(row)
            log(json.dumps({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()}))
            torch.cuda.empty_cache()
    return rows


def choose_backends(gemms) -> dict:
    """Point kernels.quant_linear at the faster GEMM per path (geometric mean over M >= 2048), so
    the prefill runs below use it; the choice is printed and belongs in quant_linear's defaults."""
    from pdserve.kernels import quant_linear

    def geo(path):
        vals = [r[path + "_us"] for r in gemms if r["M"] >= 2048 and path + "_us" in r]
        return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else float("inf")

    quant_linear.FP8_GEMM = "scaled_mm" if geo("fp8_scaled_mm") <= geo("fp8_triton") else "triton"
    quant_linear.NVFP4_HOPPER_GEMM = "cublas" if geo("nvfp4_cublas") <= geo("nvfp4_triton") else "triton"
    return {"FP8_GEMM": quant_linear.FP8_GEMM, "NVFP4_HOPPER_GEMM": quant_linear.NVFP4_HOPPER_GEMM,
            "geomean_us": {p: geo(p) for p in ("fp8_scaled_mm", "fp8_triton", "nvfp4_cublas", "nvfp4_triton")}}


# ------------------------------------------------------------------ prefill stack

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 4096, 32, 8, 128, 14336


def layer_weights(gen):
    def w(n, k):
        return (torch.randn(n, k, device="cuda", generator=gen) / math.sqrt(k)).to(torch.bfloat16)
    return {"qkv": w((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), "o": w(HIDDEN, HEADS * HEAD_DIM),
            "gate_up": w(2 * INTER, HIDDEN), "down": w(HIDDEN, INTER),
            "norm1": torch.ones(HIDDEN, dtype=torch.bfloat16, device="cuda"),
            "norm2": torch.ones(HIDDEN, dtype=torch.bfloat16, device="cuda")}


def torch_rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def torch_rotary(q, k, pos, cache):
    half = HEAD_DIM // 2
    cos, sin = cache[pos, :half][:, None, :], cache[pos, half:][:, None, :]
    for t in (q, k):
        a, b = t[..., :half].float(), t[..., half:].float()
        t.copy_(torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(t.dtype))
    return q, k


def torch_silu_mul(x):
    g, u = x.chunk(2, dim=-1)
    return F.silu(g) * u


def pick_elementwise():
    """The project's fused Triton kernels when they run here, else torch ops (reported)."""
    try:
        from pdserve.kernels import fused
        x = torch.randn(8, HIDDEN, dtype=torch.bfloat16, device="cuda")
        w = torch.ones(HIDDEN, dtype=torch.bfloat16, device="cuda")
        fused.rms_norm(x, w, 1e-5)
        fused.silu_and_mul(torch.randn(8, 2 * INTER, dtype=torch.bfloat16, device="cuda"))
        q = torch.randn(8, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(8, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        fused.rotary(q, k, torch.arange(8, device="cuda"), torch.randn(64, HEAD_DIM, device="cuda"))
        torch.cuda.synchronize()
        return "kernels.fused (Triton)", fused.rms_norm, fused.rotary, fused.silu_and_mul
    except Exception as e:
        return f"torch ops (kernels.fused failed: {type(e).__name__})", torch_rms_norm, torch_rotary, torch_silu_mul


def make_forward(layers, precision, rms_norm, rotary, silu_mul, cache):
    """precision "fp8_fused": fp8 layers fed by the producers with the quantizer fused in (RMSNorm
    before qkv and gate_up, SiLU*up before down; o's input still goes through the plain quantizer)."""
    fused = precision.startswith("fp8_fused")
    layer_precision = "fp8" if precision.startswith("fp8") else precision
    mods = [{name: make_linear(lw[name], None, layer_precision, torch.bfloat16) for name in ("qkv", "o", "gate_up", "down")}
            | {"norm1": lw["norm1"], "norm2": lw["norm2"]} for lw in layers]
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM

    def norm_linear(x, norm_w, linear):
        if fused:
            return linear.forward_quantized(*triton_fp8.rms_norm_quant_fp8(x, norm_w, 1e-5), torch.bfloat16)
        return linear(rms_norm(x, norm_w, 1e-5))

    def mlp_down(gate_up, linear):
        if fused:
            return linear.forward_quantized(*triton_fp8.silu_mul_quant_fp8(gate_up), torch.bfloat16)
        return linear(silu_mul(gate_up))

    def forward(x, pos):
        t = x.shape[0]
        res = x
        for lm in mods:
            qkv = norm_linear(res, lm["norm1"], lm["qkv"])
            q = qkv[:, :q_size].view(t, HEADS, HEAD_DIM)
            k = qkv[:, q_size:q_size + kv_size].view(t, KV_HEADS, HEAD_DIM)
            v = qkv[:, q_size + kv_size:].view(t, KV_HEADS, HEAD_DIM)
            rotary(q, k, pos, cache)
            rep = HEADS // KV_HEADS
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), k.repeat_interleave(rep, dim=1).transpose(0, 1).unsqueeze(0),
                v.repeat_interleave(rep, dim=1).transpose(0, 1).unsqueeze(0), is_causal=True)
            attn = attn.squeeze(0).transpose(0, 1).reshape(t, q_size)
            res = res + lm["o"](attn)
            res = res + mlp_down(norm_linear(res, lm["norm2"], lm["gate_up"]), lm["down"])
        return res

    return forward, mods


def profile_forward(fn, precision, tokens, out_dir) -> None:
    """Where one eager forward spends its GPU time, kernel by kernel (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
    with open(Path(out_dir) / "profile.txt", "a") as f:
        f.write(f"\n=== {precision}, {tokens} tokens, one eager forward ===\n{table}\n")


def bench_prefill(log, num_layers: int, profile_dir=None) -> tuple[list[dict], str]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [layer_weights(gen) for _ in range(num_layers)]
    which, rms_norm, rotary, silu_mul = pick_elementwise()
    half = HEAD_DIM // 2
    inv = 1.0 / (500000.0 ** (torch.arange(half, device="cuda").float() / half))
    ang = torch.arange(max(TOKENS), device="cuda").float()[:, None] * inv[None, :]
    cache = torch.cat((ang.cos(), ang.sin()), dim=-1).contiguous()
    rows = []
    outputs = {}
    inputs = {t: [torch.randn(t, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2)]
              for t in TOKENS}  # the same inputs for every precision
    from pdserve.kernels import quant_linear
    for precision in ("bf16", "fp8", "fp8_fused", "fp8_fused_fastacc", "nvfp4"):
        quant_linear.FP8_FAST_ACCUM = precision.endswith("fastacc")
        forward, mods = make_forward(layers, precision, rms_norm, rotary, silu_mul, cache)
        for t in TOKENS:
            xs = inputs[t]
            pos = torch.arange(t, device="cuda")
            row = {"precision": precision, "tokens": t, "layers": num_layers}
            try:
                with torch.no_grad():
                    ms_graph = graph_time_ms([lambda x=x: forward(x, pos) for x in xs], reps=7)
                    ms_eager = eager_time_ms(lambda: forward(xs[0], pos))
                    outputs[(precision, t)] = forward(xs[0], pos).float()
                row.update(graph_ms=ms_graph, eager_ms=ms_eager, graph_tok_s=t / ms_graph * 1e3,
                           eager_tok_s=t / ms_eager * 1e3)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            if t == 2048 and profile_dir is not None and not precision.endswith("fastacc"):
                profile_forward(lambda: forward(xs[0], pos), precision, t, profile_dir)
            torch.cuda.empty_cache()
        del mods, forward
        quant_linear.FP8_FAST_ACCUM = False
        torch.cuda.empty_cache()
    add_ratios(rows, outputs)
    for row in rows:
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    return rows, which


def add_ratios(rows: list[dict], outputs: dict) -> None:
    """Per row: speed vs the bf16 row of the same length (graph_x, eager_x) and how far its output
    drifts from bf16's (rel_err_vs_bf16; outputs keyed by (precision, tokens), random weights)."""
    for row in rows:
        base = next(r for r in rows if r["precision"] == "bf16" and r["tokens"] == row["tokens"])
        if "graph_ms" in row and "graph_ms" in base:
            row["graph_x"] = base["graph_ms"] / row["graph_ms"]
            row["eager_x"] = base["eager_ms"] / row["eager_ms"]
        key, bkey = (row["precision"], row["tokens"]), ("bf16", row["tokens"])
        if key in outputs and bkey in outputs:
            ref = outputs[bkey]
            row["rel_err_vs_bf16"] = ((outputs[key] - ref).norm() / ref.norm()).item()


def markdown(env, ceil, gemms, prefill, which, variants=()) -> str:
    lines = [f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
             f"{env['date']}", "",
             f"Ceilings measured in the same run: copy {ceil['copy_TBps']:.2f} TB/s (read + write), "
             f"bf16 torch.matmul 8192^3 {ceil['bf16_matmul_8192_TFLOPs']:.0f} TFLOP/s.", "",
             "### GEMM paths (TFLOP/s; quantized paths include activation quantization; x = speed vs bf16)", "",
             "| M | shape (N, K) | bf16 | bf16 Triton | fp8 scaled_mm | fp8 scaled_mm fast-acc | fp8 Triton "
             "| fp8 GEMM only | nvfp4 emu cuBLAS | nvfp4 emu Triton | quant fp8 us | quant nvfp4 us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(row, path):
        if path + "_TFLOPs" not in row:
            return "err" if path + "_error" in row else "-"
        x = row.get(path + "_x")
        return f"{row[path + '_TFLOPs']:.0f}" + (f" ({x:.2f}x)" if x is not None else "")

    for r in gemms:
        lines.append(f"| {r['M']} | {r['shape']} ({r['N']}, {r['K']}) | " + " | ".join(
            cell(r, p) for p in ("bf16", "bf16_triton", "fp8_scaled_mm", "fp8_scaled_mm_fastacc", "fp8_triton",
                                 "fp8_gemm_only", "nvfp4_cublas", "nvfp4_triton"))
            + f" | {r.get('quant_fp8_us', float('nan')):.1f} | {r.get('quant_nvfp4_us', float('nan')):.1f} |")
    lines += ["", f"### Prefill forward, {prefill[0]['layers']} Llama-3-8B decoder layers "
              f"(elementwise ops: {which}); tokens/s and x vs bf16", "",
              "| precision | tokens | graph ms | graph tok/s | x | eager ms | eager tok/s | x | rel. err vs bf16 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in prefill:
        if "graph_ms" not in r:
            lines.append(f"| {r['precision']} | {r['tokens']} | error: {r.get('error')} |")
            continue
        lines.append(f"| {r['precision']} | {r['tokens']} | {r['graph_ms']:.2f} | {r['graph_tok_s']:.0f} | "
                     f"{r.get('graph_x', 1):.2f} | {r['eager_ms']:.2f} | {r['eager_tok_s']:.0f} | "
                     f"{r.get('eager_x', 1):.2f} | {r.get('rel_err_vs_bf16', 0):.3f} |")
    if variants:
        lines += ["", "### Kernel settings compared (graph-replayed, rotated inputs)", "",
                  "| what | M | K | N | setting | us | GB/s, TFLOP/s or error |", "|---|---|---|---|---|---|---|"]
        for v in variants:
            if "err" in v:
                lines.append(f"| {v['what']} | {v['M']} | {v['K']} | {v['N']} | {v['setting']} | - | {v['err']:.2e} |")
                continue
            rate = f"{v['GBps']:.0f} GB/s" if "GBps" in v else f"{v['TFLOPs']:.0f} TFLOP/s"
            lines.append(f"| {v['what']} | {v['M']} | {v['K']} | {v.get('N', '')} | {v['setting']} | {v['us']:.1f} | {rate} |")
    errors = [f"- M={r['M']} {r['shape']} {k[:-6]}: {v}" for r in gemms for k, v in r.items() if k.endswith("_error")]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--skip-gemm", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    import triton
    env = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "host": platform.node(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    log(json.dumps(env))
    ceil = ceilings()
    log(json.dumps(ceil))
    variants = [] if args.skip_gemm else bench_variants(log)
    gemms = [] if args.skip_gemm else bench_gemms(log)
    if gemms:
        log(json.dumps(choose_backends(gemms)))
    prefill, which = bench_prefill(log, args.layers, profile_dir=out)
    md = markdown(env, ceil, gemms, prefill, which, variants)
    (out / "bench_quant.json").write_text(json.dumps({"env": env, "ceilings": ceil, "gemm": gemms,
                                                      "prefill": prefill, "elementwise": which,
                                                      "variants": variants}, indent=1))
    (out / "bench_quant.md").write_text(md)
    print(md)
    log("done")


if __name__ == "__main__":
    main()
