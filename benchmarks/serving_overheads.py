"""A planner profile for serving: `pdserve profile`'s measured curves plus the serving path's overheads, read from
the step logs of a cluster bench run in the same device call (scripts/gpu_checks.sh parts `profile` and `bench`).

    python -P benchmarks/serving_overheads.py MEASURED.json RESULTS [--tag T] --out PROFILE.json

MEASURED is what `pdserve profile` wrote; RESULTS (a folder or .tgz) what part `bench` wrote, with rows of the
`colocated` deployment (and `disagg-fp8` for the handoff). Nothing else is fitted to the bench:

- request_ms: the colocated one-stream TTFT p50 less the profile's bf16 prefill of the row's prompt (what a request
  spends outside the engine's steps: client, router, gRPC, Ray, first token's delivery);
- handoff_ms: the disaggregated one-stream handoff p50, the prefill step's end to the decode worker's add
  (benchmarks/step_timeline.py's `handoff`);
- per_stream_ms: how much a first token's delivery (the step's end to the client) grows per concurrently streamed
  sequence, the least-squares slope of the colocated rows' `deliver` p50 over their concurrency;
- engine: the Helm chart's limits (256 sequences, 2,048-token decode/colocated steps, 8,192-token prefill steps)
  with the KV the profiled engine had, and overlap scheduling as the profiled engine ran it.

The derivation key says where each number came from, so the profile can be checked against its sources.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timeline import timeline_rows  # noqa: E402

CHART_ENGINE = {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "prefill_max_num_batched_tokens": 8192,
                "prefill_max_num_seqs": 256}


def slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def derive(measured: dict, rows: list[dict], results: str) -> dict:
    from pdserve.planner import profile as profile_mod

    prof = profile_mod.from_dict({**measured, "overheads": {"request_ms": 0.0, "decode_step_ms": 0.0},
                                  "engine": {**measured["engine"], **CHART_ENGINE}})
    colo = sorted((r for r in rows if r["deployment"] == "colocated"), key=lambda r: r["concurrency"])
    disagg = sorted((r for r in rows if r["deployment"].startswith("disagg")), key=lambda r: r["concurrency"])
    if not colo or colo[0]["concurrency"] != 1:
        raise SystemExit("serving_overheads: the bench has no colocated row at concurrency 1")
    one = colo[0]
    prefill = prof.prefill_ms("bf16", one["input_len"])
    request_ms = round(max(0.0, one["ttft_p50_ms"] - prefill), 2)
    handoff = disagg[0]["path_ms"].get("handoff", {}).get("p50") if disagg and disagg[0]["concurrency"] == 1 else None
    deliver = [(r["concurrency"], r["path_ms"]["deliver"]["p50"]) for r in colo if "deliver" in r["path_ms"]]
    per_stream = round(max(0.0, slope(deliver)), 3) if len(deliver) > 1 else 0.0
    overheads = {"request_ms": request_ms, "decode_step_ms": 0.0, "per_stream_ms": per_stream}
    if handoff is not None:
        overheads["handoff_ms"] = round(handoff, 2)
    engine = {"block_size": measured["engine"]["block_size"], **CHART_ENGINE,
              "kv_cache_tokens": measured["engine"]["kv_cache_tokens"],
              "overlap_schedule": measured["engine"].get("overlap_schedule", True)}
    where = (f"colocated TTFT p50 {one['ttft_p50_ms']:.2f} ms at one stream, {one['input_len']}-token prompts, less "
             f"the profile's bf16 prefill of them ({prefill:.2f} ms)")
    return {**measured, "overheads": overheads, "engine": engine,
            "source": f"{measured.get('source', '')} on an {measured.get('device')}, {measured.get('date')}; "
                      f"serving overheads from the step logs of the same call's cluster bench ({results})",
            "derivation": {
                "prefill, decode, transfer, model": f"MEASURED by `{measured.get('command')}`, unchanged.",
                "request_ms": where,
                "handoff_ms": ("the disaggregated one-stream handoff p50 (prefill step's end -> the decode worker's "
                               "add, benchmarks/step_timeline.py)" if handoff is not None else "not measured"),
                "per_stream_ms": ("least-squares slope of the colocated rows' first-token delivery p50 over their "
                                  "concurrency: " + ", ".join(f"{d:.2f} ms at {c}" for c, d in deliver)),
                "engine": "NOT measured: the Helm chart's limits, the profiled engine's KV tokens",
                "made_by": "benchmarks/serving_overheads.py"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("measured", help="pdserve profile's output JSON")
    ap.add_argument("results", help="folder (or .tgz of one) of a gpu_checks.sh bench part's results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    measured = json.loads(Path(args.measured).read_text())
    rows = timeline_rows(args.results, args.tag)
    prof = derive(measured, rows, args.results)
    Path(args.out).write_text(json.dumps(prof, indent=1) + "\n")
    print(json.dumps({"overheads": prof["overheads"], "derivation": {k: prof["derivation"][k] for k in
                                                                       ("request_ms", "handoff_ms", "per_stream_ms")}},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
