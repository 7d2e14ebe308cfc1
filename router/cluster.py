"""The worker pools on Ray: start (or join) Ray, create prefill and decode actors, grow and shrink
each pool at run time, watch every worker, and keep each pool at its size.

- Scale is serialized. Growing checks Ray's free resources first: on a Ray this router started (its size
  is fixed) a pool is never grown past what can be placed (ClusterFull, RESOURCE_EXHAUSTED); on a Ray it
  joined (which may autoscale) the unplaced workers stay STARTING, reported as pending, until
  `router.start_timeout_s`. Shrinking removes STARTING workers first, then UNHEALTHY ones, then the least
  loaded READY ones, which drain (no new requests, in-flight ones finish, then the actor exits).
- Liveness: every worker is probed (its stats) without the router ever waiting on the answer. One that has
  not answered for `router.liveness_timeout_s` turns UNHEALTHY, one whose actor died leaves its pool; both
  are reported to the listeners ("lost"), so the requests it held move elsewhere (router/dispatch.py).
- Self-healing: a pool below its size (a worker died) gets replacements, after `router.restart_backoff_s`,
  doubling per failed start up to 60 s.
- Start-up fails (PoolStartFailed, with the cause) when a pool the cluster serves with has no ready worker once
  its workers have started or failed: a server that could answer nothing must not report itself ready.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pdserve.config import Config
from pdserve.errors import NoFreeBlocks, PoolStartFailed
from pdserve.router.log_limit import LogLimiter
from pdserve.router.policy import KVIndex
from pdserve.router.pool import Pool, Worker, WorkerState

log = logging.getLogger("pdserve.cluster")
NAMESPACE = "pdserve"


def init_ray(config: Config) -> None:
    if not config.ray.address:
        # A Ray of our own serves this process alone, so all it starts listens on loopback. Each Ray component
        # binds its gRPC server to 127.0.0.1 only when its node IP is 127.0.0.1, and ray.init turns a loopback
        # _node_ip_address into the machine's address unless Ray believes it runs single-node (as on macOS and
        # Windows), which this variable tells it; Ray reads it when first imported. Its children inherit it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # A new local Ray turns its token authentication on unless RAY_AUTH_MODE says otherwise, and prints a warning
        # that it did; saying "token" first keeps it on, without the warning. Ray reads the mode when first imported:
        # set only before that, or this process and the Ray it starts would disagree.
        if "ray" not in sys.modules:
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        if "grpc" in sys.modules and os.environ.get("GRPC_ENABLE_FORK_SUPPORT", "").lower() not in ("0", "false"):
            log.warning("GRPC_ENABLE_FORK_SUPPORT is not 0: a Ray process started beside this gRPC server may abort "
                        "before it runs (the `pdserve` command sets it to 0 before gRPC is imported; so must an "
                        "embedding program)")
    import ray

    if ray.is_initialized():
        return
    # workers import pdserve from the same environment as the router: no source folder goes on their path
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    handlers = _stop_handlers()
    try:
        if config.ray.address:
            ray.init(address=config.ray.address, runtime_env=env, log_to_driver=True, namespace=NAMESPACE)
            return
        need = (config.prefill.num_cpus * max(config.prefill.replicas, 1)
                + config.decode.num_cpus * max(config.decode.replicas, 1))
        num_cpus = config.ray.num_cpus or max(int(need + 0.999) + 2, os.cpu_count() or 1)
        # Ray waits 30 s for its GCS and 30 s for its raylet to come up; on the loaded 2-core CI box each was
        # missed once. The GCS wait can be raised; the raylet's has no setting.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
        # UCX's TCP transport listens on every network device; the workers of one machine need only loopback
        env["env_vars"]["UCX_NET_DEVICES"] = os.environ.get("UCX_NET_DEVICES", "lo")
        # address="local": always a new Ray of our own, even if another one runs on this machine
        ray.init(address="local", num_cpus=num_cpus, runtime_env=env, include_dashboard=False, log_to_driver=True,
                 namespace=NAMESPACE, _node_ip_address="127.0.0.1",
                 configure_logging=True, logging_level=logging.WARNING)
        if ray.util.get_node_ip_address() != "127.0.0.1":
            log.warning("Ray listens on %s, not only on loopback: it was imported before pdserve could set "
                        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0", ray.util.get_node_ip_address())
    finally:
        _restore(handlers)


def _stop_handlers() -> dict:
    """This process's own SIGTERM/SIGINT handlers (the CLI's: drain, then exit 0), to put back after ray.init,
    which installs its own (sys.exit) and whose core worker adds abseil's, which dumps a stack on SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    return {s: h for s, h in handlers.items() if callable(h)}


def _restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _actor_class(role: str):
    import ray

    if role == "prefill":
        from pdserve.prefill_worker.worker import PrefillWorker as cls
    else:
        from pdserve.decode_worker.worker import DecodeWorker as cls
    return ray.remote(cls)


MAX_BACKOFF_S = 60.0
FLUSH_TRACES_S = 5.0  # the longest a worker about to be killed is given to export its spans


class ClusterFull(NoFreeBlocks):
    """Ray cannot place the workers a Scale asks for: RESOURCE_EXHAUSTED, and the pool is left as it was."""


def actor_dead(exc: BaseException) -> bool:
    """The actor behind a failed call is gone for good (not merely slow or briefly unreachable)."""
    from ray import exceptions as rx

    if isinstance(exc, rx.ActorUnavailableError):
        return False
    return isinstance(exc, (rx.RayActorError, rx.ActorUnschedulableError, rx.WorkerCrashedError))


@dataclass(frozen=True)
class ScaleResult:
    previous: int  # the pool's size before (workers not draining)
    ready: int  # ready workers now
    pending: int  # workers still starting (not placed, or loading)


class Cluster:
    def __init__(self, config: Config):
        self.config = config
        self.pools = {"prefill": Pool("prefill"), "decode": Pool("decode")}
        self.index = KVIndex()
        # workers outlive the router only on a Ray cluster it joined (so a restarted router adopts
        # them, caches intact); on a Ray it started itself they go down with it
        self.detached = bool(config.ray.address)
        # called as listener(event, worker): "lost" (UNHEALTHY or dead: its requests must move), "back"
        # (answering again), "died", "removed" (left its pool), "restarted" (a replacement is ready)
        self.listeners: list[Callable[[str, Worker], None]] = []
        self.log = LogLimiter(log)
        self._counter = 0
        self.start_failures: dict[str, str] = {}  # role -> the last worker start that failed, and why
        self._tasks: set = set()
        self._scale_lock = asyncio.Lock()
        self._last_round = time.monotonic()
        base = config.router.restart_backoff_s
        self._backoff = {r: [0.0, base] for r in self.pools}  # role -> [next attempt, current delay]

    def _emit(self, event: str, w: Worker) -> None:
        for fn in self.listeners:
            try:
                fn(event, w)
            except Exception:  # a listener's bug must not stop the pools
                log.exception("cluster listener failed on %s %s", event, w.name)

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def start(self) -> None:
        init_ray(self.config)
        adopted = await self._adopt() if self.detached else {"prefill": 0, "decode": 0}
        new = []
        for role, pool in self.pools.items():
            pool.target = max(getattr(self.config, role).replicas, adopted[role])
            if not adopted[role]:
                new += [w.starting for w in self._create(role, pool.target)]
        if new:
            await asyncio.wait(new)
        empty = [role for role in self.config.roles() if self.pools[role].target and not self.pools[role].ready()]
        if empty:
            raise PoolStartFailed("; ".join(
                f"no {role} worker started ({self.start_failures.get(role, 'none ready')})" for role in empty))

    async def _adopt(self) -> dict:
        """Take over the workers a previous router left on this Ray cluster."""
        import ray
        from ray.util import list_named_actors

        found = {"prefill": 0, "decode": 0}
        for name in list_named_actors():
            role = name.split("-", 1)[0]
            if role not in found:
                continue
            try:
                actor = ray.get_actor(name, namespace=NAMESPACE)
                info = await asyncio.wait_for(actor.start.remote(), self.config.router.call_timeout_s)
            except Exception as e:
                log.warning("cannot adopt worker %s: %s", name, e)
                continue
            self.pools[role].workers[name] = Worker(name, role, actor, state=WorkerState.READY, info=info,
                                                    last_seen=time.monotonic())
            found[role] += 1
        if any(found.values()):
            log.info("adopted %d prefill and %d decode workers", found["prefill"], found["decode"])
        return found

    def _create(self, role: str, n: int, replacement: bool = False) -> list[Worker]:
        """n new STARTING workers; each has a task (`starting`) that makes it READY or removes it."""
        pool_cfg = getattr(self.config, role)
        cls = _actor_class(role)
        new = []
        for _ in range(n):
            self._counter += 1
            name = f"{role}-{self._counter}-{secrets.token_hex(3)}"
            actor = cls.options(num_cpus=pool_cfg.num_cpus, num_gpus=self.gpus_per_actor(role),
                                resources=pool_cfg.resources or None, max_concurrency=1000,
                                name=name, namespace=NAMESPACE,
                                lifetime="detached" if self.detached else None).remote(self.config.to_dict(), name)
            w = Worker(name, role, actor)
            self.pools[role].workers[name] = w
            w.starting = self._spawn(self._start(w, replacement))
            new.append(w)
        return new

    async def _start(self, w: Worker, replacement: bool) -> None:
        try:
            info = await asyncio.wait_for(w.actor.start.remote(), self.config.router.start_timeout_s)
        except asyncio.CancelledError:  # removed while starting (a Scale down, shutdown)
            raise
        except Exception as e:
            why = (f"not ready within {self.config.router.start_timeout_s:g} s (not placeable, or still loading)"
                   if isinstance(e, asyncio.TimeoutError) else f"{type(e).__name__}: {e}")
            self.log.warning(f"start-{w.role}", "worker %s failed to start: %s", w.name, why)
            self.start_failures[w.role] = f"{w.name}: {_root_cause(why)}"
            self._remove(w, kill=True)
            return
        finally:
            w.starting = None
        if self.pools[w.role].workers.get(w.name) is not w:
            return
        w.info = info
        w.state = WorkerState.READY
        w.last_seen = time.monotonic()
        self._backoff[w.role][1] = self.config.router.restart_backoff_s
        if replacement:
            log.info("worker %s replaces a lost %s worker", w.name, w.role)
            self._emit("restarted", w)

    def gpus_per_actor(self, role: str) -> float:
        """The pool's num_gpus, or its default for this Ray cluster (Config.gpus_per_actor)."""
        import ray

        return self.config.gpus_per_actor(role, ray.cluster_resources().get("GPU", 0.0))

    def placeable(self, role: str) -> float:
        """How many more workers of `role` Ray has free resources for now (summed over nodes: an upper bound
        when they are split across nodes)."""
        import ray

        cfg = getattr(self.config, role)
        need = {"CPU": cfg.num_cpus, "GPU": self.gpus_per_actor(role), **cfg.resources}
        free = ray.available_resources()
        n = math.inf
        for key, per in need.items():
            if per > 0:
                n = min(n, math.floor(free.get(key, 0.0) / per + 1e-6))
        return n

    async def scale(self, role: str, replicas: int) -> ScaleResult:
        """Set a pool's size. Growing returns once the new workers are ready or have failed (a joined Ray may
        leave some pending); shrinking returns at once, the removed ready workers draining behind it."""
        if role not in self.pools:
            raise ValueError(f"role must be prefill or decode, got {role!r}")
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        starting: list[asyncio.Task] = []
        async with self._scale_lock:
            pool = self.pools[role]
            prev = len(pool.active())
            if replicas > prev:
                more = replicas - prev
                room = await asyncio.to_thread(self.placeable, role)
                if more > room and not self.detached:
                    cfg = getattr(self.config, role)
                    raise ClusterFull(f"cannot place {more} more {role} workers: Ray has room for {room} "
                                      f"(each needs {cfg.num_cpus:g} CPU, {self.gpus_per_actor(role):g} GPU"
                                      f"{', ' + str(cfg.resources) if cfg.resources else ''}); "
                                      f"the {role} pool stays at {prev}")
                starting = [w.starting for w in self._create(role, more)]
            elif replicas < prev:
                self._shrink(pool, prev - replicas)
            pool.target = replicas
        if starting:
            await asyncio.wait(starting)
        return ScaleResult(prev, len(pool.ready()), len(pool.in_state(WorkerState.STARTING)))

    def _shrink(self, pool: Pool, n: int) -> None:
        """Remove n workers: those not serving first (starting, newest first; unhealthy), then the least loaded."""
        order = (list(reversed(pool.in_state(WorkerState.STARTING))) + pool.in_state(WorkerState.UNHEALTHY)
                 + sorted(pool.ready(), key=lambda w: w.inflight))
        for w in order[:n]:
            if w.state is WorkerState.STARTING:
                if w.starting is not None:
                    w.starting.cancel()
                self._remove(w, kill=True)
            else:
                w.state = WorkerState.DRAINING
                self._spawn(self._retire(w))

    async def _retire(self, w: Worker) -> None:
        try:
            await asyncio.wait_for(w.actor.drain.remote(), self.config.router.call_timeout_s)
        except Exception:  # dead or stalled: its requests fail over, so it need not hear of the drain
            pass
        while w.inflight > 0 and w.name in self.pools[w.role].workers:
            await asyncio.sleep(0.05)
        # a prefill worker stays in flight until its KV was pulled, so no lease is left to strand
        await self._flush_traces([w])
        self._remove(w, kill=True)

    def _remove(self, w: Worker, kill: bool) -> None:
        if self.pools[w.role].workers.get(w.name) is not w:
            return
        del self.pools[w.role].workers[w.name]
        self.index.forget(w.name)
        for f in (w.probe, w.events_probe):
            if f is not None:
                f.cancel()
        if kill:
            import ray

            try:
                ray.kill(w.actor, no_restart=True)
            except Exception:  # already gone
                pass
        self._emit("removed", w)

    def worker_failed(self, w: Worker, exc: BaseException) -> None:
        """A call to `w` failed with `exc` (a request's call, or a probe): a dead actor leaves its pool now."""
        if not actor_dead(exc) or self.pools[w.role].workers.get(w.name) is not w:
            return
        log.warning("worker %s died: %s", w.name, _short(exc))
        self._emit("lost", w)
        self._emit("died", w)
        self._remove(w, kill=True)

    # -- liveness and stats ------------------------------------------------------------------------
    async def refresh_stats(self) -> None:
        """One round of the watch (the router calls it every 0.5 s): start the probes that are not in
        flight, judge liveness, replace lost workers. Never waits on a worker."""
        now = time.monotonic()
        liveness = self.config.router.liveness_timeout_s
        stalled = now - self._last_round > 1.0  # the router itself did not run: answers may be queued unread
        self._last_round = now
        for pool in self.pools.values():
            for w in list(pool.workers.values()):
                if w.state is WorkerState.STARTING:
                    continue
                if w.probe is not None and w.probe.done():  # answered; its callback has not run yet
                    self._stats_done(w, w.probe)
                if w.probe is None:
                    w.probe = self._probe(w, w.actor.stats.remote(), self._stats_done)
                # the workers that prefill publish their prefix cache: the prefill pool, or every worker colocated
                if ((w.role == "prefill" or self.config.colocated) and w.state is WorkerState.READY
                        and w.events_probe is None):
                    w.events_probe = self._probe(w, w.actor.kv_events.remote(self.index.after(w.name)),
                                                 self._events_done)
                if stalled:
                    w.last_seen = max(w.last_seen, now - liveness / 2)
                elif w.state is WorkerState.UNHEALTHY and now - w.last_seen > self.config.router.call_timeout_s:
                    # hung for good: make room for a replacement
                    log.warning("worker %s has not answered for %.0f s: replacing it", w.name, now - w.last_seen)
                    self._emit("died", w)
                    self._remove(w, kill=True)
                elif w.state is WorkerState.READY and now - w.last_seen > liveness:
                    w.state = WorkerState.UNHEALTHY
                    log.warning("worker %s has not answered for %.1f s: unhealthy, routed around", w.name,
                                now - w.last_seen)
                    self._emit("lost", w)
        self._heal(now)

    def _probe(self, w: Worker, ref, done) -> asyncio.Future:
        f = asyncio.ensure_future(ref)
        f.add_done_callback(lambda f: done(w, f))
        return f

    def _stats_done(self, w: Worker, f: asyncio.Future) -> None:
        if w.probe is not f:  # handled already (refresh_stats found it done before its callback ran)
            return
        w.probe = None
        if f.cancelled():
            return
        if f.exception() is not None:
            if actor_dead(f.exception()):
                self.worker_failed(w, f.exception())
            else:  # unreachable for now: liveness decides
                self.log.warning(f"probe-{w.name}", "worker %s did not answer its probe: %s", w.name,
                                 _short(f.exception()))
            return
        w.stats = f.result()
        w.last_seen = time.monotonic()
        if w.state is WorkerState.UNHEALTHY:
            log.warning("worker %s answers again: ready", w.name)
            w.state = WorkerState.READY
            self._emit("back", w)

    def _events_done(self, w: Worker, f: asyncio.Future) -> None:
        w.events_probe = None
        if f.cancelled() or f.exception() is not None:
            return  # the stats probe judges liveness
        if w.name in self.pools[w.role].workers:
            self.index.apply(f.result())

    def _heal(self, now: float) -> None:
        """Replace the workers a pool lost, one backoff step at a time."""
        if self._scale_lock.locked():
            return
        for role, pool in self.pools.items():
            missing = pool.target - len(pool.active())
            nxt, delay = self._backoff[role]
            if missing <= 0 or now < nxt:
                continue
            self._backoff[role] = [now + delay, min(delay * 2, MAX_BACKOFF_S)]
            if not self.detached:
                try:
                    missing = min(missing, self.placeable(role))
                except Exception:  # Ray itself is unreachable: try again after the backoff
                    continue
                if missing <= 0:
                    self.log.warning(f"heal-{role}", "the %s pool is %d below its size; Ray has no room for a "
                                     "replacement yet", role, pool.target - len(pool.active()))
                    continue
            log.warning("replacing %d lost %s worker(s)", missing, role)
            self._create(role, int(missing), replacement=True)

    async def shutdown(self) -> None:
        import ray

        for t in list(self._tasks):
            t.cancel()
        for p in self.pools.values():
            for w in list(p.workers.values()):
                for f in (w.probe, w.events_probe):
                    if f is not None:
                        f.cancel()
        if self.detached:  # they serve the next router on this Ray cluster
            return
        await self._flush_traces([w for p in self.pools.values() for w in p.workers.values()
                                  if w.state is not WorkerState.STARTING])
        for p in self.pools.values():
            for w in list(p.workers.values()):
                try:
                    ray.kill(w.actor, no_restart=True)
                except Exception:
                    pass
            p.workers.clear()
        # the Ray this router started goes with it: its processes are stopped and waited for here, not left
        # to the exit hooks of a process that is going away
        ray.shutdown()

    async def _flush_traces(self, workers: list[Worker]) -> None:
        """With tracing on, have workers about to be killed export the spans they hold (ray.kill runs none of
        their exit hooks); waits at most FLUSH_TRACES_S for whichever answer."""
        if not self.config.tracing.otlp_endpoint or not workers:
            return
        calls = asyncio.gather(*(w.actor.flush_traces.remote() for w in workers), return_exceptions=True)
        try:
            await asyncio.wait_for(calls, FLUSH_TRACES_S)
        except asyncio.TimeoutError:
            log.warning("tracing: not every worker exported its spans within %g s", FLUSH_TRACES_S)


def _root_cause(why: str) -> str:
    """The line of a start failure that names the error: a Ray actor's creation failure carries the worker's
    whole traceback, whose last `SomeError: message` line is the cause (torch.OutOfMemoryError: CUDA out of
    memory...); other failures are one line already."""
    lines = [line.strip() for line in why.strip().splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b:?", line)]
    return (causes[-1] if causes else lines[0] if lines else why)[:300]


def _short(exc: BaseException) -> str:
    """One line of a failure, without Ray's multi-line actor report."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
