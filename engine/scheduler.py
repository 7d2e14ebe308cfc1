"""Continuous batching with a token budget per step, chunked prefill and preemption by recompute.

One step mixes decode tokens and prompt chunks, in this order:
  1. every running sequence that decodes (one token each), so a prompt being chunked never stalls them;
  2. prompts: running ones partly computed, then waiting ones, oldest first, split by prompt_chunks.allot.
     While more than one competes, those that can finish within `prompt_chunk_tokens` (a quarter of the budget
     by default) go first and the oldest gets at least that many tokens; the budget left goes to them oldest
     first. A short prompt behind a long one is done in one step instead of after every chunk of the long one;
     long prompts alone are served first come, first served, as before.
A sequence whose KV will not fit takes blocks from the most recently admitted running sequence, which is
preempted: its blocks are freed and it recomputes later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.prompt_chunks import LOOKAHEAD, allot
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
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prompt_chunk_tokens: int | None = None):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # while several prompts compete for a step, those that can finish within this many tokens go first (module doc)
        self.prompt_chunk_tokens = prompt_chunk_tokens or max(1, max_num_batched_tokens // 4)
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
        decodes = [s for s in self.running if s.num_pending_tokens == 1]
        budget = self._running(batch, decodes, [1] * len(decodes), budget)
        prompts = [s for s in self.running if s.num_pending_tokens > 1]  # partly computed, admission order
        peek = []  # waiting ones that may be admitted this step, in arrival order
        matched = set()  # of them, those that took cached prefix blocks just now (ids)
        if not batch.preempted and budget > 0:
            # as many as first come, first served would fill the budget with, and, behind a long prompt, LOOKAHEAD
            # more for short ones
            room, fill, more = self.max_num_seqs - len(self.running), budget, LOOKAHEAD
            fill -= sum(s.num_pending_tokens for s in prompts)
            long = any(s.num_pending_tokens > self.prompt_chunk_tokens for s in prompts)
            for seq in self.waiting:
                if len(peek) >= room or (fill <= 0 and (more <= 0 or not long)):
                    break
                if self._match_prefix(seq):
                    matched.add(id(seq))
                peek.append(seq)
                demand = seq.num_pending_tokens + seq.num_refresh_tokens
                long = long or demand > self.prompt_chunk_tokens
                if fill > 0:
                    fill -= demand
                else:
                    more -= 1
        competing = len(prompts) + len(self.waiting) > 1
        n = allot([s.num_pending_tokens for s in prompts] + [s.num_pending_tokens + s.num_refresh_tokens for s in peek],
                  budget, self.prompt_chunk_tokens if competing else None)
        budget = self._running(batch, prompts, n[:len(prompts)], budget)
        admitting = not batch.preempted  # a step that preempts is short of KV: it admits nothing new
        for seq, k in zip(peek, n[len(prompts):]):
            want, r = seq.num_pending_tokens, seq.num_refresh_tokens  # a refresh rides with the first step, whole
            over = False
            if r and k < want + r:  # the next step has room for both; an empty step takes them even over budget
                over = not batch
                k = want + r if over else 0
            if not admitting or (k == 0 and want + r > 0) \
                    or (want > 0 and not self.bm.ensure(seq.block_table, seq.num_computed_tokens + k - r)):
                if id(seq) in matched:
                    self._unmatch_prefix(seq)
                admitting = admitting and k == 0  # blocks short: nothing after it either
                continue
            self._admit(batch, seq, k - r, r)
            admitting = not over
        return batch

    def _admit(self, batch: ScheduledBatch, seq: Sequence, n: int, r: int) -> None:
        self.waiting.remove(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)
        if n + r > 0:
            batch.seqs.append(seq)
            batch.num_new.append(n)
            batch.num_refresh.append(r)

    def _running(self, batch: ScheduledBatch, seqs: list[Sequence], wants: list[int], budget: int) -> int:
        """Schedule running sequences `seqs` in order, `wants` tokens each. A sequence whose KV does not fit takes
        the blocks of the most recently admitted running sequences (preempted; taken out of the batch if it was in
        it already), or is preempted itself when it is the most recent."""
        for seq, want in zip(seqs, wants):
            n = min(want, budget)
            if n <= 0 or seq.status != Status.RUNNING:  # nothing allotted, or preempted for an earlier sequence
                continue
            while not self.bm.ensure(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running.pop()
                budget += self._unschedule(batch, victim)
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new.append(n)
                batch.num_refresh.append(0)
                budget -= n
        return budget

    @staticmethod
    def _unschedule(batch: ScheduledBatch, seq: Sequence) -> int:
        for k, s in enumerate(batch.seqs):
            if s is seq:
                del batch.seqs[k]
                batch.num_refresh.pop(k)
                return batch.num_new.pop(k)
        return 0

    def _match_prefix(self, seq: Sequence) -> bool:
        """Reuse cached blocks of the prompt's longest cached prefix (never the whole prompt: at
        least one token must be computed so the step yields logits or the prefill has work). True if it took
        any: only those may be given back by _unmatch_prefix (a sequence's own blocks, e.g. KV that arrived from
        another engine, never are)."""
        if seq.block_table or not seq.block_hashes:
            return False
        blocks = self.bm.lookup(seq.block_hashes)
        max_blocks = (seq.compute_target - 1) // self.bm.block_size if seq.compute_target > 0 else 0
        blocks = blocks[:max_blocks]
        if blocks:
            self.bm.acquire(blocks)
            seq.block_table = list(blocks)
            seq.num_computed_tokens = len(blocks) * self.bm.block_size
            seq.num_cached_tokens = seq.num_computed_tokens
        return bool(blocks)

    def _unmatch_prefix(self, seq: Sequence) -> None:
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
