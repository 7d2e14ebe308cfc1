"""`pdserve demo`: the two-minute tour. Starts a local cluster on the embedded model (Ray, one
prefill and one decode worker, KV through NIXL, the gRPC router), streams a few requests through
gRPC showing the text as it arrives with TTFT and inter-token latency, then shuts it all down."""
from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time

DEMO_PROMPTS = [
    ("What is the capital of France? Answer in one sentence.", True),
    ("Write a haiku about the sea.", True),
    ("Once upon a time, in a quiet mountain village,", False),
]


def cmd_demo(args) -> int:
    """`pdserve demo` (its arguments: pdserve/commands.py)."""
    import grpc

    from pdserve.client import request_proto, stream_one
    from pdserve.config import load_config
    from pdserve.engine.sequence import SamplingParams
    from pdserve.proto import pb, rpc
    from pdserve.router.server import serve

    config = load_config(args.config, {"router.port": args.port, "router.metrics_port": None,
                                       "router.http_port": None})
    ready = threading.Event()
    state: dict = {}

    def run_server():
        async def main():
            state["stop"] = asyncio.Event()
            state["loop"] = asyncio.get_running_loop()

            def on_ready(port, router):
                state["port"] = port
                ready.set()

            try:
                await serve(config, ready_cb=on_ready, stop_event=state["stop"])
            except BaseException as e:  # surfaced to the main thread below
                state["error"] = e
                ready.set()

        asyncio.run(main())

    print("pdserve demo: starting Ray, 1 prefill + 1 decode worker on the embedded SmolLM2-135M-Instruct ...",
          flush=True)
    t0 = time.monotonic()
    server = threading.Thread(target=run_server, name="pdserve-server", daemon=True)
    server.start()
    ready.wait()
    if "error" in state:
        print(f"pdserve demo: the cluster failed to start: {state['error']}", file=sys.stderr)
        return 4
    addr = f"127.0.0.1:{state['port']}"
    print(f"pdserve demo: cluster ready in {time.monotonic() - t0:.1f} s; router on {addr} (gRPC)\n", flush=True)
    try:
        with grpc.insecure_channel(addr) as ch:
            stub = rpc.PDServeStub(ch)
            info = stub.GetModelInfo(pb.ModelInfoRequest())
            print(f"model {info.architecture}, {info.num_layers} layers, prefill {info.prefill_precision} / "
                  f"decode {info.decode_precision}, KV over NIXL as {info.kv_transfer_dtype}\n")
            params = SamplingParams(max_tokens=args.max_tokens)
            for prompt, chat in DEMO_PROMPTS:
                print(f">>> {prompt}" + ("  [chat]" if chat else ""))
                sys.stdout.write("    ")
                r = stream_one(stub, request_proto({"prompt": prompt, "chat": chat}, params),
                               on_delta=lambda resp: (sys.stdout.write(resp.text.replace("\n", "\n    ")),
                                                      sys.stdout.flush()))
                t = r["timing"]["token_times"]
                itl = [b - a for a, b in zip(t, t[1:])]
                print(f"\n    [{len(r['token_ids'])} tokens, finish={r['finish_reason']}, "
                      f"TTFT {t[0] * 1000:.0f} ms, inter-token p50 {statistics.median(itl) * 1000:.1f} ms"
                      + (f" / p99 {sorted(itl)[int(0.99 * (len(itl) - 1))] * 1000:.1f} ms" if itl else "") + "]\n")
    finally:
        print("pdserve demo: shutting the cluster down", flush=True)
        state["loop"].call_soon_threadsafe(state["stop"].set)
        server.join(timeout=60)
    return 0
