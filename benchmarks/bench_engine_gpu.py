"""Engine-level decode throughput on one GPU: LLMEngine (scheduler + ModelRunner + sampler + detokenizer)
over a random-weight Llama-3-8B-shaped model, CUDA graphs on vs off, batch 1 and 32 at 1K context, each with
overlap scheduling off and on (engine.overlap_schedule; --overlap picks). Compare with the standalone kernels
benchmark (benchmarks/bench_gpu.py, docs/bench/gpu.md).

    python benchmarks/bench_engine_gpu.py --tokenizer .gpu_fixture --out OUT
    python benchmarks/bench_engine_gpu.py --tokenizer .gpu_fixture --out OUT --overlap off,on --plans ''
    python benchmarks/bench_engine_gpu.py --tokenizer .gpu/models/llama-3-8b --out OUT --plans '' --only-graphs \
        --breakdown --trace 32 --peer     # where a step's time goes; transformers' compiled generate beside it

The 16 GB of weights are made on the GPU rather than written and read back as safetensors: the run
replaces the runner's loader with engine/random_weights.py (the same tensor names, unit-variance
projections as in benchmarks/random_llama.py). --tokenizer: any HF directory with tokenizer files (the
engine needs one; the prompts are token ids and out-of-vocabulary output ids decode to nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

# bench_gpu (the peer's timing) sits beside this script, which runs with `python -P` (script folder not on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=500000.0, tie_word_embeddings=False, model_type="llama", bos_token_id=1,
                 eos_token_id=2)


def build_engine(model_dir: Path, cfg: dict, args):
    import pdserve.engine.model_runner as model_runner
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.model_config import arch_from_hf_config
    from pdserve.config import EngineConfig
    from pdserve.engine.random_weights import random_weights

    loader = model_runner.load_weights
    arch = arch_from_hf_config(cfg)
    # the engine's own loader would read 16 GB of safetensors; the same names, generated on the GPU
    model_runner.load_weights = lambda path, dtype, progress=True: (arch, random_weights(arch, dtype, "cuda"))
    try:
        config = EngineConfig(block_size=16, kv_cache_memory_gb=args.kv_gb, max_num_seqs=64,
                              max_num_batched_tokens=8192, device="cuda")
        return LLMEngine(str(model_dir), dtype="bfloat16", config=config, progress=False)
    finally:
        model_runner.load_weights = loader


class _TimedEvent:
    """A step's `done` event whose synchronize() (the host waiting for the device) is timed."""

    def __init__(self, event, waits: list):
        self.event, self.waits = event, waits

    def synchronize(self):
        t0 = time.perf_counter()
        self.event.synchronize()
        self.waits.append(time.perf_counter() - t0)


def _instrument(engine) -> tuple[dict, callable]:
    """Time each step's host phases (schedule, launch, finish; the finish's wait for the device apart) and
    bracket each launched step's device work with CUDA events, so a step's period splits into device work,
    device idle between steps, and host work. Returns the record and a function that undoes it."""
    rec = dict(schedule=[], launch=[], finish=[], wait=[], events=[])
    saved = engine.scheduler.schedule, engine._launch, engine._finish

    def schedule(*a, **k):
        t0 = time.perf_counter()
        try:
            return saved[0](*a, **k)
        finally:
            rec["schedule"].append(time.perf_counter() - t0)

    def launch(batch, prev):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        begin.record()
        step = saved[1](batch, prev)
        end.record()
        rec["launch"].append(time.perf_counter() - t0)
        rec["events"].append((begin, end, all(n == 1 for n in batch.num_new)))
        if step.done is not None:
            step.done = _TimedEvent(step.done, rec["wait"])
        return step

    def finish(step):
        t0 = time.perf_counter()
        try:
            return saved[2](step)
        finally:
            rec["finish"].append(time.perf_counter() - t0)

    engine.scheduler.schedule, engine._launch, engine._finish = schedule, launch, finish

    def undo():
        engine.scheduler.schedule, engine._launch, engine._finish = saved
    return rec, undo


def _breakdown(rec: dict) -> dict:
    """Medians over the decode steps (the first two and the last left out: pipeline fill and drain). gpu_step:
    from a launch's first queued work to its last on the device (includes the device idling mid-launch if the
    host falls behind); gpu_gap: from one step's end to the next one's start (the device idle between steps)."""
    ev = rec["events"]
    decode = [i for i, (_, _, d) in enumerate(ev) if d][2:-1]
    med = lambda xs: statistics.median(xs) * 1e3 if xs else None  # noqa: E731
    gpu = [ev[i][0].elapsed_time(ev[i][1]) / 1e3 for i in decode]
    gap = [ev[i - 1][1].elapsed_time(ev[i][0]) / 1e3 for i in decode if i > 0]
    # step() calls, launches and waits do not pair one to one (the last call only finishes): the host phases
    # are taken over the second half of each list, where every call is a decode step
    host = {k: med(rec[k][len(rec[k]) // 2:-1]) for k in ("schedule", "launch", "finish", "wait")}
    return dict(gpu_step_ms=med(gpu), gpu_gap_ms=med(gap), host_ms=host, steps=len(decode))


def decode_run(engine, batch: int, context: int, new_tokens: int, seed: int, breakdown: bool = False,
               trace: str | None = None) -> dict:
    """All `batch` prompts of `context` tokens prefilled, then `new_tokens` decode steps; the decode steps'
    wall time (engine.step: schedule, inputs, forward/replay, sampling, detokenization) is measured.

    Overlap scheduling off, a step() ends in the host read of its sampled tokens, and each is timed alone (the
    device idle at its start). On, a step() returns with the next model step still running (it reads the one
    before), so the device is not synchronized between steps: the time of a step() in the steady state is
    the period of the pipeline, and tokens/s is over the whole decode phase. The step() that launches a decode
    step is the one counted as a decode step (it also finishes the step before)."""
    from pdserve.engine.sequence import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    for i in range(batch):
        engine.add_request(f"b{batch}-{seed}-{i}", torch.randint(3, 32000, (context,), generator=gen).tolist(),
                           SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    kinds, times = [], []
    execute = engine.runner.execute

    def recording(b, *a, **k):
        kinds.append(all(n == 1 for n in b.num_new))
        return execute(b, *a, **k)

    engine.runner.execute = recording
    overlap = engine.overlap_schedule
    graphs = engine.runner.graphs
    snap: dict = {}
    if graphs is not None:  # the graph's inputs at a mid-run step of the full batch, for replay_ms
        run = graphs.run

        def snapshot(ids, *a, **k):
            logits = run(ids, *a, **k)
            if len(ids) == batch and len(kinds) >= new_tokens // 2 and not snap:
                snap.update(bucket=graphs.bucket_for(batch), tokens=graphs.tokens.clone(),
                            seq_lens=graphs.seq_lens.clone(), block_tables=graphs.block_tables.clone())
            return logits
        graphs.run = snapshot
    rec, undo = _instrument(engine) if breakdown else (None, lambda: None)
    prof = contextlib.nullcontext()
    if trace:
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    try:
        torch.cuda.synchronize()
        with prof:
            while engine.has_unfinished():
                if not overlap:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)  # off: step() ends in a host read of the sampled tokens
            torch.cuda.synchronize()
    finally:
        engine.runner.execute = execute
        if graphs is not None:
            del graphs.run  # the instance attribute; the class's method again
        undo()
    if trace:
        prof.export_chrome_trace(trace)
    # on, the last step() launches nothing (it only finishes the last step): zip leaves it out; and the first
    # decode step() waits for the last prefill step: left out, both ways, so that the two compare
    decode = [t for t, d in zip(times, kinds) if d][1:]
    ms = statistics.median(decode) * 1e3
    row = dict(batch=batch, context=context, new_tokens=new_tokens, overlap=overlap, decode_steps=len(decode),
               median_step_ms=ms, mean_step_ms=statistics.mean(decode) * 1e3,
               tokens_per_s=batch * len(decode) / sum(decode), prefill_steps=len(kinds) - len(decode),
               # the whole generation, prefill included, as a peer's generate() is timed (--peer)
               e2e_tokens_per_s=batch * new_tokens / sum(times))
    if rec is not None:
        row["breakdown"] = _breakdown(rec)
    if snap:
        # first on the buffers as the run left them (what this benchmark reported before 2026-12-05), then on
        # the mid-run full batch's
        row["replay_ms_end_buffers"] = replay_ms(engine, {"bucket": snap["bucket"]})
        row["replay_ms"] = replay_ms(engine, snap)
    return row


def replay_ms(engine, snap: dict, reps: int = 50) -> float:
    """GPU time of one graph replay alone (the engine step minus this is host work), on the inputs of a mid-run
    step of the full batch. The buffers as the run leaves them would not do: its last steps run fewer sequences,
    and a bucket's padding rows (seq_len 0) read no KV, so a replay on them is cheaper than the steps measured."""
    graphs = engine.runner.graphs
    for name in ("tokens", "seq_lens", "block_tables"):
        if name in snap:
            getattr(graphs, name).copy_(snap[name])
    graph = graphs.graphs[snap["bucket"]]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def peer_generate(cfg: dict, batches: list[int], context: int, new_tokens: int, device="cuda",
                  compiled: bool = True, dtype=torch.bfloat16) -> list[dict]:
    """transformers' LlamaForCausalLM (SDPA, static cache, torch.compile'd unless `compiled` is off) on the very
    tensors the engine ran (random_weights, same seed, same device), greedy generate() of `new_tokens` after
    `context`-token random prompts: the peer of issue 17's tokens/s ratio, timed like the engine's e2e rate
    (prefill included). Timed by bench_gpu.hf_generate: the median of two calls after a first one (which
    compiles), or of one eager call after a warm one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench_gpu import hf_generate

    from pdserve.engine.model_config import arch_from_hf_config
    from pdserve.engine.random_weights import random_weights

    config = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    hf.load_state_dict(random_weights(arch_from_hf_config(cfg), dtype, device), strict=True)
    hf.eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    rows = []
    for b in batches:
        gen = torch.Generator().manual_seed(b)
        ids = torch.randint(3, 32000, (b, context), generator=gen).to(device)
        seconds, first, out = hf_generate(hf, ids, compiled, new_tokens)
        assert out.shape == (b, new_tokens), out.shape
        rows.append(dict(peer=f"transformers {transformers_version()} LlamaForCausalLM, SDPA, static cache, "
                              f"{'torch.compile' if compiled else 'eager'}", batch=b, context=context,
                         new_tokens=new_tokens, first_call_s=first, seconds=seconds,
                         tokens_per_s=b * new_tokens / seconds))
    del hf
    return rows


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def load_plans(path: Path) -> int:
    """fused.LINEAR_PLANS from a bench_gpu.py run's JSON (its tuned GEMV / skinny-GEMM choices)."""
    from pdserve.kernels import fused

    count = 0
    for model in json.loads(path.read_text())["models"]:
        for row in model.get("linear") or []:
            kernel, cfg = row["best"]
            fused.LINEAR_PLANS[(row["batch"], row["n"], row["k"], row["proj"].endswith("silu"))] = (
                kernel, tuple(cfg) if cfg else None)
            count += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--kv-gb", type=float, default=8.0)
    ap.add_argument("--plans", default="docs/bench/gpu-run3.json",
                    help="also run with the linear plans tuned by a bench_gpu.py run ('' to skip)")
    ap.add_argument("--overlap", default="off,on",
                    help="overlap scheduling settings to run each case with (engine.overlap_schedule): off, on, "
                         "or off,on to measure its gain in one call")
    ap.add_argument("--breakdown", action="store_true",
                    help="split each decode step into host phases (schedule, launch, finish, waiting for the "
                         "device) and device work / idle between steps (CUDA events); adds a little host time")
    ap.add_argument("--trace", type=int, default=0, metavar="BATCH",
                    help="also record a torch.profiler trace (CPU + CUDA) of a 16-token decode at this batch "
                         "with graphs and overlap on: OUT/trace_bBATCH.json.gz")
    ap.add_argument("--only-graphs", action="store_true", help="skip the eager rows")
    ap.add_argument("--peer", action="store_true",
                    help="then free the engine and time transformers' compiled static-cache generate on the same "
                         "weights, prompts of --context tokens, --new-tokens each (issue 17's ratio: the engine's "
                         "e2e_tokens_per_s with graphs and overlap on over this)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path("/tmp/engine-bench-llama3-8b")
    model_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(args.tokenizer).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, model_dir / f.name)
    (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B))
    t0 = time.time()
    engine = build_engine(model_dir, LLAMA3_8B, args)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  command="python benchmarks/bench_engine_gpu.py " + flags, load_s=time.time() - t0, runs=[])
    graphs = engine.runner.graphs
    batches = [int(b) for b in args.batches.split(",")]
    overlaps = [{"off": False, "on": True}[o] for o in args.overlap.split(",")]
    variants = [("graphs", True)] + ([] if args.only_graphs else [("eager", False)])
    for plans in ([False, True] if args.plans else [False]):
        if plans:
            result["plans_loaded"] = load_plans(Path(args.plans))
            graphs = engine.runner._decode_graphs(64)  # recapture: the plans change the kernels
        for name, on in variants:
            if plans and not on:
                continue
            engine.runner.graphs = graphs if on else None
            for batch in batches:
                for overlap in overlaps:
                    engine.overlap_schedule = overlap
                    t1 = time.time()
                    decode_run(engine, batch, 64, 4, seed=99)  # compile, capture the bucket
                    warm = time.time() - t1
                    row = decode_run(engine, batch, args.context, args.new_tokens, seed=batch,
                                     breakdown=args.breakdown and on)
                    row |= dict(mode=name, tuned_plans=plans, warmup_s=warm)
                    result["runs"].append(row)
                    print(json.dumps(row), flush=True)
    if args.trace:
        engine.runner.graphs, engine.overlap_schedule = graphs, True
        path = out / f"trace_b{args.trace}.json"
        decode_run(engine, args.trace, args.context, 16, seed=7, trace=str(path))
        with open(path, "rb") as f, gzip.open(f"{path}.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        path.unlink()
    result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.peer:
        ours = {r["batch"]: r["e2e_tokens_per_s"] for r in result["runs"]
                if r["mode"] == "graphs" and r["overlap"] and not r["tuned_plans"]}
        del engine, graphs
        gc.collect()
        torch.cuda.empty_cache()
        try:
            result["peer"] = peer_generate(LLAMA3_8B, batches, args.context, args.new_tokens)
        except Exception as e:  # a peer that fails to build or compile is a result, not a lost run
            result["peer_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        for row in result.get("peer", []):
            if row["batch"] in ours:
                row["engine_over_peer"] = ours[row["batch"]] / row["tokens_per_s"]
            print(json.dumps(row), flush=True)
    (out / "engine_bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
