"""Cache-aware routing vs round-robin on a shared-prefix workload, measured in one run.

Starts a real cluster (2 prefill + 1 decode workers on the embedded model, CPU) once per policy,
where the two prefill caches together can hold the workload's system prompts but one alone cannot,
runs the same `pdserve bench` shared-prefix workload against each, and prints/saves the hit rate
(vs the oracle's), TTFT and throughput side by side.

    .venv/bin/python benchmarks/bench_routing.py --out docs/bench/routing.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdserve.testing.cluster import NEUTRAL_CWD, Server

# 16 system prompts of 512 tokens x 4 users; each prefill worker's cache (320 blocks of 16 tokens)
# holds ~10 of the 16 prompts: the two together hold all of them only if each keeps its own half
BENCH = ["--workload", "shared-prefix", "--num-prefixes", "16", "--users-per-prefix", "4", "--prefix-len", "512",
         "--suffix-len", "16:32", "--max-tokens", "4", "--concurrency", "4", "--seed", "1", "--no-progress"]
PREFILL_BLOCKS = 320


def run(policy: str, tmp: Path, extra: list[str]) -> dict:
    cfg = {"model": {"dtype": "float32"}, "engine": {"kv_cache_memory_gb": 0.5, "max_num_batched_tokens": 512},
           "prefill": {"replicas": 2, "num_cpus": 0.5, "engine": {"num_blocks": PREFILL_BLOCKS}},
           "decode": {"replicas": 1, "num_cpus": 0.5},
           "router": {"policy": policy}}
    server = Server(cfg, tmp)
    try:
        r = subprocess.run([sys.executable, "-m", "pdserve", "bench", "--server", server.address, "--json",
                            *BENCH, *extra], capture_output=True, text=True, cwd=NEUTRAL_CWD, timeout=3600)
        if r.returncode != 0:
            raise SystemExit(f"bench failed for {policy}: {r.stderr[-3000:]}")
        return json.loads(r.stdout)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        reps = {p: run(p, Path(d), args.extra) for p in ("cache_aware", "round_robin")}
    rows = []
    for p, r in reps.items():
        rows.append({"policy": p, "hit_rate": r["prefix_hit_rate"], "oracle_hit_rate": r["oracle_hit_rate"],
                     "hit_vs_oracle": r["hit_rate_vs_oracle"], "ttft_mean_s": r["ttft_s"]["mean"],
                     "ttft_p50_s": r["ttft_s"]["p50"], "ttft_p99_s": r["ttft_s"]["p99"],
                     "req_per_s": r["request_throughput"], "failed": r["failed"],
                     "per_prefill_worker": r["per_worker"]["prefill"]})
    ratio = rows[1]["ttft_mean_s"] / rows[0]["ttft_mean_s"]
    print(f"{'policy':12} {'hit':>6} {'oracle':>6} {'vs oracle':>9} {'TTFT mean':>10} {'p50':>8} {'p99':>8} {'req/s':>6}")
    for x in rows:
        print(f"{x['policy']:12} {x['hit_rate']:6.3f} {x['oracle_hit_rate']:6.3f} {x['hit_vs_oracle']:9.3f} "
              f"{x['ttft_mean_s']:10.3f} {x['ttft_p50_s']:8.3f} {x['ttft_p99_s']:8.3f} {x['req_per_s']:6.2f}")
    print(f"mean TTFT round_robin / cache_aware = {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "bench_args": BENCH + args.extra,
                                              "rows": rows, "ttft_ratio_rr_over_ca": ratio, "raw": reps},
                                             indent=1))


if __name__ == "__main__":
    main()
