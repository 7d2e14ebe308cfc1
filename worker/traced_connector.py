"""The engine's KV connector with a span for each transfer, under the worker's span of the request it moves
KV for: `kv_send` on a prefill worker (offered, until the decode side's READ is done, the lease expires or the
send is cancelled: where a request waiting for KV shows which side holds it up), `kv_transfer` on a decode
worker (the load started, until it landed or failed).

A worker puts it in front of its connector only while tracing is on; off, the engine calls the connector
itself and no transfer pays for this. It has the engine's KVConnector methods (engine/kv_connector.py) and
no more; the engine calls them from its own thread, the worker's coroutines register requests.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

from pdserve import tracing


class TracedConnector:
    def __init__(self, connector, wire_dtype: str):
        self.connector = connector
        self.wire_dtype = wire_dtype
        self._parents: dict = {}  # request id -> this worker's span of the request, while it works on it here
        self._open: dict = {}  # request id -> the span of its transfer in flight

    @contextlib.contextmanager
    def request(self, name: str, request_id: str, carrier: Optional[dict], attributes: dict):
        """This worker's span of a request (a child of the router's span `carrier` names), the parent of the
        transfer the request starts while it is open; yields None when there is nothing to trace."""
        with tracing.remote_span(name, carrier, request_id=request_id, **attributes) as span:
            if span is None:
                yield None
                return
            self._parents[request_id] = span
            try:
                yield span
            finally:
                self._parents.pop(request_id, None)

    @contextlib.contextmanager
    def _begin(self, name: str, request_id: str, **attributes):
        """Open the transfer's span around the call that starts it (the call's own work, the fp8 quantization
        or a first exchange of NIXL metadata, is part of the transfer); a call that raises ends it failed."""
        parent = self._parents.get(request_id)
        if parent is not None:
            self._open[request_id] = tracing.start_child(parent, name, request_id=request_id,
                                                         wire_dtype=self.wire_dtype, **attributes)
        try:
            yield
        except Exception as e:
            tracing.end(self._open.pop(request_id, None), f"{type(e).__name__}: {e}")
            raise

    def save(self, request_id: str, block_ids: Sequence[int], num_tokens: int) -> bytes:
        with self._begin("kv_send", request_id, blocks=len(block_ids), tokens=num_tokens):
            return self.connector.save(request_id, block_ids, num_tokens)

    def start_load(self, request_id: str, handle: bytes, block_ids: Sequence[int]) -> None:
        with self._begin("kv_transfer", request_id, blocks=len(block_ids)):
            self.connector.start_load(request_id, handle, block_ids)

    def cancel(self, request_id: str) -> None:
        self.connector.cancel(request_id)  # poll() still reports the end, which ends the span

    def poll(self) -> tuple[list[str], list[tuple[str, str]], list[str]]:
        loaded, failed, sent = self.connector.poll()
        if self._open:
            for request_id in loaded:
                tracing.end(self._open.pop(request_id, None))
            for request_id, why in failed:
                tracing.end(self._open.pop(request_id, None), why)
            for request_id in sent:
                tracing.end(self._open.pop(request_id, None))
        return loaded, failed, sent
