"""What tracing costs per streamed token: a real `pdserve serve` (Ray, one prefill and one decode worker, the
embedded model, float32, CPU) per variant, one gRPC stream at a time, the time per output token of each request
measured at the client (first delta to last, over the tokens between them).

A variant is NAME:MODE[:DIR]: MODE `off` (tracing off, the default) or `on` (every span exported over OTLP/gRPC
to a receiver in this process), DIR another checkout of the repository to run instead of the installed pdserve (say
the commit before a change: `git archive <commit> | tar -x -C DIR`). Without --variant: off:off and on:on. The
servers run one after the other, the variants in turn for `--rounds` rounds, so that a box whose load drifts
burdens each variant alike.

    git archive <commit before tracing> | tar -x -C /tmp/pdserve-before
    .venv/bin/python -P benchmarks/bench_tracing.py --variant before:off:/tmp/pdserve-before \
        --variant after:off --variant traced:on --out docs/bench/tracing.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

import grpc

from pdserve.proto import pb, rpc
from pdserve.testing.cluster import Server

CONFIG = {
    "model": {"dtype": "float32"},
    "engine": {"kv_cache_memory_gb": 0.2, "max_num_batched_tokens": 256},
    "prefill": {"replicas": 1, "num_cpus": 0.5},
    "decode": {"replicas": 1, "num_cpus": 0.5},
}
PROMPT = "Tell me about the history of the city of Paris, from its founding to the present day."


def importable(tree: Path, into: Path) -> Path:
    """`tree` (a checkout) laid out as the installed package is (pyproject.toml's package-dir mapping), for
    PYTHONPATH: its servers and their Ray workers import that code, not this environment's pdserve."""
    dirs = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(dirs.items()):
        shutil.copytree(tree / folder, into / package.replace(".", "/"), dirs_exist_ok=True)
    for f in (tree / "proto").glob("*.proto"):
        shutil.copy(f, into / "pdserve" / "proto")
    return into


def per_token_seconds(address: str, requests: int, max_tokens: int) -> list[float]:
    out = []
    with grpc.insecure_channel(address) as ch:
        stub = rpc.PDServeStub(ch)
        for i in range(requests + 1):  # the first warms the workers up and is not counted
            times, tokens = [], 0
            for msg in stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(
                    max_tokens=max_tokens, temperature=0.0, ignore_eos=True)), timeout=600):
                if msg.token_ids:
                    times.append(time.perf_counter())
                    tokens += len(msg.token_ids) if len(times) > 1 else 0
            if i:
                out.append((times[-1] - times[0]) / tokens)
    return out


def run(name: str, pythonpath: str | None, traced: bool, args, tmp: Path) -> list[float]:
    receiver = None
    config = dict(CONFIG)
    if traced:
        from pdserve.testing.otlp import TraceReceiver

        receiver = TraceReceiver()
        config["tracing"] = {"otlp_endpoint": receiver.endpoint}
    saved = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = pythonpath
    try:
        server = Server(config, tmp)
    finally:
        if pythonpath:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.__setitem__("PYTHONPATH", saved)
    try:
        return per_token_seconds(server.address, args.requests, args.max_tokens)
    finally:
        server.stop()
        if receiver is not None:
            print(f"  {name}: {len(receiver.spans)} spans received")
            receiver.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:MODE[:DIR]",
                    help="MODE off or on (tracing); DIR: another checkout to run (default: the installed pdserve)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=12, help="per variant and round (after one warm-up)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    variants = []
    for spec in args.variant or ["off:off", "on:on"]:
        name, mode, *folder = spec.split(":", 2)
        if mode not in ("off", "on") or not name:
            ap.error(f"--variant {spec}: expected NAME:off or NAME:on, then optionally :DIR")
        site = str(importable(Path(folder[0]), tmp / f"site-{name}")) if folder else None
        variants.append((name, site, mode == "on"))
    samples: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for r in range(args.rounds):
        for name, pythonpath, traced in variants:
            got = run(name, pythonpath, traced, args, tmp)
            samples[name] += got
            print(f"round {r + 1} {name}: median {statistics.median(got) * 1e3:.2f} ms/token over {len(got)} requests",
                  flush=True)
    result = {"config": CONFIG, "requests_per_round": args.requests, "max_tokens": args.max_tokens,
              "rounds": args.rounds, "variants": {}}
    for name, xs in samples.items():
        q = statistics.quantiles(xs, n=4)
        result["variants"][name] = {"median_ms_per_token": statistics.median(xs) * 1e3, "p25_ms": q[0] * 1e3,
                                    "p75_ms": q[2] * 1e3, "requests": len(xs)}
        print(f"{name:>8}: median {statistics.median(xs) * 1e3:.2f} ms/token "
              f"(p25 {q[0] * 1e3:.2f}, p75 {q[2] * 1e3:.2f}) over {len(xs)} requests")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
