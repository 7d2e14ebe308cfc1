"""The subcommands beside `generate`: serve and scale, which run the cluster, and demo, bench and eval,
whose code (pdserve/tools/) is imported only when one of them runs, so `pdserve serve` never loads it."""
from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal


def register(sub) -> None:
    s = sub.add_parser("serve", help="start (or join) Ray, the prefill and decode pools and the router (gRPC and "
                                     "OpenAI-compatible HTTP)")
    s.add_argument("model", nargs="?", default=None,
                   help="HF model directory or .gguf file, as `vllm serve MODEL` (overrides the config's model.path; "
                        "default: the embedded SmolLM2)")
    s.add_argument("--config", default=None, help="YAML config (default: embedded model, 1 prefill + 1 decode)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="unquantized compute dtype of both pools (float32 on CPU is the exactness reference)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None, help="gRPC port (default 50051)")
    s.add_argument("--http-port", type=int, default=None,
                   help="OpenAI-compatible HTTP port, with /metrics, /health and /ready (default 8000; -1: off)")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics (and the probes' /health, /ready) on plain HTTP (default 9400; -1: off)")
    s.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto' or HOST:PORT)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("scale", help="set the size of the prefill or decode pool of a running cluster")
    c.add_argument("role", choices=["prefill", "decode"])
    c.add_argument("replicas", type=int)
    c.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the router")
    from pdserve.client import add_credential_args

    add_credential_args(c)
    c.set_defaults(func=cmd_scale)

    register_demo(sub)
    register_bench(sub)
    register_eval(sub)
    from pdserve.planner import commands as planner  # profile, plan: only argparse until one of them runs

    planner.register(sub)


def _tool(name: str):
    """`pdserve.tools.<name>.cmd_<name>`, imported when the subcommand runs rather than when the parser is built."""
    def run(args) -> int:
        return getattr(importlib.import_module(f"pdserve.tools.{name}"), f"cmd_{name}")(args)
    return run


def register_demo(sub) -> None:
    d = sub.add_parser("demo", help="start a local cluster, stream a few requests through gRPC, shut down")
    d.add_argument("--config", default=None, help="YAML config (default: embedded model, 1 prefill + 1 decode)")
    d.add_argument("--max-tokens", type=int, default=48)
    d.add_argument("--port", type=int, default=0, help="router port (0: any free port)")
    d.set_defaults(func=_tool("demo"))


def register_bench(sub) -> None:
    b = sub.add_parser("bench", help="serving benchmark against a running router",
                       description="Send a seeded workload to a pdserve router over gRPC and report throughput, "
                                   "TTFT/TPOT/ITL/end-to-end percentiles, goodput and prefix hit rates.")
    b.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the router")
    from pdserve.client import add_credential_args

    add_credential_args(b.add_argument_group("a router that needs TLS or a token (gRPC and --http)"))
    b.add_argument("--http", default=None, metavar="URL",
                   help="drive an OpenAI-compatible HTTP server at URL (e.g. http://127.0.0.1:8000) with streamed "
                        "/v1/completions instead of gRPC (no cluster samples, no token ids to save or compare)")
    b.add_argument("--workload", choices=["random", "shared-prefix"], default="random")
    b.add_argument("--num-requests", type=int, default=None,
                   help="measured requests (default: 100 for random, prefixes x users for shared-prefix)")
    b.add_argument("--warmup", type=int, default=0, help="requests sent first and not counted (random prompts)")
    b.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths, order and arrivals")
    b.add_argument("--max-tokens", default="64", help="output tokens per request: N or LO:HI (uniform)")
    b.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max-tokens (default on)")
    b.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    b.add_argument("--sampling-seed", type=int, default=None, help="sampling seed sent with every request")
    g = b.add_argument_group("random workload")
    g.add_argument("--input-len", default="128:512", help="prompt tokens: N or LO:HI (uniform)")
    g.add_argument("--prompt-format", choices=["ids", "text"], default="ids",
                   help="ids: exact lengths; text: random words (the server's tokenizer sets the length)")
    g = b.add_argument_group("shared-prefix workload")
    g.add_argument("--num-prefixes", type=int, default=8, help="system prompts")
    g.add_argument("--users-per-prefix", type=int, default=8, help="users per system prompt")
    g.add_argument("--prefix-len", type=int, default=512, help="tokens of each system prompt")
    g.add_argument("--suffix-len", default="16:48", help="user-specific tokens: N or LO:HI")
    b.add_argument("--vocab-range", default=None,
                   help="LO:HI token ids to sample (default 100:min(30000, vocab_size) from GetModelInfo)")
    g = b.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrivals per second (default inf: all at once)")
    g.add_argument("--concurrency", type=int, default=None, help="at most this many in flight (closed loop)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument("--connect-timeout", type=float, default=10.0)
    g.add_argument("--cluster-poll", type=float, default=1.0,
                   help="seconds between GetClusterInfo samples (pool sizes while it runs)")
    g = b.add_argument_group("report")
    g.add_argument("--goodput-ttft", type=float, default=None, help="goodput target: TTFT seconds")
    g.add_argument("--goodput-tpot", type=float, default=None, help="goodput target: TPOT seconds")
    g.add_argument("--json", action="store_true", help="one JSON object with everything, on stdout")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g.add_argument("--save-outputs", default=None, metavar="FILE",
                   help="write one JSON line per measured request (tokens, timings, workers)")
    g.add_argument("--compare-outputs", default=None, metavar="FILE",
                   help="compare each request's tokens with a --save-outputs file of the same workload and seed")
    b.set_defaults(func=_tool("bench"))


# `pdserve eval`'s defaults live here, not in pdserve.tools.eval (which imports torch); tests/unit/test_eval.py
# checks them, and the "at most 32" of --num-prompts, against that module.
DEFAULT_EVAL_CONFIGS = ("bf16/bf16/bf16,bf16/bf16/fp8,fp8/bf16/bf16,fp8/bf16/fp8,"
                        "nvfp4/bf16/bf16,nvfp4/bf16/fp8,nvfp4/nvfp4/bf16,nvfp4/nvfp4/fp8")


def register_eval(sub) -> None:
    from pdserve.config import EngineConfig, KVTransferConfig

    e = sub.add_parser("eval", help="accuracy of prefill/decode precision configurations vs the unquantized baseline")
    e.add_argument("--configs", default=DEFAULT_EVAL_CONFIGS,
                   help="comma-separated PREFILL/DECODE/WIRE, precisions bf16|fp8|nvfp4, wire bf16|fp8 "
                        "(default: the 8 configurations of issue 4)")
    e.add_argument("--num-prompts", type=int, default=24, help="prompts from the fixed set (at most 32)")
    e.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt (EOS stops earlier)")
    e.add_argument("--ppl-windows", type=int, default=16, help="text windows for perplexity (0: skip)")
    e.add_argument("--ppl-prefix", type=int, default=256, help="tokens of each window prefilled at P")
    e.add_argument("--ppl-tokens", type=int, default=256, help="tokens of each window scored at D")
    e.add_argument("--text", default=None, help="UTF-8 text file for perplexity (default: alice29.txt, "
                                                "see pdserve/tools/eval_text.py)")
    e.add_argument("--refresh-sink-tokens", type=int, default=KVTransferConfig.refresh_sink_tokens,
                   help="first prompt tokens the decode side recomputes where the KV is not its own (fp8 wire "
                        "or P != D), as config kv_transfer.refresh_sink_tokens (0: off)")
    e.add_argument("--fp8-attention-min-tokens", type=int, default=EngineConfig.fp8_attention_min_tokens,
                   help="fp8 engines run attention's matmuls in fp8 on prompt chunks of at least this many tokens, "
                        "as config engine.fp8_attention_min_tokens (0: every prompt step; the default leaves "
                        "this harness's short prompts in bf16 attention)")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="auto",
                   help="compute dtype of every engine; auto: float32 on CPU, bfloat16 on CUDA")
    e.add_argument("--model", default=None, help="HF model directory or .gguf file (default: embedded SmolLM2)")
    e.add_argument("--out-dir", default=None, help="write eval.md, eval.json and eval.png here")
    e.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    e.set_defaults(func=_tool("eval"))


def load_serve_config(args):
    from pdserve.config import load_config

    overrides = {}
    if args.dtype:
        overrides["model.dtype"] = args.dtype
    if args.host:
        overrides["router.host"] = args.host
    if args.port is not None:
        overrides["router.port"] = args.port
    if args.http_port is not None:
        overrides["router.http_port"] = None if args.http_port < 0 else args.http_port
    if args.metrics_port is not None:
        overrides["router.metrics_port"] = None if args.metrics_port < 0 else args.metrics_port
    if args.model is not None:
        overrides["model.path"] = args.model
    if args.ray_address:
        overrides["ray.address"] = args.ray_address
    return load_config(args.config, overrides)


def cmd_serve(args) -> int:
    from pdserve.router.server import serve

    config = load_serve_config(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def ready(port, router):
        pools = router.cluster.pools
        host = config.router.host
        tls = config.router.tls_cert_file is not None
        print(f"pdserve: listening on {host}:{port} (gRPC{', TLS' if tls else ''})"
              + (f", http{'s' if tls else ''}://{host}:{router.http_port}/v1 (OpenAI HTTP)"
                 if router.http_port is not None else "")
              + (f", metrics on http://{host}:{router.metrics_port}/metrics" if router.metrics_port is not None
                 else ""), flush=True)
        def pool(role):
            ready = pools[role].ready()
            return f"{len(ready)} {role} ({ready[0].info.get('precision') if ready else '-'})"
        workers = (f"{pool('decode')} worker(s), colocated (each prefills and decodes)" if config.colocated
                   else f"{pool('prefill')}, {pool('decode')} worker(s)")
        print(f"pdserve: ready: {workers}, model {router.model_path}", flush=True)

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, ready_cb=ready, stop_event=stop)

    from pdserve.errors import EXIT_MODEL, EXIT_SERVER, CLIError, ModelLoadError, PoolStartFailed

    try:
        asyncio.run(main())
    except ModelLoadError as e:  # the router loads the tokenizer and the architecture before any worker
        raise CLIError(str(e), EXIT_MODEL) from None
    except PoolStartFailed as e:
        raise CLIError(f"the cluster failed to start: {e}", EXIT_SERVER) from None
    return 0


def cmd_scale(args) -> int:
    import grpc

    from pdserve.client import credentials_from_args
    from pdserve.errors import EXIT_SERVER, CLIError
    from pdserve.proto import pb, rpc

    with credentials_from_args(args).channel(args.server) as ch:
        try:
            r = rpc.PDServeStub(ch).Scale(pb.ScaleRequest(role=args.role, replicas=args.replicas), timeout=600)
        except grpc.RpcError as e:
            raise CLIError(f"scale failed: {e.code().name}: {e.details()}", EXIT_SERVER) from None
    print(f"{args.role}: {r.previous} -> {r.replicas} replicas")
    return 0
