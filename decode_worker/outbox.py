"""A decode worker's outgoing tokens: every request's new deltas, taken by the router's channel as one message.

Each Ray message costs the worker's process a fixed share of its one GIL (serialization, the report call, their
thread hand-offs), which the engine thread needs to launch its steps. Sent per request per step, those messages
capped what a worker delivered at a few dozen streams (BENCHMARKS.md, "Token delivery"); sent as one per take,
their number follows the steps, not the streams. A request's deltas that are not taken yet merge into one.
"""
from __future__ import annotations

import asyncio
from typing import Optional

from pdserve.worker.messages import DecodeDelta


class Outbox:
    def __init__(self):
        self._pending: dict[str, DecodeDelta] = {}
        self._ready = asyncio.Event()
        self._took = asyncio.Event()
        self.posted = 0  # deltas posted so far
        self.taken = 0  # ... of which a take has carried off
        self.epoch = 0  # the channel that takes: a newer one (a restarted router) retires the older

    def post(self, request_id: str, delta: DecodeDelta) -> None:
        earlier = self._pending.get(request_id)
        self._pending[request_id] = delta if earlier is None else earlier.then(delta)
        self.posted += 1
        self._ready.set()

    def open(self) -> int:
        """A new channel: the one open until now takes nothing more. Returns the new channel's epoch."""
        self.epoch += 1
        self._ready.set()  # wakes the retired channel's take, which then returns None
        return self.epoch

    async def take(self, epoch: int) -> Optional[list[tuple[str, DecodeDelta]]]:
        """Everything posted and not yet taken, once there is some; None once channel `epoch` is retired."""
        while True:
            if epoch != self.epoch:
                return None
            if self._pending:
                batch, self._pending = list(self._pending.items()), {}
                self.taken = self.posted
                self._took.set()
                return batch
            self._ready.clear()
            await self._ready.wait()

    async def flushed(self) -> None:
        """Returns once every delta posted before the call has been taken."""
        target = self.posted
        while self.taken < target:
            self._took.clear()
            await self._took.wait()
