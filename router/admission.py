"""Admission, shared by both front doors (gRPC `router/server.py`, HTTP `router/http_server.py`): the size
limits, the prompt turned into validated token ids (raw text, chat messages through the model's template, or
ids), and the router's own refusals (duplicate id, full). Whatever is refused here is refused the same way on
both doors, as InvalidRequest or NoFreeBlocks.

Nothing heavy runs on the router's event loop, which streams every other request's tokens: tokenizing and
templating run in a small thread pool (the Rust tokenizer releases the GIL while it works), and a prompt
of token ids is checked there too once it is long. The limits checked on the loop are cheap by construction.
"""
from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from pdserve import tracing
from pdserve.config import Config
from pdserve.engine.sequence import SamplingParams
from pdserve.engine.tokenizer import Tokenizer, prompt_ids
from pdserve.errors import InvalidRequest, NoFreeBlocks, NoReadyWorker

# two threads: one long prompt does not hold up every other admission, and the box's cores stay with the engines
_THREADS = 2
# token-id prompts up to this long are checked on the loop (well under a millisecond)
_INLINE_IDS = 4096
# a text longer than this many characters per token of context is first counted on its first
# max_model_len * _CHARS_PER_TOKEN characters only: tokens of a prefix never outnumber the whole's (but for
# a cut last word), so a multi-megabyte prompt is refused after tokenizing a bounded part of it, not all of it
_CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class Admitted:
    rid: str
    ids: list[int]
    params: SamplingParams
    namespace: Optional[str]


class Admission:
    def __init__(self, config: Config, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, dispatch):
        self.limits = config.router
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.dispatch = dispatch
        self.admitting = 0  # requests between arrival and dispatch, counted toward max_queued_requests
        self.closed: Optional[str] = None  # why no request is admitted any more (router/drain.py), or None
        self._pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="admission")

    async def admit(self, params: SamplingParams, *, prompt: Optional[str] = None,
                    prompt_token_ids: Optional[list[int]] = None, messages: Optional[list[dict]] = None,
                    chat: bool = False, request_id: str = "", namespace: str = "") -> Admitted:
        """One of prompt (with `chat`: as the user message), prompt_token_ids or messages (a chat)."""
        admitting = self._admit(params, prompt, prompt_token_ids, messages, chat, request_id, namespace)
        trace = tracing.current()
        if trace is None:
            return await admitting
        try:
            with tracing.span(trace, "admit") as span:
                admitted = await admitting
                tracing.annotate(span, prompt_tokens=len(admitted.ids))
        except asyncio.CancelledError:  # the client went away: its request ends here
            trace.end("cancelled")
            raise
        tracing.annotate(trace.root, request_id=admitted.rid, prompt_tokens=len(admitted.ids),
                         max_tokens=params.max_tokens)
        return admitted

    async def _admit(self, params: SamplingParams, prompt, prompt_token_ids, messages, chat, request_id,
                     namespace) -> Admitted:
        _check_size("request_id", request_id, self.limits.max_request_id_bytes)
        _check_size("cache_namespace", namespace, self.limits.max_cache_namespace_bytes)
        if params.max_tokens > self.max_model_len:  # could never be met: say so, as vLLM does (a 400)
            raise InvalidRequest(f"max_tokens is {params.max_tokens}; the model's context is {self.max_model_len} "
                                 "tokens, prompt included")
        self._check_room()
        self.admitting += 1
        try:
            ids = await self._prompt_ids(prompt, prompt_token_ids, messages, chat)
        finally:
            self.admitting -= 1
        # checked again after the wait, with no await between here and dispatch.run registering the id
        rid = request_id or uuid.uuid4().hex
        if rid in self.dispatch.active:
            raise InvalidRequest(f"request id {rid!r} is already in use")
        self._check_room()
        return Admitted(rid, ids, params, namespace or None)

    def _check_room(self) -> None:
        if self.closed is not None:
            raise NoReadyWorker(self.closed)
        held = len(self.dispatch.active) + self.admitting
        if held >= self.limits.max_queued_requests:
            raise NoFreeBlocks(f"the router holds {held} requests, its limit")

    async def _prompt_ids(self, prompt, prompt_token_ids, messages, chat) -> list[int]:
        if messages is not None:
            return await self.off_loop(self._chat_ids, messages)
        if prompt_token_ids is not None:
            if len(prompt_token_ids) >= self.max_model_len:  # refused before any per-token work
                raise InvalidRequest(f"prompt has {len(prompt_token_ids)} tokens; the model's context is "
                                     f"{self.max_model_len} and at least one token must be generated")
            if len(prompt_token_ids) <= _INLINE_IDS:
                return self._ids(None, prompt_token_ids, False)
        return await self.off_loop(self._ids, prompt, prompt_token_ids, chat)

    async def off_loop(self, fn, *args):
        """fn(*args) in admission's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _ids(self, prompt, prompt_token_ids, chat) -> list[int]:
        if isinstance(prompt, str):
            self._refuse_if_surely_too_long(prompt)
        return prompt_ids(self.tokenizer, self.vocab_size, self.max_model_len, prompt=prompt,
                          prompt_token_ids=prompt_token_ids, chat=chat)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        self._refuse_if_surely_too_long("".join(m["content"] for m in messages))  # the template only adds
        try:
            ids = self.tokenizer.apply_chat_template(messages)
        except Exception as e:  # a template's own error (jinja2's raise_exception) is about the messages
            raise InvalidRequest(f"the chat template rejected the messages: {e}") from None
        return self._ids(None, ids, False)

    def _refuse_if_surely_too_long(self, text: str) -> None:
        head = self.max_model_len * _CHARS_PER_TOKEN
        if len(text) <= head:
            return
        n = len(self.tokenizer.encode(text[:head])) - 2  # less the cut word and a special token
        if n >= self.max_model_len:
            raise InvalidRequest(f"prompt has more than {n} tokens; the model's context is {self.max_model_len} "
                                 "and at least one token must be generated")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _check_size(field: str, value: str, limit: int) -> None:
    # characters never outnumber UTF-8 bytes, so a long string is refused before it is encoded
    if len(value) > limit or len(value.encode("utf-8", "surrogatepass")) > limit:
        raise InvalidRequest(f"{field} is longer than {limit} bytes")
