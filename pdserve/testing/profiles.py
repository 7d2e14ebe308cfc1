"""Planner profiles made by hand for tests: straight lines whose costs a test can add up in its head."""
from __future__ import annotations

from pdserve.planner import profile


def lines(prefill=((0, 0), (1000, 1000)), decode=((1, 10), (2, 20)), ctx_slope=0.0, transfer=((0, 0), (1e6, 0)),
          kv_bytes=1000.0, overheads=None, **engine) -> profile.Profile:
    """A profile of straight lines (ms): prefill(tokens), decode(batch), transfer(bytes); `engine` keys override
    the engine section (block 16, 64 sequences, a step budget no test reaches)."""
    return profile.from_dict({
        "schema": profile.SCHEMA, "source": "test",
        "prefill": {"bf16": {"tokens": [p[0] for p in prefill], "ms": [p[1] for p in prefill]}},
        "decode": {"bf16": {"batch": [d[0] for d in decode], "ms": [d[1] for d in decode], "context": 0,
                            "ms_per_context_token": ctx_slope}},
        "transfer": {"raw": {"bytes": [t[0] for t in transfer], "ms": [t[1] for t in transfer]},
                     "fp8": {"bytes": [t[0] for t in transfer], "ms": [t[1] for t in transfer]}},
        "kv_bytes_per_token": {"raw": kv_bytes, "fp8": kv_bytes / 2},
        "overheads": overheads or {},
        "engine": {"block_size": 16, "max_num_seqs": 64, "max_num_batched_tokens": 10 ** 6, **engine}})
