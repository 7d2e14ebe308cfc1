"""`pdserve profile`: measure a profile (profile.py) on the machine at hand, CUDA or CPU.

- prefill: `LLMEngine.step()` of one fresh prompt of T tokens (the whole prompt in one step), per precision; the
  context term from a prompt cut into two equal chunks: the second chunk's step minus the first's (same number
  of tokens, plus attention over the first chunk's KV);
- decode: `LLMEngine.step()` of B sequences decoding at once at two contexts (the sequences share their prompt
  through the prefix cache, so setting up batch 32 at 512 tokens prefills 512 tokens, not 16K; each still
  reads its own block table);
- transfer: one request's KV from a NIXL agent in a second (spawned) process into one in this process (export
  there, then READ posted -> landed here), raw and fp8 wire, in the engine's KV geometry and dtype on the same
  device, adjacent block ids on both sides by default (--transfer-placement): what a decode worker's pull from a
  prefill worker costs (benchmarks/bench_kv_transfer_ipc.py does the same). Two processes because two agents in
  one process do not get UCX's cuda_ipc transport on a GPU: a host-staged pipeline instead, 0.38 GB/s on an H200
  against 0.9-1.4 TB/s between two processes at 2048-8192 tokens (2026-12-05);
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

import gc
import os
import platform
import random
import statistics
import sys
import time
import uuid
from datetime import datetime, timezone

from pdserve.planner.hostload import CPUShare, this_process
from pdserve.planner.procs import reply as _reply
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
    # context term: a 2C-token prompt in chunks of C; the second chunk computes C tokens over C cached ones, the
    # first the same C tokens over none: their difference, per pass, is the attention over the cached prefix (both
    # steps of one request, so a fresh request's first-step costs are in neither difference). C as long as the
    # curve allows up to 2048 on a GPU (512 on a CPU): at 512 tokens on an H200 the term is ~3% of the step, below
    # the noise of two steps (the second chunk also samples the request's one token: a fraction of a ms)
    limit = 512 if engine.device.type == "cpu" else 2048
    c = max((t for t in tokens if t <= limit), default=tokens[0])
    sched.max_num_batched_tokens = c
    first, second = [], []
    # each step waited out on the device: the first chunk samples nothing, so its step() returns once the work is
    # queued, and the second call would be charged for both (on an H100 17-24 / 83-88 ms against 47-49 for a fresh
    # prompt of the same length)
    import torch

    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for _ in range(repeats):
        engine.add_request(f"p{next(ids)}", prompt(2 * c), SamplingParams(max_tokens=1, ignore_eos=True))
        for out in (first, second):
            sync()
            t = time.perf_counter()
            engine.step()
            sync()
            out.append((time.perf_counter() - t) * 1e3)
        while engine.has_unfinished():
            engine.step()
    diff = statistics.median(b - a for a, b in zip(first, second))
    per_pair = max(0.0, diff / (c * c))
    return {"tokens": tokens, "ms": ms, "ms_per_token_context": per_pair,
            "context_check": {"chunk": c, "first_chunk_ms": round(statistics.median(first), 4),
                              "second_chunk_ms": round(statistics.median(second), 4),
                              "fresh_prompt_ms": ms[tokens.index(c)]}}


def measure_decode(engine, batches: list[int], contexts: list[int], steps: int, passes: int,
                   rng: random.Random, distinct: bool = False) -> dict:
    from pdserve.engine.sequence import SamplingParams

    vocab = engine.arch.vocab_size
    engine.scheduler.max_num_batched_tokens = max(max(contexts) + max(batches), 2048)

    def point(ctx: int, b: int) -> float:
        prompt = [rng.randrange(100, vocab - 1) for _ in range(ctx)]
        # enough tokens that no sequence ends before the timed steps do: distinct prompts are prefilled one step
        # each while the earlier ones already decode (with max_tokens = steps + 3, the first of 64 4K-token
        # prompts had finished before the last was prefilled, and "batch 64" timed far fewer sequences)
        params = SamplingParams(max_tokens=steps + b + 8, ignore_eos=True)
        ids = []
        # one sequence computes the prompt; the others, added once its blocks are cached, reuse them (or, distinct,
        # each computes its own: on a GPU, blocks read by every sequence may come from L2 instead of HBM)
        for group in ((range(b),) if distinct else (range(1), range(1, b))):
            for i in group:
                own = [rng.randrange(100, vocab - 1) for _ in range(ctx)] if distinct else prompt
                ids.append(f"d{ctx}-{b}-{i}-{uuid.uuid4().hex[:6]}")
                engine.add_request(ids[-1], own, params)
            while any(s.num_output_tokens == 0 for s in engine.requests.values()):
                engine.step()
        times = []
        for _ in range(steps):
            running = len(engine.scheduler.running)
            if running != b:
                raise RuntimeError(f"decode batch {b} at context {ctx}: {running} sequences running")
            t = time.perf_counter()
            engine.step()
            times.append((time.perf_counter() - t) * 1e3)
        for request_id in ids:
            engine.abort(request_id)
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


PLACEMENTS = ("adjacent", "scattered")


def placement_ids(placement: str, n: int) -> tuple[list[int], list[int]]:
    """The exporter's and the reader's block ids of an n-block request, in caches of 2n blocks or more.
    adjacent: consecutive on both sides (the block manager hands out freed blocks in order, so a request's table
    is mostly one run: one NIXL descriptor); scattered: every other block, the reader's in reverse (one descriptor
    per block, the worst case). This is the raw wire's: the fp8 wire reads the exporter's staged copy into the
    reader's staging, both contiguous (one descriptor), and only the quantize and dequantize gather or scatter."""
    if placement == "adjacent":
        return list(range(n)), list(range(n, 2 * n))
    if placement == "scattered":
        return list(range(0, 2 * n, 2)), list(range(2 * n - 1, 0, -2))
    raise ValueError(f"block placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")


def _block_sums(cache, ids: list[int]) -> list[list[int]]:
    """Per block, in order: the sum of its bytes and a position-weighted sum (equal lists: the same bytes landed)."""
    import torch

    if not ids:
        return []
    nbytes = cache[0].numel() * cache.element_size()
    weights = torch.arange(1, nbytes + 1, device=cache.device, dtype=torch.int64) % 251
    sums = []
    for b in ids:
        x = cache[b].reshape(-1).view(torch.uint8).to(torch.int64)
        sums.append(torch.stack([x.sum(), (x * weights).sum()]))
    return torch.stack(sums).tolist()


def _exporter(conn, shape: tuple, dtype: str, device: str, blocks: int, wires: list[str], threads: int) -> None:
    """The prefill worker's side of measure_transfer, in a process of its own (as a prefill worker is): a KV cache
    of the reader's geometry on the same device, one NIXL agent per wire; exports what the reader asks for, times
    the export, and waits for the reader's done notification before the next."""
    import traceback

    agents = {}
    try:
        import torch

        from pdserve.kv_transfer import KVTransferAgent

        if device == "cpu":
            torch.set_num_threads(threads)
        torch.manual_seed(1)
        dt = getattr(torch, dtype)
        gen = dt if dt in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        cache = torch.randn(2 * blocks, *shape, device=device, dtype=gen).to(dt)
        for w in wires:  # fp8: staging for the quantized copy of the largest request
            agents[w] = KVTransferAgent(f"prof-exp-{w}-{os.getpid()}", cache, wire_dtype=w, lease_seconds=60,
                                        staging_blocks=blocks if w == "fp8" else 0)
        conn.send(("ready", os.getpid()))
        while (msg := conn.recv()) is not None:
            if msg[0] == "checksum":
                conn.send(("checksum", _block_sums(cache, msg[1])))
                continue
            _, wire, rid, ids, tokens = msg
            t0 = time.perf_counter()
            ticket = agents[wire].export(rid, ids, tokens)
            conn.send(("ticket", ticket, (time.perf_counter() - t0) * 1e3))
            deadline = time.monotonic() + 60
            while not agents[wire].poll():  # the reader's done notification ends the lease
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no done notification for {rid} within 60 s")
                time.sleep(0.0002)
            conn.send(("released",))
    except BaseException as e:
        traceback.print_exc()  # the whole of it on the profile's stderr (inherited); the reader raises the last line
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except Exception:
            pass
    finally:
        for a in agents.values():
            a.close()


def measure_transfer(engine, tokens: list[int], repeats: int, placement: str = "adjacent",
                     threads: int = 1) -> tuple[dict, dict]:
    """One request's KV pull from an exporter in another process (a spawned one, with its own cache of the
    engine's geometry and dtype on the same device) into a cache here, raw and fp8 wire: what a decode worker's
    pull from a prefill worker costs. Two processes, not two agents in this one: on CUDA, UCX's cuda_ipc transport
    (what two workers use, zero-copy) does not apply within one process, which falls back to a host-staged
    pipeline (0.38 GB/s on an H200, thousands of times slower than two processes at 2048 tokens). Per size, the
    median of `repeats` after one discarded pull; raw-wire bytes are checked equal on both sides."""
    import torch
    import torch.multiprocessing as mp

    from pdserve.kv_transfer import KVTransferAgent

    cache = engine.runner.kv_cache
    shape = tuple(cache.shape[1:])
    bs = engine.config.block_size
    blocks = -(-max(tokens) // bs)
    placement_ids(placement, 1)  # a bad placement fails before a process starts
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_exporter, daemon=True,
                       args=(there, shape, str(cache.dtype).removeprefix("torch."), str(cache.device), blocks,
                             ["bf16", "fp8"], threads))
    proc.start()
    there.close()
    out, per_token = {}, {}
    try:
        (exporter_pid,) = _reply(here, proc, "ready", 600)
        dst = torch.zeros(2 * blocks, *shape, dtype=cache.dtype, device=cache.device)
        with KVTransferAgent(f"prof-read-{uuid.uuid4().hex[:6]}", dst, staging_blocks=blocks) as reader:
            for wire, wire_name in (("bf16", "raw"), ("fp8", "fp8")):
                rows = {"bytes": [], "ms": [], "export_ms": [], "tokens": [], "descriptors": []}
                for n in tokens:
                    src_ids, dst_ids = placement_ids(placement, -(-n // bs))
                    samples = []
                    for i in range(repeats + 1):
                        here.send(("export", wire, f"r{n}-{wire}-{i}", src_ids, n))
                        ticket, export_ms = _reply(here, proc, "ticket", 120)
                        t0 = time.perf_counter()
                        h = reader.pull(ticket, dst_ids)
                        while reader.check(h) == "PENDING":
                            pass
                        pull_ms = (time.perf_counter() - t0) * 1e3
                        if h.state != "DONE":
                            raise RuntimeError(f"KV transfer failed: {h.error}")
                        _reply(here, proc, "released", 120)
                        samples.append((export_ms, pull_ms))
                    exp, pull = (statistics.median(col) for col in zip(*samples[1:]))
                    if wire == "bf16":  # the same bytes, in the same order, on both sides
                        here.send(("checksum", src_ids))
                        (theirs,) = _reply(here, proc, "checksum", 120)
                        if theirs != _block_sums(dst, dst_ids):
                            raise RuntimeError(f"KV transfer of {n} tokens: the landed blocks differ from the source")
                    rows["bytes"].append(int(h.bytes))
                    rows["ms"].append(round(pull, 4))
                    rows["export_ms"].append(round(exp, 4))
                    rows["tokens"].append(n)
                    rows["descriptors"].append(h.descriptors)
                    _log(f"transfer {wire_name} {n} tokens ({h.bytes} B, {h.descriptors} descriptor(s)): "
                         f"pull {pull:.3f} ms, export {exp:.3f} ms")
                rows.update(placement=placement, processes=2)
                out[wire_name] = rows
                # whole blocks on the wire: bytes per token of a full block
                per_token[wire_name] = rows["bytes"][-1] / (-(-rows["tokens"][-1] // bs) * bs)
        _log(f"transfer: exporter pid {exporter_pid}, reader pid {os.getpid()}, {placement} blocks")
    finally:
        try:
            here.send(None)
        except OSError:
            pass
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)
        here.close()
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
        if engine is not None:  # one engine at a time: two 8B models with their KV pools may not fit one GPU
            engine = None
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
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
    # overlap_schedule: the engines this profile stands for overlap their steps as this one does (on by default on
    # CUDA); the decode points are timed with it, and the simulator models it (sim.py `overlap`)
    prof["engine"] = {"block_size": engine.config.block_size, "max_num_seqs": 64, "max_num_batched_tokens": 1024,
                      "kv_cache_tokens": engine.runner.num_blocks * engine.config.block_size,
                      "overlap_schedule": engine.overlap_schedule}
    prof["host"] = {"cores": args.host_cores, "cpu_share": None if cpu_share is None else round(cpu_share, 4)}
    prof["transfer"], prof["kv_bytes_per_token"] = (
        measure_transfer(engine, ttoks, args.repeats, args.transfer_placement, args.threads) if ttoks else ({}, {}))
    del engine
    if device == "cpu" and args.host_contention:
        from pdserve.planner.contention import measure_host_contention

        gc.collect()
        prof["host"]["contention"] = {"cores": os.cpu_count(), **measure_host_contention(
            args.host_contention, args.model, args.dtype, args.load_format, args.threads, log=_log)}
    if args.server:
        prof["overheads"] = measure_overheads(prof, args.server, args.overhead_prompt_tokens, args.overhead_requests)
    return prof
