"""The worker pools on Ray: start (or join) Ray, create prefill and decode actors, grow and shrink
each pool at run time (removal drains: no new requests, in-flight ones finish, then the actor exits).
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets

from pdserve.config import Config
from pdserve.router.policy import KVIndex
from pdserve.router.pool import Pool, Worker, WorkerState

log = logging.getLogger("pdserve.cluster")
NAMESPACE = "pdserve"


def init_ray(config: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    # workers import pdserve from the same environment as the router: no source folder goes on their path
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if config.ray.address:
        ray.init(address=config.ray.address, runtime_env=env, log_to_driver=True, namespace=NAMESPACE)
        return
    need = config.prefill.num_cpus * max(config.prefill.replicas, 1) + config.decode.num_cpus * max(config.decode.replicas, 1)
    num_cpus = config.ray.num_cpus or max(int(need + 0.999) + 2, os.cpu_count() or 1)
    # Ray waits 30 s for its GCS and 30 s for its raylet to come up; on the loaded 2-core CI box each was
    # missed once. The GCS wait can be raised; the raylet's has no setting.
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
    # address="local": always a new Ray of our own, even if another one runs on this machine
    ray.init(address="local", num_cpus=num_cpus, runtime_env=env, include_dashboard=False, log_to_driver=True,
             namespace=NAMESPACE,
             configure_logging=True, logging_level=logging.WARNING)


def _actor_class(role: str):
    import ray

    if role == "prefill":
        from pdserve.prefill_worker.worker import PrefillWorker as cls
    else:
        from pdserve.decode_worker.worker import DecodeWorker as cls
    return ray.remote(cls)


class Cluster:
    def __init__(self, config: Config):
        self.config = config
        self.pools = {"prefill": Pool("prefill"), "decode": Pool("decode")}
        self.index = KVIndex()
        # workers outlive the router only on a Ray cluster it joined (so a restarted router adopts
        # them, caches intact); on a Ray it started itself they go down with it
        self.detached = bool(config.ray.address)
        self._counter = 0
        self._tasks: set = set()
        self._scale_lock = asyncio.Lock()

    async def start(self) -> None:
        init_ray(self.config)
        adopted = await self._adopt() if self.detached else {"prefill": 0, "decode": 0}
        await asyncio.gather(*(self._add(role, getattr(self.config, role).replicas - adopted[role])
                               for role in ("prefill", "decode") if not adopted[role]))

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
                info = await actor.start.remote()
            except Exception as e:
                log.warning("cannot adopt worker %s: %s", name, e)
                continue
            self.pools[role].workers[name] = Worker(name, role, actor, state=WorkerState.READY, info=info)
            found[role] += 1
        if any(found.values()):
            log.info("adopted %d prefill and %d decode workers", found["prefill"], found["decode"])
        return found

    async def _add(self, role: str, n: int) -> list[Worker]:
        import ray

        pool_cfg = getattr(self.config, role)
        cls = _actor_class(role)
        new = []
        for _ in range(n):
            self._counter += 1
            name = f"{role}-{self._counter}-{secrets.token_hex(3)}"
            actor = cls.options(num_cpus=pool_cfg.num_cpus, num_gpus=pool_cfg.num_gpus,
                                resources=pool_cfg.resources or None, max_concurrency=1000,
                                name=name, namespace=NAMESPACE,
                                lifetime="detached" if self.detached else None).remote(self.config.to_dict(), name)
            w = Worker(name, role, actor)
            self.pools[role].workers[name] = w
            new.append(w)
        results = await asyncio.gather(*(w.actor.start.remote() for w in new), return_exceptions=True)
        for w, r in zip(new, results):
            if isinstance(r, BaseException):
                log.error("worker %s failed to start: %s", w.name, r)
                self.pools[role].workers.pop(w.name, None)
                ray.kill(w.actor)
            else:
                w.info = r
                w.state = WorkerState.READY
        return [w for w in new if w.state is WorkerState.READY]

    async def scale(self, role: str, replicas: int) -> int:
        """Set a pool's size; returns the previous size. Removal drains the least loaded workers."""
        if role not in self.pools:
            raise ValueError(f"role must be prefill or decode, got {role!r}")
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        async with self._scale_lock:
            pool = self.pools[role]
            prev = len(pool.active())
            if replicas > prev:
                await self._add(role, replicas - prev)
            elif replicas < prev:
                victims = sorted(pool.active(), key=lambda w: w.inflight)[:prev - replicas]
                for w in victims:
                    w.state = WorkerState.DRAINING
                    t = asyncio.get_running_loop().create_task(self._retire(w))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)
            return prev

    async def _retire(self, w: Worker) -> None:
        import ray

        try:
            await w.actor.drain.remote()
        except Exception:
            pass
        while w.inflight > 0:
            await asyncio.sleep(0.05)
        # a prefill worker stays in flight until its KV was pulled, so no lease is left to strand
        self.pools[w.role].workers.pop(w.name, None)
        self.index.forget(w.name)
        ray.kill(w.actor, no_restart=True)

    async def refresh_stats(self) -> None:
        workers = [w for p in self.pools.values() for w in p.workers.values() if w.state is not WorkerState.STARTING]
        results = await asyncio.gather(*(w.actor.stats.remote() for w in workers), return_exceptions=True)
        for w, r in zip(workers, results):
            if isinstance(r, BaseException):
                log.warning("worker %s is not answering: %s", w.name, r)
                if w.state is WorkerState.READY:
                    w.state = WorkerState.DRAINING  # a dead actor takes no new requests
            else:
                w.stats = r
        prefill = self.pools["prefill"].ready()
        events = await asyncio.gather(*(w.actor.kv_events.remote(self.index.after(w.name)) for w in prefill),
                                      return_exceptions=True)
        for w, payload in zip(prefill, events):
            if not isinstance(payload, BaseException):
                self.index.apply(payload)

    async def shutdown(self) -> None:
        import ray

        if self.detached:  # they serve the next router on this Ray cluster
            return
        for p in self.pools.values():
            for w in list(p.workers.values()):
                try:
                    ray.kill(w.actor, no_restart=True)
                except Exception:
                    pass
            p.workers.clear()
