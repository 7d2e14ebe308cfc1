"""Decode worker: admits a request with its prompt KV still on the prefill worker; the engine's KV
connector pulls it into this worker's cache, then the engine recomputes the last prompt token in its own
precision (so the first output token comes from the decode path) and decodes in continuous batches,
streaming its tokens to the router through one channel for all its requests. Where the KV it got is not
its own numbers (fp8 wire, another prefill precision), the same step also recomputes the first prompt
tokens, the attention sinks (sink_refresh_tokens, below).
"""
from __future__ import annotations

import asyncio
from typing import Optional

from pdserve import tracing
from pdserve.decode_worker.outbox import Outbox
from pdserve.engine.kv_connector import RemoteKV
from pdserve.engine.sequence import Continuation, SamplingParams
from pdserve.worker.base import WorkerBase
from pdserve.worker.faults import die
from pdserve.worker.messages import DecodeDelta, FinishReason, PrefillResult


class DecodeWorker(WorkerBase):
    """Requests arrive as `generate` calls; their tokens leave through `outputs`, the router's one channel to
    this worker, as one message per take for all of them (decode_worker/outbox.py says why)."""
    role = "decode"

    def __init__(self, config: dict, name: str):
        super().__init__(config, name)
        # aborted before their generate() arrived (the router aborts both sides at once); bounded
        self.cancelled: dict[str, None] = {}
        self.outbox = Outbox()

    async def outputs(self):
        """Async generator (a Ray stream to the router) of [(request_id, DecodeDelta), ...]: every request's
        deltas since the last message, sent as soon as the last has left. Ends when a newer call takes over
        (a restarted router opens its own)."""
        epoch = self.outbox.open()
        while True:
            batch = await self.outbox.take(epoch)
            if batch is None:
                return
            yield batch

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prefill: Optional[PrefillResult], cache_namespace: Optional[str] = None,
                       trace_context: Optional[dict] = None, continuation: Optional[Continuation] = None) -> bool:
        """Run one request, posting its DecodeDeltas to the outbox; True once its finished delta is posted,
        False if it ended before that (aborted). Raises what failed the request. `prefill` None: no prefill
        pool (mode colocated), this engine computes the prompt itself, reusing its prefix cache within
        `cache_namespace`. `trace_context`: the router's span of this call (W3C headers) when the request is
        traced. `continuation`: the request moved here mid-stream; the prompt ends with its output so far."""
        if self.cancelled.pop(request_id, "live") is None:
            return False
        remote = None
        if prefill is not None and prefill.ticket is not None:
            kt = self.config.kv_transfer
            refresh = sink_refresh_tokens(kt.refresh_sink_tokens, kt.dtype, prefill.precision, self.engine.precision)
            remote = RemoteKV(prefill.ticket, prefill.num_tokens, refresh)
        with self._traced("decode", request_id, trace_context, prompt_tokens=len(prompt_token_ids),
                          remote_kv_tokens=remote.num_tokens if remote else None) as span:
            kill_at = self.faults.kill_at("kill_decode_at", request_id) if self.faults.prefixes else None
            # a chaos kill counts the tokens sent: one per output there, so that it lands on the token asked for
            q = await self.aengine.add(request_id, prompt_token_ids, params, remote_kv=remote,
                                       cache_namespace=cache_namespace if prefill is None else None,
                                       continuation=continuation, coalesce=kill_at is None)
            streamed = 0
            while True:
                out = await q.get()
                if out is None:
                    return False
                if isinstance(out, Exception):
                    raise out
                if kill_at is not None and streamed >= kill_at:
                    # chaos tests: kill -9 with exactly kill_at tokens of this request sent. Ray sends a stream's
                    # items from its own thread: give the last message a moment to leave after it is taken.
                    await self.outbox.flushed()
                    await asyncio.sleep(0.1)
                    die()
                streamed += len(out.new_token_ids)
                self.outbox.post(request_id, DecodeDelta(
                    out.new_token_ids, out.new_text, out.new_logprobs,
                    FinishReason(out.finish_reason) if out.finished else None,
                    out.num_prompt_tokens, out.num_output_tokens,
                    out.num_cached_tokens if prefill is None else prefill.num_cached_tokens))
                if out.finished:
                    tracing.annotate(span, completion_tokens=out.num_output_tokens, finish_reason=out.finish_reason)
                    return True

    async def abort(self, request_id: str) -> bool:
        found = await self.aengine.abort(request_id)
        if not found:
            self.cancelled[request_id] = None
            while len(self.cancelled) > 10000:
                del self.cancelled[next(iter(self.cancelled))]
        return found


def sink_refresh_tokens(configured: int, wire: str, prefill_precision: str, decode_precision: str) -> int:
    """Attention-sink refresh: the decode side recomputes the KV of the first prompt tokens itself.

    The first few tokens of a sequence draw a large share of every later token's attention (attention
    sinks; StreamingLLM, arXiv:2309.17453, keeps 4), so an error in their KV reaches every output
    token; KV quantization methods keep them in full precision (IntactKV, SKVQ). On the embedded model
    they carry most of the FP8 wire's error (BENCHMARKS.md). Being first, they depend on nothing
    else (causal attention, positions 0..W-1), so the decode engine recomputes them exactly, in its own
    precision, inside the step that recomputes the last prompt token (LLMEngine.add_request's
    `refresh_tokens`): no extra model step, and the wire contract is unchanged (every token still
    crosses per-token-per-head e4m3; the first block is still sent whole and its sink slots are
    overwritten after landing).

    How many first prompt tokens the decode side recomputes over transferred KV: `configured`
    where that KV differs from what the decode engine would compute (the fp8 wire, or a prefill at
    another precision), else 0: the raw wire between equal precisions delivers the decode side's
    own numbers, and recomputing them could only change bits (token-identity tests rely on that)."""
    if wire == "fp8" or prefill_precision != decode_precision:
        return configured
    return 0
