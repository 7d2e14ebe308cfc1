"""One-GPU benchmark of the fast path (issue 5), in one run, on random-weight Llama models built from the
Triton kernels (benchmarks/random_llama.py) plus torch bf16 GEMMs:

- the GPU's ceilings: device-to-device copy bandwidth (bytes read + written) and the bf16 GEMM rate;
- decode step time at batch 1/8/32/128 and context 1K/8K, eager and as one CUDA-graph replay, against the
  bandwidth floor (weight bytes + KV bytes read, over the measured copy bandwidth);
- prefill throughput and model-FLOP utilisation at 512/2048/8192 tokens against the measured GEMM rate;
- a kernel-time profile of one decode step and one prefill (where the time goes);
- greedy generation tokens/s, this path vs transformers' `generate` (SDPA, static cache; eager and its
  auto-compiled mode) on the same weights, at batch 1 and 32.

    python benchmarks/bench_gpu.py --out DIR [--models llama3-8b,llama3.2-1b] [--quick]

Writes DIR/bench.json (every number) and DIR/bench.md (the tables), and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pdserve.kernels import attention, fused
from random_llama import (LLAMA3_8B, LLAMA32_1B, Batch, DecodeGraphs, RandomLlama, SequenceSlots, greedy_generate,
                          prefill_batch, triton_ops)

MODELS = {"llama3-8b": LLAMA3_8B, "llama3.2-1b": LLAMA32_1B}
BLOCK_SIZE = 16
DECODE_BATCHES = (1, 8, 32, 128)
DECODE_CONTEXTS = (1024, 8192)
PREFILL_TOKENS = (512, 2048, 8192)
GEN_BATCHES = (1, 32)
GEN_PROMPT, GEN_NEW = 128, 128
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    """Median over reps of device time measured with CUDA events around one call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    src = torch.randn(2 ** 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def gemm_rate(reps: int) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, reps)
    return 2 * n ** 3 / (ms * 1e-3)


LINEAR_CANDIDATES = {
    1: [("library", None), ("gemv", (4, 1024, 4)), ("gemv", (8, 512, 4)), ("gemv", (8, 1024, 8)),
        ("gemv", (16, 512, 8))],
    8: [("library", None), ("skinny", (16, 256, 4, 4)), ("skinny", (32, 256, 4, 4)), ("skinny", (32, 128, 4, 6)),
        ("skinny", (64, 128, 4, 4))],
}
LINEAR_CANDIDATES[32] = LINEAR_CANDIDATES[8]


def graph_us_per_call(fn, weights, reps: int = 7) -> float:
    """Device time of fn(w) per weight, inside one CUDA graph over all the weights: launch overhead gone,
    as in a decode step, and each call reads a weight the previous one did not (no L2 reuse)."""
    for w in weights:
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    ms = median_ms(graph.replay, reps)
    del graph
    return ms * 1e3 / len(weights)


def tune_linear(model, copy_bw) -> list[dict]:
    """Per projection and decode batch bucket: the library GEMM vs the Triton GEMV / skinny-GEMM configs,
    timed in graphs; the fastest goes into fused.LINEAR_PLANS, which the model's decode then uses."""
    layers = model.layers
    projections = [("qkv", [l.qkv for l in layers], False), ("o", [l.o for l in layers], False),
                   ("gate_up", [l.gate_up for l in layers], False), ("down+silu", [l.down for l in layers], True),
                   ("lm_head", [model.lm_head], False)]
    rows = []
    for name, weights, silu in projections:
        n, k = weights[0].shape
        for bucket, candidates in LINEAR_CANDIDATES.items():
            x = torch.randn(bucket, 2 * k if silu else k, device="cuda", dtype=model.dtype)
            timed = {}
            for kernel, cfg in candidates:
                fn = fused.LINEAR_KERNELS[kernel]
                try:
                    timed[(kernel, cfg)] = graph_us_per_call(lambda w: fn(x, w, silu, cfg), weights)
                except Exception as exc:  # a config that does not compile or fit is skipped
                    log(f"linear {name} b={bucket} {kernel} {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}")
            best = min(timed, key=timed.get)
            fused.LINEAR_PLANS[(bucket, n, k, silu)] = best
            nbytes = n * k * 2
            library = timed.get(("library", None), float("nan"))
            rows.append(dict(proj=name, batch=bucket, n=n, k=k, library_us=library, best=list(best),
                             best_us=timed[best], library_pct_copy_bw=100 * nbytes / (library * 1e-6) / copy_bw,
                             best_pct_copy_bw=100 * nbytes / (timed[best] * 1e-6) / copy_bw,
                             all={f"{kk}{cc}": v for (kk, cc), v in timed.items()}))
            log(f"linear {name} {n}x{k} b={bucket}: library {library:.1f} us "
                f"({rows[-1]['library_pct_copy_bw']:.0f}% copy bw), best {best} {timed[best]:.1f} us "
                f"({rows[-1]['best_pct_copy_bw']:.0f}%)")
    return rows


PREFILL_CANDIDATES = (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                      dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
                      dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
                      dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3))


def tune_prefill_attention(model, kv_cache, reps, tokens=4096) -> list[dict]:
    """One layer's causal prefill attention over `tokens` tokens for each tile config; keeps the fastest."""
    s = model.shape
    slots = SequenceSlots(1, tokens, BLOCK_SIZE, model.device)
    q = torch.randn(tokens, s.num_heads, s.head_dim, device="cuda", dtype=model.dtype)
    qsl = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
    lens = torch.tensor([tokens], dtype=torch.int32, device="cuda")
    flops = 2 * s.num_heads * s.head_dim * tokens * (tokens + 1)
    rows = []
    for cfg in PREFILL_CANDIDATES:
        attention.PREFILL_CONFIGS[s.head_dim] = cfg
        ms = median_ms(lambda: attention.paged_attention(q, kv_cache[:, 0], qsl, lens, slots.tables, s.head_dim ** -0.5,
                                                         tokens, tokens), reps)
        rows.append(dict(config=cfg, ms=ms, tflops=flops / (ms * 1e-3) / 1e12))
        log(f"prefill attention {tokens} tokens {cfg}: {ms:.3f} ms, {rows[-1]['tflops']:.0f} TFLOP/s")
    attention.PREFILL_CONFIGS[s.head_dim] = min(rows, key=lambda r: r["ms"])["config"]
    return rows


def decode_step_batch(batch: int, context: int, pool_blocks: int, max_blocks: int, device) -> tuple[Batch, bool]:
    """A decode step of `batch` sequences whose seq_len is `context`. Each sequence gets its own blocks
    while the pool lasts; past that, blocks are shared round-robin (aliased, flagged in the results)."""
    per_seq = -(-context // BLOCK_SIZE)
    ids = torch.arange(batch * per_seq, device=device).view(batch, per_seq) % pool_blocks
    tables = torch.zeros((batch, max_blocks), dtype=torch.int32, device=device)
    tables[:, :per_seq] = ids.int()
    positions = torch.full((batch,), context - 1, device=device)
    slots = tables[:, (context - 1) // BLOCK_SIZE].long() * BLOCK_SIZE + (context - 1) % BLOCK_SIZE
    tokens = torch.randint(0, 1000, (batch,), device=device)
    step = Batch(tokens, positions, slots, torch.arange(batch + 1, dtype=torch.int32, device=device),
                 torch.full((batch,), context, dtype=torch.int32, device=device), tables,
                 torch.arange(batch, device=device), 1, max(DECODE_CONTEXTS))
    return step, batch * per_seq > pool_blocks


def bench_decode(model, kv_cache, copy_bw, reps, batches, contexts) -> list[dict]:
    shape = model.shape
    max_blocks = -(-max(contexts) // BLOCK_SIZE)
    log(f"capturing decode graphs for buckets {batches}")
    graphs = DecodeGraphs(model, kv_cache, list(batches), max_blocks, max(DECODE_CONTEXTS))
    weight_bytes = shape.linear_params() * 2
    rows = []
    for context in contexts:
        for batch in batches:
            step, aliased = decode_step_batch(batch, context, kv_cache.shape[0], max_blocks, model.device)
            eager = median_ms(lambda: model.forward(step, kv_cache).argmax(-1), reps)
            graph = median_ms(lambda: graphs.step(step), reps)
            kv_bytes = batch * context * shape.kv_bytes_per_token()
            moved = weight_bytes + kv_bytes + batch * shape.hidden * 2
            floor_ms = moved / copy_bw * 1e3
            rows.append(dict(batch=batch, context=context, eager_ms=eager, graph_ms=graph, floor_ms=floor_ms,
                             pct_of_copy_bw=100 * floor_ms / graph, graph_speedup=eager / graph,
                             weight_gb=weight_bytes / 1e9, kv_gb=kv_bytes / 1e9, kv_blocks_aliased=aliased,
                             tokens_per_s=batch / (graph * 1e-3)))
            log(f"decode b={batch} ctx={context}: eager {eager:.3f} ms graph {graph:.3f} ms floor {floor_ms:.3f} ms "
                f"({rows[-1]['pct_of_copy_bw']:.1f}% of copy bw){' ALIASED' if aliased else ''}")
    del graphs
    return rows


def prefill_flops(shape, tokens: int) -> dict:
    linear = 2 * tokens * (shape.linear_params() - shape.vocab * shape.hidden) + 2 * shape.vocab * shape.hidden
    attention = shape.num_layers * 2 * shape.num_heads * shape.head_dim * tokens * (tokens + 1)  # causal QK + PV
    return dict(linear=linear, attention=attention, total=linear + attention)


def bench_prefill(model, kv_cache, gemm, reps, sizes) -> list[dict]:
    rows = []
    for tokens in sizes:
        slots = SequenceSlots(1, tokens, BLOCK_SIZE, model.device)
        prompt = torch.randint(0, model.shape.vocab, (tokens,)).tolist()
        batch = prefill_batch([prompt], slots, model.device)
        ms = median_ms(lambda: model.forward(batch, kv_cache), reps)
        flops = prefill_flops(model.shape, tokens)
        rows.append(dict(tokens=tokens, ms=ms, tokens_per_s=tokens / (ms * 1e-3),
                         tflops=flops["total"] / (ms * 1e-3) / 1e12, mfu_vs_gemm=flops["total"] / (ms * 1e-3) / gemm,
                         attention_flop_share=flops["attention"] / flops["total"]))
        log(f"prefill {tokens}: {ms:.2f} ms, {rows[-1]['tflops']:.0f} TFLOP/s = "
            f"{100 * rows[-1]['mfu_vs_gemm']:.1f}% of GEMM rate")
    return rows


def kernel_profile(fn, top: int = 10) -> list[dict]:
    """CUDA kernel time of one call, grouped by kernel name, largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: -e.self_device_time_total)
    return [dict(kernel=e.key[:90], us=e.self_device_time_total, calls=e.count,
                 share=e.self_device_time_total / total) for e in events[:top]] + [dict(kernel="TOTAL", us=total)]


def our_generate(model, prompts) -> tuple[float, torch.Tensor]:
    batch = len(prompts)
    max_len = GEN_PROMPT + GEN_NEW
    slots = SequenceSlots(batch, max_len, BLOCK_SIZE, model.device)
    kv_cache = model.new_kv_cache(slots.tables.numel(), BLOCK_SIZE)
    graphs = DecodeGraphs(model, kv_cache, [batch], slots.blocks_per_seq, max_len)
    run = lambda: greedy_generate(model, prompts, GEN_NEW, BLOCK_SIZE, graphs=graphs, kv_cache=kv_cache,  # noqa
                                  slots=slots)
    run()
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def hf_model(model):
    """transformers' LlamaForCausalLM (SDPA) holding the same weights as `model`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = model.shape
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                         num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim, rope_theta=s.rope_theta,
                         rms_norm_eps=s.eps, max_position_embeddings=s.max_positions, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    try:
        with model.device:
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    q_width, kv_width = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.embed)
        hf.lm_head.weight.copy_(model.lm_head)
        hf.model.norm.weight.copy_(model.final_norm)
        for ours, theirs in zip(model.layers, hf.model.layers):
            attn, mlp = theirs.self_attn, theirs.mlp
            attn.q_proj.weight.copy_(ours.qkv[:q_width])
            attn.k_proj.weight.copy_(ours.qkv[q_width:q_width + kv_width])
            attn.v_proj.weight.copy_(ours.qkv[q_width + kv_width:])
            attn.o_proj.weight.copy_(ours.o)
            mlp.gate_proj.weight.copy_(ours.gate_up[:s.intermediate])
            mlp.up_proj.weight.copy_(ours.gate_up[s.intermediate:])
            mlp.down_proj.weight.copy_(ours.down)
            theirs.input_layernorm.weight.copy_(ours.input_norm)
            theirs.post_attention_layernorm.weight.copy_(ours.post_norm)
    hf.eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def hf_generate(hf, ids: torch.Tensor, compiled: bool, new_tokens: int = GEN_NEW) -> tuple[float, float, torch.Tensor]:
    """(median seconds, first-call seconds, tokens) of greedy generate with a static cache, prompts `ids` [B, T]
    on the model's device; the first call (which compiles) is left out of the median.
    benchmarks/bench_engine_gpu.py's --peer times its peer with this too."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, cache_implementation="static", disable_compile=not compiled)
    times = []
    with torch.inference_mode():
        for _ in range(3 if compiled else 2):
            sync()
            start = time.perf_counter()
            out = hf.generate(ids, **kwargs)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), times[0], out[:, ids.shape[1]:]


def bench_generate(model, with_compiled: bool, deadline: float) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, model.shape.vocab, (b, GEN_PROMPT), generator=gen).tolist() for b in GEN_BATCHES}
    rows = []
    ours = {}
    for b in GEN_BATCHES:
        seconds, tokens = our_generate(model, prompts[b])
        ours[b] = tokens
        rows.append(dict(engine="pdserve kernels + CUDA graphs", batch=b, seconds=seconds,
                         tokens_per_s=b * GEN_NEW / seconds))
        log(f"generate ours b={b}: {rows[-1]['tokens_per_s']:.0f} tok/s")
    torch.cuda.empty_cache()
    hf = hf_model(model)
    modes = [False] + ([True] if with_compiled else [])
    for compiled in modes:
        for b in GEN_BATCHES:
            if time.time() > deadline:
                rows.append(dict(engine=f"transformers ({'compiled' if compiled else 'eager'})", batch=b,
                                 skipped="time budget of the run"))
                continue
            try:
                seconds, first, tokens = hf_generate(hf, torch.tensor(prompts[b], device="cuda"), compiled)
            except Exception as exc:  # a failed peer mode is a result, not a crash of the whole run
                rows.append(dict(engine=f"transformers ({'compiled' if compiled else 'eager'})", batch=b,
                                 error=f"{type(exc).__name__}: {str(exc)[:300]}"))
                log(f"transformers compiled={compiled} b={b} failed: {exc}")
                continue
            same = (tokens == ours[b]).float().mean().item()
            rows.append(dict(engine=f"transformers static cache, SDPA, {'torch.compile' if compiled else 'eager'}",
                             batch=b, seconds=seconds, first_call_s=first, tokens_per_s=b * GEN_NEW / seconds,
                             token_agreement_with_ours=same))
            log(f"generate transformers compiled={compiled} b={b}: {rows[-1]['tokens_per_s']:.0f} tok/s "
                f"(first call {first:.1f}s), same tokens as ours {100 * same:.1f}%")
    release(*hf.parameters())
    del hf
    return rows


def bench_model(name, shape, args, copy_bw, gemm) -> dict:
    log(f"== {name}: building random weights")
    model = RandomLlama(shape, "cuda", torch.bfloat16, seed=0)
    free, _ = torch.cuda.mem_get_info()
    block_bytes = BLOCK_SIZE * shape.kv_bytes_per_token()
    want = max(DECODE_BATCHES) * -(-max(DECODE_CONTEXTS) // BLOCK_SIZE)
    pool_blocks = min(want, int((free - args.headroom_gb * 2 ** 30) // block_bytes),
                      int(args.kv_pool_gb * 2 ** 30 // block_bytes))
    log(f"KV pool: {pool_blocks} blocks ({pool_blocks * block_bytes / 2 ** 30:.1f} GiB; full batch 128 x 8K "
        f"needs {want})")
    kv_cache = model.new_kv_cache(pool_blocks, BLOCK_SIZE)
    for chunk in kv_cache.split(256):  # random K/V: zeros would hide wrong indexing and time differently
        chunk.normal_()
    result = dict(model=name, shape=shape.__dict__, kv_pool_blocks=pool_blocks)
    reps = 5 if args.quick else 20
    attempt(result, "pdl_check", pdl_check)
    attempt(result, "prefill_attention_tiles", lambda: tune_prefill_attention(model, kv_cache, reps))
    attempt(result, "prefill", lambda: bench_prefill(model, kv_cache, gemm, 3 if args.quick else 5, PREFILL_TOKENS))
    if name in args.tune_linear.split(","):
        attempt(result, "linear", lambda: tune_linear(model, copy_bw))
    attempt(result, "decode", lambda: bench_decode(model, kv_cache, copy_bw, reps, DECODE_BATCHES,
                                                   DECODE_CONTEXTS[:1] if args.quick else DECODE_CONTEXTS))
    fused.PDL = False
    attempt(result, "decode_no_pdl", lambda: bench_decode(model, kv_cache, copy_bw, reps, (1, 8), (1024,)))
    fused.PDL = result["pdl_check"] is True
    model.ops = triton_ops(fused_decode=False)  # the engine interfaces alone, library GEMMs
    attempt(result, "decode_interfaces_only", lambda: bench_decode(model, kv_cache, copy_bw, reps, (1, 8), (1024,)))
    model.ops = triton_ops(fused_decode=True)
    step, _ = decode_step_batch(1, 1024, pool_blocks, 512, model.device)
    attempt(result, "profile_decode_b1_1k_eager", lambda: kernel_profile(lambda: model.forward(step, kv_cache)))
    prompt = prefill_batch([torch.randint(0, shape.vocab, (2048,)).tolist()],
                           SequenceSlots(1, 2048, BLOCK_SIZE, model.device), model.device)
    attempt(result, "profile_prefill_2048", lambda: kernel_profile(lambda: model.forward(prompt, kv_cache)))
    release(kv_cache)  # transformers' copy of the weights needs the room
    del kv_cache
    if not args.skip_generate:
        compiled = name in args.compile_peer.split(",")
        attempt(result, "generate", lambda: bench_generate(model, compiled, T0 + args.time_budget_s))
    release(model.embed, model.lm_head, *[t for l in model.layers for t in vars(l).values()])
    del model
    return result


def release(*tensors: torch.Tensor) -> None:
    """Give large tensors' memory back now, whatever still refers to them."""
    import gc

    for tensor in tensors:
        tensor.untyped_storage().resize_(0)
    gc.collect()
    torch.cuda.empty_cache()


def pdl_check() -> bool:
    """Programmatic dependent launch inside a captured graph, on this GPU and driver: run, compare, else off."""
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    fused.PDL = True
    try:
        want = fused.rms_norm(fused.rms_norm(x, w, 1e-5), w, 1e-5)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused.rms_norm(fused.rms_norm(x, w, 1e-5), w, 1e-5)
        graph.replay()
        torch.cuda.synchronize()
        ok = torch.equal(out, want)
    except Exception as exc:
        log(f"PDL unavailable: {type(exc).__name__}: {exc}")
        ok = False
    fused.PDL = ok
    log(f"PDL {'on' if ok else 'off'}")
    return ok


def attempt(result: dict, key: str, fn) -> None:
    """Run one section; a failure is recorded under the key and the run goes on to the next section."""
    try:
        result[key] = fn()
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result[key] = f"FAILED: {type(exc).__name__}: {str(exc)[:500]}"


def markdown(report: dict) -> str:
    lines = [f"machine: {report['device']}, torch {report['torch']}, triton {report['triton']}",
             f"copy bandwidth (read+write) {report['copy_bw'] / 1e12:.2f} TB/s; bf16 GEMM 8192^3 "
             f"{report['gemm_rate'] / 1e12:.0f} TFLOP/s", ""]
    for m in report["models"]:
        for key in ("decode", "prefill", "generate", "profile_decode_b1_1k_eager", "profile_prefill_2048", "linear",
                    "decode_interfaces_only", "prefill_attention_tiles", "decode_no_pdl"):
            if isinstance(m.get(key), str):
                lines.append(f"{m['model']} {key}: {m.pop(key)}")
        lines += [f"### {m['model']}", "", "| batch | context | eager ms | graph ms | floor ms | % copy bw | graph speedup |",
                  "|---|---|---|---|---|---|---|"]
        for r in m.get("decode", []):
            lines.append(f"| {r['batch']} | {r['context']} | {r['eager_ms']:.3f} | {r['graph_ms']:.3f} | "
                         f"{r['floor_ms']:.3f} | {r['pct_of_copy_bw']:.1f}{' (aliased KV)' if r['kv_blocks_aliased'] else ''}"
                         f" | {r['graph_speedup']:.2f}x |")
        if isinstance(m.get("decode_no_pdl"), list):
            lines += ["", f"decode without programmatic dependent launch (PDL used above: {m.get('pdl_check')}):", ""]
            lines += [f"- batch {r['batch']} ctx {r['context']}: graph {r['graph_ms']:.3f} ms = "
                      f"{r['pct_of_copy_bw']:.1f}% of copy bw" for r in m["decode_no_pdl"]]
        if m.get("decode_interfaces_only"):
            lines += ["", "decode with the engine interfaces only (no GEMV / RoPE+KV-write / SiLU+down fusion):", ""]
            lines += [f"- batch {r['batch']} ctx {r['context']}: graph {r['graph_ms']:.3f} ms = "
                      f"{r['pct_of_copy_bw']:.1f}% of copy bw" for r in m["decode_interfaces_only"]]
        if m.get("linear"):
            lines += ["", "| decode projection (in a graph) | batch | N x K | library us (% copy bw) | chosen | us (% copy bw) |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['proj']} | {r['batch']} | {r['n']}x{r['k']} | {r['library_us']:.1f} "
                      f"({r['library_pct_copy_bw']:.0f}%) | {r['best'][0]} {r['best'][1]} | {r['best_us']:.1f} "
                      f"({r['best_pct_copy_bw']:.0f}%) |" for r in m["linear"]]
        if m.get("prefill_attention_tiles"):
            lines += ["", "prefill attention alone (4096 tokens, causal, one layer): " + "; ".join(
                f"{r['config']['BLOCK_M']}x{r['config']['BLOCK_N']} w{r['config']['num_warps']} "
                f"{r['tflops']:.0f} TFLOP/s" for r in m["prefill_attention_tiles"])]
        lines += ["", "| prefill tokens | ms | tokens/s | TFLOP/s | % of GEMM rate | attention FLOP share |",
                  "|---|---|---|---|---|---|"]
        for r in m.get("prefill", []):
            lines.append(f"| {r['tokens']} | {r['ms']:.2f} | {r['tokens_per_s']:.0f} | {r['tflops']:.0f} | "
                         f"{100 * r['mfu_vs_gemm']:.1f} | {100 * r['attention_flop_share']:.1f}% |")
        if "generate" in m:
            lines += ["", f"| generate ({GEN_PROMPT} prompt + {GEN_NEW} new tokens) | batch | tokens/s | note |",
                      "|---|---|---|---|"]
            for r in m["generate"]:
                note = r.get("error") or r.get("skipped") or (
                    f"first call {r['first_call_s']:.1f}s, same tokens {100 * r['token_agreement_with_ours']:.0f}%"
                    if "first_call_s" in r else "")
                rate = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
                lines.append(f"| {r['engine']} | {r['batch']} | {rate} | {note} |")
        for key in ("profile_decode_b1_1k_eager", "profile_prefill_2048"):
            if key not in m:
                continue
            lines += ["", f"{key}: " + "; ".join(f"{p['kernel'][:60]} {p['us']:.0f}us" + (
                f" ({100 * p['share']:.0f}%)" if "share" in p else "") for p in m[key])]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="llama3-8b,llama3.2-1b")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, 1K context only")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--compile-peer", default="llama3-8b",
                        help="models whose transformers peer is also run auto-compiled (slow to compile)")
    parser.add_argument("--time-budget-s", type=float, default=480.0,
                        help="transformers runs that would start after this many seconds are skipped")
    parser.add_argument("--tune-linear", default="llama3-8b",
                        help="models whose decode projections are tuned (Triton GEMV/skinny GEMM vs library)")
    parser.add_argument("--headroom-gb", type=float, default=12.0)
    parser.add_argument("--kv-pool-gb", type=float, default=36.0,
                        help="KV pool cap; batch 128 x 8K (128 GiB for the 8B) shares blocks beyond it")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    import transformers
    import triton

    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  transformers=transformers.__version__,
                  python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  command=" ".join(sys.argv))
    report["copy_bw"] = copy_bandwidth(20)
    report["gemm_rate"] = gemm_rate(20)
    log(f"copy {report['copy_bw'] / 1e12:.2f} TB/s, GEMM {report['gemm_rate'] / 1e12:.0f} TFLOP/s")
    report["models"] = []
    for name in args.models.split(","):
        report["models"].append(bench_model(name, MODELS[name], args, report["copy_bw"], report["gemm_rate"]))
        (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
