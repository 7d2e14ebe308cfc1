"""The cluster on one GPU against a colocated engine on the same GPU, at the same offered load, in one run.

    python benchmarks/bench_cluster_gpu.py --model .gpu/models/llama-3-8b [--deployments disagg-fp8,colocated]
        [--concurrency 1,8,32] [--input-len 2048] [--max-tokens 64] [--out results.json]

Each deployment is a real `pdserve serve` (Ray actors with fractional GPUs, the gRPC router) on Llama-3-8B shapes
with random weights (`model.load_format: dummy`; benchmarks/dummy_model.py writes the directory), driven by
`pdserve bench` (closed loop at each concurrency, exact-length random prompts, greedy, ignore_eos):
- disagg-fp8:  one fp8 prefill actor + one bf16 decode actor, fp8 wire (the deployment pdserve is for);
- disagg-bf16: one bf16 prefill actor + one bf16 decode actor, raw wire;
- colocated:   one bf16 engine that prefills and decodes (`mode: colocated`), the baseline.
On two GPUs (issue #19) the same three with a whole GPU per actor: disagg-fp8-2gpu and disagg-bf16-2gpu put
prefill on one GPU and decode on the other (KV over NIXL between the devices); colocated-2gpu runs two colocated
engines, one per GPU. The decode ITL p99 under prefill load is the number disaggregation exists for.
Each deployment first gets one unmeasured pass at the highest concurrency (its TTFT/ITL p99 are printed as the
cold start's), so that one-time costs (UCX endpoints, Triton JIT, CUDA graph capture) stay out of the rows.
Per deployment and concurrency: TTFT, ITL and TPOT p50/p99, throughput, and for the disaggregated ones the KV
transfer's mean time per request (decode workers' pull time, post of the READ to blocks landed, from the
router's metrics) and its share of the mean TTFT.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pdserve.planner.hostload import pids_whose_cmdline_has, process_cpu_ns

ENGINE = {"max_num_batched_tokens": 4096, "max_num_seqs": 64}
DEPLOYMENTS = {
    "disagg-fp8": {"prefill": {"replicas": 1, "precision": "fp8", "num_gpus": 0.4},
                   "decode": {"replicas": 1, "precision": "bf16", "num_gpus": 0.4},
                   "kv_transfer": {"dtype": "fp8"}},
    "disagg-bf16": {"prefill": {"replicas": 1, "precision": "bf16", "num_gpus": 0.4},
                    "decode": {"replicas": 1, "precision": "bf16", "num_gpus": 0.4},
                    "kv_transfer": {"dtype": "bf16"}},
    "colocated": {"mode": "colocated", "prefill": {"replicas": 0},
                  "decode": {"replicas": 1, "precision": "bf16", "num_gpus": 0.4}},
    # two GPUs (issue #19): a whole GPU per actor, so Ray puts prefill on one and decode on the other
    "disagg-fp8-2gpu": {"prefill": {"replicas": 1, "precision": "fp8", "num_gpus": 1},
                        "decode": {"replicas": 1, "precision": "bf16", "num_gpus": 1},
                        "kv_transfer": {"dtype": "fp8"}},
    "disagg-bf16-2gpu": {"prefill": {"replicas": 1, "precision": "bf16", "num_gpus": 1},
                         "decode": {"replicas": 1, "precision": "bf16", "num_gpus": 1},
                         "kv_transfer": {"dtype": "bf16"}},
    # the baseline at equal GPUs: two bf16 engines that each prefill and decode, the router spreading load
    "colocated-2gpu": {"mode": "colocated", "prefill": {"replicas": 0},
                       "decode": {"replicas": 2, "precision": "bf16", "num_gpus": 1}},
}


class CpuMeter:
    """Where a row's host CPU went, as cores busy over the row: the router process, each worker role's actor
    processes (Ray names them ray::ClassName; the server's session only) and the bench client. Tells a serving path
    that cannot keep up from an engine that is the limit. The window includes the bench client's start-up (a few
    seconds), so the servers' shares read a little low."""

    def __init__(self, router_pid: int):
        self.router_pid = router_pid
        self.pids = {role: pids for role in ("PrefillWorker", "DecodeWorker")
                     if (pids := pids_whose_cmdline_has(f"ray::{role}", session=router_pid))}

    def sample(self) -> dict:
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)  # the bench clients, reaped by subprocess.run
        return {"t": time.monotonic(), "router": process_cpu_ns([self.router_pid]) / 1e9,
                "client": ch.ru_utime + ch.ru_stime,
                **{role: process_cpu_ns(pids) / 1e9 for role, pids in self.pids.items()}}

    @staticmethod
    def cores(before: dict, after: dict) -> dict:
        wall = max(after["t"] - before["t"], 1e-9)
        return {f"cpu_{k}_cores": round((after[k] - before[k]) / wall, 2) for k in before if k != "t"}


def _pyspy(out: Path, tag: str, pids: dict[str, int], delay: float, seconds: float) -> list[subprocess.Popen]:
    """py-spy (on PATH) samples each of `pids` for `seconds` from `delay` s on, into out/pyspy-<tag>-<who>.txt
    (raw stacks; --nonblocking: the sampled processes are not paused). Where py-spy cannot attach (no ptrace
    permission) its error is in the .err file beside."""
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for who, pid in pids.items():
        cmd = (f"sleep {delay}; exec py-spy record --nonblocking -r 100 -d {seconds:g} -f raw -p {pid} "
               f"-o {out}/pyspy-{tag}-{who}.txt")
        with open(out / f"pyspy-{tag}-{who}.err", "w") as err:
            procs.append(subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.DEVNULL, stderr=err))
    return procs


def _metrics(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("pdserve_kv_transfer") and 'role="decode"' in line:
            key, val = line.rsplit(" ", 1)
            out[key.split("{")[0]] = float(val)
    return out


def _bench(address: str, args, concurrency: int, num: int, seed: int, save: str | None = None) -> dict:
    """One `pdserve bench` pass. Each pass of a deployment needs its own seed: prompts of a seed already served
    would be prefix-cache hits (the prefill and colocated engines cache prefixes), measuring the cache instead."""
    cmd = [sys.executable, "-m", "pdserve", "bench", "--server", address, "--json", "--no-progress",
           "--input-len", str(args.input_len), "--max-tokens", str(args.max_tokens), "--concurrency", str(concurrency),
           "--num-requests", str(num), "--warmup", str(min(concurrency, 4)), "--seed", str(seed)]
    if args.goodput_ttft:
        cmd += ["--goodput-ttft", str(args.goodput_ttft), "--goodput-tpot", str(args.goodput_tpot)]
    if save:
        cmd += ["--save-outputs", save]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"pdserve bench failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def _row(name: str, concurrency: int, rep: dict, transfer: dict | None) -> dict:
    def ms(key, q):
        s = rep.get(key)
        return None if s is None else round(s[q] * 1e3, 2)

    row = {"deployment": name, "concurrency": concurrency, "requests": rep["completed"], "failed": rep["failed"],
           "ttft_p50_ms": ms("ttft_s", "p50"), "ttft_p99_ms": ms("ttft_s", "p99"), "ttft_mean_ms": ms("ttft_s", "mean"),
           "itl_p50_ms": ms("itl_s", "p50"), "itl_p99_ms": ms("itl_s", "p99"),
           "tpot_p50_ms": ms("tpot_s", "p50"), "tpot_p99_ms": ms("tpot_s", "p99"),
           "output_tok_s": round(rep["output_token_throughput"], 1), "req_s": round(rep["request_throughput"], 3),
           "prefix_hit_rate": round(rep.get("prefix_hit_rate", 0.0), 4),
           "client_loop_lag_p99_ms": None}
    lag = rep.get("client", {}).get("loop_lag_s")
    if isinstance(lag, dict):
        row["client_loop_lag_p99_ms"] = round(lag.get("p99", 0) * 1e3, 2)
    if "cpu_frac" in rep.get("client", {}):
        row["client_cpu_frac"] = round(rep["client"]["cpu_frac"], 3)
    if rep.get("goodput"):
        row["goodput_fraction"] = round(rep["goodput"]["fraction"], 3)
    if transfer:
        row.update(transfer)
        if row["ttft_mean_ms"]:
            row["transfer_share_of_ttft"] = round(transfer["transfer_ms_per_request"] / row["ttft_mean_ms"], 4)
    return row


def default_kv_gb() -> float:
    """Each engine's KV pool: 24 GB where a GPU has >= 120 GiB (H200), else 12 (H100: two workers' 16 GB of
    weights and their pools share its 80 GB; 12 GB holds 32 streams of 2K-token prompts). From nvidia-smi, so
    this process never opens a CUDA context of its own on the GPU the workers use."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        mib = min(float(x) for x in out)
    except (OSError, ValueError, subprocess.SubprocessError):
        return 12.0
    return 24.0 if mib >= 120 * 1024 else 12.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (config.json + tokenizer) for load_format dummy")
    p.add_argument("--deployments", default="disagg-fp8,colocated")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests-per-stream", type=int, default=4, help="measured requests = this x concurrency (>= 8)")
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--goodput-ttft", type=float, default=None)
    p.add_argument("--goodput-tpot", type=float, default=None)
    p.add_argument("--kv-gb", type=float, default=None,
                   help="engine.kv_cache_memory_gb of every worker (default: 24 on GPUs of >= 120 GiB, else 12)")
    p.add_argument("--out", default=None, help="write every row as JSON here")
    p.add_argument("--save-requests", default=None, metavar="DIR",
                   help="per row, every measured request's timeline (pdserve bench --save-outputs) in DIR")
    p.add_argument("--max-num-seqs", type=int, default=ENGINE["max_num_seqs"],
                   help="engine.max_num_seqs of every worker (the decode batch's and CUDA graphs' bound)")
    p.add_argument("--no-overlap", action="store_true",
                   help="engine.overlap_schedule false in every worker (synchronous steps); rows say which")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: every worker on the CPU in float32, no GPU asked of Ray; with a tiny model "
                        "(benchmarks/dummy_model.py --shape tiny) it measures the serving path's own CPU cost")
    p.add_argument("--pyspy", default=None, metavar="DIR",
                   help="per row, py-spy (on PATH) samples the router and each worker process for 10 s from 4 s "
                        "into the row, into DIR (where the serving path's CPU goes)")
    p.add_argument("--step-log", default=None, metavar="DIR",
                   help="every engine's step log (engine.step_log) in DIR/<deployment>; with --save-requests, "
                        "benchmarks/step_timeline.py lines the two up")
    args = p.parse_args()
    from pdserve.testing.cluster import Server

    rows = []
    kv_gb = args.kv_gb if args.kv_gb is not None else default_kv_gb()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-gpu-"))
    for name in args.deployments.split(","):
        engine = {**ENGINE, "max_num_seqs": args.max_num_seqs, "kv_cache_memory_gb": kv_gb,
                  "overlap_schedule": False if args.no_overlap else None}
        if args.step_log:
            engine["step_log"] = str(Path(args.step_log).resolve() / name)
        deployment = DEPLOYMENTS[name]
        dtype = "bfloat16"
        if args.device == "cpu":
            engine["device"], dtype = "cpu", "float32"
            deployment = {k: ({**v, "num_gpus": 0} if isinstance(v, dict) and "num_gpus" in v else v)
                          for k, v in deployment.items()}
        config = {"model": {"path": str(Path(args.model).resolve()), "load_format": "dummy", "dtype": dtype},
                  "engine": engine, "ray": {"num_cpus": 8}, **deployment}
        t0 = time.monotonic()
        server = Server(config, tmp, timeout=900)
        print(f"# {name}: ready in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        try:
            # a cold start's one-time costs (UCX endpoints, Triton JIT, CUDA graph captures per batch size) are
            # reported apart: one unmeasured pass at the highest concurrency first
            top = max(int(x) for x in args.concurrency.split(","))
            cold = _bench(server.address, args, top, top, seed=0)
            print(json.dumps({"deployment": name, "warmup_concurrency": top,
                              "cold_ttft_p99_ms": round(cold["ttft_s"]["p99"] * 1e3, 1),
                              "cold_itl_p99_ms": round(cold["itl_s"]["p99"] * 1e3, 1)}), flush=True)
            for c in (int(x) for x in args.concurrency.split(",")):
                before = None
                if not name.startswith("colocated"):
                    time.sleep(1.0)  # the router refreshes worker stats every 0.5 s: the last row's pulls all in
                    before = _metrics(server.metrics_port)
                save = None
                if args.save_requests:
                    Path(args.save_requests).mkdir(parents=True, exist_ok=True)
                    save = str(Path(args.save_requests).resolve() / f"{name}-c{c}-{args.input_len}.jsonl")
                meter = CpuMeter(server.proc.pid)
                cpu0 = meter.sample()
                spies = []
                if args.pyspy:
                    pids = {"router": server.proc.pid, **{f"{role}{i}": pid for role, ps in meter.pids.items()
                                                         for i, pid in enumerate(ps)}}
                    spies = _pyspy(Path(args.pyspy), f"{name}-c{c}", pids, delay=4, seconds=10)
                rep = _bench(server.address, args, c, max(8, args.requests_per_stream * c), seed=c, save=save)
                cpu = CpuMeter.cores(cpu0, meter.sample())
                for spy in spies:
                    try:
                        spy.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        spy.kill()
                transfer = None
                if before is not None:
                    time.sleep(1.0)  # the router refreshes worker stats every 0.5 s
                    after = _metrics(server.metrics_port)
                    pulls = rep["completed"] + min(c, 4)  # measured + warmup requests
                    seconds = after.get("pdserve_kv_transfer_seconds", 0) - before.get("pdserve_kv_transfer_seconds", 0)
                    nbytes = after.get("pdserve_kv_transfer_bytes", 0) - before.get("pdserve_kv_transfer_bytes", 0)
                    transfer = {"transfer_ms_per_request": round(seconds / pulls * 1e3, 3),
                                "transfer_GBps": round(nbytes / seconds / 1e9, 1) if seconds else None,
                                "wire_MB_per_request": round(nbytes / pulls / 1e6, 1)}
                row = _row(name, c, rep, transfer)
                row.update(input_len=args.input_len, max_tokens=args.max_tokens, kv_cache_memory_gb=kv_gb,
                           max_num_seqs=args.max_num_seqs, overlap_schedule=not args.no_overlap, **cpu)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:  # after every row: a run cut short keeps what it measured
                    Path(args.out).write_text(json.dumps(rows, indent=1))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
