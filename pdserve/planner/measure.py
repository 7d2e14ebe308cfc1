"""`pdserve profile`: measure a profile (profile.py) on the machine at hand, CUDA or CPU.

- prefill: `LLMEngine.step()` of one fresh prompt of T tokens (the whole prompt in one step), per precision; the
  context term from the second chunk of a prompt cut into two equal chunks (same tokens, plus attention
  over the first chunk's KV);
- decode: `LLMEngine.step()` of B sequences decoding at once at two contexts (the sequences share their prompt
  through the prefix cache, so setting up batch 32 at 512 tokens prefills 512 tokens, not 16K; each still
  reads its own block table);
- transfer: one request's KV between two NIXL agents in this process (export, then READ posted -> landed),
  raw and fp8 wire, in the engine's KV geometry and dtype (benchmarks/bench_kv_transfer.py does the same);
- overheads (with --server): isolated requests through a running cluster with `pdserve bench`'s client; what
  their TTFT and inter-token gaps take beyond the engine curves just measured is the serving stack's fixed cost.

Every engine curve is the median of --repeats passes over all its points, so that on a shared box a burst of
another job's load spoils one sample of several points rather than every sample of one.
Engine steps are whole steps (scheduler, model, sampler, detokenizer), as a worker runs them. On CPU the engine
gets --threads intra-op threads (default 1: what a Ray actor with num_cpus 1 gets in `pdserve serve`), and the
profile records the share of a core the measurements got (host.cpu_share, hostload.py), which the simulator
uses to move its times to another share.
"""
from __future__ import annotations

import platform
import random
import statistics
import sys
import time
import uuid
from datetime import datetime, timezone

from pdserve.planner.hostload import CPUShare, this_process
from pdserve.planner.profile import SCHEMA


def _log(msg: str) -> None:
    print(f"pdserve profile: {msg}", file=sys.stderr, flush=True)


def _median_step(engine, repeats: int, setup) -> float:
    """Median ms of the engine step that `setup()` prepares (setup returns after queueing the work)."""
    times = []
    for _ in range(repeats):
        setup()
        t = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t) * 1e3)
        while engine.has_unfinished():
            engine.step()
    return statistics.median(times)


def _interleaved(xs: list[int], measure_once, passes: int) -> list[float]:
    """The median over `passes` of measure_once(x) for each x, a pass going once over all of them: on a shared box
    another job's burst then lands on one sample of several points, not on every sample of one point."""
    samples: dict[int, list[float]] = {x: [] for x in xs}
    for _ in range(passes):
        for x in xs:
            samples[x].append(measure_once(x))
    return [round(statistics.median(samples[x]), 4) for x in xs]


def measure_prefill(engine, tokens: list[int], repeats: int, rng: random.Random) -> dict:
    from pdserve.engine.sequence import SamplingParams

    vocab = engine.arch.vocab_size
    sched = engine.scheduler
    sched.max_num_batched_tokens = max(tokens) * 2  # one step per prompt
    ids = iter(range(10 ** 9))

    def prompt(n):
        return [rng.randrange(100, vocab - 1) for _ in range(n)]

    def one(n):
        return lambda: engine.add_request(f"p{next(ids)}", prompt(n), SamplingParams(max_tokens=1, ignore_eos=True))

    _median_step(engine, 2, one(tokens[0]))  # warm-up
    ms = _interleaved(tokens, lambda n: _median_step(engine, 1, one(n)), repeats)
    # context term: a 2C-token prompt in chunks of C; the second chunk computes C tokens over C cached ones
    c = max(t for t in tokens if t <= 512)
    sched.max_num_batched_tokens = c
    second = []
    for _ in range(repeats):
        engine.add_request(f"p{next(ids)}", prompt(2 * c), SamplingParams(max_tokens=1, ignore_eos=True))
        engine.step()
        t = time.perf_counter()
        engine.step()
        second.append((time.perf_counter() - t) * 1e3)
        while engine.has_unfinished():
            engine.step()
    first = ms[tokens.index(c)]
    per_pair = max(0.0, (statistics.median(second) - first) / (c * c))
    return {"tokens": tokens, "ms": ms, "ms_per_token_context": per_pair,
            "context_check": {"chunk": c, "first_chunk_ms": first,
                              "second_chunk_ms": round(statistics.median(second), 4)}}


def measure_decode(engine, batches: list[int], contexts: list[int], steps: int, passes: int,
                   rng: random.Random, distinct: bool = False) -> dict:
    from pdserve.engine.sequence import SamplingParams

    vocab = engine.arch.vocab_size
    engine.scheduler.max_num_batched_tokens = max(max(contexts) + max(batches), 2048)

    def point(ctx: int, b: int) -> float:
        prompt = [rng.randrange(100, vocab - 1) for _ in range(ctx)]
        params = SamplingParams(max_tokens=steps + 3, ignore_eos=True)
        # one sequence computes the prompt; the others, added once its blocks are cached, reuse them (or, distinct,
        # each computes its own: on a GPU, blocks read by every sequence may come from L2 instead of HBM)
        for group in ((range(b),) if distinct else (range(1), range(1, b))):
            for i in group:
                own = [rng.randrange(100, vocab - 1) for _ in range(ctx)] if distinct else prompt
                engine.add_request(f"d{ctx}-{b}-{i}-{uuid.uuid4().hex[:6]}", own, params)
            while any(s.num_output_tokens == 0 for s in engine.requests.values()):
                engine.step()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            times.append((time.perf_counter() - t) * 1e3)
        while engine.has_unfinished():
            engine.step()
        _log(f"decode batch {b} context {ctx}: {statistics.median(times):.2f} ms")
        return round(statistics.median(times), 4)

    grid = _interleaved([(c, b) for c in contexts for b in batches], lambda cb: point(*cb), passes)
    table = {c: grid[i * len(batches):(i + 1) * len(batches)] for i, c in enumerate(contexts)}
    lo, hi = contexts[0], contexts[-1]
    # KV reads grow with the batch's total context: the slope over the two contexts, fitted over all batches
    slopes = [(y1 - y0) / (b * (hi - lo)) for b, y0, y1 in zip(batches, table[lo], table[hi])]
    slope = max(0.0, statistics.median(slopes))
    return {"batch": batches, "ms": table[lo], "context": lo + steps // 2, "ms_per_context_token": slope,
            "ms_at_context": {str(c + steps // 2): table[c] for c in contexts}}


def measure_transfer(engine, tokens: list[int], repeats: int) -> tuple[dict, dict]:
    import torch

    from pdserve.kv_transfer import KVTransferAgent

    cache = engine.runner.kv_cache
    shape = tuple(cache.shape[1:])
    out, per_token = {}, {}
    for wire, wire_name in (("bf16", "raw"), ("fp8", "fp8")):
        rows = {"bytes": [], "ms": [], "export_ms": [], "tokens": []}
        for n in tokens:
            blocks = -(-n // engine.config.block_size)
            src = torch.randn(blocks * 2, *shape, device=cache.device).to(cache.dtype)
            dst = torch.zeros(blocks * 2, *shape, dtype=cache.dtype, device=cache.device)
            tag = uuid.uuid4().hex[:6]
            samples = []
            with KVTransferAgent(f"prof-p-{tag}", src, wire_dtype=wire, staging_blocks=blocks) as p, \
                    KVTransferAgent(f"prof-d-{tag}", dst, staging_blocks=blocks) as d:
                src_ids, dst_ids = list(range(0, 2 * blocks, 2)), list(range(2 * blocks - 1, 0, -2))
                for i in range(repeats + 1):
                    t0 = time.perf_counter()
                    ticket = p.export(f"r{i}", src_ids, n)
                    t1 = time.perf_counter()
                    h = d.pull(ticket, dst_ids)
                    while d.check(h) == "PENDING":
                        pass
                    t2 = time.perf_counter()
                    if h.state != "DONE":
                        raise RuntimeError(f"KV transfer failed: {h.error}")
                    while not p.poll():
                        pass
                    samples.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3, h.bytes))
            exp, pull, nbytes = (statistics.median(col) for col in zip(*samples[1:]))
            rows["bytes"].append(int(nbytes))
            rows["ms"].append(round(pull, 4))
            rows["export_ms"].append(round(exp, 4))
            rows["tokens"].append(n)
            _log(f"transfer {wire_name} {n} tokens ({int(nbytes)} B): pull {pull:.3f} ms, export {exp:.3f} ms")
        out[wire_name] = rows
        per_token[wire_name] = rows["bytes"][-1] / rows["tokens"][-1]
    return out, per_token


def measure_overheads(prof: dict, server: str, prompt_len: int, repeats: int) -> dict:
    """TTFT and inter-token gaps of isolated requests through a live cluster, less what the engine curves
    account for: the fixed cost of router, actor calls and streaming."""
    import asyncio

    from pdserve.planner.profile import from_dict
    from pdserve.tools.bench import percentile, random_workload, run_load

    p = from_dict(prof)
    reqs = random_workload(repeats + 1, (prompt_len, prompt_len), (16, 16), (100, 30000), seed=7)
    ttft, gaps = [], []
    for q in reqs:  # one at a time: no queueing, no batching
        res, _, _ = asyncio.run(run_load(server, [q], [0.0], 1, progress=False))
        if not res[0].ok:
            raise RuntimeError(f"request to {server} failed: {res[0].status}: {res[0].error}")
        ttft.append(res[0].ttft)
        gaps.extend(res[0].itl)
    ttft, gaps = ttft[1:], gaps[len(gaps) // (repeats + 1):]  # the first request warms the path
    prec = next(iter(p.decode))
    engine_ttft = (p.prefill_ms(next(iter(p.prefill)), prompt_len - 1)
                   + p.transfer_ms("raw", p.kv_bytes("raw", prompt_len - 1))
                   + p.decode_ms(prec, 1, prompt_len))
    engine_itl = p.decode_ms(prec, 1, prompt_len + 8)
    return {"request_ms": round(max(0.0, percentile(ttft, 50) * 1e3 - engine_ttft), 3),
            "decode_step_ms": round(max(0.0, percentile(gaps, 50) * 1e3 - engine_itl), 3),
            "measured": {"server": server, "prompt_tokens": prompt_len, "requests": repeats,
                         "ttft_p50_ms": round(percentile(ttft, 50) * 1e3, 3),
                         "itl_p50_ms": round(percentile(gaps, 50) * 1e3, 3),
                         "engine_ttft_ms": round(engine_ttft, 3), "engine_itl_ms": round(engine_itl, 3)}}


def measure(args) -> dict:
    import torch

    from pdserve.config import EngineConfig
    from pdserve.engine.engine import LLMEngine

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    if device == "cpu":
        torch.set_num_threads(args.threads)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ptoks, batches, ctxs = ints(args.prefill_tokens), ints(args.batches), ints(args.contexts)
    ttoks = ints(args.transfer_tokens) if args.transfer_tokens else []
    econf = EngineConfig(device=device, kv_cache_memory_gb=args.kv_cache_memory_gb, max_num_seqs=max(batches),
                         max_num_batched_tokens=max(max(ptoks) * 2, 2048))
    prof: dict = {"schema": SCHEMA, "source": "measured by pdserve profile",
                  "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                  "device": torch.cuda.get_device_name() if device.startswith("cuda") else
                  f"cpu: {platform.processor() or platform.machine()}, {args.threads} thread(s) per engine",
                  "torch": torch.__version__, "command": " ".join(["pdserve", "profile", *sys.argv[2:]]),
                  "prefill": {}, "decode": {}}
    engine = None
    # the CPU share the measurements got on a shared box: the simulator scales by it (hostload.py)
    share = CPUShare(this_process()).start() if device == "cpu" else None
    for prec in args.precisions.split(","):
        _log(f"loading the model at precision {prec} on {device}")
        engine = LLMEngine(args.model, args.dtype, econf, precision=prec, enable_prefix_caching=True, progress=False,
                           load_format=args.load_format)
        engine.block_manager.enable_prefix_caching = False  # prefill timings: every prompt computed
        prof["prefill"][prec] = measure_prefill(engine, ptoks, args.repeats, rng)
        _log(f"prefill {prec}: " + ", ".join(f"{t}: {m:.1f} ms" for t, m in zip(ptoks, prof["prefill"][prec]["ms"])))
        if prec in args.decode_precisions.split(","):
            engine.block_manager.enable_prefix_caching = True
            prof["decode"][prec] = measure_decode(engine, batches, ctxs, args.decode_steps, args.repeats, rng,
                                                  args.distinct_prompts)
    cpu_share = share.stop() if share else None
    if not prof["decode"]:
        raise ValueError("--decode-precisions names none of --precisions")
    arch = engine.arch
    prof["model"] = {"path": args.model or "embedded SmolLM2-135M-Instruct", "load_format": args.load_format,
                     "layers": arch.num_layers,
                     "kv_heads": arch.num_kv_heads, "head_dim": arch.head_dim,
                     "dtype": str(engine.dtype).removeprefix("torch."), "vocab_size": arch.vocab_size}
    prof["engine"] = {"block_size": engine.config.block_size, "max_num_seqs": 64, "max_num_batched_tokens": 1024,
                      "kv_cache_tokens": engine.runner.num_blocks * engine.config.block_size}
    prof["host"] = {"cores": args.host_cores, "cpu_share": None if cpu_share is None else round(cpu_share, 4)}
    prof["transfer"], prof["kv_bytes_per_token"] = measure_transfer(engine, ttoks, args.repeats) if ttoks else ({}, {})
    del engine
    if args.server:
        prof["overheads"] = measure_overheads(prof, args.server, args.overhead_prompt_tokens, args.overhead_requests)
    return prof
