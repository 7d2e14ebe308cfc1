"""Prometheus metrics on the router, named `pdserve_*` with vLLM-style suffixes and a `role` label."""
from __future__ import annotations

import collections
import threading
import time
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

from pdserve.worker.messages import DecodeDelta, PrefillResult

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, cluster):
        self.cluster = cluster
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("pdserve_time_to_first_token_seconds", "Time to first token", registry=r, buckets=_LAT)
        self.itl = Histogram("pdserve_inter_token_latency_seconds", "Inter-token latency", registry=r, buckets=_LAT)
        self.e2e = Histogram("pdserve_e2e_request_latency_seconds", "End-to-end request latency", registry=r,
                             buckets=_LAT)
        self.requests = Counter("pdserve_requests", "Requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens", "Generated tokens", registry=r)
        self.prefix_queries = Counter("pdserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      ["role"], registry=r)
        self.prefix_hits = Counter("pdserve_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   ["role"], registry=r)
        self.scale_events = Counter("pdserve_scale_events", "Pool size changes", ["role", "direction"], registry=r)
        self.waiting = Gauge("pdserve_num_requests_waiting", "Requests waiting in engines", ["role"], registry=r)
        self.running = Gauge("pdserve_num_requests_running", "Requests running in engines", ["role"], registry=r)
        self.kv_usage = Gauge("pdserve_kv_cache_usage_perc", "KV cache usage (0-1)", ["role", "worker"], registry=r)
        self.replicas = Gauge("pdserve_pool_replicas", "Workers in a pool (ready or starting)", ["role"], registry=r)
        self.kv_bytes = Gauge("pdserve_kv_transfer_bytes", "KV bytes moved (total)", ["role"], registry=r)
        self.kv_seconds = Gauge("pdserve_kv_transfer_seconds", "Seconds spent moving KV (total)", ["role"],
                                registry=r)
        self.router_inflight = Gauge("pdserve_router_requests_inflight", "Requests inside the router", registry=r)
        self._recent = {"ttft": collections.deque(maxlen=256), "itl": collections.deque(maxlen=2048)}

    def recent(self, kind: str, window_s: float = 30.0):
        """Mean of the last `window_s` seconds of TTFT or inter-token latency (None: no data)."""
        cutoff = time.monotonic() - window_s
        vals = [v for t, v in self._recent[kind] if t >= cutoff]
        return sum(vals) / len(vals) if vals else None

    def request_started(self) -> None:
        self.router_inflight.inc()

    def prefill_done(self, worker, prefill: PrefillResult, num_prompt: int) -> None:
        self.prefix_queries.labels("prefill").inc(num_prompt)
        self.prefix_hits.labels("prefill").inc(prefill.num_cached_tokens)
        self.prompt_tokens.inc(num_prompt)

    def token_delta(self, first: bool, dt: float, n: int) -> None:
        (self.ttft if first else self.itl).observe(dt)
        self._recent["ttft" if first else "itl"].append((time.monotonic(), dt))
        self.generation_tokens.inc(n)

    def request_finished(self, seconds: float, last: DecodeDelta) -> None:
        self.e2e.observe(seconds)
        self.router_inflight.dec()
        self.requests.labels(last.finish_reason.value).inc()

    def request_aborted(self) -> None:
        self.router_inflight.dec()
        self.requests.labels("abort").inc()

    def scaled(self, role: str, prev: int, new: int) -> None:
        if new != prev:
            self.scale_events.labels(role, "up" if new > prev else "down").inc()

    def collect_pools(self) -> None:
        """Refresh gauges from the router's view of the pools (called on each scrape)."""
        for role, pool in self.cluster.pools.items():
            ws = list(pool.workers.values())
            self.replicas.labels(role).set(len(pool.active()))
            self.waiting.labels(role).set(sum(w.stats.get("num_waiting", 0) for w in ws))
            self.running.labels(role).set(sum(w.stats.get("num_running", 0) for w in ws))
            for w in ws:
                self.kv_usage.labels(role, w.name).set(w.stats.get("kv_cache_usage", 0.0))
            kt = [w.stats.get("kv_transfer", {}) for w in ws]
            # prefill: bytes its leases handed over; decode: bytes its READs landed
            key_b, key_s = ("bytes_sent", "stage_seconds") if role == "prefill" else ("bytes_received",
                                                                                    "transfer_seconds")
            self.kv_bytes.labels(role).set(sum(k.get(key_b, 0) for k in kt))
            self.kv_seconds.labels(role).set(sum(k.get(key_s, 0.0) for k in kt))


def start_http(metrics: Metrics, host: str, port: int) -> ThreadingHTTPServer:
    registry = metrics.registry

    class Handler(MetricsHandler):
        def do_GET(self):
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            metrics.collect_pools()
            self.registry = registry
            return super().do_GET()

        def log_message(self, *a):
            pass

    Handler.registry = registry
    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics-http").start()
    return server
