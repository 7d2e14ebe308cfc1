"""Routing policies: which ready worker takes a request.

- round_robin: in turn.
- least_loaded: fewest in-flight requests (prefill: fewest uncached prompt tokens queued).
- cache_aware (prefill): the worker that would finish this prompt's prefill soonest, counting the
  tokens its cache already holds as free and the tokens queued before it as cost; a guard keeps a
  hot prefix from swamping one worker (a worker whose queue exceeds slack x the lightest queue
  plus one prompt is skipped while another one is usable).
Decode has no cache to aim at: least loaded, then most free KV blocks.
"""
from __future__ import annotations

import itertools
from typing import Optional

from router.kv_index import KVIndex
from router.pool import Worker


class Policy:
    name = ""

    def pick(self, workers: list[Worker], num_tokens: int, hashes: list, block_size: int) -> Optional[Worker]:
        raise NotImplementedError


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self):
        self._n = itertools.count()

    def pick(self, workers, num_tokens, hashes, block_size):
        return workers[next(self._n) % len(workers)] if workers else None


class LeastLoaded(Policy):
    name = "least_loaded"

    def pick(self, workers, num_tokens, hashes, block_size):
        if not workers:
            return None
        return min(workers, key=lambda w: (w.queued_tokens, w.inflight, w.stats.get("num_waiting", 0)))


class CacheAware(Policy):
    name = "cache_aware"

    def __init__(self, index: KVIndex, slack: float = 2.0):
        self.index = index
        self.slack = slack

    def pick(self, workers, num_tokens, hashes, block_size):
        if not workers:
            return None
        lightest = min(w.queued_tokens for w in workers)
        bound = lightest * self.slack + num_tokens
        usable = [w for w in workers if w.queued_tokens <= bound] or workers

        def cost(w: Worker) -> tuple:
            cached = min(self.index.overlap(w.name, hashes) * block_size, num_tokens)
            return (w.queued_tokens + num_tokens - cached, w.inflight)

        return min(usable, key=cost)

    def cached_tokens(self, w: Worker, hashes: list, block_size: int, num_tokens: int) -> int:
        return min(self.index.overlap(w.name, hashes) * block_size, num_tokens)


def make_policy(name: str, index: KVIndex, slack: float) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "cache_aware":
        return CacheAware(index, slack)
    raise ValueError(f"unknown routing policy {name!r}")
