"""Pools that grow and shrink live: prefill 1 -> 3 -> 1 and decode 1 -> 2 -> 1 while `pdserve bench`
runs 32 concurrent streams; no request fails, outputs stay correct, pool sizes show in metrics."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import grpc

from pdserve.testing.cluster import NEUTRAL_CWD, Server
from pdserve.engine.sequence import SamplingParams
from pdserve.testing.exactness import assert_same_or_near_tie
from pdserve.proto import pb, rpc

CONFIG = {
    "model": {"dtype": "float32"},
    "engine": {"kv_cache_memory_gb": 0.15, "max_num_batched_tokens": 256},
    "prefill": {"replicas": 1, "num_cpus": 0.25},
    "decode": {"replicas": 1, "num_cpus": 0.25},
    "ray": {"num_cpus": 8},
}
BENCH = ["--workload", "random", "--num-requests", "96", "--concurrency", "32", "--input-len", "16:96",
         "--max-tokens", "4:24", "--seed", "3", "--no-progress", "--cluster-poll", "0.5"]


def _scale(address, role, n):
    r = subprocess.run([sys.executable, "-m", "pdserve", "scale", role, str(n), "--server", address],
                       capture_output=True, text=True, cwd=NEUTRAL_CWD, timeout=600)
    assert r.returncode == 0, r.stderr


def _replicas_metric(server) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("pdserve_pool_replicas{")}


def test_scale_under_load(tmp_path, engine_f32):
    from pdserve.cli import build_parser
    from pdserve.tools import bench

    server = Server(CONFIG, tmp_path)
    try:
        out = tmp_path / "outputs.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "pdserve", "bench", "--server", server.address, "--json",
                                 "--save-outputs", str(out), *BENCH], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=NEUTRAL_CWD)
        seen = []
        for role, n in (("prefill", 3), ("decode", 2)):
            _scale(server.address, role, n)
            seen.append(_replicas_metric(server))
        with grpc.insecure_channel(server.address) as ch:
            info = rpc.PDServeStub(ch).GetClusterInfo(pb.ClusterInfoRequest())
        assert (info.prefill_replicas, info.decode_replicas) == (3, 2)
        for role in ("prefill", "decode"):
            _scale(server.address, role, 1)
            seen.append(_replicas_metric(server))
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
        rep = json.loads(stdout)
        assert rep["failed"] == 0, rep["failures"]
        assert rep["completed"] == 96
        assert seen[1] == {"prefill": 3.0, "decode": 2.0}
        assert seen[-1] == {"prefill": 1.0, "decode": 1.0}
        assert len(rep["per_worker"]["prefill"]) >= 2  # the added workers took requests
        # outputs are the in-process engine's (greedy, float32)
        args = build_parser().parse_args(["bench", *BENCH])
        reqs = bench.make_workload(args, bench._vocab(args, 49152))
        got = [json.loads(line) for line in out.read_text().splitlines()]
        ref = engine_f32.generate([(list(q.prompt_token_ids),
                                    SamplingParams(max_tokens=q.max_tokens, ignore_eos=True, logprobs=2))
                                   for q in reqs])
        assert_same_or_near_tie(ref, got, "under scaling")
        time.sleep(2)
        with grpc.insecure_channel(server.address) as ch:
            info = rpc.PDServeStub(ch).GetClusterInfo(pb.ClusterInfoRequest())
        assert [w.state for w in info.workers] == ["ready", "ready"]
    finally:
        server.stop()
