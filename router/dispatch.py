"""One request's way through the cluster: pick a prefill and a decode worker, prefill, stream the
decode worker's deltas (they come through the worker's token channel, router/channels.py, while the
request's `generate` call runs); keep the workers' load counts exact on every exit, and free the request's
blocks on both sides when it did not finish (client gone, error, Abort).

- Abort ends the stream at once, at any stage (waiting for its prefill, prefilling, its KV moving,
  decoding), with a last message of finish_reason "abort"; the workers are told to drop the request
  without the router waiting for them (an engine takes it between two steps).
- No wait on a worker lasts past `router.call_timeout_s`, and a worker the cluster finds dead or
  UNHEALTHY (router/cluster.py) interrupts the requests that depend on it.
- Recovery: when a worker dies, stalls, or the KV transfer fails, the request moves to other workers:
  the prompt plus the tokens already streamed is prefilled again and decoding continues from there, so
  the client sees no token twice and none missing, and the stream (token ids and text, stop strings, seeded
  sampling) is that of an undisturbed run. At most
  `router.max_migrations` moves; past them, UNAVAILABLE.

Errors are raised as they come (a Ray error wraps the worker's own: `cause_of`); the gRPC layer maps them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from pdserve import tracing
from pdserve.config import Config
from pdserve.engine.block_manager import block_hashes
from pdserve.engine.sequence import Continuation, SamplingParams
from pdserve.errors import InvalidRequest, KVTransferFailed, NoFreeBlocks, NoReadyWorker
from pdserve.router.channels import Channels
from pdserve.router.cluster import Cluster, actor_dead
from pdserve.router.log_limit import LogLimiter
from pdserve.router.policy import make_policies
from pdserve.router.pool import Worker
from pdserve.worker.messages import DecodeDelta, FinishReason, PrefillResult

log = logging.getLogger("pdserve.router")
EARLY_ABORT_S = 10.0


@dataclass(frozen=True)
class Delta:
    """A decode worker's delta as the router forwards it."""
    decode: DecodeDelta
    workers: Optional[tuple[str, str]] = None  # (prefill, decode) worker names, on the first delta only


class WorkerFailed(RuntimeError):
    """A worker died, stopped answering or could not move the KV: the request may move to other workers.
    `cause` is the failure's metrics label (worker_died, timeout, transfer)."""

    def __init__(self, msg: str, cause: str):
        super().__init__(msg)
        self.cause = cause


class _Interrupted(Exception):
    """The request was aborted, or a worker it depends on was lost (Request.lost says which)."""


def cause_of(exc: BaseException) -> BaseException:
    """The worker-side exception inside a Ray error."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def failure_cause(exc: BaseException) -> str:
    """The metrics label of why a request failed."""
    c = cause_of(exc)
    if isinstance(c, WorkerFailed):
        return c.cause
    if isinstance(c, InvalidRequest):
        return "invalid"
    if isinstance(c, NoFreeBlocks):
        return "resource_exhausted"
    if isinstance(c, NoReadyWorker):
        return "unavailable"
    return "internal"


@dataclass(eq=False)
class Request:
    rid: str
    ids: list[int]
    params: SamplingParams
    namespace: Optional[str]
    output: list[int] = field(default_factory=list)  # token ids streamed to the client so far
    emitted_chars: int = 0  # characters of their text streamed to the client so far
    P: Optional[Worker] = None  # the current attempt's workers
    D: Optional[Worker] = None
    holding_prefill: bool = False  # the prefill worker holds its KV until the decode side has pulled it
    stage: str = "queued"  # queued | prefill | transfer | decode
    interrupt: asyncio.Event = field(default_factory=asyncio.Event)
    waiter: Optional[asyncio.Future] = None  # completes when `interrupt` is set
    aborted: bool = False
    lost: Optional[Worker] = None  # the worker whose loss interrupted the attempt
    done: bool = False  # its last message is on its way: too late to abort
    migrations: int = 0
    cached_tokens: int = 0  # of the first attempt (what the client's usage reports)
    trace: Optional[tracing.RequestTrace] = None  # its spans, when it is traced (pdserve/tracing.py)

    def arm(self) -> None:
        """Ready to be interrupted (again, for an attempt after a lost worker)."""
        self.lost = None
        self.interrupt.clear()
        # always a new waiter: the old one may still be about to complete from the interrupt just handled
        if self.waiter is not None:
            self.waiter.cancel()
        self.waiter = asyncio.ensure_future(self.interrupt.wait())


class Dispatcher:
    def __init__(self, config: Config, cluster: Cluster, metrics=None):
        self.cluster = cluster
        self.block_size = config.engine.block_size
        self.prefill_policy, self.decode_policy = make_policies(config.router.policy, cluster.index,
                                                                config.router.load_balance_slack)
        self.metrics = metrics
        self.prefill_pool = "prefill" in config.roles()  # colocated: the decode worker prefills itself
        self.call_timeout = config.router.call_timeout_s
        self.max_migrations = config.router.max_migrations
        self.start_timeout = config.router.start_timeout_s
        self.roles = config.roles()
        self.active: dict[str, Request] = {}  # request id -> its state, while it runs
        # ids aborted before their request was dispatched (an Abort can overtake its Generate during admission)
        self.aborted_early: dict[str, float] = {}
        self.log = LogLimiter(log)
        self._background: set = set()
        self.channels = Channels(self._channel_closed, metrics)
        cluster.listeners.append(self._on_cluster)

    def _on_cluster(self, event: str, w: Worker) -> None:
        if event == "lost":
            for req in self.active.values():
                if req.D is w or (req.P is w and req.holding_prefill):
                    req.lost = w
                    req.interrupt.set()
        m = self.metrics
        if m is None:
            return
        if event == "removed":
            m.forget_worker(w.role, w.name)
        elif event in ("died", "restarted"):
            m.worker_event(w.role, event)

    def _pick(self, num_tokens: int, hashes: list) -> tuple[Optional[Worker], Worker]:
        pools, bs = self.cluster.pools, self.block_size
        P = self.prefill_policy.pick(pools["prefill"].ready(), num_tokens, hashes, bs) if self.prefill_pool else None
        # colocated, the decode worker prefills too: it is picked as a prefill worker is, by its prefix cache
        D = (self.decode_policy if self.prefill_pool else self.prefill_policy).pick(
            pools["decode"].ready(), num_tokens, hashes, bs)
        if (P is None and self.prefill_pool) or D is None:
            raise NoReadyWorker(f"the {'decode' if D is None else 'prefill'} pool has no ready worker")
        return P, D

    async def _pick_refilled(self, req: Request, num_tokens: int, hashes: list) -> tuple[Optional[Worker], Worker]:
        """_pick, except that a request moving off a lost worker waits for its pool's replacement to be ready
        (up to router.start_timeout_s) when no worker is left: the fault costs the replacement's start, not
        the request. A new request into an empty pool is refused at once (the client may go elsewhere), as is
        one into a pool scaled to zero."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                return self._pick(num_tokens, hashes)
            except NoReadyWorker:
                pools = [self.cluster.pools[r] for r in self.roles]
                if not req.migrations or time.monotonic() > deadline or not all(p.target for p in pools):
                    raise
            if req.interrupt.is_set():
                raise _Interrupted
            await asyncio.sleep(0.1)

    async def run(self, rid: str, ids: list[int], params: SamplingParams,
                  namespace: Optional[str]) -> AsyncIterator[Delta]:
        """The request's deltas; the last has `decode.finished`. `rid` must not be in `active`."""
        req = Request(rid, ids, params, namespace, trace=tracing.current())
        # registered before the first await, so the caller's duplicate-id check cannot race
        self.active[rid] = req
        early = self.aborted_early.pop(rid, None)
        req.aborted = early is not None and time.monotonic() - early < EARLY_ABORT_S
        m, t0 = self.metrics, time.monotonic()
        outcome = "cancelled"  # unless it ends otherwise: the client went away
        if m:
            m.request_started()
        try:
            while True:
                try:
                    # closed here, not when collected: an attempt left behind still holds blocks and counts
                    async with aclosing(self._attempt(req, t0)) as attempt:
                        async for d in attempt:
                            if d.decode.finished:
                                outcome = d.decode.finish_reason.value
                                if m:
                                    m.request_finished(time.monotonic() - t0, d.decode)
                            yield d
                    return
                except _Interrupted:
                    if req.aborted:
                        outcome = "aborted"
                        req.done = True
                        yield Delta(DecodeDelta([], "", finish_reason=FinishReason.ABORT, prompt_tokens=len(ids),
                                                completion_tokens=len(req.output), cached_tokens=req.cached_tokens),
                                    None if req.output else self._names(req))
                        return
                    w = req.lost
                    failure = (WorkerFailed(f"the {w.role} worker {w.name} was lost (dead or not answering)",
                                            "timeout" if w.name in self.cluster.pools[w.role].workers
                                            else "worker_died") if w is not None
                               else WorkerFailed("the request was interrupted", "internal"))
                except WorkerFailed as e:
                    failure = e
                if req.migrations >= self.max_migrations:
                    outcome = failure.cause
                    raise WorkerFailed(f"request {rid} failed: {failure}"
                                       + (f" (moved {req.migrations} times before)" if req.migrations else ""),
                                       failure.cause)
                req.migrations += 1
                self.log.warning(f"migrate-{failure.cause}", "request %s moves to other workers (%d of at most %d): "
                                 "%s", rid, req.migrations, self.max_migrations, failure)
                if m:
                    m.request_migrated(failure.cause)
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as e:
            outcome = failure_cause(e) if outcome == "cancelled" else outcome
            self.log.warning(f"fail-{outcome}", "request %s failed: %s", rid, cause_of(e))
            raise
        finally:
            self.active.pop(rid, None)
            if req.waiter is not None:
                req.waiter.cancel()
            if m and outcome not in ("stop", "length"):
                m.request_failed(outcome)
            if req.trace is not None:
                req.trace.end(outcome, completion_tokens=len(req.output), migrations=req.migrations)

    def _channel_closed(self, w: Worker) -> None:
        """The requests decoding on `w` can get no more tokens: they move, as off a lost worker."""
        for req in self.active.values():
            if req.D is w and req.stage in ("transfer", "decode") and not req.done:
                req.lost = w
                req.interrupt.set()

    def _names(self, req: Request) -> Optional[tuple[str, str]]:
        return None if req.D is None else (req.D.name if req.P is None else req.P.name, req.D.name)

    async def _attempt(self, req: Request, t0: float) -> AsyncIterator[Delta]:
        """One try on one prefill and one decode worker, from the tokens streamed so far."""
        if req.aborted:
            raise _Interrupted
        req.arm()
        bs, index, m = self.block_size, self.cluster.index, self.metrics
        prompt = req.ids + req.output
        params, cont = req.params, None
        if req.output:
            params = dataclasses.replace(params, max_tokens=params.max_tokens - len(req.output))
            # Text a decode worker held back (an incomplete UTF-8 character, a tail that may begin a stop
            # string) is not kept here: the next one rebuilds it from the tokens and the count of characters
            # streamed (engine Continuation), so the detokenizer and the stop rule live in the engine alone and
            # the router carries two numbers it has anyway. Seeded sampling needs nothing: a token's draw
            # depends on its position, not on the worker (engine/sampler.py).
            cont = Continuation(len(req.output), req.emitted_chars)
        # a fresh id on the workers: the lost attempt's id may still be held there (a stalled worker)
        wid = req.rid if not req.migrations else f"{req.rid}#{req.migrations}"
        with tracing.span(req.trace, "route", attempt=req.migrations):
            hashes = block_hashes(prompt[:-1], bs, req.namespace)
            P, D = await self._pick_refilled(req, len(prompt), hashes)
        req.P, req.D, req.stage = P, D, "prefill"
        # the worker that prefills (P, or D colocated) has these tokens queued until its first result
        prefiller = P or D
        uncached = len(prompt) - min(index.overlap(prefiller.name, hashes) * bs, len(prompt))
        prefiller.queued_tokens += uncached
        index.expect(prefiller.name, hashes)
        if P is not None:
            # the prefill worker counts as busy until the decode side has pulled the KV (first delta)
            P.inflight += 1
        D.inflight += 1
        colocated_prefill = P is None
        req.holding_prefill = in_prefill = P is not None
        decode_sent = finished = False
        stream_span = None
        try:
            prefill: Optional[PrefillResult] = None
            if P is not None:
                with tracing.span(req.trace, "prefill", "client", worker=P.name, attempt=req.migrations) as span:
                    prefill = await self._wait(req, P, P.actor.prefill.remote(
                        wid, prompt, req.namespace, trace_context=tracing.carrier(span)))
                if prefill is None:  # the worker dropped it (its own abort): prefill it again
                    raise WorkerFailed(f"the prefill worker {P.name} dropped request {req.rid}", "internal")
                P.queued_tokens -= uncached
                in_prefill = False
                if m:
                    m.prefill_done(P, prefill, len(prompt))
                if not req.migrations:
                    req.cached_tokens = prefill.num_cached_tokens
            req.stage = "transfer"
            stream_span = tracing.start(req.trace, "stream", "client", worker=D.name, attempt=req.migrations)
            inbox = self.channels.open(D, wid)  # before the call: its first tokens may come before it returns
            call = asyncio.ensure_future(D.actor.generate.remote(
                wid, prompt, params, prefill, req.namespace, trace_context=tracing.carrier(stream_span),
                continuation=cont))
            call.add_done_callback(_retrieved)
            decode_sent = True
            last = None
            while True:
                d: Optional[DecodeDelta] = await self._wait(req, D, inbox.get(), call)
                if d is None:
                    raise WorkerFailed(f"the decode worker {D.name} ended request {req.rid} early", "internal")
                # deltas that came while this loop was behind leave as one message: what a message costs here
                # (the client's stream write, the metrics) is paid once, not once per token
                while not d.finished and not inbox.empty():
                    d = d.then(inbox.get_nowait())
                if req.holding_prefill:
                    P.inflight -= 1
                    req.holding_prefill = False
                if colocated_prefill:
                    D.queued_tokens -= uncached
                    colocated_prefill = False
                req.stage = "decode"
                now = time.monotonic()
                first = not req.output and last is None
                if m:
                    m.token_delta(first, now - (last or t0), len(d.token_ids))
                last = now
                names = self._names(req) if first else None
                req.output.extend(d.token_ids)
                req.emitted_chars += len(d.text)
                if d.finished:
                    finished = req.done = True
                    if req.migrations:  # the client's usage is of the whole request
                        d = dataclasses.replace(d, prompt_tokens=len(req.ids), completion_tokens=len(req.output),
                                                cached_tokens=req.cached_tokens)
                yield Delta(d, names)
                if finished:
                    return
        finally:
            self.channels.close(wid)
            tracing.end(stream_span, None if finished else "ended before its last token")
            if in_prefill:
                P.queued_tokens -= uncached
            if colocated_prefill:
                D.queued_tokens -= uncached
            if req.holding_prefill:
                P.inflight -= 1
            D.inflight -= 1
            if not finished:  # interrupted, failed, or the client went away: free the blocks on both sides
                if req.holding_prefill:
                    self._tell(P, "abort", wid)
                if decode_sent:
                    self._tell(D, "abort", wid)
            req.holding_prefill = False

    async def _wait(self, req: Request, w: Worker, aw, call: Optional[asyncio.Future] = None):
        """`aw`'s result, unless the request is interrupted first (_Interrupted) or `w` fails or stays silent
        past the call timeout (WorkerFailed). A worker-side error of the request's own is raised as it is.
        `call`: the worker call whose results `aw` waits for (generate, whose tokens come by the channel): its
        failure is raised at once; its end without the request's last delta is None."""
        fut = asyncio.ensure_future(aw)
        try:
            while True:
                waiting = [fut, req.waiter]
                if call is not None:
                    if not call.done():
                        waiting.append(call)
                    elif call.exception() is not None:
                        raise self._failure(w, call.exception())
                    elif call.result() is False and not fut.done():
                        return None
                done, _ = await asyncio.wait(waiting, timeout=self.call_timeout, return_when=asyncio.FIRST_COMPLETED)
                # the flag, not `done`: the waiter task may not have run yet, and after an Abort no late result
                # may finish the request
                if req.interrupt.is_set():
                    raise _Interrupted
                if fut in done:
                    try:
                        return fut.result()
                    except Exception as e:
                        raise self._failure(w, e) from None
                if not done:
                    raise WorkerFailed(f"the {w.role} worker {w.name} did not answer within {self.call_timeout:g} s",
                                       "timeout")
                # `call` ended first: its error next round, or its last deltas are still on their way here
        finally:
            if not fut.done():
                fut.cancel()

    def _failure(self, w: Worker, e: BaseException) -> BaseException:
        """What to raise for `e`, an error of a call to `w`."""
        cause = cause_of(e)
        if isinstance(cause, KVTransferFailed):
            return WorkerFailed(str(cause), "transfer")
        if actor_dead(e) or "Actor" in type(e).__name__:
            self.cluster.worker_failed(w, e)  # its other requests move now, not at their next call
            dead = actor_dead(e)
            return WorkerFailed(f"the {w.role} worker {w.name} {'died' if dead else 'is unreachable'}",
                                "worker_died" if dead else "timeout")
        return e

    def refused(self, exc: BaseException) -> None:
        """Count a request refused before it was dispatched (admission: invalid, full)."""
        trace = tracing.current()
        if trace is not None:
            trace.end(failure_cause(exc), exc)
        if self.metrics is not None:
            self.metrics.request_refused(failure_cause(exc))

    async def abort(self, rid: str) -> bool:
        """End the request's stream now with finish_reason "abort" (its workers drop it in the background);
        False when no such request is running (unknown, or already finished). An unknown id is remembered for
        EARLY_ABORT_S: a request with that id dispatched meanwhile (it was still being admitted) ends at once."""
        req = self.active.get(rid)
        if req is None:
            now = time.monotonic()
            self.aborted_early[rid] = now
            while len(self.aborted_early) > 10_000 or now - next(iter(self.aborted_early.values())) > EARLY_ABORT_S:
                del self.aborted_early[next(iter(self.aborted_early))]
            return False
        if req.done:
            return False
        req.aborted = True
        req.interrupt.set()
        return True

    def _tell(self, w: Worker, method: str, *args) -> None:
        """Call a worker without waiting for it (bounded by the call timeout; a dead one is ignored)."""
        if self.cluster.pools[w.role].workers.get(w.name) is not w:
            return  # it left its pool (died): its blocks went with it
        async def call():
            try:
                await asyncio.wait_for(getattr(w.actor, method).remote(*args), self.call_timeout)
            except Exception as e:  # the worker is gone or stalled: its blocks go with it, or its lease expires
                self.log.warning(f"tell-{w.name}", "worker %s did not take %s: %s", w.name, method,
                                 type(e).__name__)

        t = asyncio.get_running_loop().create_task(call())
        self._background.add(t)
        t.add_done_callback(self._background.discard)


def _retrieved(call: asyncio.Future) -> None:
    """A generate call's error is read by the attempt waiting on it, if any is left; this keeps asyncio from
    reporting it as never retrieved when none is."""
    if not call.cancelled():
        call.exception()
