"""Owns the model weights, the KV cache tensor and the attention backend; turns a ScheduledBatch
into model inputs and returns the logits of the sequences that sample this step.

On CUDA the model runs the Triton kernels (engine/gpu_ops.py, engine/gpu_attention.py) and decode-only
steps replay CUDA graphs (engine/gpu_graphs.py; PDSERVE_CUDA_GRAPHS=0 turns them off); prefill and mixed
steps run eagerly. On CPU everything is the torch reference path.

execute() never waits for the device: its inputs go up as asynchronous copies from pinned memory (a
blocking copy first waits for everything queued, which would stall the host on the step in flight under
overlap scheduling), and a token the host does not know yet is taken from the device (ScheduledBatch.token_rows).
"""
from __future__ import annotations

import dataclasses

import torch

from pdserve.config import EngineConfig
from pdserve.engine.attention import TorchAttention, build_metadata, slot
from pdserve.engine.loader import load_arch, load_weights
from pdserve.engine.random_weights import random_weights
from pdserve.engine.model import DenseLinear, LlamaModel
from pdserve.engine.model_config import ModelArch
from pdserve.engine.scheduler import ScheduledBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_GRAPH_MAX_BATCH = 256  # largest decode batch replayed from a graph when max_num_seqs is not given


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or auto, got {dtype!r}")
    return DTYPES[dtype]


def linear_factory(precision: str, dtype: torch.dtype, device: torch.device):
    if precision == "bf16":  # unquantized, at the compute dtype (float32 on the exact CPU path)
        dense = DenseLinear
        if device.type == "cuda":
            from pdserve.engine.gpu_ops import TritonDenseLinear as dense
        return lambda w, b: dense(w.to(device, dtype), None if b is None else b.to(device, dtype))
    from pdserve.kernels.quant_linear import make_linear

    return lambda w, b: make_linear(w.to(device), None if b is None else b.to(device), precision, dtype)


class ModelRunner:
    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device, block_size: int,
                 num_blocks: int | None, kv_cache_memory_gb: float, precision: str = "bf16",
                 progress: bool = True, max_num_seqs: int | None = None,
                 fp8_attention_min_tokens: int = EngineConfig.fp8_attention_min_tokens, load_format: str = "auto"):
        self.device, self.dtype, self.block_size, self.precision = device, dtype, block_size, precision
        if load_format == "dummy":
            arch = load_arch(model_path)
            arch.tie_word_embeddings = False  # random_weights makes an LM head of its own
            weights = random_weights(arch, dtype, device)
        else:
            arch, weights = load_weights(model_path, dtype, progress=progress)
        self.arch: ModelArch = arch
        weights = {k: v.to(device) for k, v in weights.items()}
        self.model = LlamaModel(arch, weights, linear_factory(precision, dtype, device)).eval()
        del weights
        per_block = self.block_bytes
        self.num_blocks = num_blocks or max(16, int(kv_cache_memory_gb * 2**30) // per_block)
        self.kv_cache = torch.zeros(self.num_blocks, arch.num_layers, 2, block_size, arch.num_kv_heads,
                                    arch.head_dim, dtype=dtype, device=device)
        # the fp8 pool runs attention's matmuls in fp8 too, on long prompt chunks (kernels/attention_fp8.py)
        self.backend = get_backend(device, fp8_min_tokens=fp8_attention_min_tokens if precision == "fp8" else None)
        self.graphs = self._decode_graphs(max_num_seqs or DEFAULT_GRAPH_MAX_BATCH)

    def _decode_graphs(self, max_batch: int):
        from pdserve.engine.gpu_graphs import DecodeGraphs, graphs_enabled

        # quantized projections are not yet checked under capture; decode pools run bf16
        if not (self.device.type == "cuda" and getattr(self.backend, "graph_safe", False)
                and self.precision == "bf16" and graphs_enabled()):
            return None
        max_seq_len = min(self.arch.max_position_embeddings, self.num_blocks * self.block_size)
        return DecodeGraphs(self.model, self.kv_cache, self.backend, self.block_size, max_seq_len, max_batch)

    @property
    def block_bytes(self) -> int:
        a = self.arch
        return a.num_layers * 2 * self.block_size * a.num_kv_heads * a.head_dim * torch.finfo(self.dtype).bits // 8

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, sample_rows: list[int], all_logits: bool = False) -> torch.Tensor | None:
        """Compute KV for the batch; return [len(sample_rows), vocab] float32 logits of the last
        token of each sequence index in `sample_rows` (None if none samples), or with `all_logits`
        the logits of every new token (teacher-forced scoring). The logits are not ready until the device
        gets there; read them (or what is computed from them) through the device's stream order."""
        ids, pos, q_lens, seq_lens, tables = [], [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_new):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            q_lens.append(n)
            seq_lens.append(start + n)
            tables.append(seq.block_table)
        num_main = len(ids)
        fill = self._device_tokens(batch, q_lens) if batch.token_rows else None
        # A refresh is one more varlen entry over the same blocks: positions 0..r-1 attending only to
        # themselves. Every layer writes all new KV before any attention reads it, so the sequence's
        # own entry already reads the refreshed sinks in this step. Appended last, so entry i is still
        # batch.seqs[i] (sample_rows) and the refresh's logits are never returned.
        for seq, r in zip(batch.seqs, batch.num_refresh):
            if r:
                ids.extend(seq.token_ids[:r])
                pos.extend(range(r))
                q_lens.append(r)
                seq_lens.append(r)
                tables.append(seq.block_table)
        if (self.graphs is not None and not all_logits and len(q_lens) == len(batch.seqs)
                and all(n == 1 for n in q_lens) and self.graphs.fits(len(ids), max(len(t) for t in tables))):
            logits = self.graphs.run(ids, pos, [slot(t, p, self.block_size) for t, p in zip(tables, pos)],
                                     seq_lens, tables, fill)
            # indexing copies the rows out of the graph's output, which the next replay overwrites
            return logits[self._to_device(torch.tensor(sample_rows))] if sample_rows else None
        meta = build_metadata(q_lens, seq_lens, tables, self.block_size, torch.device("cpu"))
        if self.device.type != "cpu":
            meta = dataclasses.replace(meta, **{name: self._to_device(getattr(meta, name)) for name in
                                                ("query_start_loc", "seq_lens", "block_tables", "slot_mapping")})
        input_ids = self._to_device(torch.tensor(ids, dtype=torch.long))
        positions = self._to_device(torch.tensor(pos, dtype=torch.long))
        if fill is not None:
            input_ids.index_copy_(0, *fill)
        hidden = self.model(input_ids, positions, self.kv_cache, meta, self.backend)
        if all_logits:
            return self.model.logits(hidden[:num_main])
        if not sample_rows:
            return None
        last = self._to_device(torch.tensor(sample_rows))
        last_tok = meta.query_start_loc[1:].long()[last] - 1
        return self.model.logits(hidden[last_tok])

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return t
        # pinned: the copy is truly asynchronous, and the host allocator keeps the buffer until it is done
        return t.pin_memory().to(self.device, non_blocking=True)

    def _device_tokens(self, batch: ScheduledBatch, q_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices into the flat input ids, the tokens that go there) for the batch's tokens still on the
        device: each is the last new token of its sequence."""
        ends, total = [], 0
        for n in q_lens[:len(batch.seqs)]:
            total += n
            ends.append(total - 1)
        index = self._to_device(torch.tensor([ends[i] for i, _ in batch.token_rows]))
        rows = self._to_device(torch.tensor([r for _, r in batch.token_rows]))
        return index, batch.token_source.index_select(0, rows)


def get_backend(device: torch.device, fp8_min_tokens: int | None = None):
    """Triton kernels on CUDA when available; the torch reference elsewhere. fp8_min_tokens: the fp8
    pool's attention rule (uses_fp8_attention); None for every other pool."""
    if device.type == "cuda":
        try:
            from pdserve.engine.gpu_attention import TritonAttention
            return TritonAttention(fp8_min_tokens)
        except ImportError:
            pass
    return TorchAttention(fp8_min_tokens)
