"""Fault injection for the chaos tests: off, and free, unless the environment variable PDSERVE_FAULTS is set
(read once, when a worker starts; a local `pdserve serve` passes its environment on to its workers).

    PDSERVE_FAULTS="drop_transfer=chaos-drop,delay_transfer=chaos-late"

Each fault names a request-id prefix; it hits a request's first attempt only (the router's retries run under
"<id>#<n>", router/dispatch.py), so a test knows exactly which requests are hit and that each must recover.
- drop_transfer: the prefill worker hands over a ticket nobody can read, as if the offer were lost; the
  decode side's load fails (KVTransferFailed).
- delay_transfer: the prefill worker hands over its ticket only after the lease has run out; the decode
  side finds it expired.
"""
from __future__ import annotations

import os
from typing import Optional

from pdserve.errors import InvalidRequest

KINDS = ("drop_transfer", "delay_transfer")


class Faults:
    def __init__(self, spec: Optional[str] = None):
        spec = os.environ.get("PDSERVE_FAULTS", "") if spec is None else spec
        self.prefixes: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            kind, _, prefix = item.partition("=")
            if kind not in KINDS or not prefix:
                raise InvalidRequest(f"PDSERVE_FAULTS: {item!r} is not one of {', '.join(k + '=PREFIX' for k in KINDS)}")
            self.prefixes[kind] = prefix

    def hits(self, kind: str, request_id: str) -> bool:
        prefix = self.prefixes.get(kind)
        return prefix is not None and request_id.startswith(prefix) and "#" not in request_id
