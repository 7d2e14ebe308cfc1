"""What `pdserve plan` decides: for a GPU count, every P:D split (and colocated engines on all of them), the
highest arrival rate whose SLO attainment stays at or above a target (DistServe's goodput), and the best split.

Goodput at a rate is (requests meeting both the TTFT and the TPOT target) / (offered requests) x the rate;
the max goodput of a deployment is the highest rate at which that fraction is at least `attainment` (0.9 by
default), found by doubling the rate, then bisecting.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pdserve.planner import stats
from pdserve.planner.profile import Profile
from pdserve.planner.sim import ClusterSpec, simulate
from pdserve.planner.workload import Workload


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9


def parse_slo(text: str) -> SLO:
    """'ttft=2,tpot=0.05[,attainment=0.9]' in seconds ('ms' suffix allowed: ttft=200ms)."""
    vals = {}
    for part in filter(None, text.split(",")):
        key, _, v = part.partition("=")
        key = key.strip()
        if key not in ("ttft", "tpot", "attainment") or not v:
            raise ValueError(f"--slo: expected ttft=SECONDS,tpot=SECONDS[,attainment=FRACTION], got {text!r}")
        v = v.strip()
        scale = 1e-3 if v.endswith("ms") else 1.0
        try:
            vals[key] = float(v.removesuffix("ms").removesuffix("s")) * scale
        except ValueError:
            raise ValueError(f"--slo: {key}={v} is not a number") from None
        if not vals[key] > 0:
            raise ValueError(f"--slo: {key} must be > 0")
    if "ttft" not in vals or "tpot" not in vals:
        raise ValueError("--slo needs both ttft=... and tpot=...")
    if vals.get("attainment", 0.9) > 1:
        raise ValueError("--slo: attainment is a fraction in (0, 1]")
    return SLO(vals["ttft"], vals["tpot"], vals.get("attainment", 0.9))


WARMUP = 0.2  # of the arrival span: requests that found a cluster still filling up are not counted
MIN_REQUESTS, MAX_REQUESTS = 200, 400_000


def num_requests(rate: float, n: int | None, duration: float) -> int:
    """`n`, or as many as arrive in `duration` seconds. A sustained rate needs arrivals over many request
    lifetimes: a burst of a few thousand requests fits in the batches of a large cluster, whatever its rate."""
    return n if n else int(min(MAX_REQUESTS, max(MIN_REQUESTS, rate * duration)))


def run_at(profile: Profile, spec: ClusterSpec, wl: Workload, rate: float, n: int | None, seed: int, slo: SLO,
           duration: float = 30.0, warmup: float = WARMUP) -> dict:
    """One simulation at `rate`; SLO statistics over the requests after the first `warmup` of the arrival span."""
    reqs = wl.generate(rate, num_requests(rate, n, duration), seed)
    outcomes, engines = simulate(profile, spec, reqs)
    t0 = reqs[0].arrival + warmup * (reqs[-1].arrival - reqs[0].arrival)
    rep = stats.report([o for o in outcomes if o.arrival >= t0], engines, slo.ttft_s, slo.tpot_s)
    rep["rate"] = rate
    rep["attainment"] = rep["goodput"]["fraction"]
    rep["goodput_at_rate"] = rate * rep["attainment"]
    return rep


def max_goodput(profile: Profile, spec: ClusterSpec, wl: Workload, slo: SLO, n: int | None, seed: int,
                start: float = 1.0, iters: int = 7, duration: float = 30.0) -> tuple[float, dict | None]:
    """(the highest rate found with attainment >= slo.attainment, its report); (0, None) when not even a
    trickle meets the SLOs."""
    lo, lo_rep, hi = 0.0, None, None
    r = start
    for _ in range(30):  # doubling up (or halving down) to a bracket
        rep = run_at(profile, spec, wl, r, n, seed, slo, duration)
        if rep["attainment"] >= slo.attainment:
            lo, lo_rep = r, rep
            if hi is not None:
                break
            r *= 2
        else:
            hi = r
            if lo_rep is not None:
                break
            r /= 2
            if r < 1e-3:
                return 0.0, None
    if hi is None:  # never failed (a burst that fits in the batches: too few requests for this rate)
        return lo, lo_rep
    for _ in range(iters):
        mid = (lo + hi) / 2
        rep = run_at(profile, spec, wl, mid, n, seed, slo, duration)
        if rep["attainment"] >= slo.attainment:
            lo, lo_rep = mid, rep
        else:
            hi = mid
    return lo, lo_rep


def splits(gpus: int, limit: int = 15) -> list[tuple[int, int]]:
    """(P, D) with P + D = gpus, both >= 1; at most about `limit` of them, spread evenly over the ratio."""
    all_ = [(p, gpus - p) for p in range(1, gpus)]
    if len(all_) <= limit:
        return all_
    step = len(all_) / limit
    return sorted({all_[int(i * step)] for i in range(limit)} | {all_[-1]})


def plan(profile: Profile, wl: Workload, gpus: int, slo: SLO, *, n: int | None, seed: int, base: ClusterSpec,
         colocated_precision: str = "bf16", progress=None, duration: float = 30.0) -> dict:
    """Max goodput of every split and of colocated engines at the same GPU count; the best split."""
    rows = []
    start = 1.0
    cands = [dataclasses.replace(base, prefill=p, decode=d, colocated=False) for p, d in splits(gpus)]
    cands.append(dataclasses.replace(base, prefill=0, decode=gpus, colocated=True,
                                     decode_precision=colocated_precision))
    for spec in cands:
        rate, rep = max_goodput(profile, spec, wl, slo, n, seed, start=start, duration=duration)
        start = max(rate, 0.5)  # neighbouring splits have similar goodput: start the next search there
        rows.append({"label": spec.label(), "prefill": spec.prefill, "decode": spec.decode, "colocated": spec.colocated,
                     "gpus": spec.gpus, "max_goodput": rate, "per_gpu": rate / spec.gpus, "report": rep})
        if progress:
            progress(rows[-1])
    disagg = [r for r in rows if not r["colocated"]]
    best = max(disagg, key=lambda r: r["max_goodput"])
    coloc = rows[-1]
    return {"rows": rows, "best": best, "colocated": coloc,
            "ratio_vs_colocated": best["max_goodput"] / coloc["max_goodput"] if coloc["max_goodput"] else None}


def helm_values(best: dict, base: ClusterSpec, slo: SLO, headroom: float = 2.0) -> dict:
    """Chart values (helm/pdserve/values.yaml names) for the recommendation: replicas of each pool, autoscaling
    bounds at `headroom` x, the precisions and wire simulated, the SLOs as the autoscaler's latency targets."""
    p, d = best["prefill"], best["decode"]
    vals = {
        "prefill": {"replicas": p, "minReplicas": max(1, p // 2) if p else 0,
                    "maxReplicas": max(1, round(p * headroom)), "precision": base.prefill_precision},
        "decode": {"replicas": d, "minReplicas": max(1, d // 2), "maxReplicas": max(1, round(d * headroom)),
                   "precision": base.decode_precision},
        "kvTransfer": {"dtype": "fp8" if base.wire == "fp8" else "bf16"},
        "engine": {"maxNumSeqs": base.max_num_seqs, "maxNumBatchedTokens": base.max_num_batched_tokens},
        "autoscaling": {"targetTtftS": slo.ttft_s, "targetItlS": slo.tpot_s},
    }
    if best["colocated"]:
        vals["prefill"].update(replicas=0, minReplicas=0)
    return vals


def autoscaling_config(best: dict) -> dict:
    """The `autoscaling:` keys of a pdserve config that make the autoscaler keep the planned ratio."""
    if best["colocated"] or not best["decode"]:
        return {}
    return {"prefill_per_decode": round(best["prefill"] / best["decode"], 4)}
