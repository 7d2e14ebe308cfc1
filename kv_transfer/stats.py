"""Byte and time accounting of one agent, both roles (for kv_transfer_bytes / _seconds)."""
from collections import deque
from dataclasses import dataclass, field

RECENT = 256  # per-request records kept, newest last


@dataclass
class TransferStats:
    exported: int = 0  # tickets issued
    bytes_exported: int = 0  # wire bytes offered in those tickets
    bytes_sent: int = 0  # wire bytes of leases released "done" (read by a decode agent)
    released: dict = field(default_factory=lambda: {"done": 0, "expired": 0, "cancelled": 0})
    stage_seconds: float = 0.0  # fp8 quantization into the staging pool at export
    late_notifications: int = 0  # done/abort for a lease already released (expired or cancelled)
    pulls: int = 0
    pulls_done: int = 0
    pulls_failed: int = 0
    descriptors: int = 0  # NIXL descriptors posted by pulls (runs of adjacent blocks; see transport.coalesce_runs)
    bytes_received: int = 0
    transfer_seconds: float = 0.0  # pull: post of the READ -> blocks landed in the cache
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT))

    def record(self, role: str, request_id: str, outcome: str, nbytes: int, seconds: float) -> None:
        self.recent.append(
            {"role": role, "request_id": request_id, "outcome": outcome, "bytes": nbytes, "seconds": seconds}
        )

    def snapshot(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("released", "recent")}
        out["released"] = dict(self.released)
        out["recent"] = list(self.recent)
        return out
