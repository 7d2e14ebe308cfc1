"""The measurements' helper processes (measure.py's KV exporter, contention.py's engines): their next message,
or their failure as one clear error."""
from __future__ import annotations

import time


def reply(conn, proc, kind: str, timeout: float, who: str = "the KV exporter process"):
    """A helper process's next message, which must be `kind`; its traceback, its death or a timeout as
    RuntimeError."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.05):
        if not proc.is_alive() and not conn.poll(0):
            raise RuntimeError(f"{who} died (exit code {proc.exitcode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{who} did not answer within {timeout:.0f} s ({kind})")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"{who} failed: {msg[1]}")
    if msg[0] != kind:
        raise RuntimeError(f"{who} said {msg[0]!r}, expected {kind!r}")
    return msg[1:]
