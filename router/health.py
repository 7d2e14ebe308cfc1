"""grpc.health.v1 statuses that follow the pools (Kubernetes probes, load balancers).

- "" and "pdserve.v1.PDServe": SERVING only while every pool the cluster serves with has a READY worker;
  NOT_SERVING otherwise (also while the pools load, while the router drains, and on shutdown).
- "prefill" and "decode": each pool on its own, so a probe (or an operator with grpc_health_probe
  -service=decode) sees which pool is empty.
- "liveness": SERVING while the router runs, whatever its pools: for a Kubernetes livenessProbe, which must not
  restart the router because a pool is empty (readiness takes it out of the Service instead).
Statuses are set only when they change: a Watch stream gets one message per change, not one per refresh.
"""
from __future__ import annotations

import logging

from grpc_health.v1 import health_pb2

log = logging.getLogger("pdserve.router")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class PoolHealth:
    def __init__(self, servicer, service: str, roles: tuple[str, ...]):
        self.servicer = servicer
        self.service = service
        self.roles = roles  # the pools requests need (mode colocated: only decode)
        self.published: dict[str, int] = {}
        self.served: set[str] = set()  # pools that have had a ready worker: only their changes are news
        self.draining = False  # shutting down (router/drain.py): the overall status is NOT_SERVING

    def statuses(self, pools: dict) -> dict[str, int]:
        per_pool = {role: SERVING if pools[role].ready() else NOT_SERVING for role in pools}
        overall = SERVING if all(per_pool[r] == SERVING for r in self.roles) and not self.draining else NOT_SERVING
        return {"": overall, self.service: overall, **per_pool, "liveness": SERVING}

    async def publish(self, pools: dict) -> None:
        for name, status in self.statuses(pools).items():
            if self.published.get(name) != status:
                if name in self.roles and name in self.served:  # not the first start, which is no news
                    log.warning("the %s pool %s", name, "has a ready worker again" if status == SERVING
                                else "has no ready worker: NOT_SERVING")
                if name in self.roles and status == SERVING:
                    self.served.add(name)
                await self.servicer.set(name, status)
                self.published[name] = status

    async def stop(self) -> None:
        """Every service NOT_SERVING (shutting down)."""
        for name in list(self.published) or ["", self.service]:
            await self.servicer.set(name, NOT_SERVING)
            self.published[name] = NOT_SERVING
