"""Pool membership: the worker actors of one role, their state and load (which one takes a request
is the policy's business, router/policy.py).

A worker takes new requests only while READY. STARTING: created, still loading (or not placeable yet).
UNHEALTHY: it has not answered the router's probe within the liveness window; nothing new is routed to
it and what it held fails over, and it is READY again once it answers. DRAINING: being removed; it
finishes what it holds and takes nothing new. A worker whose actor died leaves its pool at once.
The router counts in-flight requests itself (exact, no polling lag) and refreshes engine stats
(waiting, running, KV usage) in the background.
"""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Optional


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"  # not answering its probe: routed around until it answers again
    DRAINING = "draining"  # being removed


@dataclass(eq=False)
class Worker:
    name: str
    role: str
    actor: object
    state: WorkerState = WorkerState.STARTING
    inflight: int = 0
    queued_tokens: int = 0  # prefill: uncached prompt tokens sent and not yet prefilled
    stats: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    last_seen: float = 0.0  # time.monotonic() of its last answer to a probe
    probe: Optional[asyncio.Future] = None  # the stats call in flight, if any
    events_probe: Optional[asyncio.Future] = None  # the KV-events call in flight (prefill), if any
    starting: Optional[asyncio.Task] = None  # STARTING: the task that waits for start()

    @property
    def free_blocks(self) -> int:
        return self.stats.get("num_free_blocks", 0)


class Pool:
    def __init__(self, role: str):
        self.role = role
        self.workers: dict[str, Worker] = {}
        self.target = 0  # the size Scale (or the config) asked for; dead workers are replaced up to it

    def ready(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.state is WorkerState.READY]

    def active(self) -> list[Worker]:
        """Workers counted toward the pool's size (not draining)."""
        return [w for w in self.workers.values() if w.state is not WorkerState.DRAINING]

    def in_state(self, state: WorkerState) -> list[Worker]:
        return [w for w in self.workers.values() if w.state is state]
