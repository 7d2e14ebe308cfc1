"""A random-weight Llama forward over the kernel interfaces, for bench_gpu.py beside it (a script's sibling:
`from random_llama import ...`); it depends on nothing in engine/, so the kernels are timed without the
engine around them (benchmarks/bench_engine_gpu.py times the engine's own model). The ops come in
interchangeable sets with the same signatures: triton_ops() (kernels.fused, kernels.attention; with or
without the decode-only fusions) and TORCH_OPS (kernels.reference), which is HF LlamaForCausalLM's math
(checked to 1e-6 in float32).

Weights are fused the way a serving engine keeps them (one QKV projection, one gate-up projection), so
a decode step is one GEMV per projection. DecodeGraphs captures one CUDA graph per batch-size bucket
(forward + greedy argmax) and replays it with the batch padded to its bucket: padded rows write no KV
(slot -1) and attend over nothing (seq_len 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch

from pdserve.kernels import reference


@dataclass(frozen=True)
class LlamaShape:
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float = 500000.0
    eps: float = 1e-5
    max_positions: int = 16384

    def linear_params(self) -> int:
        """Parameters a decode step reads from every layer's projections, plus the LM head."""
        qkv = self.hidden * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        per_layer = qkv + self.num_heads * self.head_dim * self.hidden + 3 * self.hidden * self.intermediate
        return self.num_layers * per_layer + self.vocab * self.hidden

    def kv_bytes_per_token(self, element_size: int = 2) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * element_size


LLAMA3_8B = LlamaShape(num_layers=32, hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                       intermediate=14336, vocab=128256)
LLAMA32_1B = LlamaShape(num_layers=16, hidden=2048, num_heads=32, num_kv_heads=8, head_dim=64,
                        intermediate=8192, vocab=128256)


TORCH_OPS = SimpleNamespace(write_kv=reference.write_kv, paged_attention=reference.paged_attention,
                            rms_norm=reference.rms_norm, rotary=reference.rotary,
                            silu_and_mul=reference.silu_and_mul, fused_decode=False)


def triton_ops(fused_decode: bool = True) -> SimpleNamespace:
    """The Triton kernels. fused_decode: also the decode-only extras (Triton GEMV at batch 1 with the
    SiLU fused into the down projection, RoPE fused with the KV write); False keeps to the engine's
    interfaces plus library GEMMs."""
    from pdserve.kernels import attention, fused  # imported late: triton reads TRITON_INTERPRET at import

    return SimpleNamespace(write_kv=fused.write_kv, paged_attention=attention.paged_attention,
                           rms_norm=fused.rms_norm, rotary=fused.rotary, silu_and_mul=fused.silu_and_mul,
                           rotary_write_kv=fused.rotary_write_kv, linear=fused.linear,
                           silu_and_mul_linear=fused.silu_and_mul_linear, fused_decode=fused_decode)


@dataclass
class Batch:
    """One forward's flattened tokens and paged-attention metadata (the kernel interfaces' arguments)."""
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] int64, -1 for padding
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    logits_indices: torch.Tensor  # [B] rows of the flattened tokens whose next token is wanted
    max_query_len: int
    max_seq_len: int


class RandomLlama:
    def __init__(self, shape: LlamaShape, device, dtype=torch.bfloat16, seed: int = 0, ops=None):
        self.shape, self.device, self.dtype = shape, torch.device(device), dtype
        self.ops = ops if ops is not None else triton_ops()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        s = shape
        q_width = s.num_heads * s.head_dim
        qkv_width = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim

        def dense(rows, cols):  # unit-variance activations through each projection
            return (torch.randn(rows, cols, generator=gen, device=self.device, dtype=torch.float32)
                    * cols ** -0.5).to(dtype)

        def norm_weight():
            return (1 + 0.1 * torch.randn(s.hidden, generator=gen, device=self.device)).to(dtype)

        self.embed = torch.randn(s.vocab, s.hidden, generator=gen, device=self.device).to(dtype)
        self.layers = [SimpleNamespace(input_norm=norm_weight(), qkv=dense(qkv_width, s.hidden),
                                       o=dense(s.hidden, q_width), post_norm=norm_weight(),
                                       gate_up=dense(2 * s.intermediate, s.hidden),
                                       down=dense(s.hidden, s.intermediate))
                       for _ in range(s.num_layers)]
        self.final_norm = norm_weight()
        self.lm_head = dense(s.vocab, s.hidden)
        self.cos_sin = reference.rope_cos_sin_cache(s.max_positions, s.head_dim, s.rope_theta, self.device)

    def new_kv_cache(self, num_blocks: int, block_size: int) -> torch.Tensor:
        s = self.shape
        return torch.empty((num_blocks, s.num_layers, 2, block_size, s.num_kv_heads, s.head_dim),
                           dtype=self.dtype, device=self.device)

    def forward(self, batch: Batch, kv_cache: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] (fp32) at batch.logits_indices; writes this step's K/V into kv_cache."""
        s, ops = self.shape, self.ops
        linear = ops.linear if ops.fused_decode else reference.linear
        num_tokens = batch.input_ids.shape[0]
        q_width, kv_width = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        hidden = self.embed[batch.input_ids]
        residual = None
        for index, layer in enumerate(self.layers):
            if residual is None:
                x, residual = ops.rms_norm(hidden, layer.input_norm, s.eps), hidden
            else:
                x, residual = ops.rms_norm(hidden, layer.input_norm, s.eps, residual)
            qkv = linear(x, layer.qkv)
            q = qkv[:, :q_width].view(num_tokens, s.num_heads, s.head_dim)
            k = qkv[:, q_width:q_width + kv_width].view(num_tokens, s.num_kv_heads, s.head_dim)
            v = qkv[:, q_width + kv_width:].view(num_tokens, s.num_kv_heads, s.head_dim)
            kv_layer = kv_cache[:, index]
            if ops.fused_decode:
                ops.rotary_write_kv(q, k, v, batch.positions, self.cos_sin, kv_layer, batch.slot_mapping)
            else:
                ops.rotary(q, k, batch.positions, self.cos_sin)
                ops.write_kv(kv_layer, k, v, batch.slot_mapping)
            attn = ops.paged_attention(q, kv_layer, batch.query_start_loc, batch.seq_lens, batch.block_tables,
                                       s.head_dim ** -0.5, batch.max_query_len, batch.max_seq_len)
            hidden = linear(attn.view(num_tokens, q_width), layer.o)
            x, residual = ops.rms_norm(hidden, layer.post_norm, s.eps, residual)
            if ops.fused_decode:
                hidden = ops.silu_and_mul_linear(linear(x, layer.gate_up), layer.down)
            else:
                hidden = ops.silu_and_mul(x @ layer.gate_up.T) @ layer.down.T
        x, _ = ops.rms_norm(hidden, self.final_norm, s.eps, residual)
        return linear(x[batch.logits_indices], self.lm_head).float()


class SequenceSlots:
    """Contiguous block ranges per sequence: sequence i owns blocks [i * blocks_per_seq, ...)."""

    def __init__(self, num_seqs: int, max_len: int, block_size: int, device):
        self.block_size = block_size
        self.blocks_per_seq = -(-max_len // block_size)
        self.tables = (torch.arange(num_seqs * self.blocks_per_seq, dtype=torch.int32, device=device)
                       .view(num_seqs, self.blocks_per_seq))

    def slots(self, seq: int, positions: torch.Tensor) -> torch.Tensor:
        table = self.tables[seq].long()
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def decode_slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot of sequence i's token at positions[i], for every i at once."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        return self.tables[rows, positions // self.block_size].long() * self.block_size + positions % self.block_size


def prefill_batch(prompts: list[list[int]], slots: SequenceSlots, device) -> Batch:
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    slot_mapping = torch.cat([slots.slots(i, torch.arange(n, device=device)) for i, n in enumerate(lens)])
    qsl = torch.zeros(len(lens) + 1, dtype=torch.int32, device=device)
    qsl[1:] = torch.cumsum(torch.tensor(lens, device=device), 0)
    return Batch(ids, positions, slot_mapping, qsl, torch.tensor(lens, dtype=torch.int32, device=device),
                 slots.tables[: len(lens)], (qsl[1:] - 1).long(), max(lens), max(lens))


def decode_batch(tokens: torch.Tensor, positions: torch.Tensor, slots: SequenceSlots, max_seq_len: int) -> Batch:
    """One new token per sequence i at position positions[i] (0-based), so its seq_len is positions[i] + 1."""
    device, batch = tokens.device, tokens.shape[0]
    return Batch(tokens, positions, slots.decode_slots(positions),
                 torch.arange(batch + 1, dtype=torch.int32, device=device), (positions + 1).int(),
                 slots.tables[:batch], torch.arange(batch, device=device), 1, max_seq_len)


class DecodeGraphs:
    """One CUDA graph per batch bucket around forward + argmax. Capture with the largest context the
    graphs will serve (max_seq_len): the split-K decode kernel splits each sequence by its own length."""

    def __init__(self, model: RandomLlama, kv_cache: torch.Tensor, buckets: list[int], max_blocks: int,
                 max_seq_len: int):
        self.model, self.kv_cache, self.max_seq_len = model, kv_cache, max_seq_len
        self.buckets = sorted(buckets)
        device = model.device
        top = self.buckets[-1]
        self.ids = torch.zeros(top, dtype=torch.long, device=device)
        self.positions = torch.zeros(top, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(top, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((top, max_blocks), dtype=torch.int32, device=device)
        self.qsl = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.graphs, self.outputs = {}, {}
        self.pool = None
        for bucket in reversed(self.buckets):  # largest first, so smaller ones reuse its memory pool
            self._capture(bucket)

    def _batch(self, bucket: int) -> Batch:
        return Batch(self.ids[:bucket], self.positions[:bucket], self.slot_mapping[:bucket], self.qsl[:bucket + 1],
                     self.seq_lens[:bucket], self.block_tables[:bucket],
                     torch.arange(bucket, device=self.ids.device), 1, self.max_seq_len)

    def _step(self, bucket: int) -> torch.Tensor:
        return self.model.forward(self._batch(bucket), self.kv_cache).argmax(-1)

    def _capture(self, bucket: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile and autotune outside the capture
                self._step(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[bucket] = self._step(bucket)
        self.pool = graph.pool()
        self.graphs[bucket] = graph

    def bucket_for(self, batch: int) -> int:
        for bucket in self.buckets:
            if bucket >= batch:
                return bucket
        raise ValueError(f"batch {batch} exceeds the largest bucket {self.buckets[-1]}")

    def step(self, batch: Batch) -> torch.Tensor:
        """Next greedy token of each sequence of a decode batch; rows past the batch are padding."""
        n = batch.input_ids.shape[0]
        bucket = self.bucket_for(n)
        width = batch.block_tables.shape[1]
        self.ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.slot_mapping[n:bucket].fill_(-1)
        self.seq_lens[:n].copy_(batch.seq_lens)
        self.seq_lens[n:bucket].fill_(0)
        self.block_tables[:n, :width].copy_(batch.block_tables)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:n].clone()  # the next replay overwrites the static output


def greedy_generate(model: RandomLlama, prompts: list[list[int]], max_new_tokens: int, block_size: int = 16,
                    graphs: Optional[DecodeGraphs] = None, kv_cache: Optional[torch.Tensor] = None,
                    slots: Optional[SequenceSlots] = None) -> torch.Tensor:
    """[B, max_new_tokens] greedy tokens: one batched varlen prefill, then one decode step per token."""
    max_len = max(len(p) for p in prompts) + max_new_tokens
    if slots is None:
        slots = SequenceSlots(len(prompts), max_len, block_size, model.device)
    if kv_cache is None:
        kv_cache = model.new_kv_cache(slots.tables.numel(), block_size)
    tokens = model.forward(prefill_batch(prompts, slots, model.device), kv_cache).argmax(-1)
    out = [tokens]
    positions = torch.tensor([len(p) for p in prompts], device=model.device)
    for _ in range(max_new_tokens - 1):
        batch = decode_batch(tokens, positions, slots, graphs.max_seq_len if graphs else max_len)
        tokens = graphs.step(batch) if graphs else model.forward(batch, kv_cache).argmax(-1)
        out.append(tokens)
        positions = positions + 1
    return torch.stack(out, dim=1)
