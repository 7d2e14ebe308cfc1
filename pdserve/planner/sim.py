"""A discrete-event simulation of one cluster serving one request list: the router's picks, prefill engines
(chunked prefill, batched prompts, a prefix cache), KV transfer (per-decode-worker link, raw or fp8 wire),
decode engines (continuous batching, KV capacity, max_num_seqs), or colocated engines that prefill and decode
in the same steps.

Engines mirror engine/scheduler.py: one step serves running sequences first (one token each), then prompt
chunks within `max_num_batched_tokens`, split by the engine's own engine/prompt_chunks.allot (while several
prompts compete, those that finish within `prompt_chunk_tokens` go first and the oldest gets at least that many;
the rest oldest first); a step's time comes from the profile (profile.py). A decode worker's first step of a
request recomputes its last prompt token (plus the attention sinks when the KV is not its own: fp8 wire, or a
prefill pool at another precision), which makes that step a mixed one.
The router mirrors router/policy.py: cache-aware prefill pick (prefix held by a worker that is not overloaded,
else least queued tokens), least-loaded decode pick, both at arrival; colocated engines with prefix caching get
the cache-aware pick, as pdserve's own colocated mode does.
On a shared CPU box, engines share `host_cores` by processor sharing (slowed further by the profile's measured
contention of engines stepping at once, contention.py, when it has one), or run at a given CPU share (a number
or a trace over time per pool, measured by hostload.py) relative to the profile's. Engines that share GPUs
(`shared_devices`: a prefill and a decode actor on one GPU) split them the same way, as the GPU time-slices
between their processes.
Engines overlap their steps (`overlap`, engine.overlap_schedule): a step is composed when the one before it
starts, so a prompt (or landed KV) that arrives while a step runs is scheduled a step later than without. A
worker's event loop passes one message per streamed sequence per step: a request entering a decode or colocated
worker, and each request's first and last tokens leaving it, wait the profile's per_stream_ms for each sequence
the worker streams.

Simplifications (each makes the simulation faster or simpler and is small for the workloads here): a decode
admission reserves KV for the whole request (prompt + output), so there is no preemption; transfers into one
decode worker go one at a time at the profile's rate; a prefix cache holds whole shared prefixes (LRU by
prefix, sized in tokens), and the router's index is exact apart from prompts still in flight.

Arrivals are open-loop (each request at its `arrival`), or closed-loop with `clients` (`pdserve bench
--concurrency C` with all requests ready at the start): C clients, the first C requests sent at their own
arrival times (0 for all at once), and each later one, in list order, sent when a request finishes (its last
token), so its arrival is that moment.

Per-token times are not stored per request: each engine keeps the end time of its every step, and a request
keeps where its tokens fall in that list, which is all TTFT, TPOT and ITL need.
"""
from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass

from pdserve.engine.prompt_chunks import LOOKAHEAD, allot
from pdserve.planner.contention import excess
from pdserve.planner.profile import Profile
from pdserve.planner.workload import SimRequest

DISPATCH, STEP_END, TRANSFER_DONE, KICK, ADMIT, HANDOFF = 1, 2, 3, 4, 5, 6


@dataclass
class ClusterSpec:
    """One deployment to simulate. colocated: `decode` engines that prefill and decode, no prefill pool."""
    prefill: int = 1
    decode: int = 1
    colocated: bool = False
    prefill_precision: str = "bf16"
    decode_precision: str = "bf16"
    wire: str = "raw"
    refresh_sink_tokens: int = 4
    policy: str = "cache_aware"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    prefill_max_num_batched_tokens: int = 1024
    prefill_max_num_seqs: int = 64
    prompt_chunk_tokens: int | None = None  # engine.prompt_chunk_tokens; None: an engine's budget // 4
    kv_cache_tokens: int = 1 << 30       # per decode (or colocated) engine
    prefix_cache_tokens: int = 1 << 30   # per prefill engine (and colocated engine when colocated_prefix_cache)
    colocated_prefix_cache: bool = True
    transfer_scale: float = 1.0          # transfer times x this (what-if: another network)
    # engine.overlap_schedule (on by default on CUDA): step N+1 is composed when step N starts, so work that arrives
    # while a step runs waits for the step after the next one (engine/engine.py)
    overlap: bool = False
    host_cores: int | None = None        # engines share this many cores; None: one device each
    # all engines share this many GPUs, time-sliced: the busy ones split them equally (bench_cluster_gpu.py's
    # disaggregated pair on one GPU, Ray fractional GPUs); None: a device each
    shared_devices: int | None = None
    # measured slowdowns of engines stepping at once on those cores (profile host.contention, contention.py)
    host_contention: dict | None = None
    # the share of a core each engine gets on a shared box (hostload.py): one number, or [(from second, share)],
    # or {"prefill": ..., "decode": ...} of those per pool (colocated engines take the decode pool's)
    cpu_share: float | list | dict | None = None

    @property
    def gpus(self) -> int:
        return self.decode if self.colocated else self.prefill + self.decode

    def label(self) -> str:
        return f"colocated x{self.decode}" if self.colocated else f"{self.prefill}P{self.decode}D"

    @classmethod
    def from_profile(cls, profile: Profile, **kw) -> "ClusterSpec":
        """Engine limits from the profile's `engine` section, overridden by `kw`."""
        e = profile.engine
        base = {"max_num_seqs": e.get("max_num_seqs", 64),
                "max_num_batched_tokens": e.get("max_num_batched_tokens", 1024),
                "prefill_max_num_batched_tokens": e.get("prefill_max_num_batched_tokens",
                                                        e.get("max_num_batched_tokens", 1024)),
                "prefill_max_num_seqs": e.get("prefill_max_num_seqs", e.get("max_num_seqs", 64)),
                "prompt_chunk_tokens": e.get("prompt_chunk_tokens"),
                "kv_cache_tokens": e.get("kv_cache_tokens", 1 << 30),
                "prefix_cache_tokens": e.get("prefix_cache_tokens", e.get("kv_cache_tokens", 1 << 30)),
                "host_cores": profile.host_cores, "host_contention": profile.host_contention,
                "overlap": bool(e.get("overlap_schedule", False))}
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)


@dataclass
class Outcome:
    """One request's fate. Token j (0-based) of the request came at `engine.step_ends[first_step + j]`."""
    arrival: float
    prompt_len: int
    output_len: int
    ttft: float = math.nan
    e2e: float = math.nan
    cached_tokens: int = 0
    engine: int = -1       # decode (or colocated) engine index
    first_step: int = -1
    prefill_engine: int = -1
    expected_hit: int = 0  # what the router counted on from the prefix cache (its queued-tokens bookkeeping)


class _Job:
    """A prompt an engine still has to compute (prefill engine, colocated engine), or a decode worker's first
    step of a request whose KV arrived (`remaining` = 1 + refresh)."""
    __slots__ = ("rid", "remaining", "done", "refresh", "admitted", "kv", "seen")

    def __init__(self, rid: int, remaining: int, done: int, refresh: int = 0, kv: int = 0):
        self.rid, self.remaining, self.done, self.refresh = rid, remaining, done, refresh
        self.admitted = False  # in the running batch (counts against max_num_seqs)
        self.kv = kv
        self.seen = True  # the scheduler may take it (overlap scheduling: not before the next step is composed)


class Engine:
    def __init__(self, idx: int, role: str, precision: str, spec: ClusterSpec, kv_tokens: int, cache_tokens: int):
        self.idx, self.role, self.precision = idx, role, precision
        self.max_seqs = spec.prefill_max_num_seqs if role == "prefill" else spec.max_num_seqs
        self.budget = spec.prefill_max_num_batched_tokens if role == "prefill" else spec.max_num_batched_tokens
        self.chunk_cap = spec.prompt_chunk_tokens or max(1, self.budget // 4)
        self.kv_free = self.kv_total = kv_tokens
        self.cache_tokens = cache_tokens
        self.cache: OrderedDict[int, int] = OrderedDict()  # group -> cached prefix tokens (LRU)
        self.cache_used = 0
        self.jobs: deque[_Job] = deque()     # prompts to compute, in arrival order
        self.unseen = 0                      # of them, the last ones, which the scheduler may not take yet
        self.admitted = 0                    # of them, those in the running batch
        self.room_wait: deque[tuple] = deque()  # requests waiting for KV room (decode: before their transfer)
        self.finish: list[tuple[int, int]] = []  # (last step, rid) of decoding sequences
        self.decoding = 0
        self.ctx_total = 0
        self.step_ends: list[float] = []
        self.busy = False
        self.kick_pending = False  # a KICK event is queued for this engine
        self.version = 0
        # the step in flight: its jobs' chunks, work left (ms at full speed), when that was last updated
        self.cur: list[tuple[_Job, int]] = []
        self.work_left = 0.0
        self.rate = 1.0
        self.t_mark = 0.0
        self.link_free = 0.0  # decode: when its inbound KV link is next free
        # the router's view
        self.queued_tokens = 0
        self.inflight = 0
        self.expected: set[int] = set()

    def has_work(self) -> bool:
        return bool(self.jobs) or self.decoding > 0

    def cache_hit(self, group: int) -> int:
        if group < 0 or group not in self.cache:
            return 0
        self.cache.move_to_end(group)
        return self.cache[group]

    def cache_insert(self, group: int, tokens: int) -> None:
        if group < 0 or tokens <= 0 or tokens > self.cache_tokens:
            return
        if group in self.cache:
            self.cache.move_to_end(group)
            return
        while self.cache_used + tokens > self.cache_tokens:
            g, t = self.cache.popitem(last=False)
            self.cache_used -= t
            self.expected.discard(g)
        self.cache[group] = tokens
        self.cache_used += tokens


class Simulator:
    def __init__(self, profile: Profile, spec: ClusterSpec, requests: list[SimRequest], clients: int | None = None):
        if clients is not None and clients < 1:
            raise ValueError(f"clients must be >= 1, got {clients}")
        self.p, self.spec, self.reqs = profile, spec, list(requests)  # closed loop rewrites arrivals: a copy
        self.clients = clients
        self.next_rid = len(self.reqs) if clients is None else min(clients, len(self.reqs))
        if spec.colocated:
            profile.need(spec.decode_precision, "prefill")
        else:
            profile.need(spec.prefill_precision, "prefill")
            if spec.wire not in profile.transfer:
                raise ValueError(f"the profile has no transfer curve for the {spec.wire} wire")
        profile.need(spec.decode_precision, "decode")
        bs = int(profile.engine.get("block_size", 16))
        self.block = bs
        pool_role = "colocated" if spec.colocated else "decode"
        cache = spec.prefix_cache_tokens if (not spec.colocated or spec.colocated_prefix_cache) else 0
        self.decoders = [Engine(i, pool_role, spec.decode_precision, spec, spec.kv_cache_tokens, cache)
                         for i in range(spec.decode)]
        self.prefillers = [] if spec.colocated else [
            Engine(i, "prefill", spec.prefill_precision, spec, spec.kv_cache_tokens, spec.prefix_cache_tokens)
            for i in range(spec.prefill)]
        self.engines = self.prefillers + self.decoders
        self.out = [Outcome(r.arrival, r.prompt_len, r.output_len) for r in requests]
        self.refresh = 0
        if not spec.colocated and (spec.wire == "fp8" or spec.prefill_precision != spec.decode_precision):
            self.refresh = spec.refresh_sink_tokens
        self.events: list = []
        self.seq = 0
        self.now = 0.0
        self.busy_count = 0
        self.rr = {"prefill": 0, "decode": 0}
        self.request_s = profile.overhead_ms("request_ms") / 1e3
        self.stream_s = profile.overhead_ms("per_stream_ms") / 1e3
        self.handoff_s = profile.overhead_ms("handoff_ms") / 1e3
        if spec.host_cores and spec.shared_devices:
            raise ValueError("host_cores (engines on a CPU box) and shared_devices (engines on shared GPUs) exclude "
                             "each other")
        self.shared = spec.host_cores or spec.shared_devices
        self.step_overhead_ms = profile.overhead_ms("decode_step_ms")
        self.holding: dict[int, tuple[Engine, int]] = {}  # rid -> (prefill engine, its KV tokens held)
        # step times scale from the CPU share the profile was measured at to the one given (a shared box)
        shares = spec.cpu_share if isinstance(spec.cpu_share, dict) else {"prefill": spec.cpu_share,
                                                                         "decode": spec.cpu_share}
        self.shares = {role: (sorted(v) if isinstance(v, list) else [(0.0, v)]) for role, v in shares.items() if v}
        self.shares.setdefault("colocated", self.shares.get("decode"))
        self.profile_share = profile.host_cpu_share

    # -- events ------------------------------------------------------------------------------------
    def push(self, t: float, kind: int, a, b=0) -> None:
        self.seq += 1
        # a KICK sorts after every other event of its instant (its `seq` lifted past any pushed later)
        heapq.heappush(self.events, (t, self.seq + (1 << 62 if kind == KICK else 0), kind, a, b))

    def run(self) -> list[Outcome]:
        for i, r in enumerate(self.reqs[:self.next_rid]):  # open loop: all; closed loop: the first `clients`
            self.push(r.arrival + self.request_s, DISPATCH, i)
        ev = self.events
        pop = heapq.heappop
        while ev:
            t, _, kind, a, b = pop(ev)
            self.now = t
            if kind == STEP_END:
                if a.version == b:
                    self.step_end(a)
            elif kind == DISPATCH:
                self.dispatch(a)
            elif kind == TRANSFER_DONE:
                self.transfer_done(a, b)
            elif kind == ADMIT:
                self.admit_prompt(b, a)
            elif kind == HANDOFF:
                self.handoff(b, a)
            elif kind == KICK:
                a.kick_pending = False
                if not a.busy and a.has_work():
                    self.start_step(a)
        return self.out

    # -- router ------------------------------------------------------------------------------------
    def dispatch(self, rid: int) -> None:
        r = self.reqs[rid]
        if self.spec.colocated and self.spec.colocated_prefix_cache:
            # a colocated baseline with prefix caching gets the cache-aware pick too (its engines hold the caches)
            d = self.pick_prefill(r, self.decoders)
        else:
            d = self.pick_decode()
        d.inflight += 1
        self.out[rid].engine = d.idx
        p = d if self.spec.colocated else self.pick_prefill(r, self.prefillers)
        if not self.spec.colocated:
            self.out[rid].prefill_engine = p.idx
            p.inflight += 1
        hit = self.block_floor(r.prefix_len, r.prompt_len) if r.group in p.expected else 0
        p.queued_tokens += r.prompt_len - hit
        self.out[rid].expected_hit = hit
        if r.group >= 0 and p.cache_tokens:
            p.expected.add(r.group)
        if p.role == "colocated" and self.stream_s and p.decoding:
            self.push(self.now + self.loop_s(p), ADMIT, rid, p)  # through the worker's loop, behind its streams
        else:
            self.admit_prompt(p, rid)

    def loop_s(self, e: Engine) -> float:
        """What a request's message waits in a decode or colocated worker's event loop: the profile's per_stream_ms
        for each sequence that the worker streams tokens of (its loop passes one message a step for each)."""
        return self.stream_s * e.decoding

    def block_floor(self, prefix_len: int, prompt_len: int) -> int:
        # cacheable: full blocks of the prefix, never the whole prompt (its last token is computed)
        return min(prefix_len, prompt_len - 1) // self.block * self.block

    def pick_decode(self) -> Engine:
        ds = self.decoders
        if self.spec.policy == "round_robin":
            self.rr["decode"] += 1
            return ds[self.rr["decode"] % len(ds)]
        return min(ds, key=lambda e: (e.inflight + len(e.room_wait), -e.kv_free))

    def pick_prefill(self, r: SimRequest, ps: list[Engine]) -> Engine:
        pol = self.spec.policy
        if pol == "round_robin":
            self.rr["prefill"] += 1
            return ps[self.rr["prefill"] % len(ps)]
        least = min(ps, key=lambda e: (e.queued_tokens, e.inflight, len(e.jobs)))
        if pol != "cache_aware" or r.group < 0:
            return least
        # router/policy.py CacheAware: the holder unless it is overloaded
        hit = self.block_floor(r.prefix_len, r.prompt_len)
        holders = [e for e in ps if r.group in e.expected]
        if not holders or hit < 0.5 * r.prompt_len:
            return least
        best = min(holders, key=lambda e: (e.queued_tokens, e.inflight))
        if best.queued_tokens <= least.queued_tokens * 2.0 + 4096:
            return best
        return least

    # -- engines -----------------------------------------------------------------------------------
    def admit_prompt(self, e: Engine, rid: int) -> None:
        r = self.reqs[rid]
        need = r.prompt_len + (r.output_len if e.role == "colocated" else 0)
        e.room_wait.append((rid, need))
        self.drain_room(e)

    def drain_room(self, e: Engine) -> None:
        """Requests waiting for KV room, in order; prompts become jobs, decode requests start their transfer."""
        while e.room_wait and e.room_wait[0][1] <= e.kv_free:
            rid, need = e.room_wait.popleft()
            e.kv_free -= need
            if e.role == "decode":
                self.start_transfer(e, rid, need)
            else:
                self.enqueue(e, _Job(rid, self.reqs[rid].prompt_len, 0, kv=need))
        while e.room_wait and e.room_wait[0][1] > e.kv_total:  # can never fit: it fails, as the engine refuses it
            rid, _ = e.room_wait.popleft()
            self.fail(rid)

    def fail(self, rid: int) -> None:
        o = self.out[rid]
        o.ttft = o.e2e = math.inf
        self.decoders[o.engine].inflight -= 1
        if rid in self.holding:
            p, kv = self.holding.pop(rid)
            p.kv_free += kv
            p.inflight -= 1
        self.client_next()

    def client_next(self, delay: float = 0.0) -> None:
        """Closed loop: a client whose request just ended (its last token reaches it after `delay`) sends the next
        one then."""
        if self.clients is None or self.next_rid >= len(self.reqs):
            return
        rid = self.next_rid
        self.next_rid += 1
        t = self.now + delay
        self.reqs[rid] = dataclasses.replace(self.reqs[rid], arrival=t)
        self.out[rid].arrival = t
        self.push(t + self.request_s, DISPATCH, rid)

    def enqueue(self, e: Engine, job: _Job) -> None:
        """A prompt (or a decode worker's landed KV) joins the engine's queue. Under overlap scheduling the engine
        composed its next step when the running one started, before this arrived: the scheduler sees it from
        the step after that (start_step reveals it once it has composed the next one)."""
        if self.spec.overlap and e.busy:
            job.seen = False
            e.unseen += 1
        e.jobs.append(job)
        self.kick(e)

    def kick(self, e: Engine) -> None:
        """Start a step on an idle engine with work, once everything else of this instant has happened: the
        engine's loop schedules what is there when it gets to run, so requests that arrive together (a burst, a
        closed-loop client's next request at a step's end) share the step, as they do in engine/engine.py."""
        if not e.busy and not e.kick_pending and e.has_work():
            e.kick_pending = True
            self.push(self.now, KICK, e)

    def start_step(self, e: Engine) -> None:
        if e.unseen and e.decoding == 0 and len(e.jobs) == e.unseen:
            self.reveal(e)  # nothing was launched behind the step that ended: the engine schedules them now
        budget = e.budget - e.decoding
        # engine/scheduler.py: the running prompts, then new ones while seats last, as many as fill the budget first
        # come, first served and, behind a long prompt, LOOKAHEAD more; split by allot
        room = e.max_seqs - e.decoding - e.admitted
        admitted: list[_Job] = []
        demands: list[int] = []
        fresh: list[_Job] = []
        hits: list[int] = []
        for job in e.jobs:  # the queue may be long under overload: stop once all admitted ones are found
            if len(admitted) == e.admitted:
                break
            if job.admitted:
                admitted.append(job)
                demands.append(job.remaining + job.refresh)
        fill, more = budget - sum(demands), LOOKAHEAD
        long = any(d > e.chunk_cap for d in demands)
        for job in e.jobs:
            if len(fresh) >= room or (fill <= 0 and (more <= 0 or not long)) or not job.seen:
                break
            if job.admitted:
                continue
            if e.role == "decode":
                d, hit = job.remaining + job.refresh, 0
            else:  # the prefix cache is looked up when the prompt is scheduled
                r = self.reqs[job.rid]
                hit = min(self.block_floor(r.prefix_len, r.prompt_len), e.cache_hit(r.group)) if r.group >= 0 else 0
                # a prefill worker computes all prompt tokens but the last (the decode side recomputes it)
                d = max(1, r.prompt_len - hit - (e.role == "prefill"))
            fresh.append(job)
            hits.append(hit)
            demands.append(d)
            long = long or d > e.chunk_cap
            if fill > 0:
                fill -= d
            else:
                more -= 1
        competing = len(e.jobs) - e.unseen + len(e.room_wait) > 1
        chunks: list[tuple[_Job, int]] = []
        for k, (job, n) in enumerate(zip(admitted + fresh, allot(demands, budget, e.chunk_cap if competing else None))):
            if n <= 0:
                continue
            if not job.admitted:
                job.admitted = True
                e.admitted += 1
                if e.role != "decode":
                    job.done, job.remaining = hits[k - len(admitted)], demands[k]
                    self.out[job.rid].cached_tokens = job.done
            chunks.append((job, n))
        new_tokens = sum(n for _, n in chunks)
        token_ctx = float(sum(n * job.done for job, n in chunks))
        all_single = all(n == 1 and not job.refresh for job, n in chunks)
        new_ctx = sum(job.done for job, _ in chunks)
        if e.unseen:
            self.reveal(e)  # arrived while the last step ran: the step after this one may take them
        if not chunks and e.decoding == 0:
            e.busy = False
            return
        p = self.p
        if chunks and not all_single:
            work = p.mixed_ms(e.precision, new_tokens + e.decoding, token_ctx, e.ctx_total + new_ctx,
                              e.decoding + len(chunks))
        elif e.role == "prefill":
            work = p.prefill_ms(e.precision, new_tokens, token_ctx)
        else:
            work = p.decode_ms(e.precision, e.decoding + len(chunks), e.ctx_total + new_ctx)
        if e.role != "prefill":
            work += self.step_overhead_ms
        elif self.spec.wire in p.export:
            for job, n in chunks:
                if n >= job.remaining:
                    work += p.export_ms(self.spec.wire, p.kv_bytes(self.spec.wire, self.reqs[job.rid].prompt_len - 1))
        e.cur = chunks
        e.work_left = work
        e.busy = True
        self.busy_count += 1
        if not self.shared:
            e.version += 1
            trace = self.shares.get(e.role)
            self.push(self.finish_time(trace, work / 1e3) if trace else self.now + work / 1e3, STEP_END, e, e.version)
        else:
            self.reschedule(started=e)

    @staticmethod
    def reveal(e: Engine) -> None:
        for job in reversed(e.jobs):
            if job.seen:
                break
            job.seen = True
        e.unseen = 0

    def finish_time(self, trace: list[tuple[float, float]], work_s: float) -> float:
        """When `work_s` seconds of profile work started now are done, running at trace's share / the profile's
        share in each of its intervals (the last one lasts)."""
        t = self.now
        i = max(bisect.bisect_right(trace, (t, math.inf)) - 1, 0)
        while True:
            rate = trace[i][1] / self.profile_share
            end = trace[i + 1][0] if i + 1 < len(trace) else math.inf
            if t + work_s / rate <= end:
                return t + work_s / rate
            work_s -= (end - t) * rate
            t, i = end, i + 1

    def reschedule(self, started: Engine | None = None) -> None:
        """Processor sharing: the busy engines split `host_cores` cores (or `shared_devices` GPUs), so every change of
        their number re-times every step in flight."""
        for o in self.engines:
            if o.busy and o is not started:
                o.work_left -= (self.now - o.t_mark) * 1e3 * o.rate
        busy = max(self.busy_count, 1)
        if self.spec.host_cores:
            rate = min(1.0, self.spec.host_cores / busy) / excess(self.spec.host_contention, busy, self.spec.host_cores)
        else:
            rate = min(1.0, self.spec.shared_devices / busy)
        for o in self.engines:
            if o.busy:
                o.t_mark, o.rate = self.now, rate
                o.version += 1
                self.push(self.now + max(o.work_left, 0.0) / 1e3 / rate, STEP_END, o, o.version)

    def step_end(self, e: Engine) -> None:
        now = self.now
        k = len(e.step_ends)
        e.step_ends.append(now)
        e.busy = False
        self.busy_count -= 1
        if self.shared:
            self.reschedule()  # the others speed up
        e.ctx_total += e.decoding
        for job, n in e.cur:
            used = min(n, job.refresh)
            job.refresh -= used
            n -= used
            job.remaining -= n
            job.done += n
            if job.remaining > 0:
                continue
            e.jobs.remove(job)
            e.admitted -= 1
            self.prompt_done(e, job, k)
        e.cur = []
        fin = e.finish
        while fin and fin[0][0] == k:
            _, rid = heapq.heappop(fin)
            self.request_done(e, rid)
        if e.room_wait:
            self.drain_room(e)
        self.kick(e)

    def prompt_done(self, e: Engine, job: _Job, k: int) -> None:
        rid = job.rid
        r = self.reqs[rid]
        if e.role != "decode":  # the engine the router queued the prompt's tokens on
            e.queued_tokens -= r.prompt_len - self.out[rid].expected_hit
        if e.role == "prefill":
            if r.group >= 0:
                e.cache_insert(r.group, self.block_floor(r.prefix_len, r.prompt_len))
            d = self.decoders[self.out[rid].engine]
            self.holding[rid] = (e, job.kv)  # the prefill side's blocks, until the transfer is over
            # the router hands the request on to the decode worker, whose loop takes it behind its streams
            delay = self.handoff_s + self.loop_s(d)
            if delay:
                self.push(self.now + delay, HANDOFF, rid, d)
            else:
                self.handoff(d, rid)
            return
        # the request's first token came with this step (colocated: its last prompt chunk; decode: the recompute)
        if e.role == "colocated" and r.group >= 0:
            e.cache_insert(r.group, self.block_floor(r.prefix_len, r.prompt_len))
        o = self.out[rid]
        o.first_step = k
        o.ttft = self.now + self.loop_s(e) - r.arrival  # the token's message leaves through the worker's loop
        if r.output_len <= 1:
            self.request_done(e, rid, joined=False)
            return
        heapq.heappush(e.finish, (k + r.output_len - 1, rid))
        e.decoding += 1
        e.ctx_total += r.prompt_len + 1

    def handoff(self, d: Engine, rid: int) -> None:
        r = self.reqs[rid]
        d.room_wait.append((rid, r.prompt_len + r.output_len))
        self.drain_room(d)

    def request_done(self, e: Engine, rid: int, joined: bool = True) -> None:
        r = self.reqs[rid]
        o = self.out[rid]
        deliver = self.loop_s(e)
        o.e2e = self.now + deliver - r.arrival
        if joined:
            e.decoding -= 1
            e.ctx_total -= r.prompt_len + r.output_len
        e.kv_free += r.prompt_len + r.output_len
        e.inflight -= 1
        self.client_next(deliver)

    # -- transfer ----------------------------------------------------------------------------------
    def start_transfer(self, d: Engine, rid: int, need: int) -> None:
        r = self.reqs[rid]
        wire = self.spec.wire
        ms = self.p.transfer_ms(wire, self.p.kv_bytes(wire, r.prompt_len - 1)) * self.spec.transfer_scale
        start = max(self.now, d.link_free)
        d.link_free = start + ms / 1e3
        self.push(d.link_free, TRANSFER_DONE, d, rid)

    def transfer_done(self, d: Engine, rid: int) -> None:
        p, kv = self.holding.pop(rid)
        p.kv_free += kv  # the lease ends: the prefill side frees (or caches) the blocks
        p.inflight -= 1
        if p.room_wait:
            self.drain_room(p)
        self.enqueue(d, _Job(rid, 1, self.reqs[rid].prompt_len - 1, self.refresh))


def simulate(profile: Profile, spec: ClusterSpec, requests: list[SimRequest],
             clients: int | None = None) -> tuple[list[Outcome], list[Engine]]:
    """Open loop (each request at its arrival), or closed loop with `clients` concurrent clients (module doc)."""
    sim = Simulator(profile, spec, requests, clients)
    return sim.run(), sim.decoders

