"""The engine's own scheduler against the simulator's, in virtual time: is a gap between the simulator and a
measured cluster in the scheduling or in the step costs?

    .venv/bin/python -P benchmarks/sched_vs_sim.py --profile h200-llama3-8b --concurrency 1,8,32

`pdserve bench --concurrency C` against one colocated engine (benchmarks/bench_cluster_gpu.py's `colocated`
deployment: 2,048-token prompts, 64 output tokens, 4,096-token steps, 64 sequences), replayed on a real
LLMEngine (engine/scheduler.py, chunked prefill, the prompt chunk cap) with a tiny random model on the CPU, so
that its steps compute in milliseconds: each step's time is what the profile charges for that step's
composition (Profile.mixed_ms / decode_ms, as sim.py charges it), not what the CPU took. C clients, each sending
its next request when its last finishes; a request reaches the engine the profile's `request_ms` after it was
sent, and every step costs the profile's `decode_step_ms` more, as the simulator charges them. The same profile
and workload go through the simulator's closed loop (validate_planner.gpu_simulated). What can differ is which
prompt tokens and decodes share a step: the scheduling. Equal numbers put a gap against the real cluster on
the step costs (what the GPU does with a step of that composition); different numbers on the simulator's copy
of the scheduler.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import dummy_model  # noqa: E402
import validate_planner  # noqa: E402
from pdserve.config import EngineConfig  # noqa: E402
from pdserve.engine.engine import LLMEngine  # noqa: E402
from pdserve.engine.sequence import SamplingParams  # noqa: E402
from pdserve.planner import profile as profile_mod  # noqa: E402
from pdserve.tools.bench import percentile  # noqa: E402

# one layer, tiny widths: only the scheduling matters here; the tokenizer is the embedded one
TINY = {**dummy_model.SHAPES["llama-3-8b"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 49152,
        "torch_dtype": "float32"}


def tiny_model(root: Path) -> Path:
    out = dummy_model.write(root / "tiny")
    cfg = json.loads((out / "config.json").read_text())
    cfg.update({k: v for k, v in TINY.items() if k not in ("bos_token_id", "eos_token_id")})
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def replay(prof, model: Path, clients: int, n: int, prompt: int, output: int) -> dict:
    """The engine scheduling a closed loop, each step timed by the profile; TTFT/TPOT per request in seconds."""
    tokens = int(validate_planner.GPU_ENGINE["kv_cache_memory_gb"] * 2 ** 30) // int(prof.kv_bytes_per_token["raw"])
    per_token = 2 * TINY["num_key_value_heads"] * TINY["head_dim"] * 4 * TINY["num_hidden_layers"]
    cfg = EngineConfig(device="cpu", max_num_seqs=validate_planner.GPU_ENGINE["max_num_seqs"],
                       max_num_batched_tokens=validate_planner.GPU_ENGINE["max_num_batched_tokens"],
                       kv_cache_memory_gb=tokens * per_token / 2 ** 30 * 1.01)
    eng = LLMEngine(str(model), "float32", cfg, load_format="dummy", progress=False)
    steps: list = []
    schedule = eng.scheduler.schedule

    def traced():  # the step's composition, read before the step advances the sequences
        b = schedule()
        steps.append((b.num_tokens, len(b.seqs), sum(s.num_computed_tokens for s in b.seqs),
                      sum(k * s.num_computed_tokens for s, k in zip(b.seqs, b.num_new))))
        return b

    eng.scheduler.schedule = traced
    request_s, step_ms = prof.overhead_ms("request_ms") / 1e3, prof.overhead_ms("decode_step_ms")
    now, sent, arrival, first, last, ntok = 0.0, 0, {}, {}, {}, {}
    pending: list[tuple[float, str]] = []  # (when it reaches the engine, id), sent and not yet there

    def send(t: float) -> None:
        nonlocal sent
        arrival[f"r{sent}"] = t
        pending.append((t + request_s, f"r{sent}"))
        sent += 1

    for _ in range(min(clients, n)):
        send(0.0)
    while pending or eng.has_unfinished():
        if not eng.has_unfinished():  # idle: the next request's arrival starts the next step
            now = max(now, min(t for t, _ in pending))
        for t, rid in sorted(pending):  # a step takes every request that reached the engine by its start
            if t <= now:
                rng = random.Random(int(rid[1:]))
                eng.add_request(rid, [rng.randrange(100, 30000) for _ in range(prompt)],
                                SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True))
                pending.remove((t, rid))
        outs = eng.step()
        num_tokens, seqs, ctx, tok_ctx = steps[-1]
        if num_tokens == seqs:  # every sequence adds one token: a decode-only step
            ms = prof.decode_ms("bf16", seqs, ctx)
        else:
            ms = prof.mixed_ms("bf16", num_tokens, tok_ctx, ctx, seqs)
        now += (ms + step_ms) / 1e3
        for o in outs:
            if o.new_token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                ntok[o.request_id] = ntok.get(o.request_id, 0) + len(o.new_token_ids)
            if o.finished and sent < n:
                send(now)
    ttft = sorted(first[r] - arrival[r] for r in first)
    tpot = sorted((last[r] - first[r]) / (ntok[r] - 1) for r in first if ntok[r] > 1)
    return {"ttft_s": ttft, "tpot_s": tpot, "req_s": len(first) / now}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="h200-llama3-8b")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-stream", type=int, default=4, help="bench_cluster_gpu's run 1: 4")
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--without-overheads", action="store_true",
                    help="drop the profile's request_ms and decode_step_ms (both sides): step costs alone")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prof = profile_mod.resolve(args.profile)
    if args.without_overheads:
        prof = profile_mod.from_dict({**prof.raw, "overheads": {}})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp))
        for c in (int(x) for x in args.concurrency.split(",")):
            n = max(8, args.requests_per_stream * c)
            eng = replay(prof, model, c, n, args.input_len, args.max_tokens)
            # overlap off: the replay above steps the scheduler synchronously (it compares scheduling alone)
            sim = validate_planner.gpu_simulated(prof, "colocated", c, n, args.input_len, args.max_tokens,
                                                 overlap=False)
            row = {"concurrency": c, "requests": n, "req_s": [round(eng["req_s"], 2),
                                                             round(sim["request_throughput"], 2)]}
            for metric in ("ttft_s", "tpot_s"):
                for q in (50, 99):
                    e, s = percentile(eng[metric], q), sim[metric][f"p{q}"]
                    row[f"{metric[:-2]}_p{q}_ms"] = [round(e * 1e3, 2), round(s * 1e3, 2), round((s - e) / e, 4)]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| C | TTFT p50 engine / sim ms | TTFT p99 | TPOT p50 | TPOT p99 | req/s |")
    print("|---:|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k][0]:.1f} / {r[k][1]:.1f} ({r[k][2]:+.0%})" for k in ("ttft_p50_ms", "ttft_p99_ms",
                                                                             "tpot_p50_ms", "tpot_p99_ms")]
        print(f"| {r['concurrency']} | " + " | ".join(cells) + f" | {r['req_s'][0]} / {r['req_s'][1]} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"profile": args.profile, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
