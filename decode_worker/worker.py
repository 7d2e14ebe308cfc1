"""Decode worker: admits a request with its prompt KV still on the prefill worker; the engine's KV
connector pulls it into this worker's cache, then the engine recomputes the last prompt token in its own
precision (so the first output token comes from the decode path) and decodes in continuous batches,
streaming. Where the KV it got is not its own numbers (fp8 wire, another prefill precision), the same step
also recomputes the first prompt tokens, the attention sinks (kv_transfer/sinks.py).
"""
from __future__ import annotations

from pdserve.engine.kv_connector import RemoteKV
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.sinks import sink_refresh_tokens
from pdserve.worker.base import WorkerBase
from pdserve.worker.messages import DecodeDelta, FinishReason, PrefillResult


class DecodeWorker(WorkerBase):
    role = "decode"

    def __init__(self, config: dict, name: str):
        super().__init__(config, name)
        # aborted before their generate() arrived (the router aborts both sides at once); bounded
        self.cancelled: dict[str, None] = {}

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prefill: PrefillResult):
        """Async generator of DecodeDelta; ends after the finished one or on abort."""
        if self.cancelled.pop(request_id, "live") is None:
            return
        remote = None
        if prefill.ticket is not None:
            kt = self.config.kv_transfer
            refresh = sink_refresh_tokens(kt.refresh_sink_tokens, kt.dtype, prefill.precision, self.engine.precision)
            remote = RemoteKV(prefill.ticket, prefill.num_tokens, refresh)
        q = await self.aengine.add(request_id, prompt_token_ids, params, remote_kv=remote)
        while True:
            out = await q.get()
            if out is None:
                return
            if isinstance(out, Exception):
                raise out
            yield DecodeDelta(out.new_token_ids, out.new_text, out.new_logprobs,
                              FinishReason(out.finish_reason) if out.finished else None,
                              out.num_prompt_tokens, out.num_output_tokens, prefill.num_cached_tokens)
            if out.finished:
                return

    async def abort(self, request_id: str) -> bool:
        found = await self.aengine.abort(request_id)
        if not found:
            self.cancelled[request_id] = None
            while len(self.cancelled) > 10000:
                del self.cancelled[next(iter(self.cancelled))]
        return found
