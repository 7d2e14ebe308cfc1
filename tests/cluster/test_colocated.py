"""`mode: colocated`: the same router and API with no prefill pool; each decode-pool worker prefills and
decodes its requests in one engine (the baseline disaggregation is measured against, and a deployment of
its own where a GPU is too small to split)."""
from __future__ import annotations

import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from pdserve.client import request_proto, stream_one
from pdserve.engine.sequence import SamplingParams
from pdserve.proto import pb, rpc
from pdserve.testing.cluster import Server
from pdserve.testing.exactness import PROMPTS

CONFIG = {
    "mode": "colocated",
    "model": {"dtype": "float32"},
    "engine": {"kv_cache_memory_gb": 0.2, "max_num_batched_tokens": 256},
    "prefill": {"replicas": 0},
    "decode": {"replicas": 1, "num_cpus": 0.5},
}


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    s = Server(CONFIG, tmp_path_factory.mktemp("colocated"))
    ch = grpc.insecure_channel(s.address)
    yield rpc.PDServeStub(ch), s
    ch.close()
    s.stop()


def test_colocated_greedy_equals_in_process_without_a_transfer(stub, engine_f32):
    stub, server = stub
    prompts = [engine_f32.tokenize(p, chat=c) for p, c in PROMPTS]
    ref = engine_f32.generate([(p, SamplingParams(max_tokens=16)) for p in prompts])
    got = [stream_one(stub, request_proto({"prompt": p, "chat": c}, SamplingParams(max_tokens=16)))
           for p, c in PROMPTS]
    for r, g in zip(ref, got):
        assert g["token_ids"] == r["token_ids"]  # one float32 engine, the same steps: no near-ties to allow
        assert g["finish_reason"] == r["finish_reason"]
    info = stub.GetClusterInfo(pb.ClusterInfoRequest())
    assert info.prefill_replicas == 0 and info.decode_replicas == 1
    assert {w.role for w in info.workers} == {"decode"}
    time.sleep(1.0)  # stats refresh every 0.5 s
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    moved = [line for line in text.splitlines() if line.startswith("pdserve_kv_transfer_bytes{")]
    assert moved and all(float(line.rsplit(" ", 1)[1]) == 0 for line in moved), moved


def test_one_channel_message_carries_many_requests_tokens(stub, engine_f32):
    """The decode worker sends the tokens of all its requests through one channel, one message per take
    (decode_worker/outbox.py), so at 8 concurrent streams a message carries several requests' deltas; the
    streams' tokens are those of the engine run in-process."""
    stub, server = stub
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [engine_f32.tokenize(p, chat=c) for p, c in PROMPTS[:8]]
    ref = engine_f32.generate([(p, params) for p in prompts])

    def counters():
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        vals = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("pdserve_decode_channel_"))
        return float(vals["pdserve_decode_channel_messages_total"]), float(vals["pdserve_decode_channel_deltas_total"])

    m0, d0 = counters()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: stream_one(stub, request_proto({"prompt_token_ids": p}, params)), prompts))
    m1, d1 = counters()
    assert [g["token_ids"] for g in got] == [r["token_ids"] for r in ref]
    assert d1 - d0 >= 8 * 24 / 2  # a delta per token and stream, less where a request's deltas merged
    assert (d1 - d0) / (m1 - m0) >= 3, (m1 - m0, d1 - d0)


def test_a_router_paused_mid_stream_loses_no_token(stub, engine_f32):
    """The router stops (SIGSTOP) while the worker goes on decoding: once it resumes, the client gets the rest
    of the request, the tokens and text of the request read step by step."""
    stub, server = stub
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    ids = engine_f32.tokenize(PROMPTS[2][0])
    ref = engine_f32.generate([(ids, params)])[0]
    msgs = []
    for resp in stub.Generate(request_proto({"prompt_token_ids": ids}, params), timeout=120):
        msgs.append(resp)
        if len(msgs) == 1:
            os.kill(server.proc.pid, signal.SIGSTOP)  # the router's process alone; its workers keep going
            try:
                time.sleep(1.0)
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
    assert [t for m in msgs for t in m.token_ids] == ref["token_ids"]
    assert "".join(m.text for m in msgs) == ref["text"]
    assert msgs[-1].finish_reason == "length" and msgs[-1].usage.completion_tokens == 48


def test_colocated_engine_reuses_its_prefix_cache(stub, engine_f32):
    """A colocated worker prefills too, so it keeps a prefix cache as a prefill worker does: a second prompt
    sharing a long prefix computes only its new blocks, with the output of an uncached run; another
    cache_namespace shares nothing."""
    stub, _ = stub
    prefix = engine_f32.tokenize(PROMPTS[1][0] * 40)[:160]  # 10 blocks of 16
    a, b = prefix + engine_f32.tokenize("First question?"), prefix + engine_f32.tokenize("A second one.")
    ref = engine_f32.generate([(b, SamplingParams(max_tokens=8))])[0]

    def run(ids, ns=""):
        msg = request_proto({"prompt_token_ids": ids}, SamplingParams(max_tokens=8))
        msg.cache_namespace = ns
        return stream_one(stub, msg, timeout=120)

    assert run(a)["usage"]["cached_tokens"] == 0
    time.sleep(1.0)  # the router learns the worker's cached blocks from its KV events (every 0.5 s)
    got = run(b)
    assert got["usage"]["cached_tokens"] == len(prefix), got["usage"]
    assert got["token_ids"] == ref["token_ids"]
    assert run(b, ns="another-tenant")["usage"]["cached_tokens"] == 0
