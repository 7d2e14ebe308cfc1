"""Pool membership: the worker actors of one role, their state and load (which one takes a request
is the policy's business, router/policy.py).

A worker takes new requests only while READY; a DRAINING one finishes what it holds and takes nothing
new. The router counts in-flight requests itself (exact, no polling lag) and refreshes engine stats
(waiting, running, KV usage) in the background.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # being removed, or not answering


@dataclass
class Worker:
    name: str
    role: str
    actor: object
    state: WorkerState = WorkerState.STARTING
    inflight: int = 0
    queued_tokens: int = 0  # prefill: uncached prompt tokens sent and not yet prefilled
    stats: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def free_blocks(self) -> int:
        return self.stats.get("num_free_blocks", 0)


class Pool:
    def __init__(self, role: str):
        self.role = role
        self.workers: dict[str, Worker] = {}

    def ready(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.state is WorkerState.READY]

    def active(self) -> list[Worker]:
        """Workers counted toward the pool's size (not draining)."""
        return [w for w in self.workers.values() if w.state is not WorkerState.DRAINING]
