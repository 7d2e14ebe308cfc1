"""Prefill worker: computes a prompt's KV at the pool's precision (batched and chunked with every
other prompt it holds, reusing cached prefix blocks) and exports the blocks through kv_transfer.

The blocks stay leased to the reader until the decode side reports its READ done, the lease
expires, or the request is aborted; only then are they released (and kept in the prefix cache).
"""
from __future__ import annotations

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.worker_base import WorkerBase


class PrefillWorker(WorkerBase):
    role = "prefill"

    def __init__(self, config: dict, name: str):
        super().__init__(config, name)
        self.agent = self._make_agent(on_release=self._on_release)

    def _on_release(self, request_id: str, reason: str) -> None:
        # runs inside agent.poll(), which AsyncEngine calls under its lock
        self.engine.release(request_id)

    async def prefill(self, request_id: str, prompt_token_ids: list[int], cache_namespace=None) -> dict:
        """KV for all prompt tokens but the last (the decode side recomputes that one in its own
        precision). Returns the msgpack transfer ticket, or None when there is nothing to send."""
        q = await self.aengine.add(request_id, prompt_token_ids, SamplingParams(max_tokens=1), prefill_only=True,
                                   cache_namespace=cache_namespace)
        out = await q.get()
        if out is None:
            raise RuntimeError(f"request {request_id} was aborted during prefill")
        if isinstance(out, Exception):
            raise out
        return await self.aengine.call(self._export, request_id, out.num_cached_tokens)

    def _export(self, request_id: str, num_cached: int) -> dict:
        seq = self.engine.requests.get(request_id)
        if seq is None:  # aborted between the output and now
            raise RuntimeError(f"request {request_id} was aborted during prefill")
        n = seq.num_computed_tokens
        ticket = None
        if n > 0:
            nblk = self.engine.block_manager.blocks_for(n)
            try:
                ticket = self.agent.export(request_id, seq.block_table[:nblk], n)
            except Exception:
                self.engine.release(request_id)
                raise
        else:
            self.engine.release(request_id)
        return {"ticket": ticket, "num_tokens": n, "num_cached_tokens": num_cached, "worker": self.name,
                "precision": self.engine.precision}

    async def abort(self, request_id: str) -> bool:
        """Wherever the request is: exported (lease cancelled, blocks released through on_release)
        or still computing (engine abort)."""
        async with self.aengine.lock:
            if self.agent.cancel(request_id):
                self.agent.poll()  # delivers the "cancelled" release now
                return True
        return await self.aengine.abort(request_id)
