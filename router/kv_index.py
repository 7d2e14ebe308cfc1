"""The router's view of which prefill worker holds which KV block (by block hash).

Truth comes from the workers' KV events (stored/removed, msgpack, consecutive ids); a worker seen
for the first time, or one whose log has moved past our cursor (a router restart, a long pause),
is rebuilt from its snapshot. Between polls the router also records where it just sent a prompt
(`expect`), so a burst of requests sharing a new prefix follows the first one; a later snapshot or
removal event corrects that guess.
"""
from __future__ import annotations

import msgpack


class KVIndex:
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
