"""A request's state, carried on its own object (the scheduler and runner read and advance it).

Its sampling settings (SamplingParams) are shaped like vLLM/SGLang's and validated at construction.
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from pdserve.errors import InvalidRequest

# A token the device has sampled and the host has not read yet (overlap scheduling, engine/engine.py): it holds
# the token's place in Sequence.token_ids; the model's input there is taken from the device. Never a valid id,
# so an input that was not replaced fails loudly instead of running on a wrong token.
PLACEHOLDER = -1


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: list = field(default_factory=list)  # stop strings, excluded from the output text
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # number of top alternatives to return with each token's logprob

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidRequest(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must be non-negative integers")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise InvalidRequest(f"logprobs must be in [0, 20], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InvalidRequest(f"unknown sampling field(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise InvalidRequest(str(e)) from None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Continuation:
    """A request another engine started (the router moved it here after a fault): the last `num_output_tokens`
    of its prompt are output the client already has, and `num_emitted_chars` characters of their text reached
    the client. The engine detokenizes those tokens again as output, so it holds back what the first engine
    held back (an incomplete UTF-8 character, a tail that may begin a stop string), finds a stop string that
    spans the move, and emits only text the client has not seen."""
    num_output_tokens: int
    num_emitted_chars: int


class Status(enum.Enum):
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # its prompt KV is being loaded by the KV connector
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    # compute KV up to this many tokens, then stop without sampling (prefill workers); None: generate
    prefill_only: bool = False
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache or a transfer
    # first prompt tokens whose transferred KV this engine recomputes in the sequence's first step
    # (attention sinks, decode_worker/worker.py); 0 once done
    num_refresh_tokens: int = 0
    remote_kv: object = None  # kv_connector.RemoteKV while its prompt KV is loaded from another engine
    block_table: list[int] = field(default_factory=list)
    block_hashes: list = field(default_factory=list)  # chained hashes of full prompt blocks
    finish_reason: Optional[str] = None
    arrival_time: float = field(default_factory=time.monotonic)
    num_preemptions: int = 0
    detok: object = None  # IncrementalDetokenizer, set by the engine
    stop_text_len: Optional[int] = None  # output text is cut here when a stop string matched
    logprobs: list = field(default_factory=list)
    num_hashed_blocks: int = 0  # full prompt blocks already offered to the prefix cache
    num_emitted_chars: int = 0  # output text already streamed
    # overlap scheduling (engine/engine.py). Model steps issued that write this sequence's KV and have not been
    # seen complete: its blocks are freed only once that count is 0 (Scheduler.release_blocks)
    num_steps_in_flight: int = 0
    # its last token is a PLACEHOLDER for row `in_flight_row` of the sampled tokens of the step in flight
    in_flight_row: int | None = None
    # that token is its last (max_tokens or the context reached): nothing more to schedule meanwhile
    last_token_in_flight: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def compute_target(self) -> int:
        """How many tokens need KV before this sequence is done computing for now.

        A generating sequence needs KV for every token so far (the last one yields the next token);
        a prefill-only one stops one short: the decode side recomputes the last prompt token in its
        own precision so the first output token comes from the decode path.
        """
        return self.num_tokens - 1 if self.prefill_only else self.num_tokens

    @property
    def num_pending_tokens(self) -> int:
        if self.last_token_in_flight:
            return 0
        return self.compute_target - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
