"""The router's end of each decode worker's token channel (DecodeWorker.outputs): one reader task per worker
puts each message's deltas into their requests' inboxes. A request's attempt registers its inbox before it calls
`generate`, and reads its deltas from there (router/dispatch.py)."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from pdserve.router.log_limit import LogLimiter
from pdserve.router.pool import Worker

log = logging.getLogger("pdserve.router")


class Channels:
    def __init__(self, on_closed: Callable[[Worker], None], metrics=None):
        """`on_closed(w)`: w's channel ended or failed; the requests it carried get no more tokens from it."""
        self.on_closed = on_closed
        self.metrics = metrics
        self.inboxes: dict[str, asyncio.Queue] = {}  # worker-side request id -> its deltas
        self._readers: dict[str, tuple[Worker, asyncio.Task]] = {}
        self.log = LogLimiter(log)

    def open(self, w: Worker, wid: str) -> asyncio.Queue:
        """The inbox of request `wid` on worker `w`, w's channel opened first if it is not open."""
        reader = self._readers.get(w.name)
        if reader is None or reader[0] is not w or reader[1].done():
            self._readers[w.name] = (w, asyncio.get_running_loop().create_task(self._read(w)))
        q = self.inboxes[wid] = asyncio.Queue()
        return q

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
                    q = self.inboxes.get(wid)
                    if q is not None:  # else its attempt has ended (finished, aborted, moved elsewhere)
                        q.put_nowait(delta)
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
