"""Prefill worker: computes a prompt's KV at the pool's precision (batched and chunked with every
other prompt it holds, reusing cached prefix blocks) and offers it through the engine's KV connector.

The blocks stay with the connector until the decode side reports its READ done, the lease expires, or
the request is aborted; only then does the engine release them (and keep them in the prefix cache).
"""
from __future__ import annotations

from pdserve.engine.sequence import SamplingParams
from pdserve.worker.base import WorkerBase
from pdserve.worker.messages import PrefillResult


class PrefillWorker(WorkerBase):
    role = "prefill"

    async def prefill(self, request_id: str, prompt_token_ids: list[int], cache_namespace=None) -> PrefillResult:
        """KV for all prompt tokens but the last (the decode side recomputes that one in its own precision)."""
        q = await self.aengine.add(request_id, prompt_token_ids, SamplingParams(max_tokens=1), prefill_only=True,
                                   cache_namespace=cache_namespace)
        out = await q.get()
        if out is None:
            raise RuntimeError(f"request {request_id} was aborted during prefill")
        if isinstance(out, Exception):
            raise out
        return PrefillResult(worker=self.name, precision=self.engine.precision, num_tokens=out.kv_num_tokens,
                             num_cached_tokens=out.num_cached_tokens, ticket=out.kv_handle)

    async def abort(self, request_id: str) -> bool:
        """Wherever the request is: computing, or its KV offered (the send is cancelled, the blocks freed)."""
        return await self.aengine.abort(request_id)
