"""Token sampling: greedy, temperature, top-k, top-p, min-p; seeded requests reproducible.

The whole batch is sampled with a few tensor operations on the logits' device, and the chosen tokens stay
there (sample_tokens): nothing waits for the device until the caller reads them, once for the batch. A
non-greedy row draws by inverse CDF: one uniform u per row, and the token is the first whose cumulative
(filtered, unnormalized) probability in vocabulary order passes u times the total.

A seeded request's u at position i (its index in prompt + output) comes from a hash of (seed, i), computed
on the host; it does not come from a generator that advances with every draw. Its output then depends only
on its seed, its tokens and its own logits, never on the batch, a preemption, or which engine of a pool
draws it (the filters and the cumulative sums run in float64, see _filtered_weights). A request the router
moved to another decode worker mid-stream (router/dispatch.py) draws there what it would have drawn where it
started. Given the same logits, the CPU and a GPU draw the same tokens too (tests/gpu/test_sampler_gpu.py);
a model's logits themselves differ between the two.
"""
from __future__ import annotations

import torch

from pdserve.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list]:
    """logits: [S, V] float32, one row per sequence. Returns token ids and per-token logprob info
    (None, or (logprob, [(token, logprob), ...]) for requests that asked for logprobs)."""
    tokens = sample_tokens(logits, seqs)
    return tokens.tolist(), logprob_infos(logits, seqs, tokens)


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence], positions: list[int] | None = None) -> torch.Tensor:
    """The sampled token of every row, as an int64 tensor on the logits' device, without waiting for the device
    (host values travel to it as non-blocking copies). positions: each row's position for seeded draws
    (default: the sequence's current length, the index its next token takes)."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not rows:
        return tokens
    if positions is None:
        positions = [s.num_tokens for s in seqs]
    params = [seqs[i].params for i in rows]
    index = _to(torch.tensor(rows), logits.device)
    probs = _filtered_weights(logits.index_select(0, index), params)
    u = _uniforms([p.seed for p in params], [positions[i] for i in rows], logits.device)
    cum = probs.cumsum(dim=-1)
    total = cum[:, -1:]
    # strictly below the total, so the first index past the target has a positive weight (cum rises there)
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cum, target, right=True).squeeze(1)
    return tokens.index_copy(0, index, drawn)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)


def logprob_infos(logits: torch.Tensor, seqs: list[Sequence], tokens: torch.Tensor) -> list:
    infos = [None] * len(seqs)
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not want:
        return infos
    lp = torch.log_softmax(logits[want], dim=-1)
    index = torch.tensor(want, device=logits.device)
    chosen = lp.gather(1, tokens[index][:, None]).squeeze(1).tolist()
    k_max = max(seqs[i].params.logprobs for i in want)
    top = lp.topk(k_max, dim=-1) if k_max else None
    top_ids = top.indices.tolist() if k_max else None
    top_lps = top.values.tolist() if k_max else None
    for row, i in enumerate(want):
        k = seqs[i].params.logprobs
        alts = list(zip(top_ids[row][:k], top_lps[row][:k])) if k else []
        infos[i] = (chosen[row], alts)
    return infos


_U64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer: neighbouring inputs give unrelated outputs, so (seed, i + 1) and (seed + 1, i)
    do not share a stream."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def token_seed(seed: int, position: int) -> int:
    """The 64-bit draw of a seeded request's token at `position` (its index in prompt + output)."""
    return _mix64(_mix64(seed) ^ position)


def _uniforms(seeds: list[int | None], positions: list[int], device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) per row, float64: from (seed, position) for seeded rows, from torch's generator
    for the others."""
    u = torch.rand(len(seeds), dtype=torch.float64, device=device)
    if all(s is None for s in seeds):
        return u
    given = torch.tensor([0.0 if s is None else (token_seed(s, p) >> 11) * 2.0 ** -53
                          for s, p in zip(seeds, positions)], dtype=torch.float64)
    return torch.where(_to(torch.tensor([s is not None for s in seeds]), device), _to(given, device), u)


def _filtered_weights(logits: torch.Tensor, params: list) -> torch.Tensor:
    """[R, V] unnormalized probabilities after temperature, top-k, top-p and min-p (0 where filtered out), row r
    with params[r]. Each filter keeps ties with its last kept value's logit only where the per-row reference
    (_filtered_probs) does."""
    device = logits.device
    # float64 throughout: float32 exp() and sums differ in their last bits between vectorized and scalar paths
    # (CPU) and between kernels picked for different batch shapes, and a draw within that of a token boundary
    # would then depend on the batch; in float64 the chance is about 1e-11 a row
    temp = _to(torch.tensor([p.temperature for p in params], dtype=torch.float64), device)
    x = logits.double() / temp[:, None]
    vocab = x.shape[-1]
    ks = [p.top_k if p.top_k and 0 < p.top_k < vocab else 0 for p in params]
    top_ps = [p.top_p for p in params]
    if any(ks) or any(tp < 1.0 for tp in top_ps):
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        if any(ks):  # drop below the k-th largest (ties with it kept); k = 0 keeps all
            k = _to(torch.tensor([k or vocab for k in ks]), device)
            kth = sorted_x.gather(1, (k - 1)[:, None])
            x = x.masked_fill(x < kth, float("-inf"))
            sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
        if any(tp < 1.0 for tp in top_ps):  # keep the smallest prefix of the sorted order whose mass reaches top_p
            p_sorted = sorted_x.softmax(dim=-1)
            before = p_sorted.cumsum(dim=-1) - p_sorted
            top_p = _to(torch.tensor(top_ps, dtype=before.dtype), device)
            drop = before >= top_p[:, None]
            x = x.scatter(1, idx, sorted_x.masked_fill(drop, float("-inf")))
    w = torch.exp(x - x.max(dim=-1, keepdim=True).values)  # the largest kept weight is 1
    min_ps = [p.min_p for p in params]
    if any(m > 0 for m in min_ps):
        min_p = _to(torch.tensor(min_ps, dtype=w.dtype), device)
        w = w.masked_fill(w < min_p[:, None], 0.0)
    return w


def _filtered_probs(logits: torch.Tensor, p) -> torch.Tensor:
    """One row's normalized probabilities after the filters (the reference the tests hold the batch to)."""
    w = _filtered_weights(logits[None], [p])[0]
    return (w / w.sum()).to(logits.dtype)
