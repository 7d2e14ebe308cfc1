"""One request's way through the cluster: pick a prefill and a decode worker, prefill, stream the
decode worker's deltas; keep the workers' load counts exact on every exit, and free the request's
blocks on both sides when it did not finish (client gone, error, Abort).

Errors are raised as they come (a Ray error wraps the worker's own: `cause_of`); the gRPC layer maps them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from pdserve.config import Config
from pdserve.engine.block_manager import block_hashes
from pdserve.engine.sequence import SamplingParams
from pdserve.errors import NoReadyWorker
from pdserve.router.cluster import Cluster
from pdserve.router.policy import make_policies
from pdserve.router.pool import Worker
from pdserve.worker.messages import DecodeDelta, PrefillResult

log = logging.getLogger("pdserve.router")


@dataclass(frozen=True)
class Delta:
    """A decode worker's delta as the router forwards it."""
    decode: DecodeDelta
    workers: Optional[tuple[str, str]] = None  # (prefill, decode) worker names, on the first delta only


def cause_of(exc: BaseException) -> BaseException:
    """The worker-side exception inside a Ray error."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class Dispatcher:
    def __init__(self, config: Config, cluster: Cluster, metrics=None):
        self.cluster = cluster
        self.block_size = config.engine.block_size
        self.prefill_policy, self.decode_policy = make_policies(config.router.policy, cluster.index,
                                                                config.router.load_balance_slack)
        self.metrics = metrics
        self.active: dict[str, tuple[Worker, Worker]] = {}  # request id -> (prefill worker, decode worker)

    def _pick(self, num_tokens: int, hashes: list) -> tuple[Worker, Worker]:
        pools, bs = self.cluster.pools, self.block_size
        P = self.prefill_policy.pick(pools["prefill"].ready(), num_tokens, hashes, bs)
        D = self.decode_policy.pick(pools["decode"].ready(), num_tokens, hashes, bs)
        if P is None or D is None:
            raise NoReadyWorker(f"the {'prefill' if P is None else 'decode'} pool has no ready worker")
        return P, D

    async def run(self, rid: str, ids: list[int], params: SamplingParams,
                  namespace: Optional[str]) -> AsyncIterator[Delta]:
        """The request's deltas; the last has `decode.finished`. `rid` must not be in `active`."""
        bs, index, m = self.block_size, self.cluster.index, self.metrics
        hashes = block_hashes(ids[:-1], bs, namespace)  # the blocks a prefill worker can cache
        P, D = self._pick(len(ids), hashes)
        # registered before the first await, so the caller's duplicate-id check cannot race
        self.active[rid] = (P, D)
        # the prefill worker counts as busy until the decode side has pulled the KV (first delta)
        uncached = len(ids) - min(index.overlap(P.name, hashes) * bs, len(ids))
        P.inflight += 1
        P.queued_tokens += uncached
        index.expect(P.name, hashes)
        D.inflight += 1
        in_prefill, holding_prefill, finished = True, True, False
        t0 = time.monotonic()
        if m:
            m.request_started()
        try:
            prefill: PrefillResult = await P.actor.prefill.remote(rid, ids, namespace)
            P.queued_tokens -= uncached
            in_prefill = False
            if m:
                m.prefill_done(P, prefill, len(ids))
            stream = D.actor.generate.options(num_returns="streaming").remote(rid, ids, params, prefill)
            first, last = True, None
            async for ref in stream:
                d: DecodeDelta = await ref
                if holding_prefill:
                    P.inflight -= 1
                    holding_prefill = False
                now = time.monotonic()
                if m:
                    m.token_delta(first, now - (last or t0), len(d.token_ids))
                last = now
                if d.finished:
                    finished = True
                    if m:
                        m.request_finished(time.monotonic() - t0, d)
                yield Delta(d, (P.name, D.name) if first else None)
                first = False
        except Exception as e:  # a worker-side error fails this request only
            log.warning("request %s failed: %s", rid, cause_of(e))
            raise
        finally:
            if in_prefill:
                P.queued_tokens -= uncached
            if holding_prefill:
                P.inflight -= 1
            D.inflight -= 1
            self.active.pop(rid, None)
            if not finished:  # client cancelled, error or abort: free the blocks on both sides
                self._abort_workers(rid, P, D)
                if m:
                    m.request_aborted()

    def _abort_workers(self, rid: str, P: Worker, D: Worker) -> None:
        for w in (P, D):
            try:
                w.actor.abort.remote(rid)
            except Exception:  # the actor is gone; its blocks went with it
                pass

    async def abort(self, rid: str) -> bool:
        """Tell both workers to drop the request (its stream then ends unfinished); False if unknown."""
        pair = self.active.get(rid)
        if pair is None:
            return False
        await asyncio.gather(*(w.actor.abort.remote(rid) for w in pair), return_exceptions=True)
        return True
