"""`pdserve bench --http URL`: the same workloads and statistics as the gRPC runner (bench.py), sent to an
OpenAI-compatible `/v1/completions` (pdserve's HTTP door, or any server that speaks it) as SSE streams.

A delta is an SSE chunk with a choice: pdserve sends one per decode delta, as its gRPC stream sends one
message, so TTFT and ITL compare one for one between the two doors. Usage comes from the stream's last
chunk (`stream_options.include_usage`). The client is httpx2 (what the `openai` package uses), one pooled
AsyncClient for all requests with a connection per request in flight.
"""
from __future__ import annotations

import json
import time


def completion_body(model: str, req, ignore_eos: bool, seed, temperature: float) -> dict:
    """The body for one bench.BenchRequest."""
    body = {"model": model, "max_tokens": req.max_tokens, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos,
            "prompt": list(req.prompt_token_ids) if req.prompt_token_ids is not None else req.prompt}
    if seed is not None:
        body["seed"] = seed
    return body


async def stream(client, url: str, body: dict, timeout: float, r):
    """One streamed completion, filling `r` (a fresh bench.RequestResult, given here so that this module does not
    import bench.py, which imports it); never raises (a failed request is a result with ok=False)."""
    r.sent = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                r.status, r.error = f"HTTP_{resp.status_code}", _message(text)
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter()
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.status, r.error = "STREAM_ERROR", chunk["error"].get("message", "")
                    return r
                if chunk.get("usage"):
                    u = chunk["usage"]
                    r.prompt_tokens, r.completion_tokens = u["prompt_tokens"], u["completion_tokens"]
                    r.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                for c in chunk.get("choices") or ():
                    if last is None:
                        r.ttft = now - r.sent
                    else:
                        r.itl.append(now - last)
                    last = now
                    if c.get("finish_reason"):
                        r.finish_reason = c["finish_reason"]
                        r.e2e = now - r.sent
        if r.finish_reason:
            r.ok = True
        else:
            r.status, r.error = "INCOMPLETE", "the stream ended without a finish_reason"
    except Exception as e:  # noqa: BLE001 - a failed request must never stop the bench
        r.status, r.error = type(e).__name__, str(e)
    return r


def _message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


def client(concurrency: int, credentials=None):
    import httpx2

    from pdserve.client import Credentials

    creds = credentials or Credentials()
    limits = httpx2.Limits(max_connections=max(1, concurrency), max_keepalive_connections=max(1, concurrency))
    return httpx2.AsyncClient(limits=limits, timeout=None, headers=creds.http_headers(), verify=creds.http_verify())


async def server_info(url: str, timeout: float, credentials=None) -> dict:
    """What the gRPC runner gets from GetModelInfo, from /v1/models: the model's id and context."""
    import httpx2

    from pdserve.errors import EXIT_SERVER, CLIError

    try:
        async with client(1, credentials) as c:
            resp = await c.get(url + "/v1/models", timeout=timeout)
    except httpx2.HTTPError as e:
        raise CLIError(f"cannot reach an OpenAI-compatible server at {url}: {e}", EXIT_SERVER) from None
    if resp.status_code != 200:
        raise CLIError(f"{url}/v1/models: HTTP {resp.status_code}: {_message(resp.text)}", EXIT_SERVER)
    try:
        m = resp.json()["data"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise CLIError(f"{url}/v1/models did not list a model", EXIT_SERVER) from None
    return {"model": m["id"], "max_model_len": m.get("max_model_len") or 0, "vocab_size": m.get("vocab_size") or 0}
