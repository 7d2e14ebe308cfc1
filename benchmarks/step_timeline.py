"""Where a served request's time went, from a bench_cluster_gpu.py run with --save-requests and --step-log, and how
each engine step compares with what the planner's profile charges for it.

    python -P benchmarks/step_timeline.py RESULTS [--profile P] [--tag -sync] [--out timeline.json]
    python -P benchmarks/step_timeline.py docs/bench/planner/h100-sources/run2-2k.tgz --profile h100-llama3-8b

RESULTS (a folder, or a .tgz of one) holds what scripts/gpu_checks.sh part bench writes: cluster_bench<tag>.json, requests<tag>/ (one
`pdserve bench --save-outputs` file per row) and steps<tag>/<deployment>/ (every engine's engine.step_log). Both
sides read time.perf_counter(), one clock for every process of the host, so a request's send (its sent_clock) lines
up with the engines' events by its id. Per row:

- the request path, median and p90 over the row's requests, in ms: `route` send -> the engine that prefills has it
  (router, gRPC, Ray; waiting for the engine's lock while a step runs); `queue` -> its first prompt chunk is
  launched; `prefill` -> the step that samples its first token is done (the decode worker's, disaggregated, after
  `handoff`: prefill done -> decode worker has the request, and `load`: -> its KV has landed); `deliver` -> the
  client has the token; and `admit_steps`, how many steps were launched from the request's arrival at the engine
  to its first chunk's (1: the next one; under overlap scheduling the next step is scheduled before the arrival is
  seen, so 2 at the least while the engine is busy);
- the engine steps inside the row's window: decode-only and mixed, their device time (CUDA events, engine/step_log.py)
  against the profile's cost of the same composition (Profile.decode_ms / mixed_ms, as the simulator charges them),
  host launch time, and the share of the window the device was busy.
"""
from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path


def _summ(xs: list[float]) -> dict:
    """p50 and p90 as `pdserve bench` computes them (pdserve/tools/bench.py), None of no values."""
    from pdserve.tools.bench import percentile

    return {"p50": round(percentile(xs, 50), 3) if xs else None, "p90": round(percentile(xs, 90), 3) if xs else None,
            "n": len(xs)}


def load_steps(directory: Path) -> dict[str, list[dict]]:
    """role -> its events in time order (a role's files, one per engine process, merged)."""
    roles: dict[str, list[dict]] = {}
    for f in sorted(directory.glob("*.jsonl")):
        role = f.name.split("-")[0]
        roles.setdefault(role, []).extend(json.loads(line) for line in f.read_text().splitlines() if line)
    for evs in roles.values():
        evs.sort(key=lambda e: e["t"])
    return roles


def _base(rid: str) -> str:
    return rid.split("#")[0]


def analyse_row(reqs: list[dict], roles: dict[str, list[dict]], prof, precisions: dict[str, str]) -> dict:
    t0 = min(r["sent_clock"] for r in reqs)
    t1 = max(r["sent_clock"] + r["e2e"] for r in reqs)
    ids = {r["request_id"] for r in reqs}
    disagg = "prefill" in roles
    pre_role = "prefill" if disagg else "colocated"
    first_role = "decode" if disagg else "colocated"
    index: dict[str, dict[str, dict]] = {}
    for role, evs in roles.items():
        steps = [e for e in evs if e["ev"] == "step"]
        starts = [s["t"] for s in steps]
        at = index[role] = {"steps": steps, "starts": starts, "add": {}, "loaded": {}, "chunk": {}, "last_chunk": {},
                            "first": {}}
        for e in evs:
            if e["ev"] in ("add", "loaded") and _base(e["id"]) in ids:
                at[e["ev"]].setdefault(_base(e["id"]), e["t"])
        for i, s in enumerate(steps):
            for rid, _, _ in s["chunks"]:
                at["chunk"].setdefault(_base(rid), i)
                at["last_chunk"][_base(rid)] = i
            for rid in s["first"]:
                at["first"].setdefault(_base(rid), i)
    path = {k: [] for k in ("route", "queue", "prefill", "handoff", "load", "first_step", "deliver", "ttft",
                            "admit_steps")}
    for r in reqs:
        rid, sent = r["request_id"], r["sent_clock"]
        p = index[pre_role]
        if rid not in p["add"] or rid not in p["chunk"]:
            continue
        path["route"].append((p["add"][rid] - sent) * 1e3)
        chunk = p["steps"][p["chunk"][rid]]
        path["queue"].append((chunk["t"] - p["add"][rid]) * 1e3)
        path["admit_steps"].append(p["chunk"][rid] - (bisect.bisect_right(p["starts"], p["add"][rid]) - 1))
        f = index[first_role]
        if rid not in f["first"]:
            continue
        first = f["steps"][f["first"][rid]]
        if disagg:
            last = p["steps"][p["last_chunk"][rid]]
            path["prefill"].append((last["done"] - chunk["t"]) * 1e3)
            if rid in f["add"]:
                path["handoff"].append((f["add"][rid] - last["done"]) * 1e3)
            if rid in f["loaded"] and rid in f["add"]:
                path["load"].append((f["loaded"][rid] - f["add"][rid]) * 1e3)
                path["first_step"].append((first["done"] - f["loaded"][rid]) * 1e3)
        else:
            path["prefill"].append((first["done"] - chunk["t"]) * 1e3)
        path["deliver"].append((sent + r["ttft"] - first["done"]) * 1e3)
        path["ttft"].append(r["ttft"] * 1e3)
    out = {"requests": len(reqs), "path_ms": {k: _summ(v) for k, v in path.items() if v}, "steps": {}}
    for role, at in index.items():
        steps = [s for s in at["steps"] if t0 <= s["t"] <= t1 and s.get("dev_ms") is not None]
        if not steps:
            continue
        prec = precisions.get(role, "bf16")
        kinds = {}
        for name, sel in (("decode", [s for s in steps if not s["chunks"]]), ("mixed", [s for s in steps if s["chunks"]])):
            if not sel:
                continue
            pred = [prof.mixed_ms(prec, s["tokens"], s["tok_ctx"], s["ctx"], s["seqs"]) if s["chunks"]
                    else prof.decode_ms(prec, s["seqs"], s["ctx"]) for s in sel] if prof else None
            k = kinds[name] = {"n": len(sel), "batch_p50": statistics.median(s["seqs"] for s in sel),
                               "tokens_p50": statistics.median(s["tokens"] for s in sel),
                               "dev_ms": _summ([s["dev_ms"] for s in sel]),
                               "host_ms": _summ([s["host_ms"] for s in sel]),
                               "dev_ms_sum": round(sum(s["dev_ms"] for s in sel), 1)}
            if pred:
                k["profile_ms_sum"] = round(sum(pred), 1)
                k["measured_over_profile"] = {"median": round(statistics.median(
                    s["dev_ms"] / q for s, q in zip(sel, pred)), 3), "summed": round(k["dev_ms_sum"] / sum(pred), 3)}
        span = (max(s["done"] for s in steps) - min(s["t"] for s in steps)) * 1e3
        out["steps"][role] = {"window_ms": round(span, 1), "device_busy": round(sum(s["dev_ms"] for s in steps) / span, 3),
                              **kinds}
    return out


def timeline_rows(results: str, tag: str = "", prof=None) -> list[dict]:
    """analyse_row of every row of a bench part's results (a folder, or a .tgz of one), with the bench row's
    deployment, concurrency, input_len, ttft_p50_ms and overlap_schedule."""
    root = Path(results)
    if root.suffix == ".tgz":
        with tempfile.TemporaryDirectory(prefix="step-timeline-") as tmp, tarfile.open(root) as tar:
            tar.extractall(tmp, filter="data")
            return timeline_rows(tmp, tag, prof)
    rows = []
    for b in json.loads((root / f"cluster_bench{tag}.json").read_text()):
        name, c = b["deployment"], b["concurrency"]
        reqs = [json.loads(line) for line in
                (root / f"requests{tag}" / f"{name}-c{c}-{b['input_len']}.jsonl").read_text().splitlines()]
        reqs = [r for r in reqs if r["status"] == "OK" and r.get("sent_clock") is not None]
        roles = load_steps(root / f"steps{tag}" / name)
        precisions = {"prefill": "fp8" if "fp8" in name else "bf16"}
        rows.append({"deployment": name, "concurrency": c, "input_len": b["input_len"],
                     "ttft_p50_ms": b.get("ttft_p50_ms"), "overlap_schedule": b.get("overlap_schedule", True),
                     **analyse_row(reqs, roles, prof, precisions)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="folder (or .tgz of one) of a gpu_checks.sh bench part's results")
    ap.add_argument("--tag", default="", help="the part's TAG (benchsync: -sync)")
    ap.add_argument("--profile", default=None, help="a profile name or file to cost the steps with")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    prof = None
    if args.profile:
        from pdserve.planner import profile as profile_mod
        prof = profile_mod.resolve(args.profile)
    rows = timeline_rows(args.results, args.tag, prof)
    for row in rows:
        pm = row["path_ms"]
        cells = " ".join(f"{k} {v['p50']:.1f}/{v['p90']:.1f}" for k, v in pm.items() if k != "admit_steps")
        print(f"{row['deployment']} c={row['concurrency']}: {cells}; admit steps p50 {pm['admit_steps']['p50']}",
              flush=True)
        for role, st in row["steps"].items():
            for kind in ("decode", "mixed"):
                if kind in st:
                    k = st[kind]
                    ratio = k.get("measured_over_profile", {})
                    print(f"    {role} {kind}: {k['n']} steps, batch {k['batch_p50']}, tokens {k['tokens_p50']}, dev "
                          f"{k['dev_ms']['p50']} ms (x{ratio.get('median', float('nan'))} of the profile, summed "
                          f"x{ratio.get('summed', float('nan'))}), host {k['host_ms']['p50']} ms")
            print(f"    {role}: device busy {st['device_busy']:.0%} of {st['window_ms']:.0f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": args.results, "tag": args.tag, "profile": args.profile,
                                              "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
