"""OpenTelemetry tracing of each request across the router and its two workers; off unless
`tracing.otlp_endpoint` is set.

One request is one trace. The router's request span is a child of the caller's W3C `traceparent` (HTTP header
or gRPC metadata); the router hands each worker the context of its own span as an explicit argument (W3C
headers in a dict), so the workers' spans are children of the router's:

    router          request -+- admit
                             +- route                 (per attempt: a request that moves has several)
                             +- prefill --- prefill worker: prefill --- kv_send      (until the READ is done)
                             +- stream ---- decode worker:  decode ---- kv_transfer  (the NIXL READ)

Each process exports its own spans over OTLP/gRPC, as `<service_name>-router`, `-prefill` or `-decode`, and
flushes them when it stops.

Off, it costs nothing that shows: OpenTelemetry is imported only by setup(), and only when an endpoint is set; a
request pays a few `is None` tests (the front door's enabled(), the span helpers below given no trace or span)
and a token pays nothing. On, the router starts no span for a request the sampler dropped and sends its workers
no carrier for it.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterable, Optional

from pdserve.config import TracingConfig

_tracer = None  # this process's opentelemetry Tracer, once setup() found an endpoint; None: tracing off
_provider = None
_otel = None  # the few OpenTelemetry names used per request, bound by setup()
_NOOP = contextlib.nullcontext()
_W3C = ("traceparent", "tracestate")
# the request a front door is serving, in the task that serves it (as router/metrics.py's RequestClock)
_request: contextvars.ContextVar[Optional["RequestTrace"]] = contextvars.ContextVar("pdserve_request_trace",
                                                                                     default=None)


class _Otel:
    def __init__(self):
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.kinds = {"internal": trace.SpanKind.INTERNAL, "server": trace.SpanKind.SERVER,
                      "client": trace.SpanKind.CLIENT}
        self.in_context = trace.set_span_in_context
        self.Status, self.ERROR = trace.Status, trace.StatusCode.ERROR
        self.propagator = TraceContextTextMapPropagator()


def setup(config: TracingConfig, role: str, instance: Optional[str] = None) -> bool:
    """Trace this process as `<service_name>-<role>` (router, prefill, decode) when `config.otlp_endpoint` is set;
    `instance` names this one of several (a worker's name). False, importing nothing, when tracing is off."""
    global _tracer, _provider, _otel
    if not config.otlp_endpoint:
        return False
    if _tracer is not None:
        return True
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    attributes = {"service.name": f"{config.service_name}-{role}", "process.pid": os.getpid(), "pdserve.role": role}
    if instance:
        attributes["service.instance.id"] = instance
    # ParentBased: a caller's traceparent decides for its request, and the workers follow the router's decision
    provider = TracerProvider(resource=Resource.create(attributes),
                              sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
    # http:// is plaintext gRPC, https:// TLS (the exporter reads the scheme; config.py allows only these)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    _otel = _Otel()
    _provider, _tracer = provider, provider.get_tracer("pdserve")
    return True


def enabled() -> bool:
    return _tracer is not None


def flush(timeout_s: float = 5.0) -> bool:
    """Export the spans this process holds now (blocks up to `timeout_s`); True when all went out or none were held."""
    return _provider is None or _provider.force_flush(int(timeout_s * 1000))


def shutdown() -> None:
    """Flush and stop exporting (blocks while it flushes); tracing is off afterwards."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


# ---- the router ---------------------------------------------------------------------------------------------

class RequestTrace:
    """The router's spans of one request: the request span (`root`) and its children. Spans are passed, never
    made current: a request's work hops between tasks (a stream is read by whichever task the client's door
    runs it in), so OpenTelemetry's context-local current span would be wrong there."""
    __slots__ = ("tracer", "root", "ended")

    def __init__(self, tracer, root):
        self.tracer = tracer  # kept: a request still running when the router stops tracing ends its spans unsent
        self.root = root
        self.ended = False

    def start(self, name: str, kind: str = "internal", **attributes):
        return self.tracer.start_span(name, context=_otel.in_context(self.root), kind=_otel.kinds[kind],
                                      attributes=_attributes(attributes))

    def end(self, outcome: str, error: Optional[BaseException] = None, **attributes) -> None:
        """End the request span (once): its outcome is stop or length, or why it did not finish."""
        if self.ended:
            return
        self.ended = True
        self.root.set_attributes(_attributes(dict(attributes, outcome=outcome)))
        if error is not None:
            self.root.record_exception(error)
        if outcome not in ("stop", "length"):
            self.root.set_status(_otel.Status(_otel.ERROR, outcome))
        self.root.end()


def begin_request(door: str, headers: Iterable[tuple[str, str]]) -> None:
    """Called by a front door (only when enabled()) as a request arrives, in the task that will serve it: start
    the request span, a child of the caller's `traceparent` among `headers` (lower-case names) if it has one."""
    carrier = {k: v for k, v in headers if k in _W3C}
    parent = _otel.propagator.extract(carrier) if carrier else None
    root = _tracer.start_span("request", context=parent, kind=_otel.kinds["server"],
                              attributes={"pdserve.door": door})
    if root.is_recording():  # a request the sampler dropped gets no spans, and its workers no carrier
        _request.set(RequestTrace(_tracer, root))


def current() -> Optional[RequestTrace]:
    """The trace of the request the calling task serves; None when tracing is off or the request is not traced."""
    return _request.get()


def span(trace: Optional[RequestTrace], name: str, kind: str = "internal", **attributes):
    """Context manager: a child span of the request, ended on exit (an exception marks it failed); a no-op
    yielding None without a trace."""
    if trace is None:
        return _NOOP
    return _ending(trace.start(name, kind, **attributes))


def start(trace: Optional[RequestTrace], name: str, kind: str = "internal", **attributes):
    """A child span of the request that the caller ends with end(); None without a trace."""
    return None if trace is None else trace.start(name, kind, **attributes)


def carrier(span) -> Optional[dict]:
    """The W3C headers that make `span` the parent of a worker's spans; None for no span."""
    if span is None:
        return None
    headers: dict = {}
    _otel.propagator.inject(headers, context=_otel.in_context(span))
    return headers


# ---- the workers --------------------------------------------------------------------------------------------

def remote_span(name: str, carrier: Optional[dict], **attributes):
    """Context manager: this worker's span of a request, a child of the router's span `carrier` names; a no-op
    yielding None when the router sent no carrier or this process does not trace."""
    if carrier is None or _tracer is None:
        return _NOOP
    return _ending(_tracer.start_span(name, context=_otel.propagator.extract(carrier), kind=_otel.kinds["server"],
                                      attributes=_attributes(attributes)))


def start_child(parent, name: str, **attributes):
    """A span under `parent` (a span of this process), ended by the caller with end()."""
    return _tracer.start_span(name, context=_otel.in_context(parent), attributes=_attributes(attributes))


def annotate(span, **attributes) -> None:
    """Add attributes to `span` (None: nothing)."""
    if span is not None:
        span.set_attributes(_attributes(attributes))


def end(span, failure: Optional[str] = None) -> None:
    """End `span` (None: nothing to end), failed with the reason `failure` if given."""
    if span is None:
        return
    if failure is not None:
        span.set_status(_otel.Status(_otel.ERROR, failure))
    span.end()


@contextlib.contextmanager
def _ending(span):
    try:
        yield span
    except Exception as e:
        span.record_exception(e)
        first_line = (str(e).strip().splitlines() or [""])[0]  # a Ray error's message carries a whole traceback
        span.set_status(_otel.Status(_otel.ERROR, f"{type(e).__name__}: {first_line}"[:300]))
        raise
    except BaseException:  # cancelled (the client went away, a stream closed early): not the span's failure
        span.set_attribute("pdserve.cancelled", True)
        raise
    finally:
        span.end()


def _attributes(attributes: dict) -> dict:
    """pdserve.<name> for our own attribute names; None values left out (OpenTelemetry refuses them)."""
    return {f"pdserve.{k}": v for k, v in attributes.items() if v is not None}
