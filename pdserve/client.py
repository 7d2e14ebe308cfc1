"""A small gRPC client for the router: `pdserve generate --server`, the demo, bench and tests."""
from __future__ import annotations

import concurrent.futures
import time

import grpc


class ServerError(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code.name}: {message}")
        self.code = code


def request_proto(req: dict, params, request_id: str = ""):
    from pdserve.proto import pb

    sp = pb.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                           top_k=params.top_k, min_p=params.min_p, stop=params.stop,
                           stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos)
    if params.seed is not None:
        sp.seed = params.seed
    if params.logprobs is not None:
        sp.logprobs = params.logprobs
    msg = pb.GenerateRequest(request_id=request_id, chat=bool(req.get("chat")), sampling=sp)
    if req.get("prompt_token_ids") is not None:
        msg.prompt_token_ids.ids.extend(req["prompt_token_ids"])
    else:
        msg.prompt = req.get("prompt") or ""
    return msg


def stream_one(stub, msg, on_delta=None, timeout=None) -> dict:
    """Run one streaming Generate; returns the JSON-line result with timing."""
    t0 = time.monotonic()
    out = {"prompt_token_ids": None, "token_ids": [], "text": "", "finish_reason": None}
    times = []
    try:
        for resp in stub.Generate(msg, timeout=timeout):
            times.append(time.monotonic() - t0)
            if out["prompt_token_ids"] is None and resp.prompt_token_ids:
                out["prompt_token_ids"] = list(resp.prompt_token_ids)
            out["token_ids"].extend(resp.token_ids)
            out["text"] += resp.text
            if on_delta is not None:
                on_delta(resp)
            if resp.finish_reason:
                out["finish_reason"] = resp.finish_reason
                out["usage"] = {"prompt_tokens": resp.usage.prompt_tokens,
                                "completion_tokens": resp.usage.completion_tokens,
                                "cached_tokens": resp.usage.cached_tokens}
    except grpc.RpcError as e:
        raise ServerError(e.code(), e.details()) from None
    out["timing"] = {"ttft": times[0] if times else None, "token_times": times}
    return out


def generate_remote(server: str, reqs: list[dict], params, stream_to=None, prompt_ids=None) -> list[dict]:
    """Send every request concurrently (the cluster batches them); results in input order."""
    from pdserve.errors import EXIT_BAD_INPUT, EXIT_SERVER, CLIError
    from pdserve.proto import rpc

    channel = grpc.insecure_channel(server)
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
    except grpc.FutureTimeoutError:
        raise CLIError(f"cannot reach a pdserve router at {server}", EXIT_SERVER) from None
    stub = rpc.PDServeStub(channel)

    def run(i):
        cb = None if stream_to is None else (lambda r: stream_to(i, r.text, bool(r.finish_reason)))
        return stream_one(stub, request_proto(reqs[i], params), cb)

    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(reqs), 64))) as ex:
        futures = [ex.submit(run, i) for i in range(len(reqs))]
        results = []
        for f in futures:
            try:
                r = f.result()
            except ServerError as e:
                code = EXIT_BAD_INPUT if e.code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_SERVER
                raise CLIError(str(e), code) from None
            results.append(r)
    channel.close()
    for r in results:
        r.pop("timing", None)
    return results
