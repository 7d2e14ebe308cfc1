"""Short prompts behind a long one: the scheduler's prompt chunk cap (engine/scheduler.py) against first come,
first served, on the in-process engine with the embedded model, the same requests, alternating runs.

    python -P benchmarks/bench_scheduler.py [--budget 256] [--long 1024] [--short 3] [--repeats 3]

Two sequences are decoding when a long prompt arrives, and `--short` short prompts right behind it. First come,
first served (the scheduler before the cap, kept here as the baseline) gives the long prompt the whole budget
until its last chunk, so the short prompts wait for all of them; with the cap they share the first step. Reported
per policy (median of the repeats): the short prompts' TTFT (seconds and engine steps), the long prompt's TTFT,
the decoding sequences' longest gap between tokens, and the time until every request is done.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.scheduler import ScheduledBatch, Scheduler
from pdserve.engine.sequence import SamplingParams, Status

TEXT = ("The history of the city begins with a settlement on the river, where traders met to exchange salt, "
        "grain and cloth. ")


class FirstComeFirstServed(Scheduler):
    """The scheduler before the chunk cap: running sequences in admission order, each taking all it can of the
    budget, then waiting ones in arrival order."""

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        running = list(self.running)  # admission order, each all it can take (the same preemption as Scheduler's)
        budget = self._running(batch, running, [s.num_pending_tokens for s in running], self.max_num_batched_tokens)
        if batch.preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            matched = self._match_prefix(seq)
            n = min(seq.num_pending_tokens, budget)
            if n > 0 and not self.bm.ensure(seq.block_table, seq.num_computed_tokens + n):
                if matched:
                    self._unmatch_prefix(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            if n > 0:
                batch.seqs.append(seq)
                batch.num_new.append(n)
                batch.num_refresh.append(0)
                budget -= n
        return batch


def run_once(engine: LLMEngine, policy: str, args) -> dict:
    old = engine.scheduler
    cls = FirstComeFirstServed if policy == "fcfs" else Scheduler
    engine.scheduler = cls(engine.block_manager, old.max_num_seqs, old.max_num_batched_tokens, old.prompt_chunk_tokens)
    tok = engine.tokenizer
    words = tok.hf.encode(TEXT * (args.long // 20 + 2), add_special_tokens=False)
    greedy = dict(temperature=0.0, ignore_eos=True)
    times: dict[str, list[float]] = {}
    steps: dict[str, int] = {}
    t0 = time.perf_counter()
    step = 0

    def add(rid, ids, n):
        engine.add_request(rid, ids, SamplingParams(max_tokens=n, **greedy))
        times[rid] = [time.perf_counter()]

    for d in range(2):
        add(f"decode{d}", words[d * 7: d * 7 + 24], args.decode_tokens)
    arrived = None
    while engine.has_unfinished():
        if arrived is None and all(len(times[f"decode{d}"]) > 3 for d in range(2)):
            add("long", words[:args.long], 4)
            for s in range(args.short):
                add(f"short{s}", words[100 + 9 * s: 100 + 9 * s + args.short_len], 4)
            arrived = step
        for out in engine.step():
            if out.new_token_ids:
                times[out.request_id].extend([time.perf_counter()] * len(out.new_token_ids))
                if out.request_id not in steps and out.request_id in ("long",) + tuple(
                        f"short{s}" for s in range(args.short)):
                    steps[out.request_id] = step + 1 - arrived
        step += 1
    total = time.perf_counter() - t0
    engine.scheduler = old
    shorts = [f"short{s}" for s in range(args.short)]
    gaps = [b - a for d in range(2) for a, b in zip(times[f"decode{d}"][1:], times[f"decode{d}"][2:])]
    return {"short_ttft_s": statistics.fmean(times[s][1] - times[s][0] for s in shorts),
            "short_ttft_steps": statistics.fmean(steps[s] for s in shorts),
            "long_ttft_s": times["long"][1] - times["long"][0], "long_ttft_steps": steps["long"],
            "decode_max_gap_s": max(gaps), "all_done_s": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=256, help="engine.max_num_batched_tokens")
    p.add_argument("--long", type=int, default=1024, help="tokens of the long prompt")
    p.add_argument("--short", type=int, default=3, help="short prompts right behind it")
    p.add_argument("--short-len", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    engine = LLMEngine(config=EngineConfig(max_num_batched_tokens=args.budget), dtype="float32", progress=False)
    runs: dict[str, list[dict]] = {"fcfs": [], "chunk_cap": []}
    for _ in range(args.repeats):
        for policy in runs:
            runs[policy].append(run_once(engine, policy, args))
    result = {"budget": args.budget, "prompt_chunk_tokens": engine.scheduler.prompt_chunk_tokens,
              "long": args.long, "short": args.short, "short_len": args.short_len, "repeats": args.repeats}
    for policy, rs in runs.items():
        result[policy] = {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
    result["short_ttft_ratio"] = round(result["fcfs"]["short_ttft_s"] / result["chunk_cap"]["short_ttft_s"], 2)
    result["long_ttft_ratio"] = round(result["chunk_cap"]["long_ttft_s"] / result["fcfs"]["long_ttft_s"], 2)
    result["all_done_ratio"] = round(result["chunk_cap"]["all_done_s"] / result["fcfs"]["all_done_s"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
