"""Replay a validation scenario's requests on one in-process engine and hold every engine step against the profile.

    python -P benchmarks/replay_steps.py [--scenario colocated] [--profile docs/bench/planner/validation/run-f-profile.json]
    python -P benchmarks/replay_steps.py --ragged   # decode steps: ragged contexts against uniform, same total

benchmarks/validate_planner.py compares the simulator with a real cluster; when they disagree, this tells whether
the profile's step costs or the simulator's scheduling is the cause, without Ray, gRPC or the router: the
scenario's requests (validate_planner.SCENARIOS, bench's generators and seed) arrive at their times at one
colocated engine with one intra-op thread (as a Ray actor with num_cpus <= 1 runs it; the profile is measured so
too). Printed: decode-only and mixed steps, measured against the profile's cost of the same composition
(Profile.decode_ms / mixed_ms, as the simulator charges them), the batch sizes, and the per-token gaps (ITL) the
requests saw.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import validate_planner  # noqa: E402
from pdserve.config import EngineConfig  # noqa: E402
from pdserve.engine.engine import LLMEngine  # noqa: E402
from pdserve.engine.sequence import SamplingParams  # noqa: E402
from pdserve.planner import profile as profile_mod  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="colocated", help="the first validate_planner scenario whose name has this")
    p.add_argument("--profile", default="docs/bench/planner/validation/run-f-profile.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ragged", action="store_true",
                   help="instead: decode steps of batches with equal total context, uniform against ragged")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.ragged:
        return ragged()
    prof = profile_mod.load(Path(args.profile))
    _, _, _, a = next(s for s in validate_planner.SCENARIOS if args.scenario in s[0])
    reqs = validate_planner.sim_requests(a)
    eng = LLMEngine(config=EngineConfig(**validate_planner.CONFIG["engine"]), dtype="float32", progress=False,
                    enable_prefix_caching=True)
    steps: list[dict] = []
    schedule = eng.scheduler.schedule

    def traced():
        b = schedule()
        steps.append({"tokens": b.num_tokens, "seqs": len(b.seqs), "ctx": sum(s.num_computed_tokens for s in b.seqs),
                      "tok_ctx": sum(n * s.num_computed_tokens for s, n in zip(b.seqs, b.num_new))})
        return b

    eng.scheduler.schedule = traced
    token_times: dict[str, list[float]] = {}
    t0, i = time.perf_counter(), 0
    while i < len(reqs) or eng.has_unfinished():
        while i < len(reqs) and reqs[i].arrival <= time.perf_counter() - t0:
            r, rng = reqs[i], random.Random(i)
            eng.add_request(f"r{i}", [rng.randrange(100, 30000) for _ in range(r.prompt_len)],
                            SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True))
            i += 1
        if not eng.has_unfinished():
            time.sleep(0.005)
            continue
        start = time.perf_counter()
        outs = eng.step()
        end = time.perf_counter()
        steps[-1]["ms"] = (end - start) * 1e3
        for o in outs:
            if o.new_token_ids:
                token_times.setdefault(o.request_id, []).append(end)
    rows = [s for s in steps if "ms" in s and s["seqs"]]
    for mixed in (False, True):
        sel = [s for s in rows if (s["tokens"] != s["seqs"]) == mixed]
        if not sel:
            continue
        pred = [prof.mixed_ms("bf16", s["tokens"], s["tok_ctx"], s["ctx"], s["seqs"]) if mixed
                else prof.decode_ms("bf16", s["seqs"], s["ctx"]) for s in sel]
        print(f"{'mixed' if mixed else 'decode-only'} steps: {len(sel)}; measured / profile, median "
              f"{statistics.median(s['ms'] / q for s, q in zip(sel, pred)):.2f}, summed "
              f"{sum(s['ms'] for s in sel) / sum(pred):.2f}; batch p50 {statistics.median(s['seqs'] for s in sel)}, "
              f"max {max(s['seqs'] for s in sel)}")
    gaps = sorted(b - a for ts in token_times.values() for a, b in zip(ts, ts[1:]))
    print(f"ITL p50 / p90: {statistics.median(gaps) * 1e3:.0f} / {gaps[int(0.9 * len(gaps))] * 1e3:.0f} ms")


def ragged(repeats: int = 2, steps: int = 12) -> None:
    """Median decode step of batches with the same total context, every sequence at the same length against lengths
    far apart: the simulator charges both the same (base(batch) + slope x total context)."""
    eng = LLMEngine(config=EngineConfig(**validate_planner.CONFIG["engine"]), dtype="float32", progress=False)
    for rep in range(repeats):
        for lens in ([400, 400], [100, 700], [400] * 8, [50, 750] * 4):
            for i, n in enumerate(lens):
                rng = random.Random(1000 * rep + 10 * i + len(lens))
                eng.add_request(f"{rep}-{len(lens)}-{lens[0]}-{i}", [rng.randrange(100, 30000) for _ in range(n)],
                                SamplingParams(max_tokens=steps + 8, ignore_eos=True))
            while eng.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                               for s in eng.scheduler.running):
                eng.step()
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                eng.step()
                times.append((time.perf_counter() - t) * 1e3)
            while eng.has_unfinished():
                eng.step()
            print(f"batch {len(lens)}, contexts {sorted(set(lens))}: {statistics.median(times):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
