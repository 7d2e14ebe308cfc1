"""The autoscaling policy (config `autoscaling:`): each pool sized from its own signal.

- prefill: queue depth per worker (uncached prompt tokens waiting / block of work) against
  `prefill.target`, and recent TTFT against `target_ttft_s`;
- decode: KV cache usage per worker against `decode.target`, and recent inter-token latency
  against `target_itl_s`.
One step up when over target, one step down when comfortably under (half the target), within
[min_replicas, max_replicas], and never again before `cooldown_s` has passed for that pool.
With `prefill_per_decode` (the ratio `pdserve plan` recommends) the prefill pool instead follows the
decode pool's size at that ratio.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from pdserve.config import AutoscalingConfig
from pdserve.router.log_limit import LogLimiter

log = logging.getLogger("pdserve.autoscaler")


@dataclass
class PoolSignal:
    replicas: int
    load: float  # prefill: waiting requests per worker; decode: mean KV usage (0..1)
    latency: float | None  # prefill: recent TTFT; decode: recent inter-token latency (seconds)


def decide(cfg: AutoscalingConfig, role: str, s: PoolSignal, last_change: float, now: float) -> int:
    """The replica count this pool should have now (== s.replicas: leave it)."""
    bounds = getattr(cfg, role)
    target_lat = cfg.target_ttft_s if role == "prefill" else cfg.target_itl_s
    want = s.replicas
    if s.replicas < bounds.min_replicas:
        return bounds.min_replicas
    if s.replicas > bounds.max_replicas:
        return bounds.max_replicas
    if now - last_change < cfg.cooldown_s:
        return want
    over = s.load > bounds.target or (s.latency is not None and s.latency > target_lat)
    under = s.load < bounds.target / 2 and (s.latency is None or s.latency < target_lat / 2)
    if over:
        want = s.replicas + 1
    elif under:
        want = s.replicas - 1
    return max(bounds.min_replicas, min(bounds.max_replicas, want))


def follow_ratio(cfg: AutoscalingConfig, decode_replicas: int) -> int:
    """Prefill replicas for `decode_replicas` at the planner's ratio, rounded up, within the prefill bounds."""
    want = math.ceil(decode_replicas * cfg.prefill_per_decode - 1e-9)  # 0.5 x 4 is 2, not 3 by rounding noise
    return max(cfg.prefill.min_replicas, min(cfg.prefill.max_replicas, want))


class Autoscaler:
    def __init__(self, cfg: AutoscalingConfig, cluster, metrics=None):
        self.cfg = cfg
        self.cluster = cluster
        self.metrics = metrics
        self.last_change = {"prefill": 0.0, "decode": 0.0}
        self.log = LogLimiter(log, period_s=300.0)

    def signal(self, role: str) -> PoolSignal:
        pool = self.cluster.pools[role]
        ws = pool.active()
        n = max(len(ws), 1)
        if role == "prefill":
            load = sum(w.inflight + w.stats.get("num_waiting", 0) for w in ws) / n
            lat = self.metrics.recent("ttft") if self.metrics else None
        else:
            load = sum(w.stats.get("kv_cache_usage", 0.0) for w in ws) / n
            lat = self.metrics.recent("itl") if self.metrics else None
        return PoolSignal(len(ws), load, lat)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            ratio = self.cfg.prefill_per_decode
            decode_want = None
            for role in ("decode", "prefill") if ratio else ("prefill", "decode"):
                s = self.signal(role)
                now = time.monotonic()
                if role == "prefill" and ratio:
                    want = follow_ratio(self.cfg, decode_want)
                else:
                    want = decode_want = decide(self.cfg, role, s, self.last_change[role], now)
                if want != s.replicas:
                    log.info("autoscale %s: %d -> %d (load %.2f, latency %s)", role, s.replicas, want, s.load,
                             s.latency)
                    try:
                        await self.cluster.scale(role, want)
                        if self.metrics:
                            self.metrics.scaled(role, s.replicas, want)
                    except Exception as e:  # a failed scale (no room on the cluster) is retried after the cool-down
                        self.log.warning(f"{role}-{type(e).__name__}", "autoscale %s failed: %s", role, e)
                    self.last_change[role] = now
