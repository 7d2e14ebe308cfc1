"""Request bytes that are not a valid message end the call with INVALID_ARGUMENT, on every RPC of the server.

grpc.aio parses a request with the method's deserializer before any servicer code runs; when that raises
(garbage bytes, a truncated message, a string field that is not UTF-8), gRPC answers UNKNOWN with the
exception's text and logs a traceback per call. Here every handler gets the raw bytes instead and parses them
itself, so a bad message is the client's error (INVALID_ARGUMENT, in our words) and costs the log nothing.
"""
from __future__ import annotations

import inspect
from contextlib import aclosing

import grpc


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return decoding(handler, details.method)


def decoding(handler, method: str):
    """`handler` with its request parsing moved into the call, where a failure can set the status."""
    parse = handler.request_deserializer
    kind = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    what = kind.full_name if kind is not None else f"request of {method}"
    message = f"the request bytes are not a valid {what} (malformed protobuf, or a string field that is not UTF-8)"

    async def request(raw: bytes, context):
        try:
            return parse(raw)
        except Exception:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    async def requests(raws, context):
        async for raw in raws:
            yield await request(raw, context)

    changed = {}
    for name, streaming_request in (("unary_unary", False), ("unary_stream", False), ("stream_unary", True),
                                    ("stream_stream", True)):
        fn = getattr(handler, name)
        if fn is None:
            continue
        if not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
            return handler  # a sync handler runs in gRPC's thread pool: left as it is
        changed[name] = _wrap(fn, requests if streaming_request else request)
    return handler._replace(request_deserializer=None, **changed)


def _wrap(fn, decode):
    if inspect.isasyncgenfunction(fn):
        async def streaming(arg, context):
            # closed here, not when collected: a stream that ends early frees what it holds now
            async with aclosing(fn(await _arg(decode, arg, context), context)) as responses:
                async for r in responses:
                    yield r
        return streaming

    async def once(arg, context):
        return await fn(await _arg(decode, arg, context), context)
    return once


async def _arg(decode, arg, context):
    """A unary request parsed (awaited), or a request stream wrapped (its messages parsed as they come)."""
    out = decode(arg, context)
    return await out if inspect.isawaitable(out) else out
