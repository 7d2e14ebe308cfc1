"""Decode worker: pulls a request's prompt KV through kv_transfer into its own cache, admits the
request once the KV has arrived, recomputes the last prompt token in its own precision (so the
first output token comes from the decode path) and decodes in continuous batches, streaming.
Where the KV it got is not its own numbers (fp8 wire, another prefill precision), the same step also
recomputes the first prompt tokens, the attention sinks (kv_transfer/sinks.py).
"""
from __future__ import annotations

import asyncio

from pdserve.errors import NoFreeBlocks
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.worker_base import WorkerBase
from pdserve.kv_transfer.sinks import sink_refresh_tokens


class DecodeWorker(WorkerBase):
    role = "decode"

    def __init__(self, config: dict, name: str):
        super().__init__(config, name)
        self.agent = self._make_agent()
        self.pulls: dict[str, object] = {}  # request id -> PullHandle while its KV is in flight
        # aborted while (perhaps) waiting for room; bounded: aborts of requests that never came age out
        self.cancelled: dict[str, None] = {}

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict, prefill: dict):
        """Async generator of output deltas (dicts); ends after the finished one or on abort."""
        sp = SamplingParams.from_dict(params)
        kw = {}
        if prefill.get("ticket") is not None:
            kw = await self._receive(request_id, prefill["ticket"], prefill["num_tokens"])
            kt = self.config.kv_transfer
            # a prefill worker that does not say its precision: refresh (exact sink KV can only help)
            kw["refresh_tokens"] = sink_refresh_tokens(kt.refresh_sink_tokens, kt.dtype,
                                                       prefill.get("precision", "unknown"), self.engine.precision)
        q = await self.aengine.add(request_id, prompt_token_ids, sp, **kw)
        cached = prefill.get("num_cached_tokens", 0)
        while True:
            out = await q.get()
            if out is None:
                return
            if isinstance(out, Exception):
                raise out
            yield {"token_ids": out.new_token_ids, "text": out.new_text, "finished": out.finished,
                   "finish_reason": out.finish_reason, "prompt_tokens": out.num_prompt_tokens,
                   "completion_tokens": out.num_output_tokens, "cached_tokens": cached,
                   "logprobs": out.new_logprobs}
            if out.finished:
                return

    async def _receive(self, request_id: str, ticket: bytes, num_tokens: int) -> dict:
        # the pool may be full for a moment: wait for room, but only while the ticket's lease lasts
        deadline = asyncio.get_running_loop().time() + self.config.kv_transfer.lease_seconds / 2
        while (blocks := await self.aengine.call(self.engine.reserve_blocks, num_tokens)) is None:
            if asyncio.get_running_loop().time() > deadline or request_id in self.cancelled:
                self.cancelled.pop(request_id, None)
                raise NoFreeBlocks(f"decode worker {self.name} has no room for {num_tokens} tokens of KV")
            await asyncio.sleep(0.01)
        handle = None
        self.pulls[request_id] = None
        try:
            # the agent has its own lock and these blocks are not the engine's yet: no need to wait
            # for a running step (that wait would count as transfer time)
            handle = self.agent.pull(ticket, blocks)
            while True:
                state = self.agent.check(handle)
                if state == "DONE":
                    break
                if state == "ERROR":
                    raise RuntimeError(f"KV transfer for {request_id} failed: {handle.error}")
                if request_id not in self.pulls:
                    raise asyncio.CancelledError(f"request {request_id} aborted during its KV transfer")
                await asyncio.sleep(0.0005)
        except BaseException:
            self.pulls.pop(request_id, None)
            async with self.aengine.lock:
                if handle is not None and not handle.settled:
                    self.agent.abort(handle)
                if handle is None or handle.settled:
                    self.engine.free_blocks(blocks)
                # else NIXL may still write these blocks: they stay out of the pool until close()
            raise
        self.pulls.pop(request_id, None)
        return {"block_table": blocks, "num_computed_tokens": num_tokens}

    async def abort(self, request_id: str) -> bool:
        if request_id in self.pulls:
            del self.pulls[request_id]  # the pull loop sees it gone, stops the READ and frees the blocks
            return True
        found = await self.aengine.abort(request_id)
        if not found:
            self.cancelled[request_id] = None  # it may still be waiting for room; make it give up
            while len(self.cancelled) > 10000:
                del self.cancelled[next(iter(self.cancelled))]
        return found
