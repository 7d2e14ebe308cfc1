"""An OTLP/gRPC trace receiver on 127.0.0.1, for tests and benchmarks of a traced server: point
`tracing.otlp_endpoint` at `receiver.endpoint`, and every process's spans land in `receiver.spans`."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans: list[tuple[dict, object]] = []  # (resource attributes, opentelemetry.proto Span), as received
        self._lock = threading.Lock()
        self._server = grpc.server(ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server.start()

    def Export(self, request, context):
        with self._lock:
            for rs in request.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    self.spans += [(resource, s) for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[tuple[dict, object]]:
        """The spans received so far of the trace with this id (32 hex digits)."""
        want = bytes.fromhex(trace_id)
        with self._lock:
            return [(r, s) for r, s in self.spans if s.trace_id == want]

    def stop(self) -> None:
        self._server.stop(None)


def attributes(kvs) -> dict:
    """OTLP KeyValues as a dict of plain values."""
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) if kv.value.WhichOneof("value") else None
            for kv in kvs}
