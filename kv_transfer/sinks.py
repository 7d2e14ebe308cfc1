"""Attention-sink refresh: the decode side recomputes the KV of the first prompt tokens itself.

The first few tokens of a sequence draw a large share of every later token's attention (attention
sinks; StreamingLLM, arXiv:2309.17453, keeps 4), so an error in their KV reaches every output
token; KV quantization methods keep them in full precision (IntactKV, SKVQ). On the embedded model
they carry most of the FP8 wire's error (BENCHMARKS.md). Being first, they depend on nothing
else (causal attention, positions 0..W-1), so the decode engine recomputes them exactly, in its own
precision, inside the step that recomputes the last prompt token (LLMEngine.add_request's
`refresh_tokens`): no extra model step, and the wire contract is unchanged (every token still
crosses per-token-per-head e4m3; the first block is still sent whole and its sink slots are
overwritten after landing).
"""
from __future__ import annotations


def sink_refresh_tokens(configured: int, wire: str, prefill_precision: str, decode_precision: str) -> int:
    """How many first prompt tokens the decode side recomputes over transferred KV: `configured`
    where that KV differs from what the decode engine would compute (the fp8 wire, or a prefill at
    another precision), else 0: the raw wire between equal precisions delivers the decode side's
    own numbers, and recomputing them could only change bits (token-identity tests rely on that)."""
    if wire == "fp8" or prefill_precision != decode_precision:
        return configured
    return 0
