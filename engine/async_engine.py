"""An asyncio front for LLMEngine: one background task steps the engine in a worker thread
whenever it has work (model steps, or KV transfers to poll) and routes each output to its request's queue.

Invariant: the engine is touched only under `self.lock`, so the event loop can take requests
and aborts while a step runs in the thread; a queue receives None when its request is aborted and
an exception instance when the engine failed it.

A request's queue merges the outputs its consumer has not taken yet into one (OutputQueue): a consumer that
keeps up gets one output per step; one that falls behind catches up in one wake-up instead of one per step.
vLLM's AsyncLLM merges a request's pending outputs the same way. (What leaves a decode worker is merged again,
across requests, by its outbox: decode_worker/outbox.py.)
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from pdserve.engine.engine import LLMEngine, RequestOutput

log = logging.getLogger("pdserve.engine")


class OutputQueue:
    """A request's outputs, in order; with `coalesce`, outputs not yet taken are merged into one as they arrive.
    The end of a request (its finished output, None for an abort, an exception) is never merged past: it is
    the last thing taken."""

    def __init__(self, coalesce: bool = True):
        self.coalesce = coalesce
        self._items: deque = deque()
        self._ready = asyncio.Event()

    def put_nowait(self, item) -> None:
        last = self._items[-1] if self._items else None
        if (self.coalesce and isinstance(item, RequestOutput) and isinstance(last, RequestOutput)
                and not last.finished):
            self._items[-1] = merged(last, item)
        else:
            self._items.append(item)
        self._ready.set()

    async def get(self):
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items


def merged(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """`a` then `b` as one output: the new tokens, text and logprobs of both, the counts and end of `b`."""
    return dataclasses.replace(b, new_token_ids=a.new_token_ids + b.new_token_ids, new_text=a.new_text + b.new_text,
                               new_logprobs=a.new_logprobs + b.new_logprobs)


class AsyncEngine:
    # while only KV transfers are in flight the loop polls them: often while a load gates a request's first
    # token, less often while only sends are out (their end just frees blocks)
    LOAD_POLL_S = 0.0005
    SEND_POLL_S = 0.005

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.lock = asyncio.Lock()
        self.queues: dict[str, OutputQueue] = {}
        self._work = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self.steps = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def add(self, request_id: str, prompt_token_ids: list[int], params, coalesce: bool = True,
                  **kw) -> OutputQueue:
        """Queue a request (LLMEngine.add_request's arguments); its outputs arrive in the returned queue.
        `coalesce` False: one output per step even when the consumer falls behind (a chaos kill counting tokens)."""
        q = OutputQueue(coalesce)
        async with self.lock:
            seq = self.engine.add_request(request_id, prompt_token_ids, params, **kw)
            if seq.finished:  # nothing to compute (a 1-token prompt on a prefill worker)
                q.put_nowait(RequestOutput(request_id, [], "", True, seq.finish_reason, seq.num_prompt_tokens))
            else:
                self.queues[request_id] = q
        self._work.set()
        return q

    async def abort(self, request_id: str) -> bool:
        async with self.lock:
            found = self.engine.abort(request_id)
        q = self.queues.pop(request_id, None)
        if q is not None:
            q.put_nowait(None)
        self._work.set()  # a cancelled transfer is still polled to its end
        return found

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_unfinished():
                if not self.engine.has_transfers():
                    self._work.clear()
                    await self._work.wait()
                    continue
                async with self.lock:  # only transfers in flight: a cheap poll, on the loop's thread
                    outputs = self.engine.poll_transfers()
                self._route(outputs)
                await asyncio.sleep(self.LOAD_POLL_S if self.engine.loading else self.SEND_POLL_S)
                continue
            async with self.lock:
                try:
                    outputs = await loop.run_in_executor(self._executor, self.engine.step)
                except Exception as e:  # a failed step must not hang every request: fail them, keep serving
                    log.exception("engine step failed; failing the %d requests in flight", len(self.queues))
                    for rid, q in list(self.queues.items()):
                        self.engine.abort(rid)
                        q.put_nowait(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
                    self.queues.clear()
                    continue
                self.steps += 1
            self._route(outputs)
            await asyncio.sleep(0)  # let request handlers run between steps

    def _route(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self.queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out.error if out.error is not None else out)
                if out.finished:
                    del self.queues[out.request_id]

    def stats(self) -> dict:
        e = self.engine
        return {
            "num_waiting": len(e.scheduler.waiting),
            "num_running": len(e.scheduler.running),
            "kv_cache_usage": e.block_manager.usage,
            "num_free_blocks": e.block_manager.num_free,
            "num_blocks": e.block_manager.num_blocks,
            "steps": self.steps,
        }
