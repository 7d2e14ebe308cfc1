"""The HTTP front door, in the router process: OpenAI's `/v1/completions`, `/v1/chat/completions` (SSE when
streamed), `/v1/models`, plus `/health`, `/ready` and `/metrics`.

The stack is Starlette on uvicorn. Starlette is the ASGI toolkit FastAPI (and so vLLM's OpenAI server) is
built on, kept by Encode and released monthly; it gives routing and streaming responses and no more, so
validation and error shapes stay ours (openai_map.py) rather than a framework's 422s. uvicorn is the ASGI
server vLLM and SGLang ship with; it runs here on the router's own asyncio loop beside grpc.aio, so both
doors hand requests to the same Dispatcher with no thread or process hop.

A client that goes away mid-request (streamed or not) aborts its request: the dispatch generator is closed
at once, which frees its blocks on both workers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from contextlib import aclosing

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pdserve import tracing
from pdserve.errors import InvalidRequest
from pdserve.router.openai_map import (
    SSE_DONE,
    APIError,
    Reply,
    cache_namespace,
    chat_input,
    check_model,
    completion_input,
    error_body,
    http_status,
    models,
    parse_body,
    sampling,
    served_model_name,
    sse,
    stream_options,
)
from pdserve.router.metrics import request_arrived
from pdserve.router.proto_map import status_of

log = logging.getLogger("pdserve.http")
# bodies larger than this are parsed in admission's threads, not on the loop
_INLINE_JSON = 256 * 1024


def _error(status: int, message: str, param=None, code=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _failure(exc: BaseException) -> JSONResponse:
    if isinstance(exc, APIError):
        return _error(exc.status, str(exc), exc.param, exc.code)
    code, message = status_of(exc)
    return _error(http_status(code), message)


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, coro):
    """Await `coro`, cancelling it if the client disconnects first (its dispatch then frees the blocks)."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
    if work.cancelled():
        raise _ClientGone()
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first(deltas):
    try:
        return await deltas.__anext__()
    except StopAsyncIteration:  # aborted before its first token
        return None


class _Stream(StreamingResponse):
    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette drops a body iterator it stopped reading (client gone) without closing it; closing it
            # here frees the request's blocks now instead of whenever the generator is collected
            await self.body_iterator.aclose()


class OpenAIApp:
    def __init__(self, router, metrics):
        self.router = router
        self.metrics = metrics
        self.admission = router.admission
        self.dispatch = router.dispatch
        self.model = served_model_name(router.config)
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.router.tokenizer.hf.decode([token_id])
        return text

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        request_arrived()
        if tracing.enabled():  # a traceparent header is its parent
            tracing.begin_request("http", request.headers.items())
        try:
            raw = await request.body()
            body = parse_body(raw) if len(raw) <= _INLINE_JSON else await self.admission.off_loop(parse_body, raw)
            check_model(body, self.model)
            inputs = chat_input(body) if chat else completion_input(body)
            params, want_logprobs = sampling(body, chat, self.router.max_model_len)
            stream, include_usage = stream_options(body)
            rid = request.headers.get("x-request-id") or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            req = await _unless_disconnected(request, self.admission.admit(
                params, **inputs, request_id=rid, namespace=cache_namespace(body)))
        except _ClientGone:
            return Response(status_code=499)
        except Exception as e:  # bad input or a full router: a status and a message, never a traceback
            self.dispatch.refused(InvalidRequest(str(e)) if isinstance(e, APIError) else e)
            return _failure(e)
        reply = Reply(req.rid, self.model, chat, want_logprobs, self.token_text, len(req.ids))
        deltas = self.dispatch.run(req.rid, req.ids, req.params, req.namespace)
        try:
            # the first delta is awaited before answering, so an empty pool is a 503, not a broken stream
            first = await _unless_disconnected(request, _first(deltas))
        except BaseException as e:
            await deltas.aclose()
            if isinstance(e, _ClientGone):
                return Response(status_code=499)
            if not isinstance(e, Exception):
                raise
            return _failure(e)
        if stream:
            return _Stream(self._events(reply, first, deltas, include_usage), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Request-Id": req.rid})
        try:
            await _unless_disconnected(request, self._collect(reply, first, deltas))
        except _ClientGone:
            return Response(status_code=499)
        except Exception as e:
            return _failure(e)
        return JSONResponse(reply.whole(), headers={"X-Request-Id": req.rid})

    async def _collect(self, reply: Reply, first, deltas) -> None:
        async with aclosing(deltas):
            if first is not None:
                reply.add(first)
                async for d in deltas:
                    reply.add(d)
        reply.end()

    async def _events(self, reply: Reply, first, deltas, include_usage: bool):
        async with aclosing(deltas):
            try:
                if reply.chat:
                    yield sse(reply.first_chat_chunk())
                if first is not None:
                    yield sse(reply.chunk(reply.add(first)))
                    async for d in deltas:
                        yield sse(reply.chunk(reply.add(d)))
                last = reply.end()
                if last is not None:
                    yield sse(reply.chunk(last))
                if include_usage:
                    yield sse(reply.usage_chunk())
            except Exception as e:  # the status line is sent: the error goes in the stream, as vLLM does
                code, message = status_of(e)
                yield sse(error_body(http_status(code), message))
        yield SSE_DONE

    async def list_models(self, request: Request) -> Response:
        return JSONResponse(models(self.model, self.router.max_model_len, self.router.arch.vocab_size, self.created))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        return ready_response(self.router)

    async def scrape(self, request: Request) -> Response:
        return metrics_response(self.metrics)


def ready_response(router) -> Response:
    if router.admission.closed is not None:  # draining (router/drain.py)
        return _error(503, router.admission.closed)
    pools = router.cluster.pools
    empty = [role for role in router.config.roles() if not pools[role].ready()]
    if empty:
        return _error(503, f"no ready worker in the {' and '.join(empty)} pool{'s' if len(empty) > 1 else ''}")
    return JSONResponse({"status": "ready"})


def metrics_response(metrics) -> Response:
    metrics.collect_pools()
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error(exc.status_code, exc.detail if exc.status_code != 404 else f"no route {request.url.path}")


def openai_app(router, metrics) -> Starlette:
    api = OpenAIApp(router, metrics)
    routes = [Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/v1/models", api.list_models, methods=["GET"]),
              Route("/health", api.health, methods=["GET"]),
              Route("/ready", api.ready, methods=["GET"]),
              Route("/metrics", api.scrape, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


def metrics_app(metrics, router=None) -> Starlette:
    """The operators' port: /metrics, and with `router` the probes' /health and /ready, which work here when the
    public doors need TLS client certificates or a token (router/tls.py)."""
    async def scrape(request: Request) -> Response:
        return metrics_response(metrics)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        return ready_response(router)

    probes = [] if router is None else [Route("/health", health), Route("/ready", ready)]
    return Starlette(routes=[Route("/metrics", scrape), Route("/", scrape), *probes],
                     exception_handlers={HTTPException: _http_error})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # the router's own signal handlers stop it (pdserve/commands.py); uvicorn's would replace them
        yield


class HTTPServer:
    """One uvicorn server on the running loop, on a socket bound before anything slow started
    (router/listeners.py), so that a taken port is a one-line error. `tls`: uvicorn's ssl_* options."""

    def __init__(self, app, sock: socket.socket, tls: dict | None = None):
        self.sock = sock
        self.port = self.sock.getsockname()[1]
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its "Started server process" is no news
        self.server = _Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                             timeout_graceful_shutdown=2, **(tls or {})))
        self.task = None

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await self.task
        self.sock.close()
