"""Between OpenAI's JSON (completions, chat completions, models, errors) and the router's own types: request
bodies in as admission arguments and SamplingParams, deltas out as OpenAI objects and SSE chunks, and each
error's HTTP status, derived from the gRPC status proto_map.status_of decides (so both doors agree).

Fields follow OpenAI's API, with vLLM's extensions (top_k, min_p, stop_token_ids, ignore_eos, cache_salt)
under vLLM's names. What pdserve cannot do is refused with a 400 that names the field, never ignored.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

import grpc

from pdserve.engine.loader import resolve_model_path
from pdserve.engine.sequence import SamplingParams
from pdserve.errors import InvalidRequest
from pdserve.router.dispatch import Delta

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# OpenAI's error "type" for each status
ERROR_TYPE = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
              405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
              504: "timeout_error"}
# sampling fields pdserve has no implementation of: a request that needs them is refused, not served wrong
_UNSUPPORTED_IF_SET = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": None,
                       "best_of": 1, "suffix": None, "echo": False, "tools": None, "functions": None,
                       "response_format": None, "use_beam_search": False}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": code}}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


# -- requests -------------------------------------------------------------------------------------------------

def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served!r}", "model",
                       "model_not_found")


def completion_input(body: dict) -> dict:
    """The admission arguments of /v1/completions: one prompt, as text or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        return {"prompt_token_ids": prompt}
    if isinstance(prompt, list):
        raise APIError(400, "a batch of prompts is not supported; send one prompt per request", "prompt")
    raise APIError(400, "prompt must be a string or a list of token ids", "prompt")


def chat_input(body: dict) -> dict:
    """The admission arguments of /v1/chat/completions: the messages, their content flattened to text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return {"messages": out}


def sampling(body: dict, chat: bool, max_model_len: int) -> tuple[SamplingParams, bool]:
    """SamplingParams, and whether the client asked for logprobs."""
    for name, default in _UNSUPPORTED_IF_SET.items():
        v = body.get(name)
        if v is not None and v != default and v not in ([], {}) and not (name == "response_format"
                                                                        and v == {"type": "text"}):
            raise APIError(400, f"{name} is not supported by this server", name)
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    if chat:
        # the engine ends a request at the context length, as vLLM's default (context minus prompt) does
        max_tokens = _first(body, "max_completion_tokens", "max_tokens", default=max_model_len)
        want_logprobs = _typed(body, "logprobs", bool, False)
        top = _typed(body, "top_logprobs", int, None)
        if top is not None and not want_logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (top or 0) if want_logprobs else None
    else:
        max_tokens = _first(body, "max_tokens", default=16)  # OpenAI's default for completions
        logprobs = _typed(body, "logprobs", int, None)
        want_logprobs = logprobs is not None
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    kw = {"max_tokens": max_tokens, "stop": stop, "logprobs": logprobs,
          "temperature": _number(body, "temperature", 1.0), "top_p": _number(body, "top_p", 1.0),
          "min_p": _number(body, "min_p", 0.0), "top_k": _typed(body, "top_k", int, 0),
          "seed": _typed(body, "seed", int, None),
          "stop_token_ids": body.get("stop_token_ids") or [], "ignore_eos": _typed(body, "ignore_eos", bool, False)}
    if not isinstance(kw["stop"], list) or not isinstance(kw["stop_token_ids"], list):
        raise APIError(400, "stop must be a string or a list of strings; stop_token_ids a list of integers", "stop")
    try:
        return SamplingParams(**kw), want_logprobs
    except InvalidRequest as e:
        raise APIError(400, str(e)) from None


def stream_options(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _typed(body, "stream", bool, False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    return stream, bool((opts or {}).get("include_usage")) and stream


def cache_namespace(body: dict) -> str:
    salt = body.get("cache_salt", "")  # vLLM's name for a prefix-cache namespace
    if not isinstance(salt, str):
        raise APIError(400, "cache_salt must be a string", "cache_salt")
    return salt


def _first(body: dict, *names: str, default):
    for name in names:
        if body.get(name) is not None:
            return _typed(body, name, int, default)
    return default


def _typed(body: dict, name: str, tp, default):
    v = body.get(name)
    if v is None:
        return default
    if tp is int and _is_int(v) or tp is bool and isinstance(v, bool):
        return v
    raise APIError(400, f"{name} must be {'an integer' if tp is int else 'true or false'}, got {v!r}", name)


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"{name} must be a number, got {v!r}", name)
    return float(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- responses ------------------------------------------------------------------------------------------------

class Reply:
    """One request's answer in OpenAI's shape, built up delta by delta (streamed as chunks, or whole)."""

    def __init__(self, rid: str, model: str, chat: bool, want_logprobs: bool, token_text, num_prompt: int):
        self.id, self.model, self.chat = rid, model, chat
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        self.want_logprobs = want_logprobs
        self.token_text = token_text  # token id -> its text, for logprobs
        self.text = ""
        self.num_prompt, self.num_output = num_prompt, 0
        self.logprobs: list = []
        self.finish_reason: Optional[str] = None
        self.usage: Optional[dict] = None

    def add(self, delta: Delta) -> dict:
        """Take one delta; returns its chunk's choice."""
        d = delta.decode
        self.text += d.text
        self.num_output += len(d.token_ids)
        lps = self._logprobs(d) if self.want_logprobs else None
        if lps is not None:
            self.logprobs.append(lps)
        if d.finished:
            self.finish_reason = d.finish_reason.value
            self.usage = _usage(d.prompt_tokens, d.completion_tokens, d.cached_tokens)
        return self._choice(d.text, lps)

    def end(self) -> Optional[dict]:
        """After the last delta: a stream that ended unfinished (aborted) gets finish_reason "abort" and
        the usage the router counted; returns that closing choice, or None when the request finished."""
        if self.finish_reason is not None:
            return None
        self.finish_reason = "abort"
        self.usage = _usage(self.num_prompt, self.num_output, 0)
        return self._choice("", None)

    def _choice(self, text: str, lps) -> dict:
        choice = {"index": 0, "logprobs": lps, "finish_reason": self.finish_reason}
        if self.chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        return choice

    def _logprobs(self, d) -> dict:
        if self.chat:
            return {"content": [{"token": self.token_text(t), "logprob": lp,
                                 "bytes": list(self.token_text(t).encode()),
                                 "top_logprobs": [{"token": self.token_text(a), "logprob": v,
                                                   "bytes": list(self.token_text(a).encode())} for a, v in top]}
                                for t, (lp, top) in zip(d.token_ids, d.logprobs)]}
        return {"tokens": [self.token_text(t) for t in d.token_ids],
                "token_logprobs": [lp for lp, _ in d.logprobs],
                "top_logprobs": [{self.token_text(a): v for a, v in top} for _, top in d.logprobs]}

    def chunk(self, choice: Optional[dict]) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, "choices": [] if choice is None else [choice]}

    def first_chat_chunk(self) -> dict:
        return self.chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None})

    def usage_chunk(self) -> dict:
        return {**self.chunk(None), "usage": self.usage}

    def whole(self) -> dict:
        choice: dict = {"index": 0, "finish_reason": self.finish_reason, "logprobs": self._merged_logprobs()}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": self.text}
        else:
            choice["text"] = self.text
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage}

    def _merged_logprobs(self) -> Optional[dict]:
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": [c for lp in self.logprobs for c in lp["content"]]}
        return {k: [v for lp in self.logprobs for v in lp[k]] for k in ("tokens", "token_logprobs", "top_logprobs")}


def _usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def served_model_name(config) -> str:
    """The model's id in the API and in metrics: the path it was served from, as `vllm serve PATH` names it
    (the embedded model: its file name)."""
    return config.model.path or os.path.basename(resolve_model_path(None))


def models(model: str, max_model_len: int, vocab_size: int, created: int) -> dict:
    # max_model_len as vLLM lists it; vocab_size lets `pdserve bench --http` draw valid token ids
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "pdserve",
                                        "root": model, "max_model_len": max_model_len, "vocab_size": vocab_size}]}
