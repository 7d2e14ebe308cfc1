"""The disaggregated cluster end to end: a real Ray cluster, real NIXL agents, a real gRPC router
on 127.0.0.1 and the embedded model."""
from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from pdserve.testing.cluster import NEUTRAL_CWD, Server
from pdserve.testing.exactness import PROMPTS
from pdserve.engine.sequence import SamplingParams
from pdserve.client import request_proto, stream_one
from pdserve.proto import pb, rpc

CONFIG = {
    "model": {"dtype": "float32"},
    "engine": {"kv_cache_memory_gb": 0.2, "max_num_batched_tokens": 256},
    "prefill": {"replicas": 2, "num_cpus": 0.5},
    "decode": {"replicas": 2, "num_cpus": 0.5},
    "kv_transfer": {"dtype": "bf16", "lease_seconds": 20},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(CONFIG, tmp_path_factory.mktemp("cluster"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server):
    ch = grpc.insecure_channel(server.address)
    yield rpc.PDServeStub(ch)
    ch.close()


def _metric(server, name: str) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, val = line.rsplit(" ", 1)
            out[key] = float(val)
    return out


def _all_blocks_free(stub, timeout=20.0):
    deadline = time.time() + timeout
    while True:
        info = stub.GetClusterInfo(pb.ClusterInfoRequest())
        busy = [(w.name, w.kv_cache_usage) for w in info.workers if w.kv_cache_usage > 0 or w.inflight]
        if not busy:
            return info
        assert time.time() < deadline, f"blocks still held: {busy}"
        time.sleep(0.5)


def _assert_matches(ref, got, label):
    """Token-identical, or the first divergence is a near-tie of the reference."""
    if ref["token_ids"] == got["token_ids"]:
        return
    a, b = ref["token_ids"], got["token_ids"]
    j = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
    _, top = ref["logprobs"][j]
    assert top[0][1] - top[1][1] < 1e-4, f"{label}: diverges at step {j}: {a} vs {b}"


def test_grpc_greedy_equals_in_process_and_kv_moved_by_nixl(server, stub, engine_f32):
    before = _metric(server, "pdserve_kv_transfer_bytes")
    prompts = [engine_f32.tokenize(p, chat=c) for p, c in PROMPTS]
    ref = engine_f32.generate([(p, SamplingParams(max_tokens=24, logprobs=2)) for p in prompts])
    params = SamplingParams(max_tokens=24)
    got = [stream_one(stub, request_proto({"prompt": p, "chat": c}, params)) for p, c in PROMPTS]
    for i, (r, g) in enumerate(zip(ref, got)):
        assert g["prompt_token_ids"] == r["prompt_token_ids"]
        _assert_matches(r, g, f"prompt {i}")
        assert g["finish_reason"] == r["finish_reason"]
        assert g["usage"]["prompt_tokens"] == len(prompts[i])
        assert g["usage"]["completion_tokens"] == len(g["token_ids"])
    time.sleep(1.0)  # stats refresh every 0.5 s
    after = _metric(server, "pdserve_kv_transfer_bytes")
    moved = {k: after[k] - before.get(k, 0.0) for k in after}
    # every prompt's KV but its last token went through NIXL: float32 blocks of 30 layers
    block_bytes = 30 * 2 * 16 * 3 * 64 * 4
    expected = sum(-(-(len(p) - 1) // 16) * block_bytes for p in prompts)
    assert moved['pdserve_kv_transfer_bytes{role="decode"}'] == expected
    assert moved['pdserve_kv_transfer_bytes{role="prefill"}'] == expected
    _all_blocks_free(stub)


def test_32_concurrent_streams_mixed_lengths(stub, engine_f32):
    texts = [(p * (1 + i % 4), c) for i, (p, c) in enumerate(PROMPTS * 3)][:32]
    lengths = [8 + (i * 7) % 40 for i in range(32)]
    prompts = [engine_f32.tokenize(t, chat=c) for t, c in texts]
    # one batch: the engine's batched output equals each alone up to near ties (test_engine_exactness), which
    # _assert_matches allows anyway
    ref = engine_f32.generate([(p, SamplingParams(max_tokens=n, logprobs=2)) for p, n in zip(prompts, lengths)])

    def run(i):
        return stream_one(stub, request_proto({"prompt_token_ids": prompts[i]}, SamplingParams(max_tokens=lengths[i])))

    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        got = list(ex.map(run, range(32)))
    workers = set()
    for i, (r, g) in enumerate(zip(ref, got)):
        _assert_matches(r, g, f"stream {i}")
        assert g["finish_reason"] in ("stop", "length")
    info = _all_blocks_free(stub)
    assert info.prefill_replicas == 2 and info.decode_replicas == 2


def test_abort_and_cancel_free_blocks_on_both_sides(stub, engine_f32):
    long_prompt = {"prompt_token_ids": engine_f32.tokenize(PROMPTS[1][0] * 60)}  # ~800 tokens: slow prefill
    # Abort RPC mid-prefill: the stream ends OK, its last message says why
    it = stub.Generate(request_proto(long_prompt, SamplingParams(max_tokens=64), request_id="abort-prefill"))
    time.sleep(0.3)
    assert stub.Abort(pb.AbortRequest(request_id="abort-prefill")).found
    assert [r.finish_reason for r in it][-1] == "abort"
    # client cancellation mid-decode
    it = stub.Generate(request_proto({"prompt": "Count from one to one hundred:"},
                                     SamplingParams(max_tokens=200, ignore_eos=True), request_id="cancel-decode"))
    got = 0
    for resp in it:
        got += len(resp.token_ids)
        if got >= 5:
            it.cancel()
            break
    # client cancellation mid-prefill
    it = stub.Generate(request_proto(long_prompt, SamplingParams(max_tokens=64), request_id="cancel-prefill"))
    time.sleep(0.3)
    it.cancel()
    _all_blocks_free(stub)
    assert not stub.Abort(pb.AbortRequest(request_id="no-such-request")).found


def _code(stub, req: dict, **sp):
    msg = request_proto(req, SamplingParams())
    for k, v in sp.items():
        setattr(msg.sampling, k, v)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(msg))
    return e.value.code(), e.value.details()


def test_bad_requests_get_status_codes_and_server_keeps_serving(stub):
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub, {"prompt": ""})[0] == INVALID
    assert _code(stub, {"prompt": "   ", "chat": True})[0] == INVALID
    assert _code(stub, {"prompt_token_ids": [1] * 9000})[0] == INVALID  # beyond the 8192-token context
    assert _code(stub, {"prompt_token_ids": [10**6]})[0] == INVALID
    assert _code(stub, {"prompt": "hi"}, max_tokens=0)[0] == INVALID
    assert _code(stub, {"prompt": "hi"}, temperature=-1.0)[0] == INVALID
    assert _code(stub, {"prompt": "hi"}, top_p=0.0)[0] == INVALID
    assert _code(stub, {"prompt": "hi"}, top_p=1.5)[0] == INVALID
    code, msg = _code(stub, {"prompt_token_ids": [504] * 8000})  # fits the context, never the KV pool
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, msg
    # the router's own limits (router.max_request_id_bytes 256, max_cache_namespace_bytes 1024)
    long_id = request_proto({"prompt": "hi"}, SamplingParams(max_tokens=2), request_id="r" * 257)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(long_id))
    assert e.value.code() == INVALID and "request_id" in e.value.details()
    long_ns = request_proto({"prompt": "hi"}, SamplingParams(max_tokens=2))
    long_ns.cache_namespace = "n" * 1025
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(long_ns))
    assert e.value.code() == INVALID and "cache_namespace" in e.value.details()
    assert stub.Abort(pb.AbortRequest(request_id="never-sent")).found is False  # not an error: nothing to abort
    with pytest.raises(grpc.RpcError) as e:  # more workers than this box can place: refused, the pool kept
        stub.Scale(pb.ScaleRequest(role="decode", replicas=256), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Scale(pb.ScaleRequest(role="router", replicas=1), timeout=30)
    assert e.value.code() == INVALID
    assert stub.GetClusterInfo(pb.ClusterInfoRequest()).decode_replicas == 2
    ok = stream_one(stub, request_proto({"prompt": "The capital of France is"}, SamplingParams(max_tokens=4)))
    assert ok["finish_reason"] == "length" and len(ok["token_ids"]) == 4


def test_health_reflection_model_info(server, stub):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = grpc.insecure_channel(server.address)
    h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    names = {s.name for s in resp.list_services_response.service}
    assert {"pdserve.v1.PDServe", "grpc.health.v1.Health"} <= names
    info = stub.GetModelInfo(pb.ModelInfoRequest())
    assert info.architecture == "llama" and info.vocab_size == 49152 and info.max_model_len == 8192
    assert info.prefill_precision == "bf16" and info.decode_precision == "bf16"
    unary = stub.GenerateUnary(request_proto({"prompt": "The capital of France is"}, SamplingParams(max_tokens=3)))
    assert len(unary.token_ids) == 3 and unary.finish_reason == "length"
    ch.close()


def test_empty_pool_is_unavailable_then_recovers(stub):
    stub.Scale(pb.ScaleRequest(role="decode", replicas=0))
    deadline = time.time() + 30
    while stub.GetClusterInfo(pb.ClusterInfoRequest()).decode_replicas != 0:
        assert time.time() < deadline
        time.sleep(0.2)
    code, msg = _code(stub, {"prompt": "hello"})
    assert code == grpc.StatusCode.UNAVAILABLE, msg
    stub.Scale(pb.ScaleRequest(role="decode", replicas=2))
    ok = stream_one(stub, request_proto({"prompt": "hello"}, SamplingParams(max_tokens=2)))
    assert len(ok["token_ids"]) == 2


def test_generate_cli_through_server_prints_same_json(server, tmp_path):
    import json

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "Hi there", "chat": true}\n{"prompt_token_ids": [504, 3575, 282, 4649, 314]}\n')
    base = [sys.executable, "-m", "pdserve", "generate", "--input", str(inp), "--json", "--max-tokens", "8",
            "--dtype", "float32"]
    local = subprocess.run(base, capture_output=True, text=True, cwd=NEUTRAL_CWD, timeout=300)
    remote = subprocess.run(base + ["--server", server.address], capture_output=True, text=True, cwd=NEUTRAL_CWD,
                            timeout=300)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    lj = [json.loads(line) for line in local.stdout.splitlines()]
    rj = [json.loads(line) for line in remote.stdout.splitlines()]
    assert [(x["prompt_token_ids"], x["token_ids"], x["text"], x["finish_reason"]) for x in lj] == \
           [(x["prompt_token_ids"], x["token_ids"], x["text"], x["finish_reason"]) for x in rj]


def test_bad_config_is_rejected_with_a_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill:\n  replica: 2\n")
    r = subprocess.run([sys.executable, "-m", "pdserve", "serve", "--config", str(bad)], capture_output=True,
                       text=True, cwd=NEUTRAL_CWD, timeout=120)
    assert r.returncode == 2
    assert "prefill: unknown key(s) replica" in r.stderr
