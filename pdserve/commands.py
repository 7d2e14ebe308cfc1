"""Cluster-side subcommands: serve, scale (and eval, bench where they are installed)."""
from __future__ import annotations

import asyncio
import logging
import signal


def register(sub) -> None:
    s = sub.add_parser("serve", help="start (or join) Ray, the prefill and decode pools and the gRPC router")
    s.add_argument("--config", default=None, help="YAML config (default: embedded model, 1 prefill + 1 decode)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="unquantized compute dtype of both pools (float32 on CPU is the exactness reference)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto' or HOST:PORT)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("scale", help="set the size of the prefill or decode pool of a running cluster")
    c.add_argument("role", choices=["prefill", "decode"])
    c.add_argument("replicas", type=int)
    c.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the router")
    c.set_defaults(func=cmd_scale)

    from pdserve import demo

    demo.register(sub)
    from pdserve import bench, eval as eval_cmd

    bench.register(sub)
    eval_cmd.register(sub)


def load_serve_config(args):
    from pdserve.config import load_config

    overrides = {}
    if args.dtype:
        overrides["model.dtype"] = args.dtype
    if args.host:
        overrides["router.host"] = args.host
    if args.port is not None:
        overrides["router.port"] = args.port
    if args.ray_address:
        overrides["ray.address"] = args.ray_address
    return load_config(args.config, overrides)


def cmd_serve(args) -> int:
    from pdserve.router.server import serve

    config = load_serve_config(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def ready(port, router):
        pools = router.cluster.pools
        print(f"pdserve: listening on {config.router.host}:{port} (gRPC)"
              + (f", metrics on http://{config.router.host}:{config.router.metrics_port}/metrics"
                 if config.router.metrics_port is not None else ""), flush=True)
        print(f"pdserve: ready: {len(pools['prefill'].ready())} prefill "
              f"({pools['prefill'].ready()[0].info.get('precision') if pools['prefill'].ready() else '-'}), "
              f"{len(pools['decode'].ready())} decode worker(s), model {router.model_path}", flush=True)

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, ready_cb=ready, stop_event=stop)

    asyncio.run(main())
    return 0


def cmd_scale(args) -> int:
    import grpc

    from pdserve.errors import CLIError, EXIT_SERVER
    from pdserve.proto import pb, rpc

    with grpc.insecure_channel(args.server) as ch:
        try:
            r = rpc.PDServeStub(ch).Scale(pb.ScaleRequest(role=args.role, replicas=args.replicas), timeout=600)
        except grpc.RpcError as e:
            raise CLIError(f"scale failed: {e.code().name}: {e.details()}", EXIT_SERVER) from None
    print(f"{args.role}: {r.previous} -> {r.replicas} replicas")
    return 0
