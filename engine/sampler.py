"""Token sampling: greedy, temperature, top-k, top-p, min-p, with per-request generators.

Each seeded request draws from its own torch.Generator, so its output depends only on its seed
and its own logits, never on what else is in the batch.
"""
from __future__ import annotations

import torch

from pdserve.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list]:
    """logits: [S, V] float32, one row per sequence. Returns token ids and per-token logprob info
    (None, or (logprob, [(token, logprob), ...]) for requests that asked for logprobs)."""
    tokens: list[int] = [0] * len(seqs)
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    if greedy:
        ids = logits[greedy].argmax(dim=-1).tolist()
        for i, t in zip(greedy, ids):
            tokens[i] = t
    for i, s in enumerate(seqs):
        if not s.params.greedy:
            probs = _filtered_probs(logits[i], s.params)
            tokens[i] = int(torch.multinomial(probs, 1, generator=s.generator).item())
    infos = [None] * len(seqs)
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)
        for row, i in enumerate(want):
            k = seqs[i].params.logprobs
            top = lp[row].topk(k) if k else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if k else []
            infos[i] = (float(lp[row, tokens[i]]), alts)
    return tokens, infos


def _filtered_probs(logits: torch.Tensor, p) -> torch.Tensor:
    x = logits / p.temperature
    if p.top_k and p.top_k > 0 and p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum - sorted_x.softmax(-1) >= p.top_p  # keep the smallest set whose mass reaches top_p
        x = x.scatter(0, idx, sorted_x.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs
