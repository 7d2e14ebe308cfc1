"""A local `pdserve serve` from its start to its end, as an operator sees it: a busy port is refused in one line
before anything loads; everything the cluster listens on is loopback; SIGTERM drains the requests in flight and
leaves no process and no stack dump behind; the harness's stop() signals no process that is not the server's."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx2 as httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.client import request_proto, stream_one
from pdserve.engine.sequence import SamplingParams
from pdserve.proto import rpc
from pdserve.testing.cluster import NEUTRAL_CWD, Server
from pdserve.testing.processes import is_loopback, left_running, listening, tree

DRAIN_S = 6.0
CONFIG = {
    "model": {"dtype": "float32"},
    "engine": {"kv_cache_memory_gb": 0.2, "max_num_batched_tokens": 256},
    "prefill": {"replicas": 1, "num_cpus": 0.5},
    "decode": {"replicas": 1, "num_cpus": 0.5},
    "router": {"drain_timeout_s": DRAIN_S},
}
# what a clean exit never prints: a Python traceback, Ray's or abseil's SIGTERM report, abseil's "*** SIG..." dump
DUMPS = ("Traceback", "SIGTERM", "*** ")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(CONFIG, tmp_path_factory.mktemp("lifecycle"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server):
    ch = grpc.insecure_channel(server.address)
    yield rpc.PDServeStub(ch)
    ch.close()


@pytest.mark.parametrize("key,flag", [("port", "--port"), ("http_port", "--http-port"),
                                      ("metrics_port", "--metrics-port")])
def test_a_busy_port_is_one_line_and_exit_2_before_ray(key, flag):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        ports = {"--port": "0", "--http-port": "0", "--metrics-port": "0", flag: str(port)}
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "pdserve", "serve", *[a for kv in ports.items() for a in kv]],
                           capture_output=True, text=True, cwd=NEUTRAL_CWD, timeout=120)
        took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"router.{key}" in lines[0] and flag in lines[0] and f"127.0.0.1:{port}" in lines[0], lines[0]
    assert "already in use" in lines[0] and not r.stdout
    assert took < 20, f"took {took:.1f} s: it should fail before Ray or the model load"


def test_workers_that_cannot_start_fail_the_start_with_their_cause(tmp_path):
    """A KV pool no worker can allocate (as a GPU out of memory): the server exits 4 with each pool's cause in its
    last line, never printing "ready" for a cluster that could answer nothing."""
    config = tmp_path / "huge_kv.yaml"
    config.write_text("engine: {kv_cache_memory_gb: 1000000}\nprefill: {num_cpus: 0.25}\n"
                      "decode: {num_cpus: 0.25}\nray: {num_cpus: 2}\n")
    r = subprocess.run([sys.executable, "-m", "pdserve", "serve", "--config", str(config), "--port", "0"],
                       capture_output=True, text=True, cwd=NEUTRAL_CWD, timeout=300)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "pdserve: ready" not in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pdserve serve: error: the cluster failed to start: no prefill worker started ("), last
    assert "no decode worker started (" in last and "can't allocate memory" in last, last


def test_every_listener_of_a_local_cluster_is_loopback(server, stub):
    # one request first: the workers have moved KV through NIXL/UCX, so their transport is up
    assert stream_one(stub, request_proto({"prompt": "Hello"}, SamplingParams(max_tokens=3)))["token_ids"]
    procs = tree(server.proc.pid)
    found = listening(procs)
    names = {name for _, name, _, _ in found}
    ports = {port for pid, _, _, port in found if pid == server.proc.pid}
    # the listing sees what it must: the router's three ports, Ray's GCS and raylet, both pool workers
    assert {server.port, server.http_port, server.metrics_port} <= ports, found
    assert {"gcs_server", "raylet"} <= names and any("PrefillWorker" in n for n in names) \
        and any("DecodeWorker" in n for n in names), names
    outside = [row for row in found if not is_loopback(row[2])]
    assert not outside, f"listening beyond loopback: {outside}"


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_sigterm_drains_in_flight_requests_then_exits_clean(server, stub):
    """Two short streams finish within the drain, a long one ends with abort past it; new requests are refused
    meanwhile; then exit code 0, no process left of those it started, no traceback or signal dump."""
    lengths = {"short": 12, "medium": 24, "long": 2000}
    results, first = {}, {name: threading.Event() for name in lengths}

    def run(name, max_tokens):
        msg = request_proto({"prompt": "Count from one to one thousand:"},
                            SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        try:
            results[name] = stream_one(stub, msg, on_delta=lambda r: first[name].set())
        except Exception as e:  # noqa: BLE001 - reported below
            results[name] = e
            first[name].set()

    streams = [threading.Thread(target=run, args=item) for item in lengths.items()]
    for t in streams:
        t.start()
    for e in first.values():  # every stream is in flight: it has had a token
        assert e.wait(60)
    procs = tree(server.proc.pid)
    assert len(procs) > 5
    os.kill(server.proc.pid, signal.SIGTERM)
    t0 = time.monotonic()

    deadline = time.monotonic() + 5  # admission closes as soon as the loop handles the signal
    while _health(server.address, "") == health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "still SERVING after SIGTERM"
        time.sleep(0.05)
    assert _health(server.address, "liveness") == health_pb2.HealthCheckResponse.SERVING  # draining, not dead
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(request_proto({"prompt": "hi"}, SamplingParams(max_tokens=2)), timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
    with httpx.Client(timeout=10) as h:
        r = h.post(server.http_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert h.get(server.http_url + "/ready").status_code == 503

    for t in streams:
        t.join(DRAIN_S + 30)
    assert results["short"]["finish_reason"] == "length" and len(results["short"]["token_ids"]) == 12
    assert results["medium"]["finish_reason"] == "length" and len(results["medium"]["token_ids"]) == 24
    long = results["long"]
    assert long["finish_reason"] == "abort" and 0 < len(long["token_ids"]) < 2000, long
    assert server.wait(60) == 0  # unreaped: the fixture's stop() may still clean up the group it leads
    took = time.monotonic() - t0
    assert took < DRAIN_S + 30, took

    left = left_running(procs)  # children are reaped by their parents a moment after the router
    assert not left, f"left running: {[(p.pid, p.name()) for p in left]}"
    server.log.flush()
    log = server.log_path.read_text()
    assert "draining" in log
    dumps = [line for line in log.splitlines() if any(d in line for d in DUMPS)]
    assert not dumps, "\n".join(dumps[:20])


def test_stop_signals_no_process_but_the_servers_own(tmp_path):
    """Server.stop(), every cluster test's teardown: SIGTERM to the router's pid alone (it stops its workers and its
    Ray itself), then SIGKILL to what is left in the process group of the router's own session. Never the caller's
    group: the test runner and a process it started beside the server get no signal."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: received.append(sig))
    neighbour = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], cwd=NEUTRAL_CWD)
    s = None
    try:
        s = Server(CONFIG, tmp_path)
        assert os.getpgid(s.proc.pid) == s.proc.pid != os.getpgrp() == os.getpgid(neighbour.pid)
        procs = tree(s.proc.pid)
        assert len(procs) > 5
        s.stop()
        assert not received, "stop() signalled the test runner's process group"
        assert neighbour.poll() is None, f"stop() killed a process of the caller's group: {neighbour.returncode}"
        assert s.proc.returncode == 0  # the router stopped on its SIGTERM, as under Kubernetes
        left = left_running(procs)
        assert not left, f"left running: {[(p.pid, p.name()) for p in left]}"
        dumps = [line for line in s.log_path.read_text().splitlines() if any(d in line for d in DUMPS)]
        assert not dumps, "\n".join(dumps[:20])
    finally:
        if s is not None:
            s.stop()  # a no-op once stopped; else an assertion above failed first
        signal.signal(signal.SIGTERM, previous)
        neighbour.kill()
        neighbour.wait()
