"""Accumulators for the accuracy harness: each compares a configuration's next-token logits with
the baseline's on the same positions, or scores a configuration against the true next tokens.

All inputs are float32 logits [tokens, vocab]; sums are kept in Python floats (float64) so a
long run does not lose the small KL values of nearly exact configurations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# A baseline top-1 that leads its runner-up by less than this (in logits = nats of log-prob) is a
# near-tie: a disagreement there says little about the configuration. The same bound as the
# FP8-wire test (tests/unit/test_disagg_inprocess.py).
NEAR_TIE = 0.25


def kl_per_token(ref_logits: torch.Tensor, got_logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || got) of each row's next-token distribution, in nats."""
    lp_ref = ref_logits.float().log_softmax(-1)
    lp_got = got_logits.float().log_softmax(-1)
    return (lp_ref.exp() * (lp_ref - lp_got)).sum(-1).clamp_min(0.0)


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.float().topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each row's target token."""
    return -logits.float().log_softmax(-1).gather(-1, targets.to(logits.device).view(-1, 1)).squeeze(-1)


@dataclass
class Agreement:
    """Teacher-forced comparison with the baseline: mean KL, top-1 agreement, and how many of the
    disagreements fall where the baseline itself was nearly undecided."""
    tokens: int = 0
    kl_sum: float = 0.0
    agree: int = 0
    near_ties: int = 0
    gaps: list = field(default_factory=list)  # baseline top-2 gap at each disagreement

    def add(self, ref_logits: torch.Tensor, got_logits: torch.Tensor) -> None:
        if ref_logits.shape != got_logits.shape:
            raise ValueError(f"logits shapes differ: {tuple(ref_logits.shape)} vs {tuple(got_logits.shape)}")
        same = ref_logits.argmax(-1) == got_logits.argmax(-1)
        gap = top2_gap(ref_logits)[~same]
        self.tokens += ref_logits.shape[0]
        self.kl_sum += kl_per_token(ref_logits, got_logits).double().sum().item()
        self.agree += int(same.sum())
        self.near_ties += int((gap < NEAR_TIE).sum())
        self.gaps += gap.tolist()

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens if self.tokens else float("nan")

    @property
    def top1(self) -> float:
        return self.agree / self.tokens if self.tokens else float("nan")

    @property
    def disagreements(self) -> int:
        return self.tokens - self.agree

    @property
    def near_tie_fraction(self) -> float | None:
        """Share of the disagreements at near-ties; None when there is none to share."""
        return self.near_ties / self.disagreements if self.disagreements else None


@dataclass
class Perplexity:
    tokens: int = 0
    nll_sum: float = 0.0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.tokens += targets.numel()
        self.nll_sum += nll(logits, targets).double().sum().item()

    @property
    def value(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")


def first_divergence(ref: list[int], got: list[int]) -> int | None:
    """Index of the first differing token (a length difference counts); None if identical."""
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return i
    return None if len(ref) == len(got) else min(len(ref), len(got))
