"""Fault injection for the chaos tests: off, and free, unless the environment variable PDSERVE_FAULTS is set
(read once, when a worker starts; a local `pdserve serve` passes its environment on to its workers).

    PDSERVE_FAULTS="drop_transfer=chaos-drop,delay_transfer=chaos-late,kill_decode_at=chaos-kd:5"

Each fault names a request-id prefix; it hits a request's first attempt only (the router's retries run under
"<id>#<n>", router/dispatch.py), so a test knows exactly which requests are hit and that each must recover.
- drop_transfer: the prefill worker hands over a ticket nobody can read, as if the offer were lost; the
  decode side's load fails (KVTransferFailed).
- delay_transfer: the prefill worker hands over its ticket only after the lease has run out; the decode
  side finds it expired.
- kill_prefill_at=PREFIX:N: the prefill worker computing the request's prompt is killed (SIGKILL, as by
  `kill -9` or the OOM killer: no exit hook runs, nothing is flushed) once N of the prompt's tokens have their
  KV: mid-prefill when the prompt is longer, before it answers when it is not.
- kill_decode_at=PREFIX:N: the decode worker of the request is killed the same way once it has sent N of the
  request's tokens, when the next one is ready: every request it holds is mid-decode.
The kills are deterministic in the request and the step, where a test's `kill -9` from outside lands
wherever the load happens to be.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

from pdserve.errors import InvalidRequest

KINDS = ("drop_transfer", "delay_transfer")
KILLS = ("kill_prefill_at", "kill_decode_at")  # these take PREFIX:N


class Faults:
    def __init__(self, spec: Optional[str] = None):
        spec = os.environ.get("PDSERVE_FAULTS", "") if spec is None else spec
        self.prefixes: dict[str, str] = {}
        self.counts: dict[str, int] = {}  # kill kind -> N
        for item in filter(None, (s.strip() for s in spec.split(","))):
            kind, _, prefix = item.partition("=")
            n = ""
            if kind in KILLS:
                prefix, _, n = prefix.rpartition(":")
            if kind not in KINDS + KILLS or not prefix or (kind in KILLS and not n.isdigit()):
                forms = [k + "=PREFIX" for k in KINDS] + [k + "=PREFIX:N" for k in KILLS]
                raise InvalidRequest(f"PDSERVE_FAULTS: {item!r} is not one of {', '.join(forms)}")
            self.prefixes[kind] = prefix
            if n:
                self.counts[kind] = int(n)

    def hits(self, kind: str, request_id: str) -> bool:
        prefix = self.prefixes.get(kind)
        return prefix is not None and request_id.startswith(prefix) and "#" not in request_id

    def kill_at(self, kind: str, request_id: str) -> Optional[int]:
        """N of the kill fault `kind` when it hits this request, else None."""
        return self.counts[kind] if self.hits(kind, request_id) else None


def die() -> None:
    """Kill this worker process as `kill -9` would (a chaos test's fault)."""
    os.kill(os.getpid(), signal.SIGKILL)
