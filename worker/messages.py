"""The typed messages between the router and the workers (Ray carries them between processes).

    router --prefill(request_id, prompt_token_ids, cache_namespace)--> prefill worker --> PrefillResult
    router --outputs()--> decode worker, once per worker: a stream of [(request_id, DecodeDelta), ...],
           each message every request's deltas since the one before (a request's last has finished=True)
    router --generate(request_id, prompt_token_ids, SamplingParams, PrefillResult)--> decode worker
           --> True once the request's last delta is posted to outputs, False if it ended before (an abort)
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Optional


class FinishReason(str, enum.Enum):
    """Why a request ended; the value is what the API reports (OpenAI's and vLLM's words)."""
    STOP = "stop"  # an EOS or stop token, or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # an Abort call, or the client went away


@dataclass(frozen=True)
class PrefillResult:
    """A prompt's KV, computed by a prefill worker and offered to one decode worker."""
    worker: str  # the prefill worker's name
    precision: str  # the prefill pool's precision (bf16, fp8, nvfp4): the decode side refreshes sinks if it differs
    num_tokens: int  # prompt tokens whose KV the ticket carries (all but the last)
    num_cached_tokens: int  # of those, how many the prefill worker found in its prefix cache
    ticket: Optional[bytes] = None  # the kv_transfer ticket (msgpack); None when there is no KV to send


@dataclass(frozen=True)
class DecodeDelta:
    """New output of one request since the previous delta."""
    token_ids: list[int]
    text: str
    logprobs: list = field(default_factory=list)  # per token: (logprob, [(token_id, logprob), ...])
    finish_reason: Optional[FinishReason] = None  # set on the last delta only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was not computed for this request (prefix cache)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def then(self, later: "DecodeDelta") -> "DecodeDelta":
        """This delta and the `later` one as one: both's tokens, text and logprobs, the counts and end of `later`."""
        return dataclasses.replace(later, token_ids=self.token_ids + later.token_ids, text=self.text + later.text,
                                   logprobs=self.logprobs + later.logprobs)
