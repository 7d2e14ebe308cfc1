"""Routing policies: which ready worker of a pool takes a request (config `router.policy`).

- round_robin: in turn (both pools).
- least_loaded: prefill, fewest uncached prompt tokens queued.
- cache_aware: prefill, the worker that holds the prompt's prefix, unless that worker is
  overloaded; new prefixes go to the least loaded worker (details on CacheAware).
Decode has no cache to aim at: unless round_robin, least loaded, then most free KV blocks.
"""
from __future__ import annotations

import itertools
from typing import Optional

import msgpack

from pdserve.router.pool import Worker


class KVIndex:
    """The router's view of which prefill worker holds which KV block (by block hash).

    Truth comes from the workers' KV events (stored/removed, msgpack, consecutive ids); a worker seen
    for the first time, or one whose log has moved past our cursor (a router restart, a long pause),
    is rebuilt from its snapshot. Between polls the router also records where it just sent a prompt
    (`expect`), so a burst of requests sharing a new prefix follows the first one; a later snapshot or
    removal event corrects that guess.
    """

    def __init__(self):
        self.blocks: dict[str, set] = {}  # worker -> block hashes it holds (or is about to)
        self.cursor: dict[str, int] = {}  # worker -> last event id applied

    def apply(self, payload: bytes) -> None:
        msg = msgpack.unpackb(payload)
        w = msg["worker"]
        if "snapshot" in msg:
            self.blocks[w] = set(msg["snapshot"])
        else:
            held = self.blocks.setdefault(w, set())
            for _, kind, h in msg["events"]:
                if kind == "stored":
                    held.add(h)
                else:
                    held.discard(h)
        self.cursor[w] = msg["last_id"]

    def after(self, worker: str) -> int:
        return self.cursor.get(worker, -1)

    def expect(self, worker: str, hashes: list) -> None:
        self.blocks.setdefault(worker, set()).update(hashes)

    def forget(self, worker: str) -> None:
        self.blocks.pop(worker, None)
        self.cursor.pop(worker, None)

    def overlap(self, worker: str, hashes: list) -> int:
        """Leading blocks of `hashes` the worker holds (hashes are chained: a prefix match)."""
        held = self.blocks.get(worker)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n


class Policy:
    name = ""

    def pick(self, workers: list[Worker], num_tokens: int, hashes: list, block_size: int) -> Optional[Worker]:
        """One of `workers` (a pool's ready ones) for a prompt of `num_tokens` whose cacheable blocks
        hash to `hashes`; None only when `workers` is empty."""
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


class LeastLoadedDecode(Policy):
    """Fewest requests held (in flight from the router, waiting in the engine), then most free KV blocks."""
    name = "least_loaded"

    def pick(self, workers, num_tokens, hashes, block_size):
        if not workers:
            return None
        return min(workers, key=lambda w: (w.inflight + w.stats.get("num_waiting", 0), -w.free_blocks))


class CacheAware(Policy):
    """Send a prompt to the worker holding most of its prefix when that is a real hit (at least
    `min_hit` of the prompt) and the worker is not overloaded; otherwise to the least loaded worker,
    which then becomes the prefix's home. Staying with the holder even when it is a little busier
    keeps one copy of each prefix, so the pool's caches add up instead of holding duplicates.

    Overloaded: queued tokens above `slack` x the lightest queue plus `headroom` tokens (the guard
    that keeps a hot prefix from swamping one worker)."""

    name = "cache_aware"

    def __init__(self, index: KVIndex, slack: float = 2.0, min_hit: float = 0.5, headroom: int = 4096):
        self.index = index
        self.slack = slack
        self.min_hit = min_hit
        self.headroom = headroom
        self.fallback = LeastLoaded()

    def pick(self, workers, num_tokens, hashes, block_size):
        if not workers:
            return None
        lightest = min(w.queued_tokens for w in workers)
        scored = [(min(self.index.overlap(w.name, hashes) * block_size, num_tokens), w) for w in workers]
        hit, best = max(scored, key=lambda x: (x[0], -x[1].queued_tokens, -x[1].inflight))
        if hit >= self.min_hit * num_tokens and best.queued_tokens <= lightest * self.slack + self.headroom:
            return best
        return self.fallback.pick(workers, num_tokens, hashes, block_size)


def make_policies(name: str, index: KVIndex, slack: float) -> tuple[Policy, Policy]:
    """The (prefill, decode) policies for `router.policy` = name."""
    if name == "round_robin":
        return RoundRobin(), RoundRobin()
    if name == "least_loaded":
        return LeastLoaded(), LeastLoadedDecode()
    if name == "cache_aware":
        return CacheAware(index, slack), LeastLoadedDecode()
    raise ValueError(f"unknown routing policy {name!r}")
