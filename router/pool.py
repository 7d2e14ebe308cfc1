"""Pool membership: the worker actors of one role, their state and load, and the pick policy.

A worker is picked only when `ready`; `draining` workers finish what they hold and take nothing new.
The router counts in-flight requests itself (exact, no polling lag) and refreshes engine stats
(waiting, running, KV usage) in the background.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Worker:
    name: str
    role: str
    actor: object
    state: str = "starting"  # starting | ready | draining
    inflight: int = 0
    queued_tokens: int = 0  # prefill: uncached prompt tokens sent and not yet prefilled
    stats: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def free_blocks(self) -> int:
        return self.stats.get("num_free_blocks", 0)


class Pool:
    def __init__(self, role: str, policy: str = "least_loaded"):
        self.role = role
        self.policy = policy
        self.workers: dict[str, Worker] = {}
        self._rr = itertools.count()

    def ready(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.state == "ready"]

    def active(self) -> list[Worker]:
        """Workers counted toward the pool's size (not draining)."""
        return [w for w in self.workers.values() if w.state != "draining"]

    def pick(self, prefer: Optional[Worker] = None) -> Optional[Worker]:
        ready = self.ready()
        if not ready:
            return None
        if prefer is not None and prefer in ready:
            return prefer
        if self.policy == "round_robin":
            return ready[next(self._rr) % len(ready)]
        if self.role == "decode":
            # decode: room for KV first among the least loaded
            return min(ready, key=lambda w: (w.inflight + w.stats.get("num_waiting", 0), -w.free_blocks))
        return min(ready, key=lambda w: (w.inflight, w.stats.get("num_waiting", 0)))
