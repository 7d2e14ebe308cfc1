"""Leases on exported blocks: held until the reader's done notification, a cancel, or expiry.

Pure Python; times are time.monotonic() seconds. A lease is found by request id (cancel) or
by its notification token (done); popping it is what makes each release happen exactly once.
"""
from dataclasses import dataclass
from typing import Optional


@dataclass
class Lease:
    request_id: str
    token: bytes
    block_ids: tuple
    wire_bytes: int
    started: float
    deadline: float
    staging_offset: Optional[int] = None  # fp8: the staged copy the reader reads


class LeaseTable:
    def __init__(self):
        self._by_request = {}
        self._by_token = {}

    def __len__(self) -> int:
        return len(self._by_request)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_request

    def request_ids(self) -> list:
        return list(self._by_request)

    def add(self, lease: Lease) -> None:
        self._by_request[lease.request_id] = lease
        self._by_token[lease.token] = lease

    def pop_request(self, request_id: str) -> Optional[Lease]:
        lease = self._by_request.pop(request_id, None)
        if lease is not None:
            del self._by_token[lease.token]
        return lease

    def pop_token(self, token: bytes) -> Optional[Lease]:
        lease = self._by_token.get(token)
        return None if lease is None else self.pop_request(lease.request_id)

    def pop_expired(self, now: float) -> list:
        return [self.pop_request(l.request_id) for l in list(self._by_request.values()) if l.deadline <= now]

    def pop_all(self) -> list:
        return [self.pop_request(r) for r in list(self._by_request)]
