"""Pools that grow and shrink live: prefill 1 -> 3 -> 1 and decode 1 -> 2 -> 1, each change made while a
`pdserve bench` (32 concurrent streams) has requests in flight; no request fails, outputs stay correct, pool sizes
show in metrics and GetClusterInfo, and the added prefill workers take requests."""
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
    # Round robin, not the default cache_aware: for prompts with no shared prefix cache_aware falls back to least
    # loaded, which ties to the first worker of the pool (the original one) unless another request still holds it
    # (from its pick to its first token), and whether one does is timing: a slow client or a quick worker can put a
    # whole burst there. Round robin sends two consecutive picks over 3 ready workers to two different ones, at
    # least one of them added, whatever the timing. Growing, draining and the metrics do not depend on the policy.
    "router": {"policy": "round_robin"},
}
N1, N2 = 64, 48
BENCH = ["--workload", "random", "--concurrency", "32", "--input-len", "16:96", "--max-tokens", "4:24",
         "--seed", "3", "--no-progress", "--cluster-poll", "0.5"]


def _bench(server, n, out):
    return subprocess.Popen([sys.executable, "-m", "pdserve", "bench", "--server", server.address, "--json",
                             "--save-outputs", str(out), "--num-requests", str(n), *BENCH], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=NEUTRAL_CWD)


def _report(proc, n) -> dict:
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    rep = json.loads(stdout)
    assert rep["failed"] == 0, rep["failures"]
    assert rep["completed"] == n
    return rep


def _info(address) -> pb.ClusterInfo:
    with grpc.insecure_channel(address) as ch:
        return rpc.PDServeStub(ch).GetClusterInfo(pb.ClusterInfoRequest(), timeout=30)


def _metrics(server) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _replicas(m: dict) -> dict:
    return {k.split('"')[1]: v for k, v in m.items() if k.startswith("pdserve_pool_replicas{")}


def _dispatched(m: dict) -> tuple[int, int]:
    """(requests the router has dispatched so far, requests in flight now). Every request observes its queue time
    once, as it is dispatched, in the same step of the router's loop as the pick of its workers; a scrape runs on
    that loop too, so it never sees one without the other."""
    (count,) = [v for k, v in m.items() if k.startswith("vllm:request_queue_time_seconds_count{")]
    return int(count), int(m["pdserve_router_requests_inflight"])


def _wait_dispatched(server, proc, n, timeout=300.0) -> None:
    """Until the router has dispatched `n` requests in all and holds at least one (`proc`'s bench is under way)."""
    deadline = time.monotonic() + timeout
    while True:
        dispatched, inflight = _dispatched(_metrics(server))
        if dispatched >= n and inflight:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the bench ended before the router had dispatched {n} requests with one in "
                                 f"flight ({dispatched}, {inflight} in flight):\n" + proc.stderr.read()[-3000:])
        assert time.monotonic() < deadline, f"{dispatched} dispatched, {inflight} in flight after {timeout:g} s"
        time.sleep(0.1)


def test_scale_under_load(tmp_path, engine_f32):
    from pdserve.cli import build_parser
    from pdserve.tools import bench

    server = Server(CONFIG, tmp_path)
    try:
        (first,) = [w.name for w in _info(server.address).workers if w.role == "prefill"]
        # scale up while bench 1 runs: both calls are made once its requests are in flight; the router grows the
        # two pools side by side (only creating the workers is serialized), each call returning once its
        # workers are ready
        out1, out2 = tmp_path / "outputs1.jsonl", tmp_path / "outputs2.jsonl"
        proc = _bench(server, N1, out1)
        _wait_dispatched(server, proc, 1)
        scales = [subprocess.Popen([sys.executable, "-m", "pdserve", "scale", role, str(n), "--server",
                                    server.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=NEUTRAL_CWD)
                  for role, n in (("prefill", 3), ("decode", 2))]
        for s in scales:
            _, err = s.communicate(timeout=600)
            assert s.returncode == 0, err
        grown = _replicas(_metrics(server))
        info = _info(server.address)
        assert (info.prefill_replicas, info.decode_replicas, info.prefill_ready, info.decode_ready) == (3, 2, 3, 2)
        rep1 = _report(proc, N1)
        before, _ = _dispatched(_metrics(server))

        # scale down while bench 2 runs, from pools of 3 and 2 ready workers and no other request: once the router
        # has dispatched two of its requests, its first two picks, consecutive in the round robin, went to two
        # different prefill workers (the spread asserted below). The Scale calls go straight from here, milliseconds
        # after the scrape that saw bench 2 in flight with most of it still to run (N2 requests, 32 at a time: some
        # are not even sent before others finish), not from a `pdserve scale` process that takes seconds to start.
        proc = _bench(server, N2, out2)
        _wait_dispatched(server, proc, before + 2)
        with grpc.insecure_channel(server.address) as ch:
            stub = rpc.PDServeStub(ch)
            for role in ("prefill", "decode"):
                r = stub.Scale(pb.ScaleRequest(role=role, replicas=1), timeout=60)
                assert (r.previous, r.replicas) == ({"prefill": 3, "decode": 2}[role], 1)
        shrunk = _replicas(_metrics(server))
        info = _info(server.address)
        assert (info.prefill_replicas, info.decode_replicas) == (1, 1)
        rep2 = _report(proc, N2)

        assert grown == {"prefill": 3.0, "decode": 2.0}
        assert shrunk == {"prefill": 1.0, "decode": 1.0}
        spread = rep2["per_worker"]["prefill"]
        assert len(spread) >= 2 and set(spread) - {first}, spread  # the added workers took requests
        # outputs are the in-process engine's (greedy, float32); bench 2's workload is bench 1's first N2 requests
        args = build_parser().parse_args(["bench", "--num-requests", str(N1), *BENCH])
        reqs = bench.make_workload(args, tuple(rep1["config"]["vocab_range"]))
        args2 = build_parser().parse_args(["bench", "--num-requests", str(N2), *BENCH])
        assert bench.make_workload(args2, tuple(rep2["config"]["vocab_range"])) == reqs[:N2]
        ref = engine_f32.generate([(list(q.prompt_token_ids),
                                    SamplingParams(max_tokens=q.max_tokens, ignore_eos=True, logprobs=2))
                                   for q in reqs])
        for out, n, when in ((out1, N1, "while scaling up"), (out2, N2, "while scaling down")):
            got = [json.loads(line) for line in out.read_text().splitlines()]
            assert len(got) == n
            assert_same_or_near_tie(ref[:n], got, when)

        # the drained workers leave their pools once their last request is done (bench 2 has ended)
        deadline = time.monotonic() + 120
        while len(info.workers) > 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            info = _info(server.address)
        assert [(w.role, w.state) for w in info.workers] == [("prefill", "ready"), ("decode", "ready")]
    finally:
        server.stop()
