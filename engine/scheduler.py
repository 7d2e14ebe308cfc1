"""Continuous batching with a token budget per step, chunked prefill and preemption by recompute.

One step mixes decode tokens and prefill chunks (running sequences first, in arrival order, then
waiting ones). A sequence whose KV will not fit takes blocks from the most recently admitted
running sequence, which is preempted: its blocks are freed and it recomputes later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """What one model step computes: for each sequence, `num_new` tokens starting at its
    num_computed_tokens, and `num_refresh` of its first tokens again (KV that arrived from another
    engine, recomputed here; 0 for most; one entry per sequence). Plain data: the runner needs
    nothing else."""
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_refresh: list[int] = field(default_factory=list)
    # overlap scheduling (engine/engine.py): (i, row) says that sequence i's last new token is still on the
    # device, row `row` of `token_source` (the sampled tokens of the step before, a tensor); the runner takes
    # the input there instead of the PLACEHOLDER in token_ids
    token_rows: list[tuple[int, int]] = field(default_factory=list)
    token_source: object = None

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new) + sum(self.num_refresh)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # blocks of finished sequences that a model step not yet seen complete still writes (release_blocks)
        self.deferred: list[tuple[Sequence, list[int]]] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_pending_tokens, budget)
            if n <= 0:
                i += 1
                continue
            while not self.bm.ensure(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new.append(n)
                batch.num_refresh.append(0)
                budget -= n
                i += 1
        if batch.preempted:
            return batch  # the pool is short: admit nothing new this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self._match_prefix(seq)
            n = min(seq.num_pending_tokens, budget)
            r = seq.num_refresh_tokens  # rides with the sequence's first step
            if r and batch and n + r > budget:
                break  # the next step has room for both (an empty step takes them even over budget)
            if n > 0 and not self.bm.ensure(seq.block_table, seq.num_computed_tokens + n):
                self._unmatch_prefix(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            if n > 0:
                batch.seqs.append(seq)
                batch.num_new.append(n)
                batch.num_refresh.append(r)
                budget -= n + r
        return batch

    def _match_prefix(self, seq: Sequence) -> None:
        """Reuse cached blocks of the prompt's longest cached prefix (never the whole prompt: at
        least one token must be computed so the step yields logits or the prefill has work)."""
        if seq.block_table or not seq.block_hashes:
            return
        blocks = self.bm.lookup(seq.block_hashes)
        max_blocks = (seq.compute_target - 1) // self.bm.block_size if seq.compute_target > 0 else 0
        blocks = blocks[:max_blocks]
        if blocks:
            self.bm.acquire(blocks)
            seq.block_table = list(blocks)
            seq.num_computed_tokens = len(blocks) * self.bm.block_size
            seq.num_cached_tokens = seq.num_computed_tokens

    def _unmatch_prefix(self, seq: Sequence) -> None:
        if seq.num_computed_tokens and seq.num_cached_tokens == seq.num_computed_tokens:
            self.bm.release(seq.block_table)
            seq.block_table = []
            seq.num_computed_tokens = seq.num_cached_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        # Freed at once even when a step in flight still writes them (overlap scheduling): until that step is
        # seen complete, within this same engine step, only this schedule can take them, and its writes are
        # ordered after the step's on the device. Nothing outside the stream order (a KV load) can.
        self.bm.release(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.num_refresh_tokens = 0  # everything is recomputed here now
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, keep_blocks: bool = False) -> None:
        """Take `seq` out of the queues. Its blocks are freed unless `keep_blocks` (a prefill
        worker holds them until the KV transfer reports done, then calls `release_blocks`)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if not keep_blocks:
            self.release_blocks(seq)

    def release_blocks(self, seq: Sequence) -> None:
        """Free `seq`'s blocks; while a model step issued but not yet seen complete writes them (overlap
        scheduling), only once it is (release_deferred): a free block may be reserved for a KV load that lands
        outside the device's stream order, and the late write would corrupt it."""
        if seq.block_table:
            if seq.num_steps_in_flight:
                self.deferred.append((seq, seq.block_table))
            else:
                self.bm.release(seq.block_table)
            seq.block_table = []

    def release_deferred(self) -> None:
        """Free the deferred blocks whose sequences no step in flight writes any more."""
        if self.deferred:
            keep = []
            for seq, blocks in self.deferred:
                if seq.num_steps_in_flight:
                    keep.append((seq, blocks))
                else:
                    self.bm.release(blocks)
            self.deferred = keep
