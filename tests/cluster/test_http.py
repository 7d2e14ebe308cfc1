"""The OpenAI-compatible HTTP front door of a real `pdserve serve` (Ray, a prefill and a decode worker, the
embedded model), driven by the official `openai` client; and the admission rules both doors share."""
from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import httpx2 as httpx
import openai
import pytest

from pdserve.client import request_proto, stream_one
from pdserve.engine.sequence import SamplingParams
from pdserve.proto import pb, rpc
from pdserve.testing.cluster import NEUTRAL_CWD, Server
from pdserve.testing.exactness import PROMPTS

CONFIG = {
    "model": {"dtype": "float32"},
    "engine": {"kv_cache_memory_gb": 0.2, "max_num_batched_tokens": 256},
    "prefill": {"replicas": 1, "num_cpus": 0.5},
    "decode": {"replicas": 1, "num_cpus": 0.5},
    "router": {"max_request_id_bytes": 64, "max_cache_namespace_bytes": 128},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from pdserve.engine.loader import default_model_path

    # the model as `pdserve serve MODEL` takes it, like `vllm serve MODEL`
    s = Server(CONFIG, tmp_path_factory.mktemp("http"), args=[default_model_path()])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def stub(server):
    ch = grpc.insecure_channel(server.address)
    yield rpc.PDServeStub(ch)
    ch.close()


def _all_blocks_free(stub, timeout=20.0):
    deadline = time.time() + timeout
    while True:
        info = stub.GetClusterInfo(pb.ClusterInfoRequest())
        busy = [(w.name, w.kv_cache_usage, w.inflight) for w in info.workers if w.kv_cache_usage > 0 or w.inflight]
        if not busy:
            return
        assert time.time() < deadline, f"blocks still held: {busy}"
        time.sleep(0.3)


def _get(server, path: str):
    try:
        with urllib.request.urlopen(server.http_url + path, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_models_health_ready(server, client, model):
    models = client.models.list().data
    from pdserve.engine.loader import default_model_path

    assert [m.id for m in models] == [default_model_path()]  # the MODEL argument, as vLLM names it
    assert _get(server, "/health")[0] == 200
    status, body = _get(server, "/ready")
    assert status == 200 and json.loads(body) == {"status": "ready"}


def test_greedy_chat_text_equals_generate_chat(server, client, model, tmp_path):
    prompts = [p for p, _ in PROMPTS]  # all 12, as chat
    inp = tmp_path / "chat.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cli = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--input", str(inp), "--chat", "--json",
                          "--max-tokens", "24", "--dtype", "float32"],
                         capture_output=True, text=True, cwd=NEUTRAL_CWD, timeout=300)
    assert cli.returncode == 0, cli.stderr
    ref = [json.loads(line) for line in cli.stdout.splitlines()]

    def chat(p):
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                              max_tokens=24, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(12) as ex:
        got = list(ex.map(chat, prompts))
    for i, (r, g) in enumerate(zip(ref, got)):
        c = g.choices[0]
        assert c.message.role == "assistant" and c.message.content == r["text"], f"prompt {i}"
        assert c.finish_reason == r["finish_reason"]
        assert g.usage.prompt_tokens == len(r["prompt_token_ids"])
        assert g.usage.completion_tokens == len(r["token_ids"])
        assert g.usage.total_tokens == g.usage.prompt_tokens + g.usage.completion_tokens


def test_completions_streamed_and_whole_agree_with_usage(client, model):
    prompt = "The three primary colors are"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens == 5
    assert whole.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # token ids in, the same continuation out
    ids = client.completions.create(model=model, prompt=[504, 1831, 3135, 3688, 359], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 5 and ids.usage.completion_tokens <= 4


def test_chat_stream_chunks_logprobs_and_cached_tokens(client, model):
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 8},
                {"role": "user", "content": [{"type": "text", "text": "Name a red fruit."}]}]
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2)
    assert whole.choices[0].message.content == streamed
    # the system prompt's full blocks were cached by the first request (one prefill worker)
    assert whole.usage.prompt_tokens_details.cached_tokens >= 16
    lps = whole.choices[0].logprobs.content
    assert len(lps) == whole.usage.completion_tokens
    assert "".join(t.token for t in lps) == streamed
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in lps)
    c = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True})
    assert len(c.choices[0].logprobs.tokens) == 3 and len(c.choices[0].logprobs.top_logprobs[0]) == 1


BAD = [  # (what, kwargs of chat.completions.create or a raw body, status, words in the message)
    ("n=2", {"n": 2}, 400, "n=1"),
    ("unknown model", {"model": "gpt-4"}, 404, "does not exist"),
    ("negative temperature", {"temperature": -1}, 400, "temperature"),
    ("max_tokens 0", {"max_tokens": 0}, 400, "max_tokens"),
    ("top_p 1.5", {"top_p": 1.5}, 400, "top_p"),
    ("top_logprobs 50", {"logprobs": True, "top_logprobs": 50}, 400, "logprobs"),
    ("penalty", {"presence_penalty": 0.5}, 400, "presence_penalty"),
    ("no messages", {"messages": []}, 400, "messages"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "text parts"),
    ("over the context", {"messages": [{"role": "user", "content": "hi " * 9000}]}, 400, "context"),
    ("long cache_salt", {"extra_body": {"cache_salt": "s" * 129}}, 400, "cache_namespace"),
    ("long request id", {"extra_headers": {"X-Request-Id": "r" * 65}}, 400, "request_id"),
    ("seed a string", {"extra_body": {"seed": "7"}}, 400, "seed"),
]


@pytest.mark.parametrize("what,kw,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests_get_openai_errors(client, model, what, kw, status, words):
    args = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == status, e.value.message
    err = e.value.body
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err


def test_bad_http_bodies_and_routes(server, model):
    url = server.http_url
    with httpx.Client(timeout=30) as h:
        r = h.post(url + "/v1/completions", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = h.post(url + "/v1/completions", json=["a list"])
        assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
        r = h.post(url + "/v1/completions", json={"model": model, "prompt": ["a", "b"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = h.post(url + "/v1/completions", json={"model": model, "prompt": [10**7]})
        assert r.status_code == 400 and "prompt_token_ids" in r.json()["error"]["message"]
        r = h.post(url + "/v1/completions", json={"model": model, "prompt": "hi", "stop": 5})
        assert r.status_code == 400
        r = h.get(url + "/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = h.get(url + "/v1/completions")
        assert r.status_code == 405 and "error" in r.json()
        r = h.post(url + "/v1/completions", json={"model": model, "prompt": "still serving", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_cli_version_http_port_and_a_missing_model():
    from pdserve.cli import build_parser
    from pdserve.commands import load_serve_config

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True,
                              cwd=NEUTRAL_CWD, timeout=120)

    v = run("--version")
    assert v.returncode == 0 and v.stdout.startswith("pdserve 0.")
    bad = run("serve", "/no/such/model.gguf", "--port", "0", "--http-port", "0")
    assert bad.returncode == 3 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    cfg = load_serve_config(build_parser().parse_args(["serve", "/m", "--http-port", "8123"]))
    assert cfg.model.path == "/m" and cfg.router.http_port == 8123
    assert load_serve_config(build_parser().parse_args(["serve", "--http-port", "-1"])).router.http_port is None


def test_grpc_limits_on_request_id_and_cache_namespace(stub):
    for field, value in (("request_id", "r" * 65), ("cache_namespace", "n" * 129), ("cache_namespace", "é" * 65)):
        msg = request_proto({"prompt": "hi"}, SamplingParams(max_tokens=2))
        setattr(msg, field, value)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(msg))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
    msg = request_proto({"prompt": "hi"}, SamplingParams(max_tokens=2), request_id="r" * 64)
    msg.cache_namespace = "n" * 128
    assert stream_one(stub, msg)["usage"]["completion_tokens"] == 2


def test_client_disconnect_aborts_and_frees_blocks(server, stub, model):
    long_prompt = "The history of the city of London begins with the Roman settlement. " * 40
    body = {"model": model, "prompt": long_prompt, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=60) as h:
        # mid-decode, streamed: read a few events, then hang up
        with h.stream("POST", server.http_url + "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            for n, _ in enumerate(r.iter_lines()):
                if n >= 6:
                    break
        _all_blocks_free(stub)
        # not streamed: the client times out (disconnects) while the request runs
        with pytest.raises(httpx.TimeoutException):
            h.post(server.http_url + "/v1/completions", json=body, timeout=1.5)
        _all_blocks_free(stub)


def test_a_4mb_prompt_does_not_stall_other_streams(server, stub):
    """Tokenizing a huge prompt (refused as too long) runs off the router's event loop."""
    gaps = []
    done = threading.Event()

    def stream():
        msg = request_proto({"prompt": "Count from one to one hundred:"},
                            SamplingParams(max_tokens=120, ignore_eos=True))
        last = None
        for resp in stub.Generate(msg):
            now = time.monotonic()
            if last is not None and resp.token_ids:
                gaps.append((now, now - last))
            last = now
        done.set()

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(1.0)  # the stream is decoding
    huge = "word " * (800 * 1024)  # 4 MB
    # encoded before the clock starts: this process's own GIL would otherwise delay the stream's thread
    body = json.dumps({"prompt": huge, "max_tokens": 2}).encode()
    msg = request_proto({"prompt": huge}, SamplingParams(max_tokens=2))
    t0 = time.monotonic()
    with httpx.Client(timeout=60) as h:
        r = h.post(server.http_url + "/v1/completions", content=body)
    th = time.monotonic()
    with grpc.insecure_channel(server.address) as ch, pytest.raises(grpc.RpcError) as e:  # another client
        list(rpc.PDServeStub(ch).Generate(msg))
    t1 = time.monotonic()
    t.join(60)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    during = [g for at, g in gaps if t0 <= at <= t1 + 0.1]
    before = sorted(g for at, g in gaps if at < t0)
    assert during, "the stream ended before the huge prompts were sent"
    # an inter-token gap while the huge prompts were tokenized is at most 100 ms above the stream's usual one
    assert max(during) < before[len(before) // 2] + 0.1, (max(during), before)


VLLM_HISTOGRAMS = {"time_to_first_token_seconds": "router", "inter_token_latency_seconds": "router",
                   "e2e_request_latency_seconds": "router", "request_queue_time_seconds": "router",
                   "request_prefill_time_seconds": "prefill", "request_decode_time_seconds": "decode"}


def test_metrics_have_vllm_series_with_roles(server, client, model):
    """The same families on both ports, after at least one request of a few tokens."""
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(2):  # the second finds the first's prompt blocks cached
        client.completions.create(model=model, prompt="The capital of France is " * 8, max_tokens=4,
                                  temperature=0, extra_body={"ignore_eos": True})

    for port_path in (f"{server.http_url}/metrics", f"http://127.0.0.1:{server.metrics_port}/metrics"):
        with urllib.request.urlopen(port_path, timeout=10) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}

        def samples(name, suffix=""):
            return [s for s in families[name].samples if s.name == name + suffix]

        for name, role in VLLM_HISTOGRAMS.items():
            (count,) = [s for s in samples("vllm:" + name, "_count") if s.labels["role"] == role]
            assert count.labels["model_name"] == model and count.value > 0, name
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
            assert {s.labels["role"] for s in samples("vllm:" + name)} == {"prefill", "decode"}, name
        for name in ("prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens"):
            assert samples("vllm:" + name, "_total")[0].value > 0, name
        assert {s.labels["finished_reason"] for s in samples("vllm:request_success", "_total")} >= {"length"}
        assert {s.labels["role"]: s.value > 0 for s in samples("pdserve_kv_transfer_bytes")} == \
               {"prefill": True, "decode": True}
        # the bf16 wire stages nothing on the prefill side: only the decode side's READs take time
        assert {s.labels["role"]: s.value > 0 for s in samples("pdserve_kv_transfer_seconds")}["decode"]
        assert samples("pdserve_time_to_first_token_seconds", "_count")[0].value > 0
