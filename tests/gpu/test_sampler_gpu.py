"""engine/sampler.py on CUDA logits: the batch is sampled without a host synchronization; a seeded row draws
the same token alone or in any batch (its uniform comes from (seed, position), not a device RNG), and the
CPU's token for the same logits."""
from __future__ import annotations

import pytest
import torch

from pdserve.engine.sampler import sample, sample_tokens
from pdserve.engine.sequence import SamplingParams, Sequence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
VOCAB = 128_256  # Llama-3's


def _seqs(params: list[SamplingParams]) -> list[Sequence]:
    return [Sequence(f"r{i}", list(range(5 + i)), 5 + i, p) for i, p in enumerate(params)]


def _mixed(n: int) -> list[SamplingParams]:
    kinds = [SamplingParams(), SamplingParams(temperature=0.8, seed=11), SamplingParams(temperature=1.0, top_p=0.9, seed=12),
             SamplingParams(temperature=0.7, top_k=40, seed=13), SamplingParams(temperature=1.1, min_p=0.05, seed=14),
             SamplingParams(temperature=0.9, top_p=0.95, top_k=100, min_p=0.01, seed=15)]
    return [kinds[i % len(kinds)] for i in range(n)]


def test_a_batch_is_sampled_without_waiting_for_the_device():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(32, VOCAB, generator=gen) * 4).cuda()
    seqs = _seqs(_mixed(32))
    sample_tokens(logits, seqs)  # warm-up: first-use allocations and kernel loads
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample_tokens(logits, seqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.device.type == "cuda" and tokens.shape == (32,)


def test_a_seeded_row_draws_the_same_token_alone_or_in_any_batch():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, VOCAB, generator=gen) * 3).cuda()
    seqs = _seqs(_mixed(64))
    batched = sample_tokens(logits, seqs).tolist()
    alone = [sample_tokens(logits[i:i + 1], seqs[i:i + 1]).item() for i in range(64)]
    reversed_ = sample_tokens(logits.flip(0), seqs[::-1]).tolist()[::-1]
    seeded = [i for i, s in enumerate(seqs) if s.params.seed is not None or s.params.greedy]
    assert [batched[i] for i in seeded] == [alone[i] for i in seeded] == [reversed_[i] for i in seeded]


def test_seeded_rows_draw_the_cpu_tokens():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(256, VOCAB, generator=gen) * 3
    seqs = _seqs(_mixed(256))
    cpu, _ = sample(logits, seqs)
    gpu, _ = sample(logits.cuda(), seqs)
    rows = [i for i, s in enumerate(seqs) if s.params.seed is not None or s.params.greedy]
    assert [gpu[i] for i in rows] == [cpu[i] for i in rows]


def test_filters_hold_on_the_gpu():
    logits = torch.full((4, VOCAB), -10.0)
    logits[:, :6] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=1.0, min_p=0.3), SamplingParams(temperature=1.0)]
    seen = [set() for _ in params]
    for pos in range(300):
        toks = sample_tokens(logits.cuda(), _seqs(params), positions=[pos] * 4).tolist()
        for s, t in zip(seen, toks):
            s.add(t)
    assert seen[0] == {0, 1} and seen[1] == {0} and seen[2] == {0, 1}  # p(0) = 0.63 > top_p alone
    assert {0, 1, 2, 3} <= seen[3]
