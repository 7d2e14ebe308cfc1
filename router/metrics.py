"""Prometheus metrics on the router: pdserve's own (`pdserve_*`), and the series vLLM's dashboards chart under
vLLM's names and meanings (`vllm:*`, labels `model_name` and `role`: router, prefill or decode), so a vLLM
Grafana board works unchanged (helm/pdserve/dashboards/ ships one).

A request's stage times (queue, prefill, decode) need to know which request a Dispatcher hook is about, and
the hooks carry no request id: each front door starts a RequestClock in its own task's context before it
admits the request (`request_arrived`), and the hooks, which run in that task, read it from there.
"""
from __future__ import annotations

import collections
import contextvars
import time
from dataclasses import dataclass
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.worker.messages import DecodeDelta, PrefillResult

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_VLLM_LAT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)


@dataclass
class RequestClock:
    """One request's moments (time.monotonic()), from its arrival at a front door."""
    arrival: float
    dispatched: Optional[float] = None
    first_token: Optional[float] = None


_clock: contextvars.ContextVar[Optional[RequestClock]] = contextvars.ContextVar("pdserve_request_clock",
                                                                                 default=None)


def request_arrived() -> RequestClock:
    """Called by a front door as a request arrives, in the task that will run it."""
    clock = RequestClock(time.monotonic())
    _clock.set(clock)
    return clock


class Metrics:
    def __init__(self, cluster, model_name: str = "pdserve"):
        self.cluster = cluster
        r = self.registry = CollectorRegistry()
        self._vllm_series(model_name)
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
        self._kv_totals: dict[tuple[str, str], tuple[int, float]] = {}  # (role, worker): its last totals
        self.router_inflight = Gauge("pdserve_router_requests_inflight", "Requests inside the router", registry=r)
        # their ratio is how many requests' tokens one message carries (decode_worker/outbox.py says why it matters)
        self.channel_messages = Counter("pdserve_decode_channel_messages", "Messages from decode workers' token "
                                        "channels", registry=r)
        self.channel_deltas = Counter("pdserve_decode_channel_deltas", "Request deltas in those messages",
                                      registry=r)
        self._recent = {"ttft": collections.deque(maxlen=256), "itl": collections.deque(maxlen=2048)}

    def recent(self, kind: str, window_s: float = 30.0):
        """Mean of the last `window_s` seconds of TTFT or inter-token latency (None: no data)."""
        cutoff = time.monotonic() - window_s
        vals = [v for t, v in self._recent[kind] if t >= cutoff]
        return sum(vals) / len(vals) if vals else None

    def _vllm_series(self, model: str) -> None:
        r = self.registry
        v = self.vllm = {}

        def hist(name, doc, role):
            v[name] = Histogram("vllm:" + name, doc, ["model_name", "role"], registry=r,
                                buckets=_VLLM_LAT).labels(model, role)

        hist("time_to_first_token_seconds", "Arrival at the router to the first output token", "router")
        hist("inter_token_latency_seconds", "Time between two output deltas of a request", "router")
        hist("e2e_request_latency_seconds", "Arrival at the router to the last output token", "router")
        hist("request_queue_time_seconds", "Arrival to dispatch: waiting for and in admission", "router")
        hist("request_prefill_time_seconds", "Dispatch to the prompt's KV ready on a prefill worker", "prefill")
        hist("request_decode_time_seconds", "First output token to the last", "decode")
        for name, doc in (("num_requests_running", "Requests in engines' running batches"),
                          ("num_requests_waiting", "Requests waiting in engines' queues"),
                          ("kv_cache_usage_perc", "KV-cache usage, mean over a pool's workers (1 = full)")):
            v[name] = Gauge("vllm:" + name, doc, ["model_name", "role"], registry=r)
        v["prefix_cache_queries"] = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                            "cache", ["model_name", "role"], registry=r).labels(model, "prefill")
        v["prefix_cache_hits"] = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                         ["model_name", "role"], registry=r).labels(model, "prefill")
        v["prompt_tokens"] = Counter("vllm:prompt_tokens", "Prompt tokens", ["model_name", "role"],
                                     registry=r).labels(model, "router")
        v["generation_tokens"] = Counter("vllm:generation_tokens", "Generated tokens", ["model_name", "role"],
                                         registry=r).labels(model, "router")
        v["request_success"] = Counter("vllm:request_success", "Finished requests by finish reason",
                                       ["model_name", "role", "finished_reason"], registry=r)
        self.model_name = model

    def request_started(self) -> None:
        self.router_inflight.inc()
        clock = _clock.get()
        if clock is not None:
            clock.dispatched = time.monotonic()
            self.vllm["request_queue_time_seconds"].observe(clock.dispatched - clock.arrival)

    def prefill_done(self, worker, prefill: PrefillResult, num_prompt: int) -> None:
        self.prefix_queries.labels("prefill").inc(num_prompt)
        self.prefix_hits.labels("prefill").inc(prefill.num_cached_tokens)
        self.prompt_tokens.inc(num_prompt)
        v = self.vllm
        v["prefix_cache_queries"].inc(num_prompt)
        v["prefix_cache_hits"].inc(prefill.num_cached_tokens)
        v["prompt_tokens"].inc(num_prompt)
        clock = _clock.get()
        if clock is not None and clock.dispatched is not None:
            v["request_prefill_time_seconds"].observe(time.monotonic() - clock.dispatched)

    def token_delta(self, first: bool, dt: float, n: int) -> None:
        (self.ttft if first else self.itl).observe(dt)
        self._recent["ttft" if first else "itl"].append((time.monotonic(), dt))
        self.generation_tokens.inc(n)
        self.vllm["generation_tokens"].inc(n)
        clock = _clock.get()
        if first and clock is not None and clock.first_token is None:
            clock.first_token = time.monotonic()
            self.vllm["time_to_first_token_seconds"].observe(clock.first_token - clock.arrival)
        elif first and clock is None:
            self.vllm["time_to_first_token_seconds"].observe(dt)
        elif not first:
            self.vllm["inter_token_latency_seconds"].observe(dt)

    def request_finished(self, seconds: float, last: DecodeDelta) -> None:
        self.e2e.observe(seconds)
        self.router_inflight.dec()
        self.requests.labels(last.finish_reason.value).inc()
        v, clock, now = self.vllm, _clock.get(), time.monotonic()
        v["e2e_request_latency_seconds"].observe(seconds if clock is None else now - clock.arrival)
        if clock is not None and clock.first_token is not None:
            v["request_decode_time_seconds"].observe(now - clock.first_token)
        v["request_success"].labels(self.model_name, "router", last.finish_reason.value).inc()

    # -- the control plane's (router/dispatch.py, router/cluster.py) ------------------------------------
    def _control_counters(self) -> None:
        if hasattr(self, "failures"):
            return
        r = self.registry
        self.failures = Counter("pdserve_request_failures", "Requests that did not finish, by cause", ["cause"],
                                registry=r)
        self.migrations = Counter("pdserve_request_migrations",
                                  "Requests moved to other workers, by what happened to the one they left",
                                  ["cause"], registry=r)
        self.worker_events = Counter("pdserve_worker_events", "Workers that died, and replacements ready",
                                     ["role", "event"], registry=r)

    def request_failed(self, cause: str) -> None:
        """A request that did not finish, by cause: aborted, cancelled (the client left), worker_died, timeout,
        transfer, invalid, resource_exhausted, unavailable, internal. Only Abort and the client's own cancel
        count as outcome "abort"; the rest as "error"."""
        self._control_counters()
        self.router_inflight.dec()
        self.requests.labels("abort" if cause in ("aborted", "cancelled") else "error").inc()
        self.failures.labels(cause).inc()

    def request_refused(self, cause: str) -> None:
        """Refused at admission (never in flight): invalid, resource_exhausted."""
        self._control_counters()
        self.failures.labels(cause).inc()

    def request_migrated(self, cause: str) -> None:
        self._control_counters()
        self.migrations.labels(cause).inc()

    def worker_event(self, role: str, event: str) -> None:
        """died, restarted."""
        self._control_counters()
        self.worker_events.labels(role, event).inc()

    def forget_worker(self, role: str, name: str) -> None:
        """A worker left its pool: its series go with it."""
        try:
            self.kv_usage.remove(role, name)
        except KeyError:  # never scraped while it lived
            pass

    def scaled(self, role: str, prev: int, new: int) -> None:
        if new != prev:
            self.scale_events.labels(role, "up" if new > prev else "down").inc()

    def collect_pools(self) -> None:
        """Refresh gauges from the router's view of the pools (called on each scrape)."""
        for role, pool in self.cluster.pools.items():
            ws = list(pool.workers.values())
            self._vllm_pool(role, pool.ready())
            self.replicas.labels(role).set(len(pool.active()))
            self.waiting.labels(role).set(sum(w.stats.get("num_waiting", 0) for w in ws))
            self.running.labels(role).set(sum(w.stats.get("num_running", 0) for w in ws))
            for w in ws:
                self.kv_usage.labels(role, w.name).set(w.stats.get("kv_cache_usage", 0.0))
            # prefill: bytes its leases handed over; decode: bytes its READs landed. A worker's last totals
            # stay counted after it is gone, so the pool's totals never drop (rate() over them stays right)
            key_b, key_s = ("bytes_sent", "stage_seconds") if role == "prefill" else ("bytes_received",
                                                                                    "transfer_seconds")
            for w in ws:
                k = w.stats.get("kv_transfer")
                if k:
                    self._kv_totals[(role, w.name)] = (k.get(key_b, 0), k.get(key_s, 0.0))
            totals = [t for (r, _), t in self._kv_totals.items() if r == role]
            self.kv_bytes.labels(role).set(sum(b for b, _ in totals))
            self.kv_seconds.labels(role).set(sum(s for _, s in totals))

    def _vllm_pool(self, role: str, ready: list) -> None:
        """vLLM's per-engine gauges for a pool: counts summed, KV usage averaged over its ready workers."""
        v, stats = self.vllm, [w.stats for w in ready]
        v["num_requests_running"].labels(self.model_name, role).set(sum(s.get("num_running", 0) for s in stats))
        v["num_requests_waiting"].labels(self.model_name, role).set(sum(s.get("num_waiting", 0) for s in stats))
        v["kv_cache_usage_perc"].labels(self.model_name, role).set(
            sum(s.get("kv_cache_usage", 0.0) for s in stats) / len(stats) if stats else 0.0)
