"""`pdserve bench`: a serving benchmark client for the gRPC router (or, with --http, its OpenAI-compatible
HTTP door: bench_http.py).

Three layers, the first two pure (testable without a server):
- workloads: seeded request lists (`random_workload`, `shared_prefix_workload`) and arrival times;
- statistics: per-request timings -> throughput, latency percentiles, goodput, hit rates;
- the runner: one asyncio loop driving grpc.aio streams, which stamps every delta on arrival.

Timing is taken on the client with `time.perf_counter()` when a message is handed to the loop, so a
busy client inflates TTFT/ITL. The runner measures that error instead of assuming it away: a probe
task sleeps 5 ms at a time and records how late it wakes (`client.loop_lag_s`), the bound on how
late any arrival can be stamped; `client.arrival_lag_s` is how late requests were released against
their scheduled (Poisson) arrival; `client.cpu_frac` is the client's CPU time over wall time.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from pdserve.client import Credentials, credentials_from_args

# Common English words: a text prompt of N words is about N tokens for a BPE vocabulary.
WORDS = ("the of and to in is was that for on with as by at from his her they this which be are "
         "one all were when there can an been has more if will some would other into time only new "
         "could these two may first then any like my now over such our man me even most made after "
         "also did many before must through back years where much your way well down should because "
         "each just those people how too little state good very make world still own see men work "
         "long get here between both life being under never day same another know while last might "
         "us great old year off come since against go came right used take three house water light "
         "river city small large music paper story garden window table morning evening winter summer").split()


# -- workloads ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: tuple[int, ...] | None  # exact-length prompts
    prompt: str | None                        # text prompts (length set by the server's tokenizer)
    max_tokens: int
    group: int = -1                           # shared-prefix: which system prompt; -1: none


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'N' -> (N, N); 'LO:HI' -> (LO, HI), both inclusive and >= 1."""
    parts = str(text).split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise ValueError(f"{name} must be N or LO:HI, got {text!r}") from None
    if len(parts) > 2 or lo < 1 or hi < lo:
        raise ValueError(f"{name} must be N or LO:HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def _ids(rng: random.Random, n: int, vocab: tuple[int, int]) -> tuple[int, ...]:
    return tuple(rng.randrange(vocab[0], vocab[1]) for _ in range(n))


def random_workload(n: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    vocab: tuple[int, int], seed: int, text: bool = False) -> list[BenchRequest]:
    """`n` independent prompts; lengths uniform in the inclusive ranges. Token ids are drawn from
    [vocab[0], vocab[1]); text prompts are words, about one token each."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        plen, olen = rng.randint(*input_len), rng.randint(*output_len)
        if text:
            out.append(BenchRequest(None, " ".join(rng.choice(WORDS) for _ in range(plen)), olen))
        else:
            out.append(BenchRequest(_ids(rng, plen, vocab), None, olen))
    return out


def shared_prefix_workload(num_prefixes: int, users_per_prefix: int, prefix_len: int,
                           suffix_len: tuple[int, int], output_len: tuple[int, int],
                           vocab: tuple[int, int], seed: int, n: int | None = None) -> list[BenchRequest]:
    """N system prompts x M users: request i is user i mod (N*M), whose system prompt is
    (i mod N); each request = that prompt's `prefix_len` ids + its own random suffix. The order is
    shuffled with the seed, so one prefix's requests are spread over the run."""
    rng = random.Random(seed)
    prefixes = [_ids(rng, prefix_len, vocab) for _ in range(num_prefixes)]
    n = num_prefixes * users_per_prefix if n is None else n
    groups = [(i % (num_prefixes * users_per_prefix)) % num_prefixes for i in range(n)]
    rng.shuffle(groups)
    out = []
    for g in groups:
        suffix = _ids(rng, rng.randint(*suffix_len), vocab)
        out.append(BenchRequest(prefixes[g] + suffix, None, rng.randint(*output_len), g))
    return out


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: a Poisson process of `rate`
    requests/s, or all at t=0 when the rate is infinite."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# -- statistics -----------------------------------------------------------------------------------
@dataclass
class RequestResult:
    ok: bool
    status: str = "OK"               # gRPC status code name, or an exception type for other failures
    error: str = ""
    sent: float = 0.0                # perf_counter when the request left
    ttft: float | None = None        # first token - sent
    e2e: float | None = None         # last message - sent
    itl: list[float] = field(default_factory=list)  # gaps between successive token deltas
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = ""
    prefill_worker: str = ""
    decode_worker: str = ""
    token_ids: list[int] = field(default_factory=list)
    request_id: str = ""             # the router's id (the engines' too, but for a '#n' suffix after a migration)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None with fewer than 2 tokens."""
        if self.ttft is None or self.e2e is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's
    default), so p50 of [1, 2, 3, 4] is 2.5."""
    if not xs:
        raise ValueError("percentile of no values")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(xs: list[float]) -> dict | None:
    if not xs:
        return None
    return {"mean": sum(xs) / len(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90),
            "p99": percentile(xs, 99), "max": max(xs), "n": len(xs)}


def meets_slo(r: RequestResult, ttft_s: float | None, tpot_s: float | None) -> bool:
    """A successful request within both targets (a missing target always holds; a request of one
    token has no TPOT and meets any TPOT target)."""
    if not r.ok or r.ttft is None:
        return False
    if ttft_s is not None and r.ttft > ttft_s:
        return False
    tpot = r.tpot
    return tpot_s is None or tpot is None or tpot <= tpot_s


def oracle_hit_rate(prompts: list[tuple[int, ...]], block_size: int) -> float:
    """The prefix hit rate of an infinite cache that holds every full block ever seen: for each
    prompt in order, its longest prefix of full blocks seen in an earlier prompt, over all prompt
    tokens. Like the engine, it never serves the whole prompt from cache: the last prompt token
    is always computed (its logits give the first output token)."""
    seen: set[int] = set()
    hit = total = 0
    for ids in prompts:
        total += len(ids)
        usable = (len(ids) - 1) // block_size  # blocks that may come from cache
        h, matching = 0, True
        for k in range(len(ids) // block_size):
            h = hash((h, tuple(ids[k * block_size:(k + 1) * block_size])))  # chained: keyed by the whole prefix
            matching = matching and k < usable and h in seen
            hit += block_size if matching else 0
            seen.add(h)
    return hit / total if total else 0.0


def build_report(results: list[RequestResult], duration: float, *, goodput_ttft: float | None = None,
                 goodput_tpot: float | None = None, oracle: float | None = None) -> dict:
    """Everything the bench reports about the measured requests (seconds and tokens/s)."""
    ok = [r for r in results if r.ok]
    dur = max(duration, 1e-9)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    rep = {
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "failures": dict(Counter(r.status for r in results if not r.ok)),
        "errors": sorted({f"{r.status}: {r.error}" for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / dur,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": sum(r.completion_tokens for r in ok),
        "input_token_throughput": prompt_tokens / dur,
        "output_token_throughput": sum(r.completion_tokens for r in ok) / dur,
        "ttft_s": summarize([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": summarize([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": summarize([g for r in ok for g in r.itl]),
        "e2e_s": summarize([r.e2e for r in ok if r.e2e is not None]),
        "cached_tokens": cached,
        "prefix_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
        "oracle_hit_rate": oracle,
        "hit_rate_vs_oracle": (cached / prompt_tokens) / oracle if oracle and prompt_tokens else None,
        "finish_reasons": dict(Counter(r.finish_reason for r in ok)),
        "per_worker": {"prefill": dict(sorted(Counter(r.prefill_worker for r in ok if r.prefill_worker).items())),
                       "decode": dict(sorted(Counter(r.decode_worker for r in ok if r.decode_worker).items()))},
        "goodput": None,
    }
    if goodput_ttft is not None or goodput_tpot is not None:
        good = sum(meets_slo(r, goodput_ttft, goodput_tpot) for r in results)
        rep["goodput"] = {"ttft_s": goodput_ttft, "tpot_s": goodput_tpot, "requests": good,
                          "request_throughput": good / dur, "fraction": good / len(results) if results else 0.0}
    return rep


def _ms(s: dict | None, key: str) -> str:
    return "-" if s is None else f"{s[key] * 1e3:.1f}"


def format_report(rep: dict) -> str:
    """The human table."""
    c = rep["config"]
    lines = [f"{' pdserve bench ':=^64}",
             f"server {c['server']}  workload {c['workload']}  rate {c['request_rate']}/s"
             + ("" if c["concurrency"] is None else f"  concurrency {c['concurrency']}"),
             f"{'successful requests':<34}{rep['completed']:>12}",
             f"{'failed requests':<34}{rep['failed']:>12}"
             + ("  " + ", ".join(f"{k} x{v}" for k, v in sorted(rep["failures"].items())) if rep["failures"] else ""),
             f"{'duration (s)':<34}{rep['duration_s']:>12.2f}",
             f"{'total input tokens':<34}{rep['total_input_tokens']:>12}",
             f"{'total output tokens':<34}{rep['total_output_tokens']:>12}",
             f"{'request throughput (req/s)':<34}{rep['request_throughput']:>12.3f}",
             f"{'input token throughput (tok/s)':<34}{rep['input_token_throughput']:>12.1f}",
             f"{'output token throughput (tok/s)':<34}{rep['output_token_throughput']:>12.1f}"]
    if rep["goodput"]:
        g = rep["goodput"]
        lines.append(f"{'goodput (req/s)':<34}{g['request_throughput']:>12.3f}  "
                     f"({g['requests']} within TTFT<={g['ttft_s']}s, TPOT<={g['tpot_s']}s)")
    oracle = rep["oracle_hit_rate"]
    lines.append(f"{'prefix hit rate':<34}{rep['prefix_hit_rate']:>12.1%}"
                 + ("" if oracle is None else f"  (oracle {oracle:.1%}"
                    + ("" if rep["hit_rate_vs_oracle"] is None else f", {rep['hit_rate_vs_oracle']:.0%} of it") + ")"))
    lines.append(f"{'':<10}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}   (ms)")
    for name, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("ITL", "itl_s"), ("E2E", "e2e_s")):
        s = rep[key]
        lines.append(f"{name:<10}" + "".join(f"{_ms(s, k):>9}" for k in ("mean", "p50", "p90", "p99", "max")))
    for role in ("prefill", "decode"):
        counts = rep["per_worker"][role]
        lines.append(f"{role + ' workers':<18}" + (", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"))
    cmp = rep.get("outputs_vs_reference")
    if cmp:
        lines.append(f"{'outputs equal to the reference':<34}{cmp['compared'] - cmp['mismatched']:>12} of "
                     f"{cmp['compared']}" + (f"; differ: {cmp['mismatched_indices']}" if cmp["mismatched"] else ""))
    cl = rep["client"]
    lines.append(f"{'client loop lag (ms)':<34}{_ms(cl['loop_lag_s'], 'p99'):>12} p99, "
                 f"{_ms(cl['loop_lag_s'], 'max')} max; cpu {cl['cpu_frac']:.0%} of a core")
    lag, ttft = cl["loop_lag_s"], rep["ttft_s"]
    if lag and ttft and lag["p99"] > 0.05 * ttft["p50"]:  # stamps late by more than 5% of a typical TTFT
        lines.append(f"warning: this client woke up to {lag['p99'] * 1e3:.0f} ms late (p99); latencies carry that "
                     "error (a busy CPU: run the bench on another core or machine)")
    lines.append("=" * 64)
    return "\n".join(lines)


# -- runner ---------------------------------------------------------------------------------------
def _request_proto(req: BenchRequest, ignore_eos: bool, seed: int | None, temperature: float = 0.0):
    from pdserve.proto import pb

    sp = pb.SamplingParams(max_tokens=req.max_tokens, temperature=temperature, ignore_eos=ignore_eos)
    if seed is not None:
        sp.seed = seed
    msg = pb.GenerateRequest(sampling=sp)
    if req.prompt_token_ids is not None:
        msg.prompt_token_ids.ids.extend(req.prompt_token_ids)
    else:
        msg.prompt = req.prompt
    return msg


async def _stream(stub, msg, timeout: float) -> RequestResult:
    """One Generate stream; never raises (a failed request is a result with ok=False)."""
    import grpc

    r = RequestResult(ok=False, sent=time.perf_counter())
    last = None
    try:
        call = stub.Generate(msg, timeout=timeout)
        async for resp in call:
            now = time.perf_counter()
            if resp.request_id and not r.request_id:
                r.request_id = resp.request_id
            if resp.prefill_worker:
                r.prefill_worker, r.decode_worker = resp.prefill_worker, resp.decode_worker
            if resp.token_ids:
                r.token_ids.extend(resp.token_ids)
                if last is None:
                    r.ttft = now - r.sent
                else:
                    r.itl.append(now - last)
                last = now
            if resp.finish_reason:
                r.finish_reason = resp.finish_reason
                r.prompt_tokens = resp.usage.prompt_tokens
                r.completion_tokens = resp.usage.completion_tokens
                r.cached_tokens = resp.usage.cached_tokens
                r.e2e = now - r.sent
        if r.finish_reason:
            r.ok = True
        else:
            r.status, r.error = "INCOMPLETE", "the stream ended without a finish_reason"
    except grpc.aio.AioRpcError as e:
        r.status, r.error = e.code().name, e.details() or ""
    except Exception as e:  # noqa: BLE001 - a failed request must never stop the bench
        r.status, r.error = type(e).__name__, str(e)
    return r


class _LoopLagProbe:
    """Wakes every `period` seconds and records how late: the time a ready message can wait in
    this loop before it is stamped."""

    def __init__(self, period: float = 0.005):
        self.period, self.lags, self.task = period, [], None

    async def _run(self):
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.period)
            self.lags.append(max(0.0, time.perf_counter() - t - self.period))

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self):
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


def _channels(address: str, n: int, credentials: Credentials):
    # separate subchannel pools: separate TCP connections, so HTTP/2 stream limits of one
    # connection never queue requests in the client
    opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
    return [credentials.channel(address, opts, aio=True) for _ in range(n)]


async def run_load(address: str, requests: list[BenchRequest], arrivals: list[float], concurrency: int | None,
                   *, ignore_eos: bool = True, seed: int | None = None, temperature: float = 0.0,
                   timeout: float = 600.0, progress: bool = True, desc: str = "bench",
                   http_model: str | None = None, credentials: Credentials = Credentials(),
                   ) -> tuple[list[RequestResult], float, dict]:
    """Send `requests` at `arrivals` (seconds from start), at most `concurrency` in flight.
    Returns the results in request order, the wall time from the start to the last completion,
    and the client's own overhead measurements. With `http_model`, `address` is an HTTP base URL."""
    from tqdm import tqdm

    from pdserve.proto import rpc

    inflight = len(requests) if concurrency is None else min(concurrency, len(requests))
    if http_model is None:
        chans = _channels(address, max(1, math.ceil(inflight / 48)), credentials)
        stubs = [rpc.PDServeStub(c) for c in chans]
        msgs = [_request_proto(q, ignore_eos, seed, temperature) for q in requests]

        def send(i):
            return _stream(stubs[i % len(stubs)], msgs[i], timeout)
    else:
        from pdserve.tools import bench_http

        chans = [bench_http.client(inflight, credentials)]
        bodies = [bench_http.completion_body(http_model, q, ignore_eos, seed, temperature) for q in requests]

        def send(i):
            return bench_http.stream(chans[0], address, bodies[i], timeout, RequestResult(ok=False))
    sem = asyncio.Semaphore(max(1, inflight))
    bar = tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, disable=not progress, leave=False)
    probe = _LoopLagProbe()
    arrival_lag: list[float] = []
    results: list[RequestResult | None] = [None] * len(requests)

    async def one(i: int, t0: float):
        delay = t0 + arrivals[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        arrival_lag.append(max(0.0, time.perf_counter() - t0 - arrivals[i]))
        async with sem:  # waiting here is closed-loop queueing; TTFT counts from the send
            results[i] = await send(i)
        bar.update(1)

    probe.start()
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(i, t0) for i in range(len(requests))))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        await probe.stop()
        bar.close()
        for c in chans:
            await (c.close() if http_model is None else c.aclose())
    end = max((r.sent + r.e2e for r in results if r.ok), default=t0 + wall)
    overhead = {"loop_lag_s": summarize(probe.lags), "arrival_lag_s": summarize(arrival_lag),
                "cpu_frac": cpu / max(wall, 1e-9), "channels": len(chans)}
    return results, end - t0, overhead


async def _server_info(address: str, timeout: float, credentials: Credentials) -> tuple[dict, dict]:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from pdserve.errors import EXIT_SERVER, CLIError
    from pdserve.proto import pb, rpc

    async with credentials.channel(address, aio=True) as ch:
        try:
            await asyncio.wait_for(ch.channel_ready(), timeout)
            stub = rpc.PDServeStub(ch)
            model = await stub.GetModelInfo(pb.ModelInfoRequest(), timeout=timeout)
            cluster = await stub.GetClusterInfo(pb.ClusterInfoRequest(), timeout=timeout)
        except asyncio.TimeoutError:
            raise CLIError(f"cannot reach a pdserve router at {address}", EXIT_SERVER) from None
        except grpc.aio.AioRpcError as e:
            raise CLIError(f"{address}: {e.code().name}: {e.details()}", EXIT_SERVER) from None
    kw = {"preserving_proto_field_name": True, "always_print_fields_with_no_presence": True}
    try:
        return MessageToDict(model, **kw), MessageToDict(cluster, **kw)
    except TypeError:  # protobuf < 5 names the option differently
        kw.pop("always_print_fields_with_no_presence")
        return (MessageToDict(model, including_default_value_fields=True, **kw),
                MessageToDict(cluster, including_default_value_fields=True, **kw))


async def watch_cluster(address: str, period: float, t0: float, samples: list[dict],
                        credentials: Credentials = Credentials()) -> None:
    """Append the pool sizes and worker states to `samples` whenever they change (seconds since
    `t0`), so a run during scaling shows when each pool grew and shrank. Runs until cancelled."""
    import grpc

    from pdserve.proto import pb, rpc

    async with credentials.channel(address, aio=True) as ch:
        stub = rpc.PDServeStub(ch)
        while True:
            try:
                info = await stub.GetClusterInfo(pb.ClusterInfoRequest(), timeout=max(period, 1.0))
                state = {"prefill_replicas": info.prefill_replicas, "decode_replicas": info.decode_replicas,
                         "workers": {w.name: w.state for w in info.workers}}
                if not samples or {k: v for k, v in samples[-1].items() if k != "t"} != state:
                    samples.append({"t": round(time.perf_counter() - t0, 3), **state})
            except grpc.aio.AioRpcError:
                pass  # a slow or restarting router: the requests' own failures tell that story
            await asyncio.sleep(period)


def save_outputs(path: str, requests: list[BenchRequest], results: list[RequestResult]) -> None:
    """One JSON line per measured request, in workload order: what it produced and how fast, so two
    runs of the same seed (say, one while scaling) can be compared token for token, and a run's timeline
    rebuilt (`sent`: seconds after the first measured request left; `itl`: the gaps between token messages).
    `sent_clock` is the same instant as time.perf_counter() read it, which on Linux is one clock for every process
    of the host: with `request_id` it lines a request up with the engines' step logs (engine.step_log)."""
    t0 = min((r.sent for r in results if r.sent), default=0.0)
    with open(path, "w") as f:
        for i, (q, r) in enumerate(zip(requests, results)):
            f.write(json.dumps({"index": i, "group": q.group, "status": r.status, "error": r.error,
                                "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens,
                                "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                                "request_id": r.request_id, "sent_clock": round(r.sent, 6) if r.sent else None,
                                "sent": round(r.sent - t0, 6) if r.sent else None, "ttft": r.ttft,
                                "e2e": r.e2e, "itl": [round(x, 6) for x in r.itl], "prefill_worker": r.prefill_worker,
                                "decode_worker": r.decode_worker}) + "\n")


def load_reference(path: str, n: int) -> list[dict]:
    """A --save-outputs file for a run of `n` requests (read before the run, so a wrong file costs
    nothing)."""
    from pdserve.errors import CLIError

    try:
        ref = [json.loads(line) for line in open(path).read().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise CLIError(f"--compare-outputs {path}: {e}") from None
    if len(ref) != n or not all(isinstance(o, dict) and {"status", "token_ids"} <= set(o) for o in ref):
        raise CLIError(f"--compare-outputs {path} holds {len(ref)} saved requests; this run has {n}")
    return ref


def compare_outputs(path: str, ref: list[dict], results: list[RequestResult]) -> dict:
    """This run's tokens against a saved run of the same workload and seed, request by request;
    only requests that succeeded in both are compared."""
    pairs = [(i, o["token_ids"], r.token_ids) for i, (o, r) in enumerate(zip(ref, results))
             if o["status"] == "OK" and r.ok]
    bad = [i for i, a, b in pairs if a != b]
    return {"reference": path, "compared": len(pairs), "mismatched": len(bad), "mismatched_indices": bad[:20]}


def make_workload(args, vocab: tuple[int, int]) -> list[BenchRequest]:
    out_len = parse_range(args.max_tokens, "--max-tokens")
    if args.workload == "random":
        return random_workload(args.num_requests, parse_range(args.input_len, "--input-len"), out_len, vocab,
                               args.seed, text=args.prompt_format == "text")
    return shared_prefix_workload(args.num_prefixes, args.users_per_prefix, args.prefix_len,
                                  parse_range(args.suffix_len, "--suffix-len"), out_len, vocab, args.seed,
                                  n=args.num_requests)


def warmup_workload(args, requests: list[BenchRequest], vocab: tuple[int, int]) -> list[BenchRequest]:
    """Random prompts as long as the measured ones, from another seed: they warm the workers
    without putting any measured prefix in a cache."""
    lens = sorted(len(q.prompt_token_ids) if q.prompt_token_ids else len(q.prompt.split()) for q in requests)
    outs = sorted(q.max_tokens for q in requests)
    return random_workload(args.warmup, (lens[0], lens[-1]), (outs[0], outs[-1]), vocab, args.seed + 1_000_003,
                           text=requests[0].prompt_token_ids is None)


def _check_args(args) -> None:
    from pdserve.errors import CLIError

    if getattr(args, "http", None):
        if not args.http.startswith(("http://", "https://")):
            raise CLIError(f"--http must be an http:// or https:// URL, got {args.http!r}")
        args.http = args.http.rstrip("/").removesuffix("/v1")
        if args.compare_outputs or args.save_outputs:
            raise CLIError("--save-outputs and --compare-outputs need token ids, which only gRPC returns")
    for name in ("num_requests", "warmup", "num_prefixes", "users_per_prefix", "prefix_len", "concurrency"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "warmup" else 1):
            raise CLIError(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {v}")
    if not args.cluster_poll > 0:
        raise CLIError(f"--cluster-poll must be > 0 seconds, got {args.cluster_poll}")
    if not args.temperature >= 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if not args.request_rate > 0:
        raise CLIError(f"--request-rate must be > 0 (inf: all at once), got {args.request_rate}")
    for name, v in (("--goodput-ttft", args.goodput_ttft), ("--goodput-tpot", args.goodput_tpot)):
        if v is not None and not v > 0:
            raise CLIError(f"{name} must be > 0 seconds, got {v}")
    try:  # the ranges, before the server is asked anything
        parse_range(args.max_tokens, "--max-tokens")
        parse_range(args.input_len, "--input-len")
        parse_range(args.suffix_len, "--suffix-len")
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.workload == "random" and args.num_requests is None:
        args.num_requests = 100  # shared-prefix defaults to one request per user


def _vocab(args, vocab_size: int) -> tuple[int, int]:
    from pdserve.errors import CLIError

    if args.vocab_range is None:
        return min(100, vocab_size - 1), min(30000, vocab_size)
    try:
        lo, hi = (int(x) for x in args.vocab_range.split(":"))
    except ValueError:
        raise CLIError(f"--vocab-range must be LO:HI, got {args.vocab_range!r}") from None
    if not 0 <= lo < hi <= vocab_size:
        raise CLIError(f"--vocab-range must lie in [0, {vocab_size}] with LO < HI, got {lo}:{hi}")
    return lo, hi


async def bench(args) -> dict:
    """The whole run in one event loop: server info, warm-up, the measured requests, the report."""
    from pdserve.errors import CLIError

    http = getattr(args, "http", None)
    creds = credentials_from_args(args)
    if http:
        from pdserve.tools.bench_http import server_info

        model, cluster_before = await server_info(http, args.connect_timeout, creds), None
    else:
        model, cluster_before = await _server_info(args.server, args.connect_timeout, creds)
    target = http or args.server
    vocab = _vocab(args, int(model.get("vocab_size") or 32000))  # a server that does not say: a 32k vocabulary
    try:
        requests = make_workload(args, vocab)
        warm = warmup_workload(args, requests, vocab) if args.warmup else []
    except ValueError as e:
        raise CLIError(str(e)) from None
    max_len = int(model.get("max_model_len") or 0)
    longest = max(len(q.prompt_token_ids or ()) + q.max_tokens for q in requests)
    if max_len and longest > max_len:
        raise CLIError(f"the longest request needs {longest} tokens; the server's context is {max_len}")
    ids_only = all(q.prompt_token_ids is not None for q in requests)
    oracle = (oracle_hit_rate([q.prompt_token_ids for q in requests], int(model.get("block_size") or 16))
              if ids_only else None)
    reference = load_reference(args.compare_outputs, len(requests)) if args.compare_outputs else None
    kw = {"ignore_eos": args.ignore_eos, "seed": args.sampling_seed, "temperature": args.temperature,
          "timeout": args.request_timeout,
          "progress": not args.no_progress, "http_model": model["model"] if http else None, "credentials": creds}
    if warm:
        w, _, _ = await run_load(target, warm, [0.0] * len(warm), args.concurrency or 16, desc="warmup", **kw)
        bad = [r for r in w if not r.ok]
        if bad:
            print(f"pdserve bench: {len(bad)} of {len(w)} warm-up requests failed: {bad[0].status}: {bad[0].error}",
                  file=sys.stderr)
    arrivals = arrival_times(len(requests), args.request_rate, args.seed)
    samples: list[dict] = []
    watcher = asyncio.create_task(watch_cluster(args.server, args.cluster_poll, time.perf_counter(), samples, creds)
                                  if not http else asyncio.sleep(0))
    try:
        results, duration, overhead = await run_load(target, requests, arrivals, args.concurrency, **kw)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if args.save_outputs:
        save_outputs(args.save_outputs, requests, results)
    compared = compare_outputs(args.compare_outputs, reference, results) if args.compare_outputs else None
    cluster_after = None if http else (await _server_info(args.server, args.connect_timeout, creds))[1]
    rep = build_report(results, duration, goodput_ttft=args.goodput_ttft, goodput_tpot=args.goodput_tpot,
                       oracle=oracle)
    rep["client"] = overhead
    rep["outputs_vs_reference"] = compared
    rep["config"] = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    rep["config"]["vocab_range"] = list(vocab)
    rep["model"] = model
    rep["config"]["num_requests"] = len(requests)
    rep["cluster"] = {"before": cluster_before, "after": cluster_after, "timeline": samples}
    return rep


def jsonable(x):
    """Strict JSON: infinite rates become the string 'inf'."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def cmd_bench(args) -> int:
    """`pdserve bench` (its arguments: pdserve/commands.py). Exit 0 when at least one measured request
    completed (failures are in the report), 4 when none did or the server cannot be reached, 2 for bad
    arguments."""
    from pdserve.errors import EXIT_SERVER

    _check_args(args)
    rep = asyncio.run(bench(args))
    print(json.dumps(jsonable(rep), allow_nan=False) if args.json else format_report(rep), flush=True)
    return 0 if rep["completed"] else EXIT_SERVER

