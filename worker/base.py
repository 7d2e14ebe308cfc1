"""What both worker kinds share: an engine at the pool's precision with a KV connector on its cache, the
async loop, and the stats and prefix-cache events the router balances on. Ray actor classes wrap this."""
from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
from collections import deque

import msgpack
import torch

from pdserve import tracing
from pdserve.config import Config, from_dict
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.worker.faults import Faults
from pdserve.worker.traced_connector import TracedConnector


class KVEvent(str, enum.Enum):
    STORED = "stored"  # a block's hash entered the prefix cache
    REMOVED = "removed"  # ... and left it


class WorkerBase:
    role = ""

    def __init__(self, config: dict, name: str):
        self.config: Config = from_dict(Config, config, "").validate()
        self.name = name
        if torch.get_num_threads() > 1 and "OMP_NUM_THREADS" in os.environ:
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        self.engine = LLMEngine.from_config(self.config, self.role)
        self.connector = self._make_connector()
        # tracing on: the engine's transfers are spanned on their way through; off, it calls the connector itself
        self.traced_connector = (TracedConnector(self.connector, self.config.kv_transfer.dtype)
                                 if tracing.setup(self.config.tracing, self.role, name) else None)
        self.engine.connector = self.traced_connector or self.connector
        self.engine.remote_kv_timeout = self.config.kv_transfer.lease_seconds / 2
        self.aengine: AsyncEngine | None = None
        self.faults = Faults()  # chaos tests only (PDSERVE_FAULTS); empty otherwise
        self.draining = False
        # KV events: (id, KVEvent, block hash), ids consecutive from 1
        self.kv_log: deque = deque(maxlen=100_000)
        self.kv_last_id = 0

    def _make_connector(self):
        from pdserve.kv_transfer.connector import NixlConnector

        kt = self.config.kv_transfer
        # staging holds fp8 wire copies (about a quarter of a float32 slot each); the raw wire reads
        # cache to cache and needs none, since both pools share model.dtype
        staging = self.engine.runner.num_blocks // 4 if kt.dtype == "fp8" else 0
        return NixlConnector(self.name, self.engine.runner.kv_cache, wire_dtype=kt.dtype,
                             lease_seconds=kt.lease_seconds, staging_blocks=staging)

    async def start(self) -> dict:
        """Called once by the router after construction; returns what the router needs to know."""
        if self.aengine is None:
            self.aengine = AsyncEngine(self.engine)
        return self.info()

    async def kv_events(self, after: int) -> bytes:
        """msgpack {"worker", "last_id", "events": [[id, kind, hash], ...]} of the events after
        id `after`; {"worker", "last_id", "snapshot": [hash, ...]} instead when the caller is new
        (after < 0) or has fallen behind the log: the router rebuilds its index from that."""
        async with self.aengine.lock:
            for kind, h in self.engine.block_manager.drain_events():
                self.kv_last_id += 1
                self.kv_log.append((self.kv_last_id, KVEvent(kind).value, h))
            first = self.kv_log[0][0] if self.kv_log else self.kv_last_id + 1
            if after < 0 or after + 1 < first:
                msg = {"worker": self.name, "last_id": self.kv_last_id,
                       "snapshot": self.engine.block_manager.cached_hashes()}
            else:
                msg = {"worker": self.name, "last_id": self.kv_last_id,
                       "events": [list(e) for e in itertools.islice(self.kv_log, after + 1 - first, None)]}
        return msgpack.packb(msg)

    def info(self) -> dict:
        e = self.engine
        return {"name": self.name, "role": self.role, "precision": e.precision, "dtype": str(e.dtype),
                "num_blocks": e.block_manager.num_blocks, "block_size": e.config.block_size,
                "pid": os.getpid(), "threads": torch.get_num_threads()}

    async def stats(self) -> dict:
        s = self.aengine.stats() if self.aengine else {}
        s["kv_transfer"] = self.connector.stats()
        s["name"] = self.name
        s["role"] = self.role
        s["draining"] = self.draining
        s["num_requests"] = len(self.engine.requests)
        return s

    async def drain(self) -> None:
        self.draining = True

    def _traced(self, name: str, request_id: str, trace_context, **attributes):
        """Context manager: this worker's span of a request, a child of the router's span that `trace_context`
        (W3C headers) names, and the parent of the request's KV transfer; yields None without a trace_context."""
        if trace_context is None or self.traced_connector is None:
            return contextlib.nullcontext()
        return self.traced_connector.request(name, request_id, trace_context, attributes)

    async def flush_traces(self) -> bool:
        """Export the spans held here now; the router calls it before it kills the actor, which runs no exit hook."""
        return await asyncio.to_thread(tracing.flush)
