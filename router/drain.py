"""Shutting down without dropping work (SIGTERM or SIGINT to `pdserve serve`; Kubernetes sends SIGTERM).

1. Stop admitting: new requests on either door get UNAVAILABLE (HTTP 503) and the overall health turns
   NOT_SERVING (/ready 503), so load balancers and probes take the router out of rotation; "liveness" stays
   SERVING, the process is not to be restarted while it drains.
2. The requests in flight run to their end, for at most router.drain_timeout_s.
3. Those still running then end with finish_reason "abort" (their blocks are freed on both workers), and the
   caller stops the servers, the workers and Ray.
"""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("pdserve.router")
CLOSED = "the router is shutting down and takes no new requests"
# after the aborts, how long their last messages may take to go out
ABORT_GRACE_S = 5.0


async def drain(router, pool_health, timeout_s: float) -> None:
    admission, dispatch = router.admission, router.dispatch
    admission.closed = CLOSED
    pool_health.draining = True
    await pool_health.publish(router.cluster.pools)
    inflight = len(dispatch.active) + admission.admitting
    if inflight:
        log.info("draining: %d request(s) in flight get up to %g s to finish", inflight, timeout_s)
    await _until_idle(admission, dispatch, time.monotonic() + timeout_s)
    left = list(dispatch.active)
    if left:
        log.warning("drain: %d request(s) still running after %g s end with finish_reason abort", len(left),
                    timeout_s)
        for rid in left:
            await dispatch.abort(rid)
        await _until_idle(admission, dispatch, time.monotonic() + ABORT_GRACE_S)


async def _until_idle(admission, dispatch, deadline: float) -> None:
    while (dispatch.active or admission.admitting) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
