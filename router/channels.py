"""The router's end of each decode worker's token channel (DecodeWorker.outputs): one reader task per worker
puts each message's deltas into their requests' inboxes. A request's attempt registers its inbox before it calls
`generate`, and reads its deltas from there (router/dispatch.py)."""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Callable, Optional

from pdserve.router.log_limit import LogLimiter
from pdserve.router.pool import Worker
from pdserve.worker.messages import DecodeDelta

log = logging.getLogger("pdserve.router")


class Inbox:
    """One attempt's deltas, and the one future its reader sleeps on. A delta, the request's interrupt or the end of
    its generate call wakes it (`wake` is their callback), so each step costs a request one wake-up: with every
    stream of a worker woken each step, waiting on several futures at once (asyncio.wait) took an eighth of the
    router's samples at 256 streams on an H100 host, a fifth on a 2-core box (BENCHMARKS.md, "Many streams a
    worker")."""
    __slots__ = ("_items", "_waiter")

    def __init__(self):
        self._items: deque[DecodeDelta] = deque()
        self._waiter: Optional[asyncio.Future] = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, delta: DecodeDelta) -> None:
        self._items.append(delta)
        self.wake()

    def wake(self, *_) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(True)

    def take(self) -> DecodeDelta:
        """The deltas that came, merged into one (up to the request's last): a stream behind by several steps
        sends them as one message, whose costs (the client's stream write, the metrics) are paid once."""
        d = self._items.popleft()
        while self._items and not d.finished:
            d = d.then(self._items.popleft())
        return d

    async def wait(self, timeout: float) -> bool:
        """Until something may have changed (True) or `timeout` s passed with nothing (False)."""
        if self._items:
            return True
        loop = asyncio.get_running_loop()
        self._waiter = fut = loop.create_future()
        timer = loop.call_later(timeout, _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            self._waiter = None


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(False)


class Channels:
    def __init__(self, on_closed: Callable[[Worker], None], metrics=None):
        """`on_closed(w)`: w's channel ended or failed; the requests it carried get no more tokens from it."""
        self.on_closed = on_closed
        self.metrics = metrics
        self.inboxes: dict[str, Inbox] = {}  # worker-side request id -> its deltas
        self._readers: dict[str, tuple[Worker, asyncio.Task]] = {}
        self.log = LogLimiter(log)

    def open(self, w: Worker, wid: str) -> Inbox:
        """The inbox of request `wid` on worker `w`, w's channel opened first if it is not open."""
        reader = self._readers.get(w.name)
        if reader is None or reader[0] is not w or reader[1].done():
            self._readers[w.name] = (w, asyncio.get_running_loop().create_task(self._read(w)))
        inbox = self.inboxes[wid] = Inbox()
        return inbox

    def close(self, wid: str) -> None:
        self.inboxes.pop(wid, None)

    async def _read(self, w: Worker) -> None:
        try:
            async for ref in w.actor.outputs.options(num_returns="streaming").remote():
                batch = await ref
                if self.metrics is not None:
                    self.metrics.channel_messages.inc()
                    self.metrics.channel_deltas.inc(len(batch))
                for wid, delta in batch:
                    inbox = self.inboxes.get(wid)
                    if inbox is not None:  # else its attempt has ended (finished, aborted, moved elsewhere)
                        inbox.put(delta)
            why = "ended"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the worker died or cannot be reached; the pool's health checks say which
            why = f"failed: {type(e).__name__}"
        # info: a worker scaled in or replaced closes its channel too; requests it strands say so as they move
        if self._readers.get(w.name, (None,))[0] is w:
            del self._readers[w.name]
        self.log.log(logging.INFO, f"channel-{w.name}", "the token channel of worker %s %s", w.name, why)
        self.on_closed(w)

    def stop(self) -> None:
        for _, task in self._readers.values():
            task.cancel()
        self._readers.clear()
