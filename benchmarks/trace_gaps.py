"""Where the GPU waits for the host, from a torch.profiler chrome trace (bench_engine_gpu.py --trace B).

    python -P benchmarks/trace_gaps.py OUT/engine/trace_b32.json.gz [--min-gap-us 20] [--top 15]

The device's busy time is the union of its kernels, copies and memsets; a gap is a stretch with none of them.
For each gap the host's innermost operators and CUDA runtime calls running during it are listed (what the
host was doing while the device had nothing queued), and the runtime calls that block the host (stream,
event and device synchronizations, blocking copies) are totalled with the operator that made them.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import statistics

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
BLOCKING = ("Synchronize", "cudaMemcpy", "cudaHostAlloc", "cudaFreeHost", "cudaMalloc", "cudaFree")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return [e for e in data["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in DEVICE_CATS)
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def overlapping(events: list[dict], a: float, b: float, cats: set[str]) -> list[dict]:
    return [e for e in events if e.get("cat") in cats and e["ts"] < b and e["ts"] + e["dur"] > a]


def innermost(host: list[dict]) -> list[dict]:
    """Host events with no other listed event inside them (the most specific operator on each thread)."""
    out = []
    for e in host:
        s, t = e["ts"], e["ts"] + e["dur"]
        if not any(o is not e and o.get("tid") == e.get("tid") and s <= o["ts"] and o["ts"] + o["dur"] <= t
                   and o["dur"] < e["dur"] for o in host):
            out.append(e)
    return out


def parent_op(events: list[dict], call: dict) -> str:
    """The innermost cpu_op on the same thread enclosing a runtime call."""
    best = None
    for e in events:
        if (e.get("cat") == "cpu_op" and e.get("tid") == call.get("tid") and e["ts"] <= call["ts"]
                and call["ts"] + call["dur"] <= e["ts"] + e["dur"] and (best is None or e["dur"] < best["dur"])):
            best = e
    return best["name"] if best else "(python)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--min-gap-us", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    events = load(args.trace)
    busy = busy_intervals(events)
    if not busy:
        raise SystemExit("trace_gaps: no device activity in the trace (recorded without CUDA?)")
    start, end = busy[0][0], busy[-1][1]
    busy_us = sum(b - a for a, b in busy)
    gaps = [(b0, a1) for (_, b0), (a1, _) in zip(busy, busy[1:]) if a1 - b0 >= args.min_gap_us]
    print(f"device span {(end - start) / 1e3:.2f} ms, busy {busy_us / 1e3:.2f} ms ({busy_us / (end - start):.1%}); "
          f"{len(gaps)} gaps >= {args.min_gap_us:.0f} us, {sum(b - a for a, b in gaps) / 1e3:.2f} ms in all")
    if gaps:
        print(f"gap median {statistics.median(b - a for a, b in gaps):.0f} us")
    host_cats = {"cpu_op", "cuda_runtime", "cuda_driver", "python_function", "user_annotation"}
    by_host: collections.Counter = collections.Counter()
    for a, b in gaps:
        for e in innermost(overlapping(events, a, b, host_cats)):
            by_host[e["name"]] += min(b, e["ts"] + e["dur"]) - max(a, e["ts"])
    print("\nhost work during the device's gaps (innermost events, us of gap covered):")
    for name, us in by_host.most_common(args.top):
        print(f"  {us:9.0f}  {name}")
    blocking: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and any(k in e["name"] for k in BLOCKING):
            key = f"{e['name']} <- {parent_op(events, e)}"
            blocking[key] += e["dur"]
            counts[key] += 1
    print("\nruntime calls that can block the host (us in all, count, enclosing operator):")
    for key, us in blocking.most_common(args.top):
        print(f"  {us:9.0f}  x{counts[key]:<5d} {key}")


if __name__ == "__main__":
    main()
