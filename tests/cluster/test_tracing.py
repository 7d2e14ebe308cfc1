"""OpenTelemetry tracing across processes: a real `pdserve serve` (Ray, one prefill and one decode worker, the
embedded model) with `tracing.otlp_endpoint` pointing at an OTLP/gRPC receiver this test runs on 127.0.0.1; every
process exports its own spans there. One request over HTTP with a `traceparent` header and one over gRPC with
`traceparent` metadata each come back as one trace: the caller's parent, the router's spans, the prefill and
decode workers' spans under them, from three processes. The server exports only as it stops (the exporters'
periodic export is put off), so the traces also show that every process flushes its spans at shutdown. With
tracing off (the default), the router serves both doors without importing any of OpenTelemetry."""
from __future__ import annotations

import json
import secrets
import time
import urllib.request

import grpc
import pytest

from pdserve.proto import pb, rpc
from pdserve.testing.cluster import Server
from pdserve.testing.otlp import TraceReceiver, attributes

CONFIG = {
    "model": {"dtype": "float32"},
    "engine": {"kv_cache_memory_gb": 0.2, "max_num_batched_tokens": 256},
    "prefill": {"replicas": 1, "num_cpus": 0.5},
    "decode": {"replicas": 1, "num_cpus": 0.5},
}
PROMPT = "The capital of France is Paris. The capital of Italy is"  # the KV of all tokens but the last moves
# each process's spans of one request, by the service name it reports
EXPECTED = {"pdserve-router": {"request", "admit", "route", "prefill", "stream"},
            "pdserve-prefill": {"prefill", "kv_send"},
            "pdserve-decode": {"decode", "kv_transfer"}}
# run by every Python process of a server started with it on PYTHONPATH: at exit, writes the OpenTelemetry modules
# the process imported to $PDSERVE_MODULES_DIR/<pid>.json
PROBE = """
import atexit, json, os, sys
def _report():
    names = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
    with open(os.path.join(os.environ["PDSERVE_MODULES_DIR"], f"{os.getpid()}.json"), "w") as f:
        json.dump(names, f)
atexit.register(_report)
"""


def _trace(receiver: TraceReceiver, trace_id: str, timeout: float = 10.0) -> list[tuple[dict, object]]:
    """The spans of one trace, once every expected one arrived."""
    deadline = time.time() + timeout
    while True:
        found = receiver.trace(trace_id)
        names = {(r["service.name"], s.name) for r, s in found}
        if all((svc, n) in names for svc, ns in EXPECTED.items() for n in ns):
            return found
        assert time.time() < deadline, (f"spans of trace {trace_id} received (each process sends them as it "
                                        f"stops): {sorted(names)}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def receiver():
    r = TraceReceiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def traced(receiver, tmp_path_factory) -> dict:
    """A traced server that served one request through each door and stopped: {door: (trace id, caller's span
    id)}; their spans are the receiver's."""
    config = {**CONFIG, "tracing": {"otlp_endpoint": receiver.endpoint}}
    with pytest.MonkeyPatch.context() as mp:
        # no periodic export (the SDK's knob, in ms; Ray's workers inherit it): spans leave only when flushed
        mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
        s = Server(config, tmp_path_factory.mktemp("tracing"))
    try:
        requests = {}
        for door, send in (("http", _http_request), ("grpc", _grpc_request)):
            trace_id, parent_id, traceparent = _traceparent()
            send(s, traceparent, f"traced-{door}")
            requests[door] = trace_id, parent_id
    finally:
        _stop(s)
    return requests


@pytest.fixture
def untraced(tmp_path):
    """A server with tracing off whose processes report the OpenTelemetry modules they imported when they exit."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(PROBE)
    (tmp_path / "modules").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(tmp_path / "probe"))
        mp.setenv("PDSERVE_MODULES_DIR", str(tmp_path / "modules"))
        s = Server(CONFIG, tmp_path)
    s.modules_dir = tmp_path / "modules"
    yield s
    s.stop()


def _stop(server: Server) -> None:
    """Server.stop(): SIGTERM to the router alone, as Kubernetes stops its pod; the router flushes its workers'
    spans, kills them, flushes its own and exits. Then whatever Ray left in its group goes."""
    server.stop(timeout=60)


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent_id, f"00-{trace_id}-{parent_id}-01"


def _http_request(server: Server, traceparent: str, request_id: str) -> None:
    body = json.dumps({"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    req = urllib.request.Request(server.http_url + "/v1/completions", data=body, method="POST", headers={
        "Content-Type": "application/json", "traceparent": traceparent, "X-Request-Id": request_id})
    with urllib.request.urlopen(req, timeout=120) as r:
        events = r.read().decode()
    assert events.rstrip().endswith("data: [DONE]")


def _grpc_request(server: Server, traceparent: str, request_id: str) -> None:
    with grpc.insecure_channel(server.address) as ch:
        msgs = list(rpc.PDServeStub(ch).Generate(
            pb.GenerateRequest(prompt=PROMPT, request_id=request_id,
                               sampling=pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)),
            metadata=(("traceparent", traceparent),), timeout=120))
    assert msgs[-1].finish_reason == "length"


def _check_trace(spans: list, parent_id: str, door: str, request_id: str) -> None:
    assert len(spans) >= 5
    processes = {(r["service.name"], r["process.pid"]) for r, _ in spans}
    assert len(processes) >= 3 and {svc for svc, _ in processes} == set(EXPECTED), processes
    assert len({pid for _, pid in processes}) == 3  # three processes, not three names
    # one span of each name per process: nothing moved, nothing was retried
    by = {}
    for r, s in spans:
        key = (r["service.name"], s.name)
        assert key not in by, f"two {key} spans"
        by[key] = s

    def parent(svc: str, name: str) -> str:
        return by[(svc, name)].parent_span_id.hex()

    def span_id(svc: str, name: str) -> str:
        return by[(svc, name)].span_id.hex()

    router, prefill, decode = "pdserve-router", "pdserve-prefill", "pdserve-decode"
    assert parent(router, "request") == parent_id  # the caller's traceparent
    for name in ("admit", "route", "prefill", "stream"):
        assert parent(router, name) == span_id(router, "request"), name
    # the workers' spans hang under the router's spans of the calls made to them
    assert parent(prefill, "prefill") == span_id(router, "prefill")
    assert parent(prefill, "kv_send") == span_id(prefill, "prefill")
    assert parent(decode, "decode") == span_id(router, "stream")
    assert parent(decode, "kv_transfer") == span_id(decode, "decode")
    # and nothing else: every span's parent is in the trace, or is the caller's
    ids = {s.span_id.hex() for _, s in spans} | {parent_id}
    assert all(s.parent_span_id.hex() in ids for _, s in spans)

    request = by[(router, "request")]
    attrs = attributes(request.attributes)
    assert attrs["pdserve.door"] == door and attrs["pdserve.request_id"] == request_id
    assert attrs["pdserve.outcome"] == "length" and attrs["pdserve.completion_tokens"] == 8
    load = by[(decode, "kv_transfer")]
    assert by[(decode, "decode")].start_time_unix_nano <= load.start_time_unix_nano <= load.end_time_unix_nano
    assert all(s.status.code != s.status.STATUS_CODE_ERROR for _, s in spans)


def test_untraced_router_serves_both_doors_without_importing_opentelemetry(untraced):
    _http_request(untraced, _traceparent()[2], "untraced-http")  # a caller's traceparent changes nothing
    _grpc_request(untraced, _traceparent()[2], "untraced-grpc")
    _stop(untraced)  # the router exits, and its probe reports
    report = untraced.modules_dir / f"{untraced.proc.pid}.json"
    assert report.exists(), f"the router (pid {untraced.proc.pid}) did not exit cleanly: no {report.name}"
    assert json.loads(report.read_text()) == []


def test_http_request_with_a_traceparent_header_is_one_trace_across_three_processes(traced, receiver):
    trace_id, parent_id = traced["http"]
    _check_trace(_trace(receiver, trace_id), parent_id, "http", "traced-http")


def test_grpc_request_with_traceparent_metadata_is_one_trace_across_three_processes(traced, receiver):
    trace_id, parent_id = traced["grpc"]
    _check_trace(_trace(receiver, trace_id), parent_id, "grpc", "traced-grpc")
