"""A simulated run's numbers, computed by `pdserve bench`'s own statistics (pdserve/tools/bench.py): the same
percentile, TPOT and goodput definitions for measured and simulated requests, so the two can be compared."""
from __future__ import annotations

import math
import random

from pdserve.planner.sim import Engine, Outcome
from pdserve.tools.bench import RequestResult, build_report, summarize

MAX_ITL_SAMPLES = 400_000  # gaps kept for the ITL percentiles (all of them for small runs)


def results(outcomes: list[Outcome], engines: list[Engine]) -> list[RequestResult]:
    out = []
    for o in outcomes:
        if not math.isfinite(o.e2e):
            out.append(RequestResult(ok=False, status="RESOURCE_EXHAUSTED", error="the request never fits the KV cache",
                                     sent=o.arrival, prompt_tokens=o.prompt_len))
            continue
        out.append(RequestResult(ok=True, sent=o.arrival, ttft=o.ttft, e2e=o.e2e, prompt_tokens=o.prompt_len,
                                 completion_tokens=o.output_len, cached_tokens=o.cached_tokens))
    return out


def itl_gaps(outcomes: list[Outcome], engines: list[Engine], seed: int = 0) -> list[float]:
    """Gaps between successive tokens of each request; a seeded sample of requests when there are too many."""
    total = sum(max(o.output_len - 1, 0) for o in outcomes if math.isfinite(o.e2e))
    pick = outcomes
    if total > MAX_ITL_SAMPLES:
        rng = random.Random(seed)
        pick = [o for o in outcomes if rng.random() < MAX_ITL_SAMPLES / total]
    gaps: list[float] = []
    for o in pick:
        if o.first_step < 0 or o.output_len < 2 or not math.isfinite(o.e2e):
            continue
        ends = engines[o.engine].step_ends
        k = o.first_step
        seg = ends[k:k + o.output_len]
        gaps.extend(b - a for a, b in zip(seg, seg[1:]))
    return gaps


def report(outcomes: list[Outcome], engines: list[Engine], ttft_slo: float | None, tpot_slo: float | None) -> dict:
    res = results(outcomes, engines)
    ok = [r for r in res if r.ok]
    start = min((o.arrival for o in outcomes), default=0.0)
    end = max((r.sent + r.e2e for r in ok), default=start)
    rep = build_report(res, end - start, goodput_ttft=ttft_slo, goodput_tpot=tpot_slo)
    rep["itl_s"] = summarize(itl_gaps(outcomes, engines))
    arrivals = sorted(o.arrival for o in outcomes)
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    rep["offered_rate"] = (len(arrivals) - 1) / span if span > 0 else math.inf
    return rep
