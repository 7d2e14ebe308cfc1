"""Prefill worker: computes a prompt's KV at the pool's precision (batched and chunked with every
other prompt it holds, reusing cached prefix blocks) and offers it through the engine's KV connector.

The blocks stay with the connector until the decode side reports its READ done, the lease expires, or
the request is aborted; only then does the engine release them (and keep them in the prefix cache).
"""
from __future__ import annotations

import asyncio
from typing import Optional

from pdserve import tracing
from pdserve.engine.async_engine import OutputQueue
from pdserve.engine.sequence import SamplingParams
from pdserve.worker.base import WorkerBase
from pdserve.worker.faults import die
from pdserve.worker.messages import PrefillResult


class PrefillWorker(WorkerBase):
    role = "prefill"

    async def prefill(self, request_id: str, prompt_token_ids: list[int], cache_namespace=None,
                      trace_context: Optional[dict] = None) -> Optional[PrefillResult]:
        """KV for all prompt tokens but the last (the decode side recomputes that one in its own precision);
        None when the request was aborted meanwhile (the router stopped waiting for it: an error here would
        only be an unread one in Ray's log). `trace_context`: the router's span of this call (W3C headers)
        when the request is traced."""
        with self._traced("prefill", request_id, trace_context, prompt_tokens=len(prompt_token_ids)) as span:
            q = await self.aengine.add(request_id, prompt_token_ids, SamplingParams(max_tokens=1),
                                       prefill_only=True, cache_namespace=cache_namespace)
            kill_at = self.faults.kill_at("kill_prefill_at", request_id) if self.faults.prefixes else None
            if kill_at is not None:
                await self._die_once_computed(request_id, q, kill_at)
            out = await q.get()
            if out is None:
                return None
            if isinstance(out, Exception):
                raise out
            if kill_at is not None:
                die()  # chaos tests: the prompt was shorter than kill_at; die before answering
            tracing.annotate(span, cached_tokens=out.num_cached_tokens)
            ticket = out.kv_handle
            if ticket is not None and self.faults.prefixes:
                ticket = await self._inject_fault(request_id, ticket)
            return PrefillResult(worker=self.name, precision=self.engine.precision, num_tokens=out.kv_num_tokens,
                                 num_cached_tokens=out.num_cached_tokens, ticket=ticket)

    async def _inject_fault(self, request_id: str, ticket: bytes) -> bytes:
        if self.faults.hits("drop_transfer", request_id):
            return b"dropped"  # the lease still holds the blocks until the router aborts the request
        if self.faults.hits("delay_transfer", request_id):
            await asyncio.sleep(self.config.kv_transfer.lease_seconds + 1.0)
        return ticket

    async def _die_once_computed(self, request_id: str, q: OutputQueue, n: int) -> None:
        """Chaos tests (kill_prefill_at): kill -9 of this worker once n of the prompt's tokens have their KV, mid-
        prefill; returns when the request's answer (or abort) comes first."""
        while q.empty():
            seq = self.engine.requests.get(request_id)
            if seq is not None and seq.num_computed_tokens >= n:
                die()
            await asyncio.sleep(0.002)  # the engine steps in its own thread; a chunk takes far longer

    async def abort(self, request_id: str) -> bool:
        """Wherever the request is: computing, or its KV offered (the send is cancelled, the blocks freed)."""
        return await self.aengine.abort(request_id)
