"""The gRPC front door: validates and tokenizes, picks a prefill and a decode worker, runs the
request through both and streams the decode worker's deltas back.

Status codes: INVALID_ARGUMENT for bad input, RESOURCE_EXHAUSTED when full, UNAVAILABLE when a
pool has no ready worker; a failure of one request never touches the others.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.engine.block_hash import block_hashes
from pdserve.errors import NoFreeBlocks
from pdserve.engine.loader import load_arch, resolve_model_path
from pdserve.engine.prompt import prompt_ids
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequest
from pdserve.engine.tokenizer import Tokenizer
from pdserve.config import Config
from pdserve.proto import pb, rpc
from pdserve.router.cluster import Cluster
from pdserve.router.policy import make_policy

log = logging.getLogger("pdserve.router")
SERVICE = "pdserve.v1.PDServe"


def sampling_from_proto(s) -> SamplingParams:
    kw = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "logprobs"):
        if s.HasField(name):
            kw[name] = getattr(s, name)
    if kw.get("seed") is not None and kw["seed"] >= 2**63:
        raise InvalidRequest("seed must be < 2^63")
    return SamplingParams(stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos, **kw)


def _cause(exc: BaseException) -> BaseException:
    """The worker-side exception inside a Ray error."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class Router(rpc.PDServeServicer):
    def __init__(self, config: Config, cluster: Cluster):
        self.config = config
        self.cluster = cluster
        path = resolve_model_path(config.model.path)
        self.model_path = path
        self.arch = load_arch(path)
        self.tokenizer = Tokenizer(path)
        self.max_model_len = min(config.model.max_model_len or self.arch.max_position_embeddings,
                                 self.arch.max_position_embeddings)
        self.active: dict[str, tuple] = {}  # request id -> (prefill worker, decode worker)
        self.policy = make_policy(config.router.policy, cluster.index, config.router.load_balance_slack)
        self.metrics = None  # set by serve() when metrics are enabled

    # -- admission --------------------------------------------------------------------------------
    def _admit(self, request) -> tuple[str, list[int], SamplingParams]:
        params = sampling_from_proto(request.sampling)
        which = request.WhichOneof("input")
        ids = prompt_ids(self.tokenizer, self.arch.vocab_size, self.max_model_len,
                         prompt=None if which == "prompt_token_ids" else request.prompt,
                         prompt_token_ids=list(request.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
                         chat=request.chat)
        rid = request.request_id or uuid.uuid4().hex
        if rid in self.active:
            raise InvalidRequest(f"request id {rid!r} is already in use")
        if len(self.active) >= self.config.router.max_queued_requests:
            raise NoFreeBlocks(f"the router holds {len(self.active)} requests, its limit")
        return rid, ids, params

    # -- RPCs -------------------------------------------------------------------------------------
    async def Generate(self, request, context):
        try:
            rid, ids, params = self._admit(request)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except NoFreeBlocks as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        async for resp in self._run(rid, ids, params, request, context):
            yield resp

    async def GenerateUnary(self, request, context):
        final = pb.GenerateResponse()
        async for resp in self.Generate(request, context):
            final.request_id = resp.request_id
            final.token_ids.extend(resp.token_ids)
            final.text += resp.text
            final.logprobs.extend(resp.logprobs)
            final.prefill_worker = final.prefill_worker or resp.prefill_worker
            final.decode_worker = final.decode_worker or resp.decode_worker
            if resp.finish_reason:
                final.finish_reason = resp.finish_reason
                final.usage.CopyFrom(resp.usage)
        return final

    async def _run(self, rid, ids, params, request, context):
        pools = self.cluster.pools
        namespace = request.cache_namespace or None
        bs = self.config.engine.block_size
        hashes = block_hashes(ids[:-1], bs, namespace)  # the blocks a prefill worker can cache
        P = self.policy.pick(pools["prefill"].ready(), len(ids), hashes, bs)
        D = pools["decode"].pick()
        if P is None or D is None:
            empty = "prefill" if P is None else "decode"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the {empty} pool has no ready worker")
        self.active[rid] = (P, D)
        # the prefill worker counts as busy until the decode side has pulled the KV (first delta)
        uncached = len(ids) - min(self.cluster.index.overlap(P.name, hashes) * bs, len(ids))
        P.inflight += 1
        P.queued_tokens += uncached
        self.cluster.index.expect(P.name, hashes)
        D.inflight += 1
        in_prefill, holding_prefill, finished = True, True, False
        t0 = time.monotonic()
        m = self.metrics
        if m:
            m.request_started()
        try:
            prefill = await P.actor.prefill.remote(rid, ids, namespace)
            P.queued_tokens -= uncached
            in_prefill = False
            if m:
                m.prefill_done(P, prefill, len(ids))
            gen = D.actor.generate.options(num_returns="streaming").remote(rid, ids, params.to_dict(), prefill)
            first, last = True, None
            async for ref in gen:
                d = await ref
                if holding_prefill:
                    P.inflight -= 1
                    holding_prefill = False
                now = time.monotonic()
                if m:
                    m.token_delta(first, now - (last or t0), len(d["token_ids"]))
                last = now
                resp = pb.GenerateResponse(request_id=rid, token_ids=d["token_ids"], text=d["text"])
                for lp, top in d["logprobs"]:
                    resp.logprobs.add(logprob=lp, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top])
                if first:
                    resp.prefill_worker, resp.decode_worker = P.name, D.name
                    resp.prompt_token_ids.extend(ids)
                    first = False
                if d["finished"]:
                    finished = True
                    resp.finish_reason = d["finish_reason"]
                    resp.usage.CopyFrom(pb.Usage(prompt_tokens=d["prompt_tokens"],
                                                 completion_tokens=d["completion_tokens"],
                                                 cached_tokens=d["cached_tokens"]))
                    if m:
                        m.request_finished(time.monotonic() - t0, d)
                yield resp
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a worker-side error: map it, keep serving others
            cause = _cause(e)
            log.warning("request %s failed: %s", rid, cause)
            if isinstance(cause, InvalidRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(cause))
            if isinstance(cause, NoFreeBlocks):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(cause))
            await context.abort(grpc.StatusCode.UNAVAILABLE if "Actor" in type(e).__name__
                                else grpc.StatusCode.INTERNAL, f"{type(cause).__name__}: {cause}")
        finally:
            if in_prefill:
                P.queued_tokens -= uncached
            if holding_prefill:
                P.inflight -= 1
            D.inflight -= 1
            self.active.pop(rid, None)
            if not finished:  # client cancelled, error or abort: free the blocks on both sides
                self._abort_workers(rid, P, D)
                if m:
                    m.request_aborted()

    def _abort_workers(self, rid, P, D) -> None:
        for w in (P, D):
            try:
                w.actor.abort.remote(rid)
            except Exception:  # the actor is gone; its blocks went with it
                pass

    async def Abort(self, request, context):
        pair = self.active.get(request.request_id)
        if pair is None:
            return pb.AbortResponse(found=False)
        refs = [w.actor.abort.remote(request.request_id) for w in pair]
        await asyncio.gather(*refs, return_exceptions=True)
        return pb.AbortResponse(found=True)

    async def GetModelInfo(self, request, context):
        a = self.arch
        precisions = {r: next((w.info.get("precision") for w in p.ready()), getattr(self.config, r).precision)
                      for r, p in self.cluster.pools.items()}
        return pb.ModelInfo(model=self.model_path, architecture=a.model_type, vocab_size=a.vocab_size,
                            max_model_len=self.max_model_len, num_layers=a.num_layers, hidden_size=a.hidden_size,
                            prefill_precision=precisions["prefill"], decode_precision=precisions["decode"],
                            kv_transfer_dtype=self.config.kv_transfer.dtype,
                            block_size=self.config.engine.block_size, eos_token_ids=sorted(a.eos_token_ids))

    async def GetClusterInfo(self, request, context):
        info = pb.ClusterInfo(prefill_replicas=len(self.cluster.pools["prefill"].active()),
                              decode_replicas=len(self.cluster.pools["decode"].active()))
        for p in self.cluster.pools.values():
            for w in p.workers.values():
                s = w.stats
                info.workers.add(name=w.name, role=w.role, state=w.state, num_waiting=s.get("num_waiting", 0),
                                 num_running=s.get("num_running", 0), kv_cache_usage=s.get("kv_cache_usage", 0.0),
                                 num_free_blocks=s.get("num_free_blocks", 0), inflight=w.inflight)
        return info

    async def Scale(self, request, context):
        if request.role not in ("prefill", "decode"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role must be prefill or decode")
        if request.replicas < 0 or request.replicas > 256:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "replicas must be in [0, 256]")
        prev = await self.cluster.scale(request.role, request.replicas)
        if self.metrics:
            self.metrics.scaled(request.role, prev, request.replicas)
        return pb.ScaleResponse(previous=prev, replicas=request.replicas)


async def serve(config: Config, ready_cb=None, stop_event: asyncio.Event | None = None) -> None:
    """Start the pools and the gRPC server; run until `stop_event` is set (or forever)."""
    cluster = Cluster(config)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    addr = f"{config.router.host}:{config.router.port}"
    port = server.add_insecure_port(addr)
    if port == 0:
        raise RuntimeError(f"cannot listen on {addr}")
    router = Router(config, cluster)
    rpc.add_PDServeServicer_to_server(router, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()  # probes see NOT_SERVING while the pools load
    await cluster.start()
    stats_task = asyncio.get_running_loop().create_task(_refresh(cluster))
    metrics_server = None
    if config.router.metrics_port is not None:
        from pdserve.router.metrics import Metrics, start_http

        router.metrics = Metrics(cluster)
        metrics_server = start_http(router.metrics, config.router.host, config.router.metrics_port)
    tasks = [stats_task]
    if config.autoscaling.enabled:
        from pdserve.router.autoscaler import Autoscaler

        tasks.append(asyncio.get_running_loop().create_task(
            Autoscaler(config.autoscaling, cluster, router.metrics).run()))
    ready = bool(cluster.pools["prefill"].ready() and cluster.pools["decode"].ready())
    status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
    await health_servicer.set("", status)
    await health_servicer.set(SERVICE, status)
    if ready_cb is not None:
        ready_cb(port, router)
    try:
        if stop_event is None:
            await server.wait_for_termination()
        else:
            await stop_event.wait()
    finally:
        for t in tasks:
            t.cancel()
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace=2)
        if metrics_server is not None:
            metrics_server.shutdown()
        await cluster.shutdown()


async def _refresh(cluster: Cluster) -> None:
    while True:
        try:
            await cluster.refresh_stats()
        except Exception as e:  # stats are advisory; never let them stop the router
            log.warning("stats refresh failed: %s", e)
        await asyncio.sleep(0.5)
