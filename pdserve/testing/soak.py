"""A soak: mixed load on a real cluster for a while, the resident memory (RSS) of the router process and of every
worker process sampled all along; the growth of each after a warm-up is what a leak would show.

The load (`KINDS`, drawn at random by a few client threads, each starting its next request when the last ended):
streamed and unary gRPC, streamed and unary OpenAI HTTP (completions and chat), short prompts and ~1000-token
ones, requests aborted through the Abort RPC, streams the client cancels (gRPC) or hangs up on (HTTP). Every
request's outcome is checked (finished with stop/length, ended with abort, or cancelled by the client); any other
outcome is an error, listed in the report.

Growth: RSS medians over a window at the start of the measured span (after the warm-up) and at its end
(`GrowthRule.window_s`, medians so one sample at an allocation peak does not count), their difference in MB and
in % of the first, and that difference per hour. The soak fails (`over_limit`) when a process grows by more than
`GrowthRule.limit_mb`; see GrowthRule for why that number.
"""
from __future__ import annotations

import json
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import grpc
import psutil

from pdserve.client import request_proto, stream_one
from pdserve.engine.sequence import SamplingParams
from pdserve.proto import pb, rpc
from pdserve.testing.chaos import cluster_info
from pdserve.testing.exactness import PROMPTS

# one worker per pool: every request goes through the same two workers, the most requests per process for the time
CONFIG = {
    "engine": {"kv_cache_memory_gb": 0.3, "max_num_batched_tokens": 512},
    "prefill": {"replicas": 1, "num_cpus": 0.5},
    "decode": {"replicas": 1, "num_cpus": 0.5},
    "ray": {"num_cpus": 2},
}
LONG_PROMPT = "The history of the city of London begins with the Roman settlement of Londinium. " * 60  # ~1000 tokens
# kind -> weight; every kind is one request of a client thread
KINDS = {"grpc_stream": 5, "grpc_unary": 2, "grpc_long": 1, "grpc_abort": 1, "grpc_cancel": 1,
         "http_stream": 3, "http_unary": 2, "http_chat": 2, "http_hangup": 1}


@dataclass(frozen=True)
class GrowthRule:
    """When a process's RSS growth over the measured span fails the soak: past `limit_mb(hours)`, the larger of
    `floor_mb` and `limit_mb_per_hour` times the hours between the two windows.

    What must not pass is a leak per request, which grows without bound: a server that keeps a few KB per request
    is OOM-killed within days. What moves RSS without a leak: glibc's and torch's allocators keep freed memory and
    hand it back in steps, and buffers grow to the largest prompt and the highest concurrency seen. The warm-up
    is there to reach those peaks first (the prefill worker gained 121 MB in the first minute of a 3-minute run on
    2026-12-05, BENCHMARKS.md); after it, one process's RSS still swung by up to 15 MB (the decode worker, 1473 to
    1488 MB, in the second of two 3-minute runs; under 2 MB in the first). The floor, 32 MB, is twice that swing,
    so an allocator step does not fail the soak. In the 30-minute soak (5 minutes of warm-up, 24 minutes between
    the windows' centres, ~2,200 requests at the ~1.5 requests/s measured) it fails a leak of 15 KB per request:
    80 MB an hour, ~2 GB a day. For longer soaks the limit grows with the span at 64 MB an hour, so a longer run
    is held to about the same rate rather than to a fixed total."""
    limit_mb_per_hour: float = 64.0
    floor_mb: float = 32.0
    window_s: float = 60.0

    def limit_mb(self, hours: float) -> float:
        return max(self.floor_mb, self.limit_mb_per_hour * hours)


@dataclass
class Tally:
    counts: dict = field(default_factory=dict)  # kind -> outcome -> n
    errors: list = field(default_factory=list)  # (kind, message), the first 50
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, outcome: str, error: str = "") -> None:
        with self.lock:
            per = self.counts.setdefault(kind, {})
            per[outcome] = per.get(outcome, 0) + 1
            if error and len(self.errors) < 50:
                self.errors.append((kind, error))


class Load:
    """Client threads sending KINDS at random until `stop` is set."""

    def __init__(self, server, clients: int, seed: int):
        self.server, self.clients, self.seed = server, clients, seed
        self.tally = Tally()
        self.stop = threading.Event()
        self.n = 0
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        import httpx2 as httpx

        self.http = httpx.Client(timeout=120)
        self.model = self.http.get(self.server.http_url + "/v1/models").json()["data"][0]["id"]
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = rpc.PDServeStub(self.channel)
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(random.Random(self.seed + i), i), daemon=True)
            t.start()
            self._threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(180)
        self.http.close()
        self.channel.close()

    def _client(self, rng: random.Random, i: int) -> None:
        kinds, weights = zip(*KINDS.items())
        k = 0
        while not self.stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            k += 1
            try:
                outcome = getattr(self, "_" + kind)(rng, f"soak-{i}-{k}")
                self.tally.add(kind, outcome)
            except Exception as e:  # noqa: BLE001 (an unexpected outcome: reported, the soak goes on)
                self.tally.add(kind, "error", f"{type(e).__name__}: {str(e)[:300]}")
            with self.tally.lock:
                self.n += 1

    # -- the kinds: each returns its outcome, or raises on a wrong one -------------------------------------
    def _params(self, rng: random.Random, max_tokens: int) -> SamplingParams:
        greedy = rng.random() < 0.5
        return SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else 0.8,
                              seed=None if greedy else rng.randrange(2**31), stop=["\n\n"] if rng.random() < 0.3 else [])

    def _prompt(self, rng: random.Random) -> tuple[str, bool]:
        return rng.choice(PROMPTS)

    def _finished(self, reason: str) -> str:
        if reason not in ("stop", "length"):
            raise AssertionError(f"finish_reason {reason!r}")
        return reason

    def _grpc_stream(self, rng, rid, prompt=None, max_tokens=None):
        p, chat = prompt or self._prompt(rng)
        msg = request_proto({"prompt": p, "chat": chat}, self._params(rng, max_tokens or rng.randint(8, 64)), rid)
        return self._finished(stream_one(self.stub, msg, timeout=120)["finish_reason"])

    def _grpc_long(self, rng, rid):
        return self._grpc_stream(rng, rid, (LONG_PROMPT, False), rng.randint(4, 16))

    def _grpc_unary(self, rng, rid):
        p, chat = self._prompt(rng)
        msg = request_proto({"prompt": p, "chat": chat}, self._params(rng, rng.randint(8, 48)), rid)
        return self._finished(self.stub.GenerateUnary(msg, timeout=120).finish_reason)

    def _grpc_abort(self, rng, rid):
        p, chat = self._prompt(rng)
        msg = request_proto({"prompt": p, "chat": chat}, SamplingParams(max_tokens=200, ignore_eos=True), rid)
        call = self.stub.Generate(msg, timeout=120)
        timer = threading.Timer(rng.uniform(0.05, 1.5), lambda: self.stub.Abort(pb.AbortRequest(request_id=rid),
                                                                                   timeout=30))
        timer.start()
        reason = None
        for resp in call:
            reason = resp.finish_reason or reason
        timer.join()
        if reason != "abort":
            raise AssertionError(f"an aborted stream ended with {reason!r}")
        return "aborted"

    def _grpc_cancel(self, rng, rid):
        p, chat = self._prompt(rng)
        msg = request_proto({"prompt": p, "chat": chat}, SamplingParams(max_tokens=200, ignore_eos=True), rid)
        call = self.stub.Generate(msg, timeout=120)
        after = rng.randint(1, 20)
        try:
            for n, _ in enumerate(call):
                if n >= after:
                    call.cancel()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise
            return "cancelled"
        raise AssertionError("a cancelled stream ran to its end")

    def _http_body(self, rng, chat: bool, stream: bool, max_tokens: int) -> dict:
        p, _ = self._prompt(rng)
        body = {"model": self.model, "max_tokens": max_tokens, "stream": stream,
                "temperature": 0.0 if rng.random() < 0.5 else 0.8}
        body.update({"messages": [{"role": "user", "content": p}]} if chat else {"prompt": p})
        return body

    def _http_stream(self, rng, rid):
        body = self._http_body(rng, False, True, rng.randint(8, 64))
        reason, done = None, False
        with self.http.stream("POST", self.server.http_url + "/v1/completions", json=body,
                              headers={"X-Request-Id": rid}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    reason = choices[0].get("finish_reason") or reason
        if not done:
            raise AssertionError("an SSE stream without data: [DONE]")
        return self._finished(reason)

    def _http_unary(self, rng, rid):
        r = self.http.post(self.server.http_url + "/v1/completions", headers={"X-Request-Id": rid},
                           json=self._http_body(rng, False, False, rng.randint(8, 48)))
        r.raise_for_status()
        return self._finished(r.json()["choices"][0]["finish_reason"])

    def _http_chat(self, rng, rid):
        r = self.http.post(self.server.http_url + "/v1/chat/completions", headers={"X-Request-Id": rid},
                           json=self._http_body(rng, True, False, rng.randint(8, 48)))
        r.raise_for_status()
        return self._finished(r.json()["choices"][0]["finish_reason"])

    def _http_hangup(self, rng, rid):
        body = {**self._http_body(rng, False, True, 200), "ignore_eos": True}
        with self.http.stream("POST", self.server.http_url + "/v1/completions", json=body,
                              headers={"X-Request-Id": rid}) as r:
            r.raise_for_status()
            after = rng.randint(1, 20)
            for n, _ in enumerate(r.iter_lines()):
                if n >= after:
                    return "cancelled"  # leaving the block closes the connection mid-stream
        raise AssertionError("a stream the client hung up on ran to its end")


def _rss_mb(pid: int) -> float | None:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        return None


def growth(samples: list[tuple[float, float]], start: float, rule: GrowthRule) -> dict:
    """The growth of one process from its samples (t, rss_mb), counting from `start` (the warm-up's end)."""
    s = [(t, v) for t, v in samples if t >= start]
    end = s[-1][0]
    first = [v for t, v in s if t <= start + rule.window_s]
    last = [v for t, v in s if t >= end - rule.window_s]
    a, b = statistics.median(first), statistics.median(last)
    hours = max(end - start - rule.window_s, 1.0) / 3600  # between the windows' centres
    mb = b - a
    return {"rss_start_mb": round(a, 1), "rss_end_mb": round(b, 1), "rss_max_mb": round(max(v for _, v in s), 1),
            "growth_mb": round(mb, 1), "growth_pct": round(100 * mb / a, 2),
            "mb_per_hour": round(mb / hours, 1), "pct_per_hour": round(100 * mb / a / hours, 2),
            "limit_mb": round(rule.limit_mb(hours), 1), "over_limit": mb > rule.limit_mb(hours)}


def run_soak(server, minutes: float, warmup_minutes: float | None = None, sample_s: float = 5.0, clients: int = 4,
             seed: int = 0, rule: GrowthRule = GrowthRule()) -> dict:
    """Load `server` (pdserve.testing.cluster.Server) for `minutes`, sampling RSS every `sample_s`; the report."""
    warmup = (min(5.0, minutes / 3) if warmup_minutes is None else warmup_minutes) * 60
    with grpc.insecure_channel(server.address) as ch:
        info = cluster_info(rpc.PDServeStub(ch))
    procs = {"router": server.proc.pid, **{w.name: w.pid for w in info.workers}}
    samples: dict[str, list] = {name: [] for name in procs}
    load = Load(server, clients, seed)
    t0 = time.monotonic()
    load.start()
    try:
        while (now := time.monotonic()) - t0 < minutes * 60:
            for name, pid in procs.items():
                v = _rss_mb(pid)
                if v is not None:
                    samples[name].append((now - t0, v))
            time.sleep(sample_s)
    finally:
        load.join()
    elapsed = time.monotonic() - t0
    per = {name: growth(s, warmup, rule) for name, s in samples.items() if s and s[-1][0] > warmup + rule.window_s}
    gone = [name for name, pid in procs.items() if _rss_mb(pid) is None]
    return {"minutes": round(elapsed / 60, 2), "warmup_minutes": round(warmup / 60, 2), "sample_s": sample_s,
            "clients": clients, "requests": load.n, "requests_per_s": round(load.n / elapsed, 2),
            "outcomes": load.tally.counts, "errors": load.tally.errors, "processes_gone": gone,
            "rule": {"limit_mb_per_hour": rule.limit_mb_per_hour, "floor_mb": rule.floor_mb, "window_s": rule.window_s},
            "rss": per, "over_limit": sorted(n for n, g in per.items() if g["over_limit"]),
            "samples": {name: [(round(t, 1), round(v, 1)) for t, v in s] for name, s in samples.items()}}


def markdown(rep: dict) -> str:
    lines = [f"Soak: {rep['minutes']} min ({rep['warmup_minutes']} min warm-up), {rep['clients']} clients, "
             f"{rep['requests']} requests ({rep['requests_per_s']}/s), {len(rep['errors'])} errors, "
             f"processes gone: {rep['processes_gone'] or 'none'}.", "",
             "| process | RSS after warm-up (MB) | at the end (MB) | max (MB) | growth (MB) | growth (%) | MB/hour "
             "| %/hour | limit (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, g in rep["rss"].items():
        lines.append(f"| {name} | {g['rss_start_mb']} | {g['rss_end_mb']} | {g['rss_max_mb']} | {g['growth_mb']} | "
                     f"{g['growth_pct']} | {g['mb_per_hour']} | {g['pct_per_hour']} | {g['limit_mb']}"
                     f"{' **over**' if g['over_limit'] else ''} |")
    outcomes = ", ".join(f"{k}: " + "/".join(f"{o} {n}" for o, n in sorted(v.items()))
                         for k, v in sorted(rep["outcomes"].items()))
    lines += ["", f"Outcomes: {outcomes}."]
    return "\n".join(lines)
