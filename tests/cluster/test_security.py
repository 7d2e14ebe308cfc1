"""A `pdserve serve` with TLS and a bearer token on both doors, driven by real clients (grpc, the openai package,
httpx, the pdserve CLI); the bad-input table (gRPC and HTTP, each row with its expected code, the server still
serving after each); and a clean exit on SIGINT."""
from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
from types import SimpleNamespace

import grpc
import httpx2 as httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve.client import Credentials, request_proto, stream_one
from pdserve.engine.sequence import SamplingParams
from pdserve.proto import pb, rpc
from pdserve.testing.certs import CA
from pdserve.testing.cluster import NEUTRAL_CWD, Server
from pdserve.testing.processes import left_running, tree

CONFIG = {
    "model": {"dtype": "float32"},
    "engine": {"kv_cache_memory_gb": 0.2, "max_num_batched_tokens": 256},
    "prefill": {"replicas": 1, "num_cpus": 0.5},
    "decode": {"replicas": 1, "num_cpus": 0.5},
}
DUMPS = ("Traceback", "SIGTERM", "*** ")
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def sec(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    ca = CA(tmp)
    cert = ca.server()
    token = secrets.token_urlsafe(24)
    token_file = tmp / "token"
    token_file.write_text(token + "\n")
    router = {"tls_cert_file": cert.cert_file, "tls_key_file": cert.key_file, "auth_token_file": str(token_file)}
    s = Server({**CONFIG, "router": router}, tmp)
    creds = Credentials(token, ca.cert_file)
    ctx = creds.http_verify()
    http = httpx.Client(timeout=60, verify=ctx)
    yield SimpleNamespace(server=s, ca=ca, token=token, token_file=str(token_file), creds=creds, ssl=ctx, http=http,
                          url=f"https://127.0.0.1:{s.http_port}", tmp=tmp)
    http.close()
    s.stop()


@pytest.fixture(scope="module")
def stub(sec):
    ch = sec.creds.channel(sec.server.address)
    yield rpc.PDServeStub(ch)
    ch.close()


def _hello(stub) -> dict:
    return stream_one(stub, request_proto({"prompt": "The capital of France is"}, SamplingParams(max_tokens=2)))


def test_grpc_serves_only_with_the_token_over_tls(sec, stub):
    assert _hello(stub)["finish_reason"] == "length"
    address = sec.server.address
    for creds, code, words in ((Credentials(None, sec.ca.cert_file), grpc.StatusCode.UNAUTHENTICATED, "bearer token"),
                               (Credentials("not-the-token", sec.ca.cert_file), grpc.StatusCode.UNAUTHENTICATED,
                                "wrong"),
                               (Credentials(sec.token), grpc.StatusCode.UNAVAILABLE, ""),  # plaintext to a TLS port
                               (Credentials(sec.token, CA(sec.tmp, "another CA").cert_file),
                                grpc.StatusCode.UNAVAILABLE, "")):
        with creds.channel(address) as ch, pytest.raises(grpc.RpcError) as e:
            rpc.PDServeStub(ch).GetModelInfo(pb.ModelInfoRequest(), timeout=20)
        assert e.value.code() == code and words in e.value.details(), (creds.token, e.value.details())
    with Credentials(None, sec.ca.cert_file).channel(address) as ch:
        # health stays open for probes; reflection (the API's shape) needs the token like the rest
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=20)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=20)
        with pytest.raises(grpc.RpcError) as e:
            list(refl)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with sec.creds.channel(address) as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=20)
        names = {s.name for s in next(iter(refl)).list_services_response.service}
        assert "pdserve.v1.PDServe" in names


def test_http_serves_only_with_the_token_over_tls(sec):
    with httpx.Client(timeout=60, verify=sec.ssl) as h:
        good = openai.OpenAI(base_url=sec.url + "/v1", api_key=sec.token, max_retries=0, http_client=h)
        model = good.models.list().data[0].id
        r = good.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert r.usage.completion_tokens == 3
        wrong = openai.OpenAI(base_url=sec.url + "/v1", api_key="wrong", max_retries=0, http_client=h)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    no_token = sec.http.get(sec.url + "/v1/models")
    assert no_token.status_code == 401 and no_token.headers["www-authenticate"] == "Bearer"
    assert set(no_token.json()["error"]) == {"message", "type", "param", "code"}
    assert sec.http.get(sec.url + "/health").status_code == 200  # probes carry no token
    assert sec.http.get(sec.url + "/ready").status_code == 200
    assert sec.http.get(sec.url + "/metrics").status_code == 401  # the public door: behind the token
    assert sec.http.get(sec.url + "/metrics", headers=sec.creds.http_headers()).status_code == 200
    with pytest.raises(httpx.HTTPError):  # plaintext to the TLS port
        httpx.get(f"http://127.0.0.1:{sec.server.http_port}/health", timeout=20)
    # the operators' port: plain HTTP, no token (Prometheus, kubelet probes)
    metrics = f"http://127.0.0.1:{sec.server.metrics_port}"
    assert "vllm:" in httpx.get(metrics + "/metrics", timeout=20).text
    assert httpx.get(metrics + "/ready", timeout=20).json() == {"status": "ready"}


def _cli(*args, token: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "PDSERVE_AUTH_TOKEN"}
    if token is not None:
        env["PDSERVE_AUTH_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True,
                          cwd=NEUTRAL_CWD, timeout=300, env=env)


def test_cli_clients_take_the_token_and_the_ca(sec):
    tls = ["--server", sec.server.address, "--ca-file", sec.ca.cert_file]
    gen = ["generate", "The capital of France is", "--max-tokens", "3", "--json", *tls]
    ok = _cli(*gen, token=sec.token)  # from $PDSERVE_AUTH_TOKEN
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["token_ids"]) == 3
    refused = _cli(*gen)
    assert refused.returncode == 4 and "UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr
    scale = _cli("scale", "decode", "1", *tls, "--token-file", sec.token_file)
    assert scale.returncode == 0 and "decode: 1 -> 1" in scale.stdout, scale.stderr
    common = ["--num-requests", "2", "--input-len", "8", "--max-tokens", "2", "--json", "--no-progress",
              "--ca-file", sec.ca.cert_file, "--token-file", sec.token_file]
    for target in (["--server", sec.server.address], ["--http", sec.url]):
        bench = _cli("bench", *target, *common)
        assert bench.returncode == 0, bench.stderr
        assert json.loads(bench.stdout)["completed"] == 2, target


# ---- the bad-input table ----------------------------------------------------------------------------------------
# each row: (what, expected gRPC status or HTTP code, call(ctx) -> the code it got); after every row the server
# must still serve a good request


def _raw(ctx, method: str, payload: bytes, creds=None, service="pdserve.v1.PDServe"):
    """Bytes as they are, through a channel with identity serializers."""
    with (creds or ctx.creds).channel(ctx.server.address) as ch:
        streaming = method == "Generate"
        call = (ch.unary_stream if streaming else ch.unary_unary)(f"/{service}/{method}")
        try:
            out = call(payload, timeout=30)
            if streaming:
                list(out)
        except grpc.RpcError as e:
            return e.code()
    return OK


def _gen(ctx, req=None, creds=None, metadata=None, timeout=60, request_id="", **sampling):
    msg = request_proto(req or {"prompt": "hi"}, SamplingParams(max_tokens=2), request_id=request_id)
    for k, v in sampling.items():
        if k == "cache_namespace":
            msg.cache_namespace = v
        elif isinstance(v, list):
            getattr(msg.sampling, k).extend(v)
        else:
            setattr(msg.sampling, k, v)
    with (creds or ctx.creds).channel(ctx.server.address) as ch:
        try:
            list(rpc.PDServeStub(ch).Generate(msg, timeout=timeout, metadata=metadata))
        except grpc.RpcError as e:
            return e.code()
    return OK


def _scale(ctx, role, replicas):
    with ctx.creds.channel(ctx.server.address) as ch:
        try:
            rpc.PDServeStub(ch).Scale(pb.ScaleRequest(role=role, replicas=replicas), timeout=60)
        except grpc.RpcError as e:
            return e.code()
    return OK


def _duplicate_id(ctx):
    with ctx.creds.channel(ctx.server.address) as ch:
        stub = rpc.PDServeStub(ch)
        running = stub.Generate(request_proto({"prompt": "Count to a thousand:"},
                                              SamplingParams(max_tokens=500, ignore_eos=True), request_id="dup"))
        next(running)  # it runs
        try:
            return _gen(ctx, request_id="dup")
        finally:
            stub.Abort(pb.AbortRequest(request_id="dup"))
            list(running)


def _http(ctx, path="/v1/completions", body=None, content=None, headers=None, method="POST"):
    h = ctx.creds.http_headers() if headers is None else headers
    if body is not None:
        body = {"prompt": "hi", "max_tokens": 2, **body}
    return ctx.http.request(method, ctx.url + path, json=body, content=content, headers=h).status_code


def _chat(ctx, **body):
    return _http(ctx, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **body})


GARBAGE = b"\xff\xff\xff\xff\x0f\x08"
U = grpc.StatusCode
BAD_INPUT = [
    # undecodable bytes, on every RPC
    *[(f"garbage {m}", INVALID, lambda c, m=m: _raw(c, m, GARBAGE))
      for m in ("Generate", "GenerateUnary", "Abort", "GetModelInfo", "GetClusterInfo", "Scale")],
    ("garbage health check", INVALID, lambda c: _raw(c, "Check", GARBAGE, Credentials(None, c.ca.cert_file),
                                                     "grpc.health.v1.Health")),
    ("truncated message", INVALID,
     lambda c: _raw(c, "Generate", pb.GenerateRequest(prompt="hello there").SerializeToString()[:-3])),
    ("length past the end", INVALID, lambda c: _raw(c, "Generate", b"\x12\xff\xff\xff\xff\x0f")),
    ("prompt not UTF-8", INVALID, lambda c: _raw(c, "Generate", b"\x12\x02\xff\xfe")),
    ("request_id not UTF-8", INVALID, lambda c: _raw(c, "Generate", b"\x0a\x02\xc3\x28\x12\x02hi")),
    ("cache_namespace not UTF-8", INVALID, lambda c: _raw(c, "Generate", b"\x12\x02hi\x32\x01\x80")),
    ("stop string not UTF-8", INVALID, lambda c: _raw(c, "Generate", b"\x12\x02hi\x2a\x04\x32\x02\xff\xfe")),
    ("Abort id not UTF-8", INVALID, lambda c: _raw(c, "Abort", b"\x0a\x01\xff")),
    ("empty message: no prompt", INVALID, lambda c: _raw(c, "Generate", b"")),
    # prompts
    ("whitespace chat prompt", INVALID, lambda c: _gen(c, {"prompt": "   ", "chat": True})),
    ("token id beyond the vocabulary", INVALID, lambda c: _gen(c, {"prompt_token_ids": [10**6]})),
    ("negative token id", INVALID, lambda c: _gen(c, {"prompt_token_ids": [5, -1]})),
    ("prompt beyond the context", INVALID, lambda c: _gen(c, {"prompt_token_ids": [1] * 9000})),
    ("prompt beyond the KV pool", U.RESOURCE_EXHAUSTED, lambda c: _gen(c, {"prompt_token_ids": [504] * 8000})),
    # sampling values
    ("max_tokens 0", INVALID, lambda c: _gen(c, max_tokens=0)),
    ("max_tokens -1", INVALID, lambda c: _gen(c, max_tokens=-1)),
    ("max_tokens beyond the context", INVALID, lambda c: _gen(c, max_tokens=10**6)),
    ("temperature -1", INVALID, lambda c: _gen(c, temperature=-1.0)),
    ("temperature NaN", INVALID, lambda c: _gen(c, temperature=math.nan)),
    ("top_p 0", INVALID, lambda c: _gen(c, top_p=0.0)),
    ("top_p 1.5", INVALID, lambda c: _gen(c, top_p=1.5)),
    ("top_k -5", INVALID, lambda c: _gen(c, top_k=-5)),
    ("min_p 1.5", INVALID, lambda c: _gen(c, min_p=1.5)),
    ("logprobs 21", INVALID, lambda c: _gen(c, logprobs=21)),
    ("seed 2^63", INVALID, lambda c: _gen(c, seed=2**63)),
    ("stop_token_ids -1", INVALID, lambda c: _gen(c, stop_token_ids=[-1])),
    # the router's own limits and refusals
    ("request_id over 256 bytes", INVALID, lambda c: _gen(c, request_id="r" * 257)),
    ("cache_namespace over 1024 bytes", INVALID, lambda c: _gen(c, cache_namespace="n" * 1025)),
    ("duplicate running request id", INVALID, _duplicate_id),
    ("deadline 1 ms", U.DEADLINE_EXCEEDED, lambda c: _gen(c, timeout=0.001)),
    ("Scale role router", INVALID, lambda c: _scale(c, "router", 1)),
    ("Scale replicas -1", INVALID, lambda c: _scale(c, "decode", -1)),
    ("Scale beyond the machine", U.RESOURCE_EXHAUSTED, lambda c: _scale(c, "decode", 256)),
    ("unknown method", U.UNIMPLEMENTED, lambda c: _raw(c, "Nothing", b"")),
    # authentication and transport
    ("gRPC without a token", U.UNAUTHENTICATED, lambda c: _gen(c, creds=Credentials(None, c.ca.cert_file))),
    ("gRPC with a wrong token", U.UNAUTHENTICATED, lambda c: _gen(c, creds=Credentials("x" * 32, c.ca.cert_file))),
    ("gRPC token without Bearer", U.UNAUTHENTICATED,
     lambda c: _gen(c, creds=Credentials(None, c.ca.cert_file), metadata=[("authorization", c.token)])),
    ("garbage bytes without a token", U.UNAUTHENTICATED,
     lambda c: _raw(c, "Generate", GARBAGE, Credentials(None, c.ca.cert_file))),
    ("gRPC plaintext to the TLS port", U.UNAVAILABLE, lambda c: _gen(c, creds=Credentials(c.token), timeout=20)),
    # HTTP
    ("HTTP without a token", 401, lambda c: _http(c, body={}, headers={})),
    ("HTTP with a wrong token", 401, lambda c: _http(c, body={}, headers={"Authorization": "Bearer nope"})),
    ("HTTP token without Bearer", 401, lambda c: _http(c, body={}, headers={"Authorization": c.token})),
    ("malformed JSON", 400, lambda c: _http(c, content=b'{"prompt": "hi",')),
    ("body a JSON list", 400, lambda c: _http(c, content=b'["hi"]')),
    ("body not UTF-8", 400, lambda c: _http(c, content=b'{"prompt": "\xff\xfe"}')),
    ("max_tokens a string", 400, lambda c: _http(c, body={"max_tokens": "5"})),
    ("temperature a string", 400, lambda c: _http(c, body={"temperature": "hot"})),
    ("stream a string", 400, lambda c: _http(c, body={"stream": "yes"})),
    ("prompt an object", 400, lambda c: _http(c, body={"prompt": {"text": "hi"}})),
    ("messages not a list", 400, lambda c: _chat(c, messages="hi")),
    ("message content a number", 400, lambda c: _chat(c, messages=[{"role": "user", "content": 5}])),
    ("unknown model", 404, lambda c: _chat(c, model="gpt-4")),
    ("n=2", 400, lambda c: _chat(c, n=2)),
    ("max_tokens negative", 400, lambda c: _http(c, body={"max_tokens": -5})),
    ("HTTP max_tokens beyond the context", 400, lambda c: _http(c, body={"max_tokens": 10**6})),
    ("unknown route", 404, lambda c: _http(c, "/v1/embeddings", body={})),
    ("GET a POST route", 405, lambda c: _http(c, method="GET")),
]


@pytest.mark.parametrize("what,expected,call", BAD_INPUT, ids=[row[0] for row in BAD_INPUT])
def test_bad_input_gets_its_code_and_the_server_keeps_serving(sec, stub, what, expected, call):
    assert call(sec) == expected
    assert _hello(stub)["finish_reason"] == "length"


def test_undecodable_bytes_are_told_in_our_words(sec):
    with sec.creds.channel(sec.server.address) as ch, pytest.raises(grpc.RpcError) as e:
        list(ch.unary_stream("/pdserve.v1.PDServe/Generate")(b"\x12\x02\xff\xfe", timeout=30))
    assert e.value.code() == INVALID
    assert e.value.details().startswith("the request bytes are not a valid pdserve.v1.GenerateRequest")
    sec.server.log.flush()
    assert "DecodeError" not in sec.server.log_path.read_text()  # no traceback logged per bad call either


def test_bad_input_table_is_40_rows():
    assert len(BAD_INPUT) >= 40 and len({row[0] for row in BAD_INPUT}) == len(BAD_INPUT)


def test_the_token_never_reaches_the_log(sec):
    sec.server.log.flush()
    assert sec.token not in sec.server.log_path.read_text()


def test_sigint_drains_and_exits_clean(sec, stub):
    """Last: it ends the module's server. SIGINT (Ctrl-C) does what SIGTERM does."""
    procs = tree(sec.server.proc.pid)
    os.kill(sec.server.proc.pid, signal.SIGINT)
    assert sec.server.wait(90) == 0
    left = left_running(procs)  # children are reaped by their parents a moment after the router
    assert not left, f"left running: {[(p.pid, p.name()) for p in left]}"
    sec.server.log.flush()
    dumps = [line for line in sec.server.log_path.read_text().splitlines() if any(d in line for d in DUMPS)]
    assert not dumps, "\n".join(dumps[:20])
