"""CUDA graphs of decode-only steps (every scheduled sequence adds exactly one token).

A decode step of a small batch is a few hundred short kernels whose launch costs exceed their run time;
replaying a captured graph launches them all at once. One graph per batch bucket (1, 2, 4, ... up to
max_batch), captured the first time a bucket is needed, over static input buffers. A step's batch is
padded to its bucket: padding rows have slot -1 (the KV writer skips them) and seq_len 0 (attention
reads nothing), and their logits are dropped, so requests may join and leave between any two steps.

Invariants: the graphs read only these buffers and the KV cache tensor, which must never be
reallocated; they share one memory pool, which is safe because one replays at a time and its logits are
copied out (indexed) before the next replay. A replay may be queued while the one before still runs
(overlap scheduling, engine/engine.py): every write of the buffers and every read of the logits is queued
on the same stream, so each replay sees its own inputs.
"""
from __future__ import annotations

import os

import torch

from pdserve.engine.attention import AttentionMetadata


def graphs_enabled() -> bool:
    """PDSERVE_CUDA_GRAPHS=0 turns decode graphs off (eager Triton path)."""
    return os.environ.get("PDSERVE_CUDA_GRAPHS", "1") != "0"


def batch_buckets(max_batch: int) -> list[int]:
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch]


def _copy(dst: torch.Tensor, host: torch.Tensor) -> None:
    if dst.is_cuda:  # pinned: truly asynchronous, and the host allocator keeps the buffer until it is done
        dst.copy_(host.pin_memory(), non_blocking=True)
    else:
        dst.copy_(host)


class DecodeGraphs:
    def __init__(self, model, kv_cache: torch.Tensor, backend, block_size: int, max_seq_len: int, max_batch: int):
        self.model, self.kv_cache, self.backend = model, kv_cache, backend
        self.block_size = block_size
        # the decode kernel sizes its context split from max_seq_len at capture and then splits each
        # sequence by its own length, so capturing with the largest context serves every shorter one
        self.max_seq_len = max_seq_len
        self.max_blocks = -(-max_seq_len // block_size)
        self.buckets = batch_buckets(max_batch)
        device = kv_cache.device
        top = self.buckets[-1]
        self.tokens = torch.zeros(3, top, dtype=torch.long, device=device)  # ids, positions, slots
        self.tokens[2].fill_(-1)
        self.seq_lens = torch.zeros(top, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(top, self.max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def fits(self, batch: int, table_width: int) -> bool:
        return batch <= self.buckets[-1] and table_width <= self.max_blocks

    def bucket_for(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def run(self, ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]], fill: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [len(ids), vocab] float32 of one decode step (one token per sequence); writes its KV.
        `fill` (rows, tokens on the device): input ids the host does not know yet (overlap scheduling).
        The result is a view of the graph's output: index or copy it before the next run."""
        n = len(ids)
        bucket = self.bucket_for(n)
        if bucket not in self.graphs:
            self._capture(bucket)
        pad = bucket - n
        host = torch.tensor([ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad], dtype=torch.long)
        # The buffers may still be read by the replay in flight: the copies are queued behind it on the
        # stream, and asynchronous, so the host goes on meanwhile (a blocking copy would wait for that replay)
        _copy(self.tokens[:, :bucket], host)
        if fill is not None:
            self.tokens[0].index_copy_(0, *fill)
        _copy(self.seq_lens[:bucket], torch.tensor(seq_lens + [0] * pad, dtype=torch.int32))
        width = max(len(t) for t in tables)
        # rows past a table's end keep stale entries; seq_lens stops the kernel before them
        _copy(self.block_tables[:n, :width], torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                          dtype=torch.int32))
        self.graphs[bucket].replay()
        return self.logits[bucket][:n]

    def _forward(self, bucket: int) -> torch.Tensor:
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[:bucket + 1], seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket], slot_mapping=self.tokens[2, :bucket], max_query_len=1,
            max_seq_len=self.max_seq_len, q_lens_list=None, seq_lens_list=None, block_tables_list=None,
            block_size=self.block_size)
        hidden = self.model(self.tokens[0, :bucket], self.tokens[1, :bucket], self.kv_cache, meta, self.backend)
        return self.model.logits(hidden)

    def _capture(self, bucket: int) -> None:
        # captured over pure padding (slot -1, seq_len 0): the warm-up runs write no KV
        self.tokens[:, :bucket] = torch.tensor([[0], [0], [-1]], device=self.tokens.device)
        self.seq_lens[:bucket] = 0
        stream = torch.cuda.Stream(self.kv_cache.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the kernels and settle the allocator outside the capture
                self._forward(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.logits[bucket] = self._forward(bucket)
        self.pool = graph.pool()
        self.graphs[bucket] = graph
