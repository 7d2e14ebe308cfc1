"""The engine's view of KV that lives in another engine: the KV-connector interface.

Two halves, as vLLM v1 splits them. The scheduler half is the engine's own bookkeeping: a request whose
prompt KV is elsewhere waits in WAITING_FOR_REMOTE_KV (blocks reserved, load started) and is scheduled
only once the connector reports the load done; a prefill request's blocks are kept after it finishes,
while the connector sends them, and freed only when the connector says the send is over. The worker
half, below, moves the bytes; kv_transfer.connector implements it over NIXL.

Invariants the engine relies on:
- blocks given to start_load belong to the connector until poll() names the request as loaded or
  failed; a failed load is reported only once nothing can write those blocks any more;
- blocks given to save belong to the connector until poll() names the request as sent (the reader
  finished, the lease expired, or the send was cancelled);
- every method returns at once; poll() is called between engine steps, under the engine's lock.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class RemoteKV:
    """The KV of a request's first `num_tokens` prompt tokens, held by another engine."""
    handle: bytes  # the connector's description of where the KV is (a kv_transfer ticket)
    num_tokens: int
    # recompute the KV of this many first tokens in this engine's precision in the request's first step
    # (the attention sinks; decode_worker/worker.py decides how many)
    refresh_tokens: int = 0


class KVConnector(Protocol):
    def save(self, request_id: str, block_ids: Sequence[int], num_tokens: int) -> bytes:
        """Offer these blocks' KV to one reader; returns the handle the reader loads from."""

    def start_load(self, request_id: str, handle: bytes, block_ids: Sequence[int]) -> None:
        """Start copying the KV described by `handle` into `block_ids` (raises if it cannot start)."""

    def cancel(self, request_id: str) -> None:
        """Stop a load or a send of this request; poll() still reports how it ended."""

    def poll(self) -> tuple[list[str], list[tuple[str, str]], list[str]]:
        """(loaded request ids, [(failed request id, why)], sent request ids) since the last poll."""
