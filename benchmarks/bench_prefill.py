"""Prefill forward of the engine's own model at each pool precision, on one GPU, in one run.

    python benchmarks/bench_prefill.py --out OUT [--layers 32] [--tokens 512,2048,8192]

What runs is engine/model.py's LlamaModel with the linears and the attention backend a pool of that
precision builds (engine/model_runner.py linear_factory, engine/model_runner.py get_backend), over a random-
weight Llama-3-8B (all 32 layers by default), one fresh prompt of T tokens, plus the LM head of its last
token: the work of one prefill step. Precisions:
    bf16          TritonDenseLinear (cuBLAS) + the paged Triton prefill attention
    fp8           the fp8 pool as configured by default: W8A8 with the quantizers fused into RMSNorm and
                  SiLU*up, cuBLAS rowwise scaled_mm with fp32 accumulation; attention with both matmuls in
                  fp8 (kernels/attention_fp8.py) from engine.fp8_attention_min_tokens (2048) prompt tokens,
                  bf16 below
    fp8_fp8attn   fp8 with the fp8 attention at every length (fp8_attention_min_tokens 0)
    fp8_bf16attn  fp8 with the bf16 attention at every length (what the fp8 attention adds)
    fp8_unfused   fp8_bf16attn with the quantizers in their own passes (what the fusion adds)
    fp8_fastacc   fp8 with Hopper's fast fp8 accumulation (kernels.quant_linear.FP8_FAST_ACCUM, opt-in: not
                  fp32 accumulation)
    nvfp4         W4A4, exact emulation on Hopper (bf16 GEMM of scale-folded operands)
Timing: CUDA events, median; "eager" is how the engine runs a prefill step (kernel launches from Python),
"graph" replays a CUDA graph of the same forward (GPU time alone). Eager prefill is partly bound by the
host, whose CPUs are shared on a lent machine: "eager x, paired" alternates each precision's forward with
bf16's, one of each per round, so a stretch of host noise slows both of a pair (median of the rounds'
ratios). Before the forwards the paged prefill
attention kernel is timed alone over a few tile configurations and the best is used; torch SDPA (flash)
on contiguous K/V is timed too, as an outside reference for the attention rate: attention is the part of
a long prefill that the precision does not change.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import triton

from bench_engine_gpu import LLAMA3_8B  # noqa: E402
from bench_quant import add_ratios, call_ms, eager_time_ms, graph_time_ms  # noqa: E402

PRECISIONS = ("bf16", "fp8", "fp8_fp8attn", "fp8_bf16attn", "fp8_unfused", "fp8_fastacc", "nvfp4")
# the fp8 pool's attention (kernels/attention_fp8.py): tile and variant candidates
def _fp8_tile(m, n, warps, stages, tma=True, acc=None, qk_acc=0):
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages, TMA=tma,
                ACC_EVERY=n if acc is None else acc, QK_ACC_EVERY=qk_acc)


FP8_TILES = [_fp8_tile(64, 128, 4, 3), _fp8_tile(64, 128, 4, 3, acc=0), _fp8_tile(64, 128, 4, 2),
             _fp8_tile(128, 128, 8, 3)]
TILES = [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
         dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)]


def attention_inputs(tokens: int, arch, gen):
    from pdserve.engine.attention import build_metadata

    bs = 16
    nblk = -(-tokens // bs)
    kv = torch.randn(nblk + 1, 2, bs, arch.num_kv_heads, arch.head_dim, generator=gen, device="cuda").to(torch.bfloat16)
    q = torch.randn(tokens, arch.num_heads, arch.head_dim, generator=gen, device="cuda").to(torch.bfloat16)
    meta = build_metadata([tokens], [tokens], [list(range(nblk))], bs, torch.device("cuda"))
    return q, kv, meta


def attention_flops(tokens: int, arch) -> float:
    return 4.0 * arch.num_heads * arch.head_dim * tokens * (tokens + 1) / 2  # causal QK^T and PV


def bench_attention(arch, tokens_list, log) -> tuple[list[dict], dict]:
    """The paged prefill attention over the tile candidates, and SDPA; sets and returns the best tile."""
    import torch.nn.functional as F

    from pdserve.kernels import attention

    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for tokens in tokens_list:
        q, kv, meta = attention_inputs(tokens, arch, gen)
        flops = attention_flops(tokens, arch)
        scale = arch.head_dim ** -0.5

        def paged():
            return attention.paged_attention(q, kv, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
                                             meta.max_query_len, meta.max_seq_len)

        for tile in TILES:
            attention.PREFILL_CONFIGS[arch.head_dim] = tile
            try:
                ms = graph_time_ms([paged], reps=10)
                row = dict(what="paged prefill attention (bf16)", tokens=tokens, tile=tile, ms=ms,
                           TFLOPs=flops / ms / 1e9)
            except Exception as e:  # a tile that does not fit is a result, not a crash
                row = dict(what="paged prefill attention (bf16)", tokens=tokens, tile=tile, error=str(e)[:200])
            rows.append(row)
            log(json.dumps(row))
        rows += bench_fp8_attention(q, kv, meta, tokens, flops, scale, log)
        k = kv[:, 0].reshape(-1, arch.num_kv_heads, arch.head_dim)[:tokens].transpose(0, 1).unsqueeze(0)
        v = kv[:, 1].reshape(-1, arch.num_kv_heads, arch.head_dim)[:tokens].transpose(0, 1).unsqueeze(0)
        k, v = k.contiguous(), v.contiguous()
        qt = q.transpose(0, 1).unsqueeze(0).contiguous()
        try:
            ms = graph_time_ms([lambda: F.scaled_dot_product_attention(qt, k, v, is_causal=True, scale=scale,
                                                                         enable_gqa=True)], reps=10)
            rows.append(dict(what="torch SDPA (contiguous K/V, enable_gqa)", tokens=tokens, ms=ms,
                             TFLOPs=flops / ms / 1e9))
        except Exception as e:
            rows.append(dict(what="torch SDPA (contiguous K/V, enable_gqa)", tokens=tokens, error=str(e)[:200]))
        log(json.dumps(rows[-1]))
    totals = {}  # one tile: the fastest summed over the lengths
    for r in rows:
        if r.get("tile") and "ms" in r and r["what"].endswith("(bf16)"):
            totals.setdefault(json.dumps(r["tile"], sort_keys=True), []).append(r["ms"])
    full = {k: sum(v) for k, v in totals.items() if len(v) == len(tokens_list)}
    best = json.loads(min(full, key=full.get))
    attention.PREFILL_CONFIGS[arch.head_dim] = best
    best_fp8 = pick_fp8_tile(rows, len(tokens_list))
    if best_fp8:
        from pdserve.kernels import attention_fp8
        attention_fp8.PREFILL_FP8_CONFIG = best_fp8
    return rows, dict(bf16=best, fp8=best_fp8)


def pick_fp8_tile(rows, lengths: int) -> dict | None:
    """The fastest fp8 attention tile over all lengths, among those within 1e-2 of the reference and with
    the engine's numerics (P @ V partial sums into fp32 every tile, QK^T as the MMA sums it); the other
    variants are measured to show what those choices cost."""
    totals, bad = {}, set()
    for r in rows:
        if r["what"] != "fp8 prefill attention" or "ms" not in r:
            continue
        if r["tile"]["ACC_EVERY"] != r["tile"]["BLOCK_N"] or r["tile"]["QK_ACC_EVERY"]:
            continue
        key = json.dumps(r["tile"], sort_keys=True)
        totals.setdefault(key, []).append(r["ms"])
        if r.get("rel_err_vs_ref", 0.0) > 1e-2:
            bad.add(key)
    full = {k: sum(v) for k, v in totals.items() if len(v) == lengths and k not in bad}
    return json.loads(min(full, key=full.get)) if full else None

def kernel_facts(jit_fn) -> list[dict]:
    """Registers, spills and MMA instructions of each compiled variant of a Triton kernel (for the log)."""
    facts = []
    try:
        for cache in jit_fn.device_caches.values():
            for key, k in cache[0].items():
                ptx = k.asm.get("ptx", "")
                facts.append(dict(n_regs=k.n_regs, n_spills=k.n_spills, wgmma=ptx.count("wgmma.mma_async"),
                                  mma_sync=ptx.count("mma.sync"), key=str(key)[-160:]))
    except Exception as e:  # introspection is a diagnostic, never a failure
        facts.append(dict(error=str(e)[:200]))
    return facts


def host_cost(q, kv, meta, tokens, scale, ctx_start, log, calls=200) -> dict:
    """Host time per call of the bf16 and the fp8 attention on 64 tokens of the batch (the GPU's share is then
    a few us, so back-to-back calls are bound by the host: what an eager prefill pays per layer)."""
    from pdserve.kernels import attention, attention_fp8

    n = 64
    qs = q[:n]
    small = dict(query_start_loc=torch.tensor([0, n], dtype=torch.int32, device="cuda"),
                 seq_lens=torch.tensor([n], dtype=torch.int32, device="cuda"), block_tables=meta.block_tables)
    fns = {"bf16": lambda: attention.paged_attention(qs, kv, small["query_start_loc"], small["seq_lens"],
                                                     small["block_tables"], scale, n, n),
           "fp8": lambda: attention_fp8.prefill_attention_fp8(qs, kv, small["query_start_loc"], small["seq_lens"],
                                                              small["block_tables"], ctx_start, n, scale, n, n)}
    row = dict(what="host time per attention call (us)", tokens=n)
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        row[name] = (time.perf_counter() - t0) / calls * 1e6
    log(json.dumps(row))
    return row


def bench_fp8_attention(q, kv, meta, tokens, flops, scale, log) -> list[dict]:
    """kernels/attention_fp8.py over its candidates, each with its relative error against the torch
    reference (up to 4096 tokens: the reference materialises the whole score matrix)."""
    from pdserve.kernels import attention_fp8, reference

    ctx_start = torch.zeros(1, dtype=torch.int32, device="cuda")
    ref = None
    if tokens <= 4096:
        ref = reference.prefill_attention_fp8(q, kv, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale)
    rows = []
    for tile in FP8_TILES:
        def run(tile=tile):
            return attention_fp8.prefill_attention_fp8(q, kv, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                                       ctx_start, tokens, scale, meta.max_query_len,
                                                       meta.max_seq_len, config=tile)
        row = dict(what="fp8 prefill attention", tokens=tokens, tile=tile)
        try:
            out = run()
            if ref is not None:
                row["rel_err_vs_ref"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            row["ms"] = graph_time_ms([run], reps=10)
            row["TFLOPs"] = flops / row["ms"] / 1e9
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        log(json.dumps(row))
    rows.append(host_cost(q, kv, meta, tokens, scale, ctx_start, log))
    quantize = dict(what="fp8 attention's context quantization (in the rows above)", tokens=tokens)
    quantize["ms"] = graph_time_ms([lambda: attention_fp8.quantize_context(kv, meta.seq_lens, meta.block_tables,
                                                                           ctx_start, tokens, tokens)], reps=10)
    quantize["TFLOPs"] = 0.0
    rows.append(quantize)
    log(json.dumps(quantize))
    log(json.dumps(dict(kernel_facts=kernel_facts(attention_fp8._prefill_fp8_kernel))))
    return rows


def bench_silu_mul_quant(arch, tokens_list, log) -> list[dict]:
    """The fp8 pool's fused SiLU*up + quantizer over its launch candidates: one pass with the next row's
    loads in flight (warps per program, programs per SM), two passes (rows in flight per SM: the second
    read must hit L2). Reports which is fastest over all lengths next to the engine's default
    (kernels.triton_fp8.silu_mul_launch), which the forward rows below use."""
    from pdserve.kernels import fused, triton_fp8

    inter = arch.intermediate_size
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    one_pass = dict(BLOCK_K=triton.next_power_of_2(inter), K_TILES=1, ONE_PASS=True)
    two_pass = dict(BLOCK_K=2048, K_TILES=triton.cdiv(inter, 2048), ONE_PASS=False)
    candidates = {f"one pass, {r} program(s)/SM, {w} warps": dict(one_pass, num_warps=w, PROGRAMS=sms * r)
                  for w, r in ((32, 1), (16, 1), (16, 2), (8, 4))}
    candidates |= {f"two passes, {r} rows/SM, {w} warps": dict(two_pass, num_warps=w, PROGRAMS=sms * r)
                   for r in (2, 4, 8) for w in (4, 8)}
    default = triton_fp8.silu_mul_launch(inter, torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(3)
    rows, totals = [], {}
    for t in tokens_list:
        x = torch.randn(t, 2 * inter, generator=gen, device="cuda").to(torch.bfloat16)
        ref = triton_fp8.quantize_fp8_rows(fused.silu_and_mul(x))
        for name, launch in candidates.items():
            out = triton_fp8.silu_mul_quant_fp8(x, launch=launch)
            same = torch.equal(out[0].view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(out[1], ref[1])
            ms = graph_time_ms([lambda launch=launch: triton_fp8.silu_mul_quant_fp8(x, launch=launch)], reps=20)
            row = dict(what="fp8 SiLU*up + quantizer", tokens=t, setting=name, us=ms * 1e3, same_bytes=same,
                       GBps=t * inter * (4 + 1) / ms / 1e6, engine_default=launch == default)
            rows.append(row)
            log(json.dumps(row))
            if same:
                totals.setdefault(name, []).append(ms)
        ms = graph_time_ms([lambda: fused.silu_and_mul(x)], reps=20)
        rows.append(dict(what="bf16 SiLU*up (the bf16 pool's)", tokens=t, setting="fused.silu_and_mul", us=ms * 1e3,
                         GBps=t * inter * (4 + 2) / ms / 1e6))
        log(json.dumps(rows[-1]))
    full = {k: sum(v) for k, v in totals.items() if len(v) == len(tokens_list)}
    log(json.dumps({"silu_mul_quant fastest over all lengths": min(full, key=full.get), "engine default": default}))
    return rows


def build(precision: str, arch, weights):
    from pdserve.engine.model_runner import get_backend
    from pdserve.engine.model import LlamaModel
    from pdserve.engine.model_runner import linear_factory
    from pdserve.config import EngineConfig

    linear_precision = "fp8" if precision.startswith("fp8") else precision
    model = LlamaModel(arch, weights, linear_factory(linear_precision, torch.bfloat16, torch.device("cuda"))).eval()
    min_tokens = {"fp8": EngineConfig.fp8_attention_min_tokens, "fp8_fastacc": EngineConfig.fp8_attention_min_tokens,
                  "fp8_fp8attn": 0}.get(precision)
    return model, get_backend(torch.device("cuda"), fp8_min_tokens=min_tokens)


def kernel_profile(forward, log, label: str, top: int = 14) -> None:
    """GPU time per kernel name over one eager forward (torch.profiler), largest first: where a
    precision's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    totals: dict[str, list] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            t = totals.setdefault(e.name[:90], [0.0, 0])
            t[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            t[1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    total = sum(v[0] for _, v in rows)
    log(json.dumps(dict(profile=label, total_gpu_ms=total / 1e3,
                        kernels=[dict(name=k, ms=round(v[0] / 1e3, 3), calls=v[1]) for k, v in rows[:top]])))


def paired_eager_ms(forward, base_forward, rounds: int = 7) -> tuple[float, float, float]:
    """Eager times of forward and of bf16's base_forward, one of each per round, alternating: a stretch of
    host noise (the lent machine's CPUs are shared; eager prefill is partly bound by the host) then slows
    both of a pair, not one precision's whole series. Returns (median ms, bf16's median ms, median of
    the per-round ratios bf16 / forward)."""
    for fn in (forward, base_forward, forward, base_forward):
        fn()
    torch.cuda.synchronize()
    times, base_times = [], []
    for _ in range(rounds):
        base_times.append(call_ms(base_forward))
        times.append(call_ms(forward))
    ratios = [b / t for b, t in zip(base_times, times)]
    return statistics.median(times), statistics.median(base_times), statistics.median(ratios)


def bench_forward(arch, weights, tokens_list, layers, log, profile_tokens: int = 0) -> list[dict]:
    from pdserve.engine.attention import build_metadata
    from pdserve.kernels import quant_linear

    bs = 16
    nblk = max(-(-t // bs) for t in tokens_list)
    kv_cache = torch.zeros(nblk, layers, 2, bs, arch.num_kv_heads, arch.head_dim, dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(2)
    ids = {t: torch.randint(3, arch.vocab_size, (t,), generator=gen, device="cuda") for t in tokens_list}
    metas = {t: build_metadata([t], [t], [list(range(-(-t // bs)))], bs, torch.device("cuda")) for t in tokens_list}
    positions = {t: torch.arange(t, device="cuda") for t in tokens_list}

    def forward_of(model, backend, t):
        def forward():
            hidden = model(ids[t], positions[t], kv_cache, metas[t], backend)
            return model.logits(hidden[-1:])
        return forward

    base = build("bf16", arch, weights)  # kept for the paired eager timings
    rows, outputs = [], {}
    for precision in PRECISIONS:
        quant_linear.FUSE_PRODUCERS = precision != "fp8_unfused"
        quant_linear.FP8_FAST_ACCUM = precision == "fp8_fastacc"
        t0 = time.perf_counter()
        model, backend = base if precision == "bf16" else build(precision, arch, weights)
        build_s = time.perf_counter() - t0
        for t in tokens_list:
            forward = forward_of(model, backend, t)
            row = dict(precision=precision, tokens=t, layers=layers, build_s=build_s)
            try:
                with torch.no_grad():
                    row["eager_ms"] = eager_time_ms(forward, warmup=2, reps=7)
                    if precision != "bf16":  # (the bf16 model's linears ignore quant_linear's switches)
                        row["paired_eager_ms"], row["paired_bf16_eager_ms"], row["paired_eager_x"] = paired_eager_ms(
                            forward, forward_of(*base, t))
                    row["graph_ms"] = graph_time_ms([forward], warmup=2, reps=7)
                    outputs[(precision, t)] = model(ids[t], positions[t], kv_cache, metas[t], backend).float()
                row["eager_tok_s"] = t / row["eager_ms"] * 1e3
                row["graph_tok_s"] = t / row["graph_ms"] * 1e3
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        if precision != "bf16":
            del model, backend
        torch.cuda.empty_cache()
    del base
    quant_linear.FUSE_PRODUCERS, quant_linear.FP8_FAST_ACCUM = True, False
    add_ratios(rows, outputs)
    if profile_tokens:  # after every timing: the profiler slows the launches of later eager runs
        for precision in PRECISIONS:
            quant_linear.FUSE_PRODUCERS = precision != "fp8_unfused"
            quant_linear.FP8_FAST_ACCUM = precision == "fp8_fastacc"
            model, backend = build(precision, arch, weights)
            forward = forward_of(model, backend, profile_tokens)  # main() checks it is among tokens_list
            with torch.no_grad():
                forward()  # compiled before the profile
            kernel_profile(forward, log, f"{precision} {profile_tokens} tokens")
            del model, backend, forward
        quant_linear.FUSE_PRODUCERS, quant_linear.FP8_FAST_ACCUM = True, False
    return rows


def markdown(env, attn_rows, best, fwd_rows, silu_rows=()) -> str:
    lines = [f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}; {env['date']}", "",
             "### Prefill attention alone (one layer, causal, 32 query / 8 KV heads, head_dim 128)", "",
             "| kernel | tokens | tile (BLOCK_M, BLOCK_N, warps, stages[, loads, fp32 accumulation]) | ms | TFLOP/s "
             "| rel. err vs reference |", "|---|---|---|---|---|---|"]
    for r in attn_rows:
        tile = r.get("tile")
        tile_s = f"{tile['BLOCK_M']}, {tile['BLOCK_N']}, {tile['num_warps']}, {tile['num_stages']}" if tile else ""
        if tile and "TMA" in tile:
            tile_s += (f", {'TMA' if tile['TMA'] else 'pointers'}, fp32 sums every {tile['ACC_EVERY'] or '-'} (PV) "
                       f"{tile['QK_ACC_EVERY'] or '-'} (QK)")
        err = f"{r['rel_err_vs_ref']:.1e}" if "rel_err_vs_ref" in r else ""
        if "fp8" in r and "ms" not in r:  # the host-time row
            lines.append(f"| {r['what']} | {r['tokens']} | bf16 {r['bf16']:.0f}, fp8 {r['fp8']:.0f} | | | |")
        elif "error" in r:
            lines.append(f"| {r['what']} | {r['tokens']} | {tile_s} | error: {r['error'][:60]} | | |")
        else:
            lines.append(f"| {r['what']} | {r['tokens']} | {tile_s} | {r['ms']:.3f} | {r['TFLOPs']:.0f} | {err} |")
    lines += ["", f"Chosen tiles: {best}", "", "### fp8 SiLU*up + quantizer (Llama-3-8B's 14336-wide rows)", "",
              "| tokens | launch | us | GB/s | bytes equal to silu_and_mul + quantize_fp8_rows | engine default |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['setting']} | {r['us']:.1f} | {r['GBps']:.0f} | {r.get('same_bytes', '')} | "
              f"{'yes' if r.get('engine_default') else ''} |" for r in silu_rows]
    lines += ["",
              f"### Prefill forward, {fwd_rows[0]['layers']} Llama-3-8B layers + LM head of the last token "
              "(tokens/s; x = vs bf16 in the same run)", "",
              "| precision | tokens | eager ms | eager tok/s | x | eager x, paired | graph ms | graph tok/s | x "
              "| rel. err vs bf16 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in fwd_rows:
        if "error" in r:
            lines.append(f"| {r['precision']} | {r['tokens']} | error: {r['error'][:80]} | | | | | | | |")
            continue
        lines.append(f"| {r['precision']} | {r['tokens']} | {r['eager_ms']:.2f} | {r['eager_tok_s']:.0f} | "
                     f"{r.get('eager_x', float('nan')):.2f} | {r.get('paired_eager_x', 1.0):.2f} | "
                     f"{r['graph_ms']:.2f} | {r['graph_tok_s']:.0f} | "
                     f"{r.get('graph_x', float('nan')):.2f} | {r.get('rel_err_vs_bf16', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--attention-only", action="store_true", help="the attention candidates, no forwards")
    ap.add_argument("--profile", type=int, default=0, metavar="T",
                    help="also print each precision's top kernels (torch.profiler, eager) at T tokens")
    args = ap.parse_args()
    from pdserve.engine.model_config import arch_from_hf_config
    from pdserve.engine.random_weights import random_weights

    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "bench_prefill.log", "a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    tokens = [int(t) for t in args.tokens.split(",")]
    if args.profile and args.profile not in tokens:
        ap.error("--profile T needs T among --tokens")
    cfg = dict(LLAMA3_8B, num_hidden_layers=args.layers, max_position_embeddings=max(8192, max(tokens)))
    arch = arch_from_hf_config(cfg)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    log(json.dumps(env))
    attn_rows, best = bench_attention(arch, [t for t in tokens if t >= 2048] or tokens, log)
    if args.attention_only:
        return
    silu_rows = bench_silu_mul_quant(arch, tokens, log)
    weights = random_weights(arch, torch.bfloat16, "cuda")
    fwd_rows = bench_forward(arch, weights, tokens, args.layers, log, args.profile)
    md = markdown(env, attn_rows, best, fwd_rows, silu_rows)
    (args.out / "bench_prefill.json").write_text(json.dumps(dict(env=env, attention=attn_rows, silu_mul_quant=silu_rows,
                                                                 best_tiles=best,
                                                                 forward=fwd_rows), indent=1))
    (args.out / "bench_prefill.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
