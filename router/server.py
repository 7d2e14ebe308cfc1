"""The gRPC front door: the PDServe servicer (validate and tokenize, then hand the request to
router/dispatch.py and map what comes back with router/proto_map.py), and `serve()`, which starts the
pools, the health and reflection services, metrics and the autoscaler.

A failure of one request ends that request's stream with a status code and never touches the others.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve import tracing
from pdserve.config import Config
from pdserve.engine.loader import load_arch, resolve_model_path
from pdserve.engine.tokenizer import Tokenizer
from pdserve.errors import InvalidRequest, NoFreeBlocks, NoReadyWorker
from pdserve.proto import pb, rpc
from pdserve.router.admission import Admission, Admitted
from pdserve.router.auth import TokenInterceptor, http_guard, load_token
from pdserve.router.cluster import Cluster
from pdserve.router.decoding import DecodingInterceptor
from pdserve.router.dispatch import Dispatcher
from pdserve.router.drain import drain
from pdserve.router.health import PoolHealth
from pdserve.router.listeners import grpc_port, tcp_socket
from pdserve.router.metrics import request_arrived
from pdserve.router.proto_map import (
    cluster_info,
    model_info,
    response,
    sampling_from_proto,
    status_of,
)
from pdserve.router.tls import grpc_credentials, load_tls, uvicorn_options

log = logging.getLogger("pdserve.router")
SERVICE = "pdserve.v1.PDServe"


class Router(rpc.PDServeServicer):
    def __init__(self, config: Config, cluster: Cluster, metrics=None):
        self.config = config
        self.cluster = cluster
        path = resolve_model_path(config.model.path)
        self.model_path = path
        self.arch = load_arch(path)
        self.tokenizer = Tokenizer(path)
        self.max_model_len = min(config.model.max_model_len or self.arch.max_position_embeddings,
                                 self.arch.max_position_embeddings)
        self.dispatch = Dispatcher(config, cluster, metrics)
        self.admission = Admission(config, self.tokenizer, self.arch.vocab_size, self.max_model_len, self.dispatch)

    async def _admit(self, request) -> Admitted:
        which = request.WhichOneof("input")
        return await self.admission.admit(
            sampling_from_proto(request.sampling), chat=request.chat,
            prompt=None if which == "prompt_token_ids" else request.prompt,
            prompt_token_ids=request.prompt_token_ids.ids if which == "prompt_token_ids" else None,
            request_id=request.request_id, namespace=request.cache_namespace)

    async def Generate(self, request, context):
        request_arrived()
        if tracing.enabled():  # a traceparent in the call's metadata is its parent
            tracing.begin_request("grpc", context.invocation_metadata() or ())
        try:
            req = await self._admit(request)
        except (InvalidRequest, NoFreeBlocks, NoReadyWorker) as e:  # NoReadyWorker: draining
            self.dispatch.refused(e)
            await context.abort(*status_of(e))
        try:
            # closed here, not whenever it is collected: a stream that ends early frees its blocks now
            async with aclosing(self.dispatch.run(req.rid, req.ids, req.params, req.namespace)) as deltas:
                async for d in deltas:
                    yield response(req.rid, d, req.ids)
        except Exception as e:
            await context.abort(*status_of(e))

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

    async def Abort(self, request, context):
        return pb.AbortResponse(found=await self.dispatch.abort(request.request_id))

    async def GetModelInfo(self, request, context):
        return model_info(self.config, self.arch, self.model_path, self.max_model_len, self.cluster.pools)

    async def GetClusterInfo(self, request, context):
        return cluster_info(self.cluster.pools)

    async def Scale(self, request, context):
        if self.admission.closed is not None:  # draining: the pools stay as they are until they stop
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.admission.closed)
        if request.role not in ("prefill", "decode"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role must be prefill or decode")
        if request.replicas < 0 or request.replicas > 256:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "replicas must be in [0, 256]")
        if request.role not in self.config.roles() and request.replicas:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"mode {self.config.mode} has no {request.role} pool")
        try:
            r = await self.cluster.scale(request.role, request.replicas)
        except NoFreeBlocks as e:  # ClusterFull: Ray cannot place them; the pool is as it was
            await context.abort(*status_of(e))
        if self.dispatch.metrics:
            self.dispatch.metrics.scaled(request.role, r.previous, request.replicas)
        return pb.ScaleResponse(previous=r.previous, replicas=request.replicas, ready=r.ready, pending=r.pending)


async def serve(config: Config, ready_cb=None, stop_event: asyncio.Event | None = None) -> None:
    """Start the pools and the gRPC server; run until `stop_event` is set (or forever)."""
    tracing.setup(config.tracing, "router")  # off (and nothing imported) unless tracing.otlp_endpoint is set
    cluster = Cluster(config)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    tls, token = load_tls(config), load_token(config)  # a bad file fails here, before any port or Ray
    # the token is checked before a request's bytes are parsed; undecodable bytes are INVALID_ARGUMENT
    guards = ([] if token is None else [TokenInterceptor(token)]) + [DecodingInterceptor()]
    server = grpc.aio.server(interceptors=guards, options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # every port is claimed now: a taken one fails in a line, before the model, Ray or a worker loads
    port = grpc_port(server, config.router.host, config.router.port, tls and grpc_credentials(tls))
    sockets = _http_sockets(config)
    metrics = None
    if config.router.metrics_port is not None or config.router.http_port is not None:
        from pdserve.router.metrics import Metrics
        from pdserve.router.openai_map import served_model_name

        metrics = Metrics(cluster, served_model_name(config))
    router = Router(config, cluster, metrics)
    rpc.add_PDServeServicer_to_server(router, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    pool_health = PoolHealth(health_servicer, SERVICE, config.roles())
    await pool_health.publish(cluster.pools)  # NOT_SERVING while the pools load; "liveness" SERVING
    await server.start()  # probes see NOT_SERVING while the pools load
    http_servers = await _start_http(config, router, metrics, sockets, tls, token)  # /ready: 503 while they load
    tasks: list[asyncio.Task] = []
    try:
        if not await _started(cluster, stop_event):
            return  # stopped while the pools loaded: nothing to drain, and what started stops below
        tasks.append(asyncio.get_running_loop().create_task(_refresh(cluster, pool_health)))
        if config.autoscaling.enabled:
            from pdserve.router.autoscaler import Autoscaler

            tasks.append(asyncio.get_running_loop().create_task(
                Autoscaler(config.autoscaling, cluster, metrics).run()))
        await pool_health.publish(cluster.pools)
        if ready_cb is not None:
            ready_cb(port, router)
        if stop_event is None:
            await server.wait_for_termination()
        else:
            await stop_event.wait()
            for t in tasks[1:]:  # the autoscaler: the pools keep their size while they drain
                t.cancel()
            await drain(router, pool_health, config.router.drain_timeout_s)
    finally:
        for t in tasks:
            t.cancel()
        await pool_health.stop()
        await server.stop(grace=2)
        for h in http_servers:
            await h.stop()
        router.admission.close()
        router.dispatch.channels.stop()  # before the workers go: their channels end with nothing to say
        await cluster.shutdown()  # the workers export their spans first
        await asyncio.to_thread(tracing.shutdown)


async def _started(cluster: Cluster, stop_event: asyncio.Event | None) -> bool:
    """Start the pools; False when `stop_event` is set first (a SIGTERM while the workers load), the start then
    cancelled."""
    start = asyncio.ensure_future(cluster.start())
    if stop_event is None:
        await start
        return True
    stop = asyncio.ensure_future(stop_event.wait())
    try:
        await asyncio.wait((start, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not start.done():
            start.cancel()
    if not start.cancelled() and start.done():
        start.result()  # raises what stopped the start
        return True
    await asyncio.gather(start, return_exceptions=True)  # the workers it created stop with the cluster
    return False


def _http_sockets(config: Config) -> dict:
    """The sockets of the HTTP ports the config turns on, bound: {config key: socket}."""
    sockets = {}
    try:
        for key in ("http_port", "metrics_port"):
            if getattr(config.router, key) is not None:
                sockets[key] = tcp_socket(config.router.host, getattr(config.router, key), key)
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    return sockets


async def _start_http(config: Config, router: Router, metrics, sockets: dict, tls, token) -> list:
    """The OpenAI HTTP server (router.http_port; TLS and the token as the gRPC door) and the metrics-only one
    (router.metrics_port; plain and open, router/tls.py says why), on their claimed sockets; their bound ports
    go on the router for whoever reports them."""
    from pdserve.router.http_server import HTTPServer, metrics_app, openai_app

    servers = []
    router.http_port = router.metrics_port = None
    try:
        if "http_port" in sockets:
            app = openai_app(router, metrics)
            servers.append(HTTPServer(app if token is None else http_guard(app, token), sockets["http_port"],
                                      uvicorn_options(tls)))
            router.http_port = servers[-1].port
        if "metrics_port" in sockets:
            servers.append(HTTPServer(metrics_app(metrics, router), sockets["metrics_port"]))
            router.metrics_port = servers[-1].port
        for h in servers:
            await h.start()
    except BaseException:
        for h in servers:
            await h.stop()
        raise
    return servers


async def _refresh(cluster: Cluster, pool_health: PoolHealth) -> None:
    while True:
        try:
            await cluster.refresh_stats()  # never waits on a worker (liveness, router/cluster.py)
            await pool_health.publish(cluster.pools)
        except Exception as e:  # never let the watch stop the router
            cluster.log.warning("refresh", "pool refresh failed: %s", e)
        await asyncio.sleep(0.5)
