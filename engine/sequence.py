"""A request's state, carried on its own object (the scheduler and runner read and advance it)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from pdserve.engine.sampling_params import SamplingParams


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
    # (attention sinks, kv_transfer/sinks.py); 0 once done
    num_refresh_tokens: int = 0
    remote_kv: object = None  # kv_connector.RemoteKV while its prompt KV is loaded from another engine
    block_table: list[int] = field(default_factory=list)
    block_hashes: list = field(default_factory=list)  # chained hashes of full prompt blocks
    finish_reason: Optional[str] = None
    generator: Optional[torch.Generator] = None
    arrival_time: float = field(default_factory=time.monotonic)
    num_preemptions: int = 0
    detok: object = None  # IncrementalDetokenizer, set by the engine
    stop_text_len: Optional[int] = None  # output text is cut here when a stop string matched
    logprobs: list = field(default_factory=list)
    num_hashed_blocks: int = 0  # full prompt blocks already offered to the prefix cache
    num_emitted_chars: int = 0  # output text already streamed

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

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
        return self.compute_target - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
