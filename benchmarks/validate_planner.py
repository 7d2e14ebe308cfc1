"""The planner's simulator against the real CPU cluster: TTFT and ITL p50/p90 of the same request lists.

    .venv/bin/python -P benchmarks/validate_planner.py --out docs/bench/planner_validation.json   # ~15 min

1. Start a 1P1D cluster (`pdserve serve`, pdserve/testing/cluster.py) and measure the CPU profile with
   `pdserve profile --server` (engine curves in this process while the cluster idles, then the cluster's fixed
   overheads from isolated requests); it is written beside --out and is what every prediction below uses.
2. For each scenario, `pdserve bench` sends a seeded workload at a Poisson rate, and the simulator gets the very
   same requests (lengths, output tokens, shared prefixes, arrival times: bench's own generators and seed).
3. Errors = (simulated - measured) / measured, per percentile.

The engines of a cluster on this box share its two cores with everything else: other jobs, and the cluster's own
router, Ray and the bench client. How much of a core they got while they had work is read from the kernel
(/proc/PID/task/TID/schedstat: time on a core over time on a core plus time waiting for one) over each bench
run, and the profile records the same for its own measurements; the simulation scales the profile's step times
by the ratio (pdserve/planner/hostload.py). That share is an input, like the profile: what the box gave the
engines, not what the simulator predicts (queueing, batching, the latencies).
The load average before each step is recorded too.

Engines on a box with fewer cores than engines also lose more to each other than a fair split of the cores
predicts; the profile measures that too (`--host-contention 4`: k engine processes stepping at once, k = 1..4,
pdserve/planner/contention.py), and the simulator's processor sharing (`--contention cores*`) applies it.
`--rate-scale F` runs every scenario at F x its request rate (`--rate-scale 0.5`: loads at which two cores cover
the busy engines most of the time, which is what the planner's target, a device per engine, always has).

`--gpu-cluster FILE` runs nothing: it simulates the rows of a benchmarks/bench_cluster_gpu.py result (one H200:
a colocated bf16 engine, or one fp8 prefill + one bf16 decode actor sharing the GPU; closed loop at each
concurrency, 2048-token prompts, 64 output tokens) with a shipped GPU profile and the simulator's closed-loop
mode, and compares TTFT, ITL and TPOT p50/p99:

    .venv/bin/python -P benchmarks/validate_planner.py \
        --gpu-cluster docs/bench/planner/h200-sources/h200-cluster-bench-run1.json \
        --profile h200-llama3-8b --out docs/bench/planner/h200-validation.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdserve.planner import profile as profile_mod
from pdserve.planner.hostload import CPUShare, box_busy_ns, pids_whose_cmdline_has, process_cpu_ns
from pdserve.planner import stats
from pdserve.planner.sim import ClusterSpec, simulate
from pdserve.planner.workload import SimRequest
from pdserve.testing.cluster import NEUTRAL_CWD, Server
from pdserve.tools import bench

PDSERVE = [sys.executable, "-m", "pdserve"]
SCENARIOS = [  # name, prefill, decode, bench workload arguments
    ("1P1D random", 1, 1, {"workload": "random", "num_requests": 40, "input_len": "64:192", "max_tokens": "16:32",
                          "request_rate": 0.7, "seed": 11}),
    ("2P2D random", 2, 2, {"workload": "random", "num_requests": 40, "input_len": "64:192", "max_tokens": "16:32",
                          "request_rate": 1.0, "seed": 12}),
    ("2P1D shared-prefix", 2, 1, {"workload": "shared-prefix", "num_requests": 48, "num_prefixes": 8,
                                  "users_per_prefix": 6, "prefix_len": 256, "suffix_len": "16:32",
                                  "max_tokens": "16:32", "request_rate": 1.0, "seed": 13}),
    # 0 prefill workers: `mode: colocated`, one engine that prefills and decodes. Prompts up to 3x the default
    # prompt_chunk_tokens (256 of the 1,024-token budget), so that short ones arrive behind long ones
    ("colocated x1 mixed lengths", 0, 1, {"workload": "random", "num_requests": 40, "input_len": "16:768",
                                          "max_tokens": "16:32", "request_rate": 0.5, "seed": 14}),
]
CONFIG = {"model": {"dtype": "float32"}, "engine": {"kv_cache_memory_gb": 0.5}}


def load() -> float:
    return os.getloadavg()[0]


def bench_args(a: dict) -> list[str]:
    out = []
    for k, v in a.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def sim_requests(a: dict) -> list[SimRequest]:
    """The measured requests exactly as `pdserve bench` makes them (same functions, same seed)."""
    ns = argparse.Namespace(workload=a["workload"], num_requests=a.get("num_requests"), seed=a["seed"],
                            max_tokens=a["max_tokens"], input_len=a.get("input_len", "128"), prompt_format="ids",
                            num_prefixes=a.get("num_prefixes", 1), users_per_prefix=a.get("users_per_prefix", 1),
                            prefix_len=a.get("prefix_len", 1), suffix_len=a.get("suffix_len", "1"))
    reqs = bench.make_workload(ns, (100, 30000))
    arrivals = bench.arrival_times(len(reqs), a["request_rate"], a["seed"])
    plen = a.get("prefix_len", 0)
    return [SimRequest(t, len(q.prompt_token_ids), q.max_tokens, q.group, plen if q.group >= 0 else 0)
            for q, t in zip(reqs, arrivals)]


def server_config(p: int, d: int) -> dict:
    mode = {"mode": "colocated"} if p == 0 else {}
    return {**CONFIG, **mode, "prefill": {"replicas": p, "num_cpus": 0.5}, "decode": {"replicas": d, "num_cpus": 0.5}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default=None, help="use this profile instead of measuring one (its overheads too)")
    ap.add_argument("--only", default=None, help="run the scenarios whose name contains this")
    ap.add_argument("--resimulate", default=None,
                    help="a result JSON of this script: simulate its runs again (its profile, its measured CPU "
                         "shares) with the code here, write --out, run nothing")
    ap.add_argument("--gpu-cluster", default=None,
                    help="a benchmarks/bench_cluster_gpu.py result JSON: simulate its rows (closed loop) with "
                         "--profile (default h200-llama3-8b), write --out, run nothing")
    ap.add_argument("--gpu-predict", default=None, metavar="DEPLOYMENTS",
                    help="comma-separated benchmarks/bench_cluster_gpu.py deployments: simulate a run of it not made "
                         "yet (--concurrency, --input-lens, --max-tokens, --requests-per-stream, --slo), write --out")
    ap.add_argument("--cost-scale", default=None, metavar="PREFILL,DECODE",
                    help="with --resimulate: multiply the profile's prefill and decode step costs by these factors "
                         "(how far a few percent of step-cost error moves the percentiles near saturation)")
    ap.add_argument("--without-contention", action="store_true",
                    help="simulate as if the profile had no measured host contention (contention.py): processor "
                         "sharing alone (to show what the measurement changes)")
    ap.add_argument("--rate-scale", type=float, default=1.0,
                    help="multiply every scenario's request rate (below 1: fewer engines busy at once, so that on a "
                         "box with fewer cores than engines the engines rarely wait for a core)")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--input-lens", default="2048,8192")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--kv-gb", type=float, default=None,
                    help="--gpu-predict: each engine's kv_cache_memory_gb as the bench will set it (default "
                         f"{GPU_ENGINE['kv_cache_memory_gb']}; bench_cluster_gpu.py sets 12 on GPUs under 120 GiB)")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help=f"--gpu-predict: the engines' max_num_seqs (default {GPU_ENGINE['max_num_seqs']}; "
                         "gpu_checks.sh benchhigh sets 256)")
    ap.add_argument("--slo", default="2.0,0.05", help="goodput's TTFT,TPOT bounds in seconds (gpu_checks.sh's)")
    ap.add_argument("--contention", choices=("measured", "cores", "cores-background"), default="measured",
                    help="measured: the engines' CPU share read from the kernel over each run is an input; cores: "
                         "none is, the simulator shares the profile's host cores among the busy engines itself "
                         "(processor sharing), which predicts the contention too: for a box running nothing else; "
                         "cores-background: the same, less the cores the rest of the box (router, Ray, the bench "
                         "client, other jobs) ran during each run, measured from /proc/stat (an input, like the "
                         "measured share)")
    args = ap.parse_args(argv)
    global CONTENTION, WITHOUT_CONTENTION
    CONTENTION, WITHOUT_CONTENTION = args.contention, args.without_contention
    if args.resimulate:
        scale = tuple(float(x) for x in args.cost_scale.split(",")) if args.cost_scale else (1.0, 1.0)
        return resimulate(Path(args.resimulate), Path(args.out), scale)
    if args.gpu_predict:
        ttft, tpot = (float(x) for x in args.slo.split(","))
        return gpu_predict(args.gpu_predict.split(","), [int(x) for x in args.concurrency.split(",")],
                           [int(x) for x in args.input_lens.split(",")], args.max_tokens, args.requests_per_stream,
                           (ttft, tpot), args.profile or "h200-llama3-8b", Path(args.out), args.kv_gb,
                           args.max_num_seqs)
    if args.gpu_cluster:
        return gpu_cluster(Path(args.gpu_cluster), args.profile or "h200-llama3-8b", Path(args.out))
    out = Path(args.out)
    prof_path = Path(args.profile) if args.profile else out.with_name(out.stem + "-profile.json")
    tmp = Path(tempfile.mkdtemp(prefix="pdserve-validate-"))
    rows, loads = [], {"start": load()}
    server = None
    try:
        for name, p, d, a in [s for s in SCENARIOS if not args.only or args.only in s[0]]:
            a = {**a, "request_rate": round(a["request_rate"] * args.rate_scale, 4)}
            if server is None or (server.p, server.d) != (p, d):
                if server:
                    server.stop()
                loads[f"before start {p}P{d}D"] = load()
                server = Server(server_config(p, d), tmp)
                server.p, server.d = p, d
            if not args.profile and not prof_path.exists():
                loads["before profile"] = load()
                # the points the scenarios need (prompts up to ~300 tokens, batches up to ~16), to keep it short
                subprocess.run([*PDSERVE, "profile", "--out", str(prof_path.resolve()), "--host-cores", "2",
                                "--server", server.address, "--kv-cache-memory-gb", "0.5",
                                "--prefill-tokens", "16,32,64,128,256,512", "--batches", "1,2,4,8,16",
                                "--contexts", "64,384", "--transfer-tokens", "16,128,512", "--repeats", "3",
                                "--decode-steps", "8", "--host-contention", "4"],
                               check=True, cwd=NEUTRAL_CWD)
            prof = profile_mod.load(prof_path)
            loads[f"before {name}"] = load()
            # the engines' CPU share over the run (other jobs, the router, Ray and the bench client take the rest)
            workers = {role: pids_whose_cmdline_has(f"ray::{cls}", session=server.proc.pid)
                       for role, cls in (("prefill", "PrefillWorker"), ("decode", "DecodeWorker"))}
            shares = {role: CPUShare(pids).start() for role, pids in workers.items()}
            engine_pids = [pid for pids in workers.values() for pid in pids]
            busy0, engines0, t0 = box_busy_ns(), process_cpu_ns(engine_pids), time.monotonic()
            r = subprocess.run([*PDSERVE, "bench", "--server", server.address, "--json", "--no-progress",
                                "--warmup", "4", "--concurrency", "64", *bench_args(a)],
                               capture_output=True, text=True, cwd=NEUTRAL_CWD, check=True)
            t_end = time.monotonic()
            busy1, engines1 = box_busy_ns(), process_cpu_ns(engine_pids)
            mean_share = {role: sh.stop() for role, sh in shares.items()}
            # what the rest of the box ran meanwhile, in cores: router, Ray, this client, other jobs
            background = None if busy0 is None or busy1 is None else max(
                0.0, (busy1 - busy0 - (engines1 - engines0)) / 1e9 / (t_end - t0))
            real = json.loads(r.stdout)
            # the measured requests ran in the bench's last duration_s seconds (then it only asks the server's info)
            traces = {role: sh.trace(since=t_end - real["duration_s"] - 0.5) or mean_share[role]
                      for role, sh in shares.items()}
            t = time.perf_counter()
            simrep = simulated(prof, p, d, a, traces, background)
            row = {"scenario": name, "bench": a, "load_during": load(), "sim_seconds": time.perf_counter() - t,
                   "background_cores": background,
                   "engines_cpu_share": mean_share, "profile_cpu_share": prof.host_cpu_share,
                   "engine_processes": {role: len(pids) for role, pids in workers.items()},
                   "cpu_share_traces": traces,
                   "client_cpu_frac": real["client"]["cpu_frac"], "prefix_hit_rate": [real["prefix_hit_rate"],
                                                                                      simrep["prefix_hit_rate"]]}
            for metric in ("ttft_s", "itl_s"):
                for q in ("p50", "p90"):
                    m, s = real[metric][q], simrep[metric][q]
                    row[f"{metric}_{q}"] = {"measured_ms": m * 1e3, "simulated_ms": s * 1e3, "error": (s - m) / m}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if server:
            server.stop()
    result = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "profile": str(prof_path), "loads": loads,
              "rows": rows, "bound": 0.2, "contention": CONTENTION,
              "within_bound": all(abs(r[k]["error"]) <= 0.2 for r in rows for k in r if k.endswith(("p50", "p90")))}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


CONTENTION = "measured"
WITHOUT_CONTENTION = False


def simulated(prof, p: int, d: int, a: dict, cpu_share, background: float | None = None) -> dict:
    if CONTENTION.startswith("cores"):  # the profile's host cores (2 here), shared by the engines busy at each moment
        spec = ClusterSpec.from_profile(prof, prefill=p, decode=d, colocated=p == 0, kv_cache_tokens=None)
        if CONTENTION == "cores-background":  # less what the rest of the box ran (measured over the run)
            spec.host_cores = max(spec.host_cores - (background or 0.0), 0.25)
        if WITHOUT_CONTENTION:
            spec.host_contention = None
    else:
        spec = ClusterSpec.from_profile(prof, prefill=p, decode=d, colocated=p == 0, kv_cache_tokens=None,
                                        cpu_share=cpu_share)
        spec.host_cores = None  # the measured shares stand for all contention, the engines' own included
    outs, engines = simulate(prof, spec, sim_requests(a))
    return stats.report(outs, engines, None, None)


def scaled_costs(prof_path: Path, prefill: float, decode: float):
    """The profile with every prefill and decode step cost (and its context terms) multiplied by a factor."""
    d = json.loads(prof_path.read_text())
    for curve in d["prefill"].values():
        curve["ms"] = [x * prefill for x in curve["ms"]]
        curve["ms_per_token_context"] = curve.get("ms_per_token_context", 0.0) * prefill
    for curve in d["decode"].values():
        curve["ms"] = [x * decode for x in curve["ms"]]
        curve["ms_per_context_token"] = curve.get("ms_per_context_token", 0.0) * decode
        if "ms_at_context" in curve:
            curve["ms_at_context"] = {c: [x * decode for x in v] for c, v in curve["ms_at_context"].items()}
    return profile_mod.from_dict(d, f"{prof_path} (step costs x{prefill:g} prefill, x{decode:g} decode)")


def resimulate(src: Path, out: Path, scale: tuple[float, float] = (1.0, 1.0)) -> int:
    result = json.loads(src.read_text())
    prof_path = Path(result["profile"])
    prof_path = prof_path if prof_path.exists() else src.with_name(prof_path.name)
    prof = profile_mod.load(prof_path) if scale == (1.0, 1.0) else scaled_costs(prof_path, *scale)
    scen = {name: (p, d, a) for name, p, d, a in SCENARIOS}
    for row in result["rows"]:
        p, d, a = scen[row["scenario"]]
        a = row.get("bench", a)  # recorded since --rate-scale (2026-12-05, fifth session)
        shares = {role: [tuple(x) for x in v] if isinstance(v, list) else v
                  for role, v in row["cpu_share_traces"].items()}
        if CONTENTION == "cores-background" and row.get("background_cores") is None:
            raise SystemExit(f"{src} has no background_cores (recorded since 2026-12-05, third session)")
        rep = simulated(prof, p, d, a, shares, row.get("background_cores"))
        for metric in ("ttft_s", "itl_s"):
            for q in ("p50", "p90"):
                cell = row[f"{metric}_{q}"]
                cell["simulated_ms"] = rep[metric][q] * 1e3
                cell["error"] = (cell["simulated_ms"] - cell["measured_ms"]) / cell["measured_ms"]
    result["resimulated_from"] = str(src)
    result["contention"] = CONTENTION + (", without the measured host contention" if WITHOUT_CONTENTION else "")
    if scale != (1.0, 1.0):
        result["cost_scale"] = {"prefill": scale[0], "decode": scale[1]}
    result["within_bound"] = all(abs(r[k]["error"]) <= 0.2 for r in result["rows"] for k in r
                                 if k.endswith(("p50", "p90")))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


# benchmarks/bench_cluster_gpu.py: its ENGINE settings and deployments (fractional GPUs: all actors on one GPU)
GPU_ENGINE = {"max_num_seqs": 64, "max_num_batched_tokens": 4096, "kv_cache_memory_gb": 24}
GPU_DEPLOYMENTS = {
    "colocated": {"prefill": 0, "decode": 1, "colocated": True, "decode_precision": "bf16"},
    # the prefill and the decode actor on one GPU: the GPU time-slices between them (shared_devices)
    "disagg-fp8": {"prefill": 1, "decode": 1, "prefill_precision": "fp8", "decode_precision": "bf16", "wire": "fp8",
                   "shared_devices": 1},
    "disagg-bf16": {"prefill": 1, "decode": 1, "prefill_precision": "bf16", "decode_precision": "bf16",
                    "wire": "raw", "shared_devices": 1},
}
# two GPUs (issue #19): the simulator gives every engine a device of its own, which these deployments really have
GPU_DEPLOYMENTS["disagg-fp8-2gpu"] = {**GPU_DEPLOYMENTS["disagg-fp8"], "shared_devices": None}
GPU_DEPLOYMENTS["disagg-bf16-2gpu"] = {**GPU_DEPLOYMENTS["disagg-bf16"], "shared_devices": None}
GPU_DEPLOYMENTS["colocated-2gpu"] = {**GPU_DEPLOYMENTS["colocated"], "decode": 2}
GPU_METRICS = (("ttft_s", "p50"), ("ttft_s", "p99"), ("itl_s", "p50"), ("itl_s", "p99"), ("tpot_s", "p50"),
               ("tpot_s", "p99"))


def gpu_spec(prof, deployment: str, kv_gb: float | None = None, overlap: bool | None = None,
             max_num_seqs: int | None = None) -> ClusterSpec:
    """The bench's deployment as the simulator sees it: engine limits as configured there, KV capacity from its
    kv_cache_memory_gb (bf16 cache; a row records its own since the bench sizes it by the GPU), overlap scheduling
    as the row ran (None: as the profile's engine), prompts random (no prefix hits)."""
    kv_gb = GPU_ENGINE["kv_cache_memory_gb"] if kv_gb is None else kv_gb
    seqs = max_num_seqs or GPU_ENGINE["max_num_seqs"]
    kv_tokens = int(kv_gb * 2 ** 30) // int(prof.kv_bytes_per_token["raw"])
    return ClusterSpec.from_profile(
        prof, max_num_seqs=seqs, prefill_max_num_seqs=seqs,
        max_num_batched_tokens=GPU_ENGINE["max_num_batched_tokens"],
        prefill_max_num_batched_tokens=GPU_ENGINE["max_num_batched_tokens"], kv_cache_tokens=kv_tokens,
        colocated_prefix_cache=False, policy="least_loaded", overlap=overlap, **GPU_DEPLOYMENTS[deployment])


def gpu_simulated(prof, deployment: str, c: int, n: int, input_len: int, output_len: int, slo=(None, None),
                  kv_gb: float | None = None, overlap: bool | None = None, max_num_seqs: int | None = None) -> dict:
    """bench --concurrency c: all n requests ready at t=0, at most c in flight (the warm-up ran before, apart)."""
    spec = gpu_spec(prof, deployment, kv_gb, overlap, max_num_seqs)
    outs, engines = simulate(prof, spec, [SimRequest(0.0, input_len, output_len) for _ in range(n)], clients=c)
    return stats.report(outs, engines, *slo)


def gpu_cluster(src: Path, profile_name: str, out: Path, input_len: int = 2048, output_len: int = 64) -> int:
    measured = json.loads(src.read_text())
    prof = profile_mod.resolve(profile_name)
    rows = []
    for m in measured:
        c, n = m["concurrency"], m["requests"]
        # rows of bench_cluster_gpu.py since 2026-12-05 (third session) say their lengths; earlier ones were 2048 / 64
        i_len, o_len = m.get("input_len", input_len), m.get("max_tokens", output_len)
        kv_gb = m.get("kv_cache_memory_gb")
        # rows say whether the engines overlapped their steps since 2026-12-05 (sixth session); earlier ones did not
        overlap = m.get("overlap_schedule", False)
        seqs = m.get("max_num_seqs")  # rows say it since 2026-12-05 (eighth session); earlier ones ran 64
        rep = gpu_simulated(prof, m["deployment"], c, n, i_len, o_len, kv_gb=kv_gb, overlap=overlap,
                            max_num_seqs=seqs)
        spec = gpu_spec(prof, m["deployment"], kv_gb, overlap, seqs)
        row = {"deployment": m["deployment"], "concurrency": c, "requests": n, "spec": spec.label(),
               "req_s": [m["req_s"], rep["request_throughput"]]}
        for metric, q in GPU_METRICS:
            meas, sim = m[f"{metric[:-2]}_{q}_ms"], rep[metric][q] * 1e3
            row[f"{metric}_{q}"] = {"measured_ms": meas, "simulated_ms": round(sim, 3),
                                    "error": round((sim - meas) / meas, 4)}
        rows.append(row)
    result = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "measured": str(src),
              "profile": profile_name, "profile_source": prof.source, "engine": GPU_ENGINE,
              "workload": {"input_len": input_len, "output_len": output_len, "closed_loop": True}, "rows": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(gpu_table(result))
    return 0


def gpu_predict(deployments: list[str], concurrency: list[int], input_lens: list[int], output_len: int,
                per_stream: int, slo: tuple[float, float], profile_name: str, out: Path,
                kv_gb: float | None = None, max_num_seqs: int | None = None) -> int:
    """The simulator's numbers for a bench_cluster_gpu.py run not made yet (the two-GPU one of issue #19 runs
    scripts/gpu_checks.sh x2bench2k x2bench8k): rows in the bench's own format, written before the measurement, so
    that the measurement tests a prediction. --gpu-cluster on the measured file gives the errors afterwards."""
    prof = profile_mod.resolve(profile_name)
    rows = []
    for i_len in input_lens:
        for name in deployments:
            for c in concurrency:
                n = max(8, per_stream * c)
                rep = gpu_simulated(prof, name, c, n, i_len, output_len, slo, kv_gb=kv_gb,
                                    max_num_seqs=max_num_seqs)
                spec = gpu_spec(prof, name, kv_gb, max_num_seqs=max_num_seqs)
                row = {"deployment": name, "concurrency": c, "requests": n, "input_len": i_len, "max_tokens": output_len,
                       "spec": spec.label(), "kv_cache_memory_gb": kv_gb or GPU_ENGINE["kv_cache_memory_gb"],
                       "max_num_seqs": spec.max_num_seqs, "overlap_schedule": spec.overlap,
                       "req_s": round(rep["request_throughput"], 3),
                       "output_tok_s": round(rep["output_token_throughput"], 1)}
                for metric, q in GPU_METRICS:
                    row[f"{metric[:-2]}_{q}_ms"] = round(rep[metric][q] * 1e3, 2)
                if rep.get("goodput"):
                    row["goodput_fraction"] = round(rep["goodput"]["fraction"], 3)
                rows.append(row)
    result = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "predicted": True, "profile": profile_name,
              "profile_source": prof.source, "engine": GPU_ENGINE, "slo": {"ttft_s": slo[0], "tpot_s": slo[1]},
              "rows": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("| prompt | deployment | C | TTFT p50 / p99 ms | ITL p50 / p99 | TPOT p50 / p99 | req/s | goodput |")
    print("|---:|---|---:|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['input_len']} | {r['deployment']} | {r['concurrency']} | {r['ttft_p50_ms']:.4g} / "
              f"{r['ttft_p99_ms']:.4g} | {r['itl_p50_ms']:.3g} / {r['itl_p99_ms']:.3g} | {r['tpot_p50_ms']:.3g} / "
              f"{r['tpot_p99_ms']:.3g} | {r['req_s']:.3g} | {r.get('goodput_fraction', float('nan')):.2f} |")
    return 0


def gpu_table(result: dict) -> str:
    keys = [f"{m}_{q}" for m, q in GPU_METRICS]
    names = ["TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "TPOT p50", "TPOT p99"]
    lines = ["| deployment | concurrency | " + " | ".join(f"{n} meas / sim ms (err)" for n in names)
             + " | req/s meas / sim |", "|---|---:|" + "---|" * len(names) + "---|"]
    for r in result["rows"]:
        cells = [f"{r[k]['measured_ms']:.4g} / {r[k]['simulated_ms']:.4g} ({r[k]['error']:+.0%})" for k in keys]
        lines.append(f"| {r['deployment']} | {r['concurrency']} | " + " | ".join(cells)
                     + f" | {r['req_s'][0]:.3g} / {r['req_s'][1]:.3g} |")
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = ["| scenario | TTFT p50 meas / sim (err) | TTFT p90 | ITL p50 | ITL p90 | CPU share P / D (profile's) | load avg |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [f"{r[k]['measured_ms']:.0f} / {r[k]['simulated_ms']:.0f} ms ({r[k]['error']:+.0%})"
                 for k in ("ttft_s_p50", "ttft_s_p90", "itl_s_p50", "itl_s_p90")]
        lines.append(f"| {r['scenario']} | " + " | ".join(cells)
                     + " | " + " / ".join("-" if x is None else f"{x:.2f}" for x in (r["engines_cpu_share"]["prefill"],
                                                                                       r["engines_cpu_share"]["decode"]))
                     + f" ({r['profile_cpu_share']:.2f})"
                     + f" | {r['load_during']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
