"""`pdserve demo`: the two-minute tour. Starts a local cluster on the embedded model (Ray, one prefill and one
decode worker, KV through NIXL, the gRPC router), streams a few requests through gRPC showing the text as it
arrives with TTFT and inter-token latency, then shuts it all down.

The cluster runs on this process's main thread, as under `pdserve serve` (ray.init sets up its signal handling only
there, and warns when called elsewhere); the tour is a gRPC client on a thread of its own. Ctrl-C lets the answer
streaming at that moment finish, then stops the workers and Ray (exit code 130)."""
from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time

from pdserve.errors import EXIT_MODEL, EXIT_SERVER, CLIError, ModelLoadError

DEMO_PROMPTS = [
    ("What is the capital of France? Answer in one sentence.", True),
    ("Write a haiku about the sea.", True),
    ("Once upon a time, in a quiet mountain village,", False),
]


def cmd_demo(args) -> int:
    """`pdserve demo` (its arguments: pdserve/commands.py)."""
    from pdserve.config import load_config

    config = load_config(args.config, {"router.port": args.port, "router.metrics_port": None,
                                       "router.http_port": None})
    model = config.model.path or "the embedded SmolLM2-135M-Instruct"
    pools = (f"{config.decode.replicas} colocated worker(s)" if config.colocated else
             f"{config.prefill.replicas} prefill + {config.decode.replicas} decode worker(s)")
    print(f"pdserve demo: starting Ray, {pools} on {model} ...", flush=True)
    return asyncio.run(_demo(config, args.max_tokens))


async def _demo(config, max_tokens: int) -> int:
    from pdserve.router.server import serve

    t0 = time.monotonic()
    stop, cancelled = asyncio.Event(), threading.Event()
    ready = asyncio.get_running_loop().create_future()
    server = asyncio.ensure_future(serve(config, ready_cb=lambda port, router: ready.set_result(port),
                                         stop_event=stop))
    try:
        await asyncio.wait((server, ready), return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():  # serve() ended before the cluster was up: its error, in one line
            error = None if server.cancelled() else server.exception()
            why = _one_line(error) if error is not None else "it stopped"
            raise CLIError(f"the cluster failed to start: {why}",
                           EXIT_MODEL if isinstance(error, ModelLoadError) else EXIT_SERVER)
        addr = f"127.0.0.1:{ready.result()}"
        print(f"pdserve demo: cluster ready in {time.monotonic() - t0:.1f} s; router on {addr} (gRPC)\n", flush=True)
        tour = asyncio.ensure_future(asyncio.to_thread(_tour, addr, max_tokens, cancelled))
        try:
            await asyncio.shield(tour)
        except asyncio.CancelledError:  # Ctrl-C: the answer streaming now ends, and no other request starts
            cancelled.set()
            await asyncio.gather(tour, return_exceptions=True)
            raise
    finally:
        if not server.done():
            print("pdserve demo: shutting the cluster down", flush=True)
            stop.set()
        await asyncio.gather(server, return_exceptions=True)  # the workers and Ray stopped and waited for
    return 0


def _tour(addr: str, max_tokens: int, cancelled: threading.Event) -> None:
    import grpc

    from pdserve.client import ServerError, request_proto, stream_one
    from pdserve.engine.sequence import SamplingParams
    from pdserve.proto import pb, rpc

    with grpc.insecure_channel(addr) as ch:
        stub = rpc.PDServeStub(ch)
        try:
            info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=60)
        except grpc.RpcError as e:
            raise CLIError(f"GetModelInfo failed: {e.code().name}: {e.details()}", EXIT_SERVER) from None
        print(f"model {info.architecture}, {info.num_layers} layers, prefill {info.prefill_precision} / "
              f"decode {info.decode_precision}, KV over NIXL as {info.kv_transfer_dtype}\n")
        params = SamplingParams(max_tokens=max_tokens)
        for prompt, chat in DEMO_PROMPTS:
            if cancelled.is_set():
                return
            print(f">>> {prompt}" + ("  [chat]" if chat else ""))
            sys.stdout.write("    ")
            try:
                r = stream_one(stub, request_proto({"prompt": prompt, "chat": chat}, params),
                               on_delta=lambda resp: (sys.stdout.write(resp.text.replace("\n", "\n    ")),
                                                      sys.stdout.flush()))
            except ServerError as e:
                print()
                raise CLIError(f"request failed: {e}", EXIT_SERVER) from None
            t = r["timing"]["token_times"]
            itl = [b - a for a, b in zip(t, t[1:])]
            print(f"\n    [{len(r['token_ids'])} tokens, finish={r['finish_reason']}, "
                  f"TTFT {t[0] * 1000:.0f} ms, inter-token p50 {statistics.median(itl) * 1000:.1f} ms"
                  + (f" / p99 {sorted(itl)[int(0.99 * (len(itl) - 1))] * 1000:.1f} ms" if itl else "") + "]\n")


def _one_line(e: BaseException) -> str:
    """A failure as one line (Ray's errors span many)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
