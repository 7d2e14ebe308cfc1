"""Latency through the disaggregated cluster against the same engine in one process, and the cost of
moving KV with and without the FP8 wire format, in one run (embedded model, float32, CPU).

For 1, 8 and 32 concurrent streams (128-token prompts, 32 new tokens): TTFT and inter-token latency
p50/p99 in-process (LLMEngine, all requests added at once) and through gRPC -> prefill actor -> NIXL
-> decode actor (`pdserve bench`). Then per-request KV transfer bytes and seconds for bf16 vs fp8.

    .venv/bin/python benchmarks/bench_cluster.py --out docs/bench/cluster.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from pdserve.testing.cluster import NEUTRAL_CWD, Server

PROMPT_LEN, NEW = 128, 32


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else None


def in_process(engine, n: int) -> dict:
    from pdserve.engine.sequence import SamplingParams
    from pdserve.tools.bench import random_workload

    reqs = random_workload(n, (PROMPT_LEN, PROMPT_LEN), (NEW, NEW), (100, 30000), seed=11)
    t0 = time.perf_counter()
    for i, r in enumerate(reqs):
        engine.add_request(f"b{i}", list(r.prompt_token_ids), SamplingParams(max_tokens=NEW, ignore_eos=True))
    times = {f"b{i}": [] for i in range(n)}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter() - t0
        for o in outs:
            times[o.request_id].append(now)
    ttft = [t[0] for t in times.values()]
    itl = [b - a for t in times.values() for a, b in zip(t, t[1:])]
    return {"ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


def bench(address: str, n: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "pdserve", "bench", "--server", address, "--json", "--no-progress",
                        "--num-requests", str(n), "--concurrency", str(n), "--input-len", str(PROMPT_LEN),
                        "--max-tokens", str(NEW), "--seed", "11"], capture_output=True, text=True, cwd=NEUTRAL_CWD,
                       timeout=3600)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout)


def kv_metrics(server) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("pdserve_kv_transfer_"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from pdserve.engine.engine import LLMEngine

    # the in-process engine gets the machine's cores (torch's default); each worker actor (num_cpus=1)
    # runs one intra-op thread, as Ray sets OMP_NUM_THREADS from num_cpus. Measure on a quiet box:
    # OpenMP threads spin under contention
    engine = LLMEngine(dtype="float32", progress=False)
    in_process(engine, 2)  # warm-up, as the cluster gets one
    local_rows = {n: in_process(engine, n) for n in (1, 8, 32)}  # before any cluster runs beside it
    del engine
    result = {"date": time.strftime("%Y-%m-%d"), "in_process_threads": torch.get_num_threads(),
              "prompt_len": PROMPT_LEN, "new_tokens": NEW, "latency": [],
              "kv_transfer": {}}
    cfg = {"model": {"dtype": "float32"}, "engine": {"kv_cache_memory_gb": 0.5},
           "prefill": {"replicas": 1, "num_cpus": 1}, "decode": {"replicas": 1, "num_cpus": 1}}
    with tempfile.TemporaryDirectory() as d:
        for wire in ("bf16", "fp8"):
            server = Server({**cfg, "kv_transfer": {"dtype": wire}}, Path(d))
            try:
                bench(server.address, 2)  # warm-up
                time.sleep(1.5)
                before = kv_metrics(server)
                n_done = 0
                for n in (1, 8, 32):
                    rep = bench(server.address, n)
                    n_done += rep["completed"]
                    if wire == "bf16":
                        local = local_rows[n]
                        row = {"concurrency": n, "in_process": local,
                               "cluster": {"ttft_p50": rep["ttft_s"]["p50"], "ttft_p99": rep["ttft_s"]["p99"],
                                           "itl_p50": rep["itl_s"]["p50"], "itl_p99": rep["itl_s"]["p99"]}}
                        result["latency"].append(row)
                        c = row["cluster"]
                        print(f"{n:2d} streams  TTFT p50/p99 in-process {local['ttft_p50']*1e3:7.0f}/"
                              f"{local['ttft_p99']*1e3:7.0f} ms  cluster {c['ttft_p50']*1e3:7.0f}/"
                              f"{c['ttft_p99']*1e3:7.0f} ms   ITL p50/p99 in-process {local['itl_p50']*1e3:6.1f}/"
                              f"{local['itl_p99']*1e3:6.1f} ms  cluster {c['itl_p50']*1e3:6.1f}/"
                              f"{c['itl_p99']*1e3:6.1f} ms", flush=True)
                time.sleep(1.5)
                after = kv_metrics(server)
                delta = {k: after[k] - before.get(k, 0.0) for k in after}
                per = {"requests": n_done,
                       "bytes_per_request": delta['pdserve_kv_transfer_bytes{role="decode"}'] / n_done,
                       "pull_seconds_per_request": delta['pdserve_kv_transfer_seconds{role="decode"}'] / n_done,
                       "quantize_seconds_per_request": delta['pdserve_kv_transfer_seconds{role="prefill"}'] / n_done}
                result["kv_transfer"][wire] = per
                print(f"KV wire {wire}: {per['bytes_per_request']:.0f} bytes/request, pull "
                      f"{per['pull_seconds_per_request']*1e3:.2f} ms/request (landing incl. dequantize), "
                      f"export quantize {per['quantize_seconds_per_request']*1e3:.2f} ms/request", flush=True)
            finally:
                server.stop()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
