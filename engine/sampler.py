"""Token sampling: greedy, temperature, top-k, top-p, min-p; seeded requests reproducible.

A seeded request's token at position i (its index in prompt + output) is drawn from a generator seeded
with (seed, i), not from one generator that advances with every draw: its output then depends only on its
seed, its tokens and its own logits, never on the batch, a preemption, or which engine draws it. A request
the router moved to another decode worker mid-stream (router/dispatch.py) draws there what it would have
drawn where it started; a stateful generator would restart its stream on the new worker.
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
            g = None if s.params.seed is None else _generator_at(s, probs.device)
            tokens[i] = int(torch.multinomial(probs, 1, generator=g).item())
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


_U64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer: neighbouring inputs give unrelated outputs, so (seed, i + 1) and (seed + 1, i)
    do not share a stream."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def token_seed(seed: int, position: int) -> int:
    """The generator seed of a seeded request's token at `position` (its index in prompt + output)."""
    return _mix64(_mix64(seed) ^ position)


def _generator_at(seq: Sequence, device: torch.device) -> torch.Generator:
    g = seq.generator
    if g is None or g.device != device:  # one per sequence, on the logits' device, re-seeded per token
        g = seq.generator = torch.Generator(device=device)
    return g.manual_seed(token_seed(seq.params.seed, seq.num_tokens))


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
