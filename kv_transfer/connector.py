"""The KV connector over NIXL: engine.kv_connector's worker half, on one KVTransferAgent.

The engine drives it (start_load, save, cancel from its loop; poll between steps), so the workers need
no coroutine of their own polling transfers and no release callback: a request's blocks change hands
only through what poll() reports."""
from __future__ import annotations

from typing import Sequence

from .agent import KVTransferAgent, PullHandle


class NixlConnector:
    def __init__(self, name: str, kv_cache, wire_dtype: str, lease_seconds: float, staging_blocks: int = 0):
        self._sent: list[str] = []
        self.agent = KVTransferAgent(name, kv_cache, wire_dtype=wire_dtype, lease_seconds=lease_seconds,
                                     on_release=lambda request_id, reason: self._sent.append(request_id),
                                     staging_blocks=staging_blocks)
        self._loads: dict[str, PullHandle] = {}

    def save(self, request_id: str, block_ids: Sequence[int], num_tokens: int) -> bytes:
        return self.agent.export(request_id, block_ids, num_tokens)

    def start_load(self, request_id: str, handle: bytes, block_ids: Sequence[int]) -> None:
        self._loads[request_id] = self.agent.pull(handle, block_ids)

    def cancel(self, request_id: str) -> None:
        pull = self._loads.get(request_id)
        if pull is not None:
            self.agent.abort(pull)
        else:
            self.agent.cancel(request_id)

    def poll(self) -> tuple[list[str], list[tuple[str, str]], list[str]]:
        self.agent.poll()  # runs on_release for finished, expired and cancelled sends
        loaded, failed = [], []
        for request_id, pull in list(self._loads.items()):
            state = self.agent.check(pull)
            if state == "DONE":
                loaded.append(request_id)
            elif state == "ERROR" and pull.settled:
                failed.append((request_id, pull.error or "KV transfer failed"))
            else:  # pending, or a READ NIXL could not release: its blocks stay out of use until close()
                continue
            del self._loads[request_id]
        sent, self._sent = self._sent, []
        return loaded, failed, sent

    def stats(self) -> dict:
        return self.agent.stats()

    def close(self) -> None:
        self.agent.close()
