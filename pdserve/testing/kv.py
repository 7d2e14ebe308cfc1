"""An engine with an in-process KV connector for the length of a test (kv_transfer.local)."""
from __future__ import annotations

import contextlib

from pdserve.kv_transfer.local import LocalConnector, LocalWire


@contextlib.contextmanager
def local_connector(engine, wire_dtype: str = "bf16", wire: LocalWire | None = None):
    """Yields the connector; the engine (often a session-wide fixture) gets its old connector back after."""
    old = engine.connector
    connector = LocalConnector(engine.runner.kv_cache, wire or LocalWire(), wire_dtype)
    engine.connector = connector
    try:
        yield connector
    finally:
        engine.connector = old
