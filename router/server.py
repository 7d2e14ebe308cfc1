"""The gRPC front door: the PDServe servicer (validate and tokenize, then hand the request to
router/dispatch.py and map what comes back with router/proto_map.py), and `serve()`, which starts the
pools, the health and reflection services, metrics and the autoscaler.

A failure of one request ends that request's stream with a status code and never touches the others.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import aclosing

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.config import Config
from pdserve.engine.loader import load_arch, resolve_model_path
from pdserve.engine.sequence import SamplingParams
from pdserve.engine.tokenizer import Tokenizer, prompt_ids
from pdserve.errors import InvalidRequest, NoFreeBlocks
from pdserve.proto import pb, rpc
from pdserve.router.cluster import Cluster
from pdserve.router.dispatch import Dispatcher
from pdserve.router.proto_map import (
    cluster_info,
    model_info,
    response,
    sampling_from_proto,
    status_of,
)

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

    def _admit(self, request) -> tuple[str, list[int], SamplingParams]:
        params = sampling_from_proto(request.sampling)
        which = request.WhichOneof("input")
        ids = prompt_ids(self.tokenizer, self.arch.vocab_size, self.max_model_len,
                         prompt=None if which == "prompt_token_ids" else request.prompt,
                         prompt_token_ids=list(request.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
                         chat=request.chat)
        rid = request.request_id or uuid.uuid4().hex
        active = self.dispatch.active
        if rid in active:
            raise InvalidRequest(f"request id {rid!r} is already in use")
        if len(active) >= self.config.router.max_queued_requests:
            raise NoFreeBlocks(f"the router holds {len(active)} requests, its limit")
        return rid, ids, params

    async def Generate(self, request, context):
        try:
            rid, ids, params = self._admit(request)
        except (InvalidRequest, NoFreeBlocks) as e:
            await context.abort(*status_of(e))
        try:
            # closed here, not whenever it is collected: a stream that ends early frees its blocks now
            async with aclosing(self.dispatch.run(rid, ids, params, request.cache_namespace or None)) as deltas:
                async for d in deltas:
                    yield response(rid, d, ids)
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
        if request.role not in ("prefill", "decode"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role must be prefill or decode")
        if request.replicas < 0 or request.replicas > 256:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "replicas must be in [0, 256]")
        prev = await self.cluster.scale(request.role, request.replicas)
        if self.dispatch.metrics:
            self.dispatch.metrics.scaled(request.role, prev, request.replicas)
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
    metrics = None
    if config.router.metrics_port is not None:
        from pdserve.router.metrics import Metrics, start_http

        metrics = Metrics(cluster)
    router = Router(config, cluster, metrics)
    rpc.add_PDServeServicer_to_server(router, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()  # probes see NOT_SERVING while the pools load
    await cluster.start()
    stats_task = asyncio.get_running_loop().create_task(_refresh(cluster))
    metrics_server = None if metrics is None else start_http(metrics, config.router.host, config.router.metrics_port)
    tasks = [stats_task]
    if config.autoscaling.enabled:
        from pdserve.router.autoscaler import Autoscaler

        tasks.append(asyncio.get_running_loop().create_task(
            Autoscaler(config.autoscaling, cluster, metrics).run()))
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
