"""Who may call the router: an optional bearer token, the same on both front doors.

- gRPC: every call carries the metadata `authorization: Bearer TOKEN`, or it ends with UNAUTHENTICATED before
  its request is even parsed. Open: `grpc.health.v1.Health`, because Kubernetes' gRPC probes (and load
  balancers' health checks) cannot send metadata, and its answer (SERVING or not) tells nothing about the model
  or the requests.
- HTTP (the OpenAI port): the header `Authorization: Bearer TOKEN`, which is what the `openai` client sends as
  its api_key; else 401 with OpenAI's error object. Open: /health and /ready, for kubelet's httpGet probes,
  which carry no token. /metrics on this port needs the token: it is the public door. The separate metrics
  port (router.metrics_port) is open: it is the operators' port, bound to router.host, that Prometheus
  scrapes, and it serves aggregate counters only, no prompt or output.

The token comes from router.auth_token_file, else $PDSERVE_AUTH_TOKEN; it is compared in constant time and is
never logged or echoed in an error.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Optional

import grpc

from pdserve.config import Config, ConfigError

ENV = "PDSERVE_AUTH_TOKEN"
HEALTH_SERVICE = "/grpc.health.v1.Health/"
OPEN_PATHS = ("/health", "/ready")
REFUSED = "this router needs a bearer token: send the header 'authorization: Bearer <token>'"
WRONG = "the bearer token is wrong"


def load_token(config: Config) -> Optional[str]:
    """The router's token, or None (no token: every caller is served)."""
    path = config.router.auth_token_file
    if path is None:
        return os.environ.get(ENV, "").strip() or None
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"router.auth_token_file: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not token:
        raise ConfigError(f"router.auth_token_file: {path} is empty")
    return token


def check(header: Optional[str], token: str) -> Optional[str]:
    """None when `header` (an authorization value) carries `token`, else why not (safe to tell the client)."""
    if not header:
        return REFUSED
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return REFUSED
    return None if hmac.compare_digest(given.strip().encode(), token.encode()) else WRONG


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call without the token, but health checks."""

    def __init__(self, token: str):
        self.token = token

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_SERVICE):
            return handler
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        why = check(header if isinstance(header, str) else None, self.token)
        return handler if why is None else refusing(handler, grpc.StatusCode.UNAUTHENTICATED, why)


def refusing(handler, code: grpc.StatusCode, message: str):
    """`handler` (any of the four kinds) turned into one that ends the call with `code`; its request bytes are
    never parsed."""
    async def refuse(request, context):
        await context.abort(code, message)

    kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
    return handler._replace(request_deserializer=None,
                            **{k: refuse for k in kinds if getattr(handler, k) is not None})


def http_guard(app, token: str):
    """The ASGI app `app`, answering 401 (OpenAI's error object) to HTTP requests without the token."""
    from starlette.responses import JSONResponse

    from pdserve.router.openai_map import error_body

    async def guarded(scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            why = check(header, token)
            if why is not None:
                response = JSONResponse(error_body(401, why, code="invalid_api_key"), status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded
